#!/usr/bin/env python
"""Pipeline-parallel early-exit decoding (EE-LLM's method) vs one process, side by side.

    python benchmarks/pipeline_decode.py [--pp 2] [--new-tokens 64]

The same random fp32 model (8 layers, hidden 512, vocabulary 8192, exits after layers 2, 4
and 6) decodes the same prompts in this process and then under `torchrun` with
`--pipeline-model-parallel-size` stages (gloo, 1 thread per process; the single process gets
as many threads as the pipeline has processes), for full decoding and
for early exit at threshold 0 (every token leaves at layer 2: the pipeline's best case, since
stage 0 gets its token from its own exit, while the later stages still run the exited token
to fill their KV cache). Prints tokens/s of both, the ratio, and whether the tokens are equal.
On one machine the stages share its cores and every message pays gloo's latency, so this
shows the method's cost here, not the speedup it brings with one device per stage.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megatron.early_exit.config import ModelConfig  # noqa: E402
from megatron.early_exit.inference import EarlyExitEngine, GenerationSettings  # noqa: E402

CONFIG = dict(num_layers=8, hidden_size=512, num_attention_heads=8, ffn_hidden_size=1408, vocab_size=8192,
              max_position_embeddings=512, normalization="RMSNorm", swiglu=True, position_embedding_type="rope",
              add_bias_linear=False, untie_embeddings_and_output_weights=True, exit_layer_nums=[2, 4, 6],
              use_exit_norm=True)  # fmt: skip
PROMPTS = [list(range(1, 33)), list(range(40, 60)), list(range(100, 140)), list(range(7, 17))]
CASES = [("full", dict(strategy="full")), ("early_exit @ 0", dict(strategy="early_exit", early_exit_threshold=0.0))]


def run_cases(engine, new_tokens: int) -> list[dict]:
    rows = []
    for name, kw in CASES:
        for batch in (1, 4):
            prompts = PROMPTS[:batch]
            engine.generate(prompts, GenerationSettings(max_new_tokens=4, ignore_eos=True, **kw))  # warm-up
            res = engine.generate(prompts, GenerationSettings(max_new_tokens=new_tokens, ignore_eos=True, **kw))
            rows.append(
                dict(case=name, batch=batch, tps=res[0].stats["tokens_per_sec"], tokens=[r.tokens for r in res])
            )
    return rows


def single_process(new_tokens: int) -> list[dict]:
    from megatron.early_exit.model import EarlyExitGPT

    model = EarlyExitGPT(ModelConfig(**CONFIG))
    model.init_weights(0)
    return run_cases(EarlyExitEngine(model.eval()), new_tokens)


def pipeline_worker(new_tokens: int) -> None:
    """Under torchrun: every rank builds its stage (same name-seeded init) and decodes; rank 0 prints JSON."""
    from megatron.early_exit.inference.parallel import build_stage, make_engine
    from megatron.early_exit.parallel.dims import initialize

    torch.set_num_threads(1)
    pstate = initialize(1, int(os.environ["WORLD_SIZE"]), torch.device("cpu"))
    model, specs = build_stage(ModelConfig(**CONFIG), pstate, seed=0)
    rows = run_cases(make_engine(model, None, pstate, specs), new_tokens)
    if int(os.environ["RANK"]) == 0:
        print("RESULT " + json.dumps(rows), flush=True)
    torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def under_torchrun(pp: int, new_tokens: int) -> list[dict]:
    port = str(free_port())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(pp), "--master-port", port,
           os.path.abspath(__file__), "--worker", "--new-tokens", str(new_tokens)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=1800)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise SystemExit(f"error: the pipeline run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pp", type=int, default=2, help="pipeline stages (8 layers: 2, 4 or 8)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        pipeline_worker(args.new_tokens)
        return
    torch.set_num_threads(args.pp)  # the same cores the pipeline's processes get, one thread each
    one = single_process(args.new_tokens)
    pipe = under_torchrun(args.pp, args.new_tokens)
    print(
        f"{os.cpu_count()} cores; one process with {args.pp} threads vs PP{args.pp} with 1 thread per stage; "
        f"torch {torch.__version__}; random fp32 model: 8 layers, hidden 512, vocab 8192, exits 2/4/6; "
        f"{args.new_tokens} new tokens, EOS ignored"
    )
    print(f"{'case':16s} {'batch':>5s} {'one process':>12s} {f'PP{args.pp}':>8s} {'ratio':>6s}  same tokens")
    for a, b in zip(one, pipe):
        print(f"{a['case']:16s} {a['batch']:5d} {a['tps']:12.1f} {b['tps']:8.1f} {b['tps'] / a['tps']:6.2f}  "
              f"{a['tokens'] == b['tokens']}")  # fmt: skip


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Exit heads in a pipeline: do they cost anything? (EE-LLM: exits placed on early stages run
in those stages' implicit bubbles, since the last stage also carries the final head.)

Runs PP2 under torchrun (gloo, 1 thread per rank), side by side: the same model without
exits, with exits (`--exits`, default one after layer 2) on the first stage, and with those
exits plus explicit-bubble filling (`--fill` extra micro-batches); prints per-stage time per
iteration and peak memory, and their ratios. Then it measures the per-layer and per-head forward /
backward costs in this process and asks the 1F1B simulator (benchmarks/pipeline_simulator.py)
for the same runs, to check the simulator against the measurement.

    python benchmarks/pipeline_exits.py            # ~2-3 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MODEL = ["--num-layers", "8", "--hidden-size", "256", "--num-attention-heads", "8", "--seq-length", "128",
         "--normalization", "RMSNorm", "--swiglu", "--position-embedding-type", "rope", "--disable-bias-linear",
         "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "8000"]  # fmt: skip


def worker(ns) -> None:
    """Under torchrun: train, time, report (rank 0 prints one JSON line for all ranks)."""
    import torch
    import torch.distributed as dist

    from megatron.early_exit.arguments import parse_args
    from megatron.early_exit.training.trainer import Trainer

    torch.set_num_threads(1)
    argv = [*MODEL, "--pipeline-model-parallel-size", "2", "--micro-batch-size", str(ns.micro_batch_size),
            "--global-batch-size", str(ns.micro_batch_size * ns.micro_batches), "--train-iters", "1000",
            "--lr", "1e-4", "--eval-interval", "0", "--device", "cpu", "--pipeline-split", "uniform"]  # fmt: skip
    if ns.exits:
        argv += ["--exit-layer-nums", *map(str, ns.exits), "--use-exit-norm"]
    if ns.fill:
        argv += ["--fill-explicit-bubbles", "--num-fill-warmup-microbatches", str(ns.fill)]
    trainer = Trainer(parse_args(argv))
    for _ in range(ns.warmup):
        trainer.train_step()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(ns.iters):
        trainer.train_step()
    ms = 1000 * (time.perf_counter() - start) / ns.iters
    mine = {"rank": dist.get_rank(), "ms": ms, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, mine)
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps(out), flush=True)
    dist.destroy_process_group()


def run(ns, exits, fill=0) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", __file__, "--worker",
           "--iters", str(ns.iters), "--warmup", str(ns.warmup), "--micro-batches", str(ns.micro_batches),
           "--micro-batch-size", str(ns.micro_batch_size), "--fill", str(fill),
           "--exits", *map(str, exits)]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(proc.stdout[-2000:] + proc.stderr[-3000:])
    return json.loads(lines[0][len("RESULT ") :])


def measured_costs(ns) -> dict[str, float]:
    """Forward and backward time (ms) of one layer and one vocabulary head, 1 thread."""
    import torch

    from megatron.early_exit.config import ModelConfig
    from megatron.early_exit.model.layer import TransformerLayer

    torch.set_num_threads(1)
    cfg = ModelConfig(num_layers=8, hidden_size=256, num_attention_heads=8, vocab_size=8064,
                      max_position_embeddings=128, normalization="RMSNorm", swiglu=True,
                      position_embedding_type="rope", add_bias_linear=False)  # fmt: skip
    layer = TransformerLayer(cfg)
    weight = torch.nn.Parameter(torch.randn(cfg.vocab_size, 256) * 0.02)
    x = torch.randn(ns.micro_batch_size, 128, 256, requires_grad=True)
    labels = torch.randint(0, 8000, (ns.micro_batch_size, 128))
    from megatron.early_exit.model.rotary import RotaryEmbedding

    rot = RotaryEmbedding(32, 10000.0)(torch.arange(128)[None])

    def time_it(fn, n=10):
        fn()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        return 1000 * (time.perf_counter() - t) / n

    def head_loss():
        return torch.nn.functional.cross_entropy((x @ weight.t()).view(-1, cfg.vocab_size), labels.view(-1))

    layer_f = time_it(lambda: layer(x, rot))
    layer_fb = time_it(lambda: layer(x, rot).sum().backward())
    head_f = time_it(head_loss)
    head_fb = time_it(lambda: head_loss().backward())
    return {"layer_f": layer_f, "layer_b": layer_fb - layer_f, "head_f": head_f, "head_b": head_fb - head_f}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--fill", type=int, default=1, help="fill micro-batches per iteration for the filling run")
    p.add_argument("--exits", type=int, nargs="*", default=[2], help="exit layers of the with-exits run (stage 0)")
    p.add_argument("--iters", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--micro-batches", type=int, default=8)
    p.add_argument("--micro-batch-size", type=int, default=2)
    ns = p.parse_args()
    if ns.worker:
        worker(ns)
        return
    from pipeline_simulator import StageCost, simulate

    print(
        f"PP2 under torchrun on {os.cpu_count()} cores, 1 thread per rank; 8 layers (4 per stage), hidden 256, "
        f"vocab 8000, seq 128, {ns.micro_batches} micro-batches of {ns.micro_batch_size}; exits: norm + tied head"
    )
    base = run(ns, [])
    ee = run(ns, ns.exits)
    n_exits = len(ns.exits)
    print(
        f"\n{'stage':6s} {'ms/iter no exits':>17s} {'with exits':>13s} {'ratio':>6s} {'peak MiB':>9s} "
        f"{'with exits':>11s} {'ratio':>6s}"
    )
    for a, b in zip(base, ee):
        print(
            f"{a['rank']:<6d} {a['ms']:17.0f} {b['ms']:13.0f} {b['ms'] / a['ms']:6.3f} {a['peak_mib']:9.0f} "
            f"{b['peak_mib']:11.0f} {b['peak_mib'] / a['peak_mib']:6.3f}"
        )
    iter_base, iter_ee = max(r["ms"] for r in base), max(r["ms"] for r in ee)
    print(f"iteration time with exits on stage 0 / without: {iter_ee / iter_base:.3f}")
    if ns.fill:
        filled = run(ns, ns.exits, ns.fill)
        iter_fill = max(r["ms"] for r in filled)
        extra = ns.fill / ns.micro_batches
        print(
            f"with bubble filling ({ns.fill} extra micro-batch(es) for the exits, +{extra:.0%} exit training data): "
            f"iteration {iter_fill / iter_ee:.3f}x the exits run, {iter_fill / iter_base:.3f}x no exits; "
            f"peak memory stage 0 {filled[0]['peak_mib'] / ee[0]['peak_mib']:.3f}x"
        )

    c = measured_costs(ns)
    print(
        f"\nmeasured (1 thread, ms per micro-batch): layer fwd {c['layer_f']:.1f} bwd {c['layer_b']:.1f}; "
        f"head fwd {c['head_f']:.1f} bwd {c['head_b']:.1f}"
    )

    def predict(n_exits):
        s0 = StageCost(4 * c["layer_f"], 4 * c["layer_b"], n_exits * (c["head_f"] + c["head_b"]))
        s1 = StageCost(4 * c["layer_f"] + c["head_f"], 4 * c["layer_b"] + c["head_b"], 0.0)
        return simulate([s0, s1], ns.micro_batches)

    pb, pe = predict(0), predict(n_exits)
    for label, pred, meas in (("no exits", pb, iter_base), (f"{n_exits} exits", pe, iter_ee)):
        print(
            f"simulator {label:9s}: {pred['time']:.0f} ms predicted vs {meas:.0f} ms measured "
            f"({pred['time'] / meas - 1:+.1%}), bubble {pred['bubble']:.1%}"
        )


if __name__ == "__main__":
    main()

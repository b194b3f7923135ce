#!/usr/bin/env python
"""Data parallelism: the old hand-written sync vs the bucketed, overlapped reducer (the
default) vs FSDP2 (`--use-torch-fsdp2`) with one unit per stage and with one unit per layer,
side by side.

Runs DP2 under torchrun (gloo, 1 thread per rank) four times on the same model and batch:
- `legacy`: after the whole schedule, one blocking all-reduce per parameter (the sync this
  project had before; kept here only, for the comparison);
- `bucketed`: gradients in ~25 MB buckets, each all-reduced asynchronously as soon as the last
  backward has produced it, so the reduction overlaps the rest of that backward;
- `fsdp2-unit`: `fully_shard` over DP with the whole stage as one unit (what `--use-torch-fsdp2`
  did before): gathered at the first forward and kept through the schedule, one reduce-scatter
  per batch; parameters between steps, gradients after it and Adam state sharded;
- `fsdp2`: `--use-torch-fsdp2` as it is now: one unit per layer, each gathered for its forward
  and again for its backward, so only a layer or two are whole at a time.
It prints iteration time per rank and the peak resident memory per rank (above the process's
resident memory before the model was built; glibc's mmap threshold fixed so that freed tensors
leave the resident set), with ratios against `legacy`, and the peak of the
FSDP2 modes against the bucketed reducer (no sharding).

    python benchmarks/data_parallel.py                 # ~3 minutes on 2 cores
    python benchmarks/data_parallel.py --hidden-size 768 --num-layers 12   # reduction more visible

On a CPU the two ranks share the cores with gloo's threads, so overlap buys less than on GPUs,
where communication runs on its own engine.
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

MODES = ("legacy", "bucketed", "fsdp2-unit", "fsdp2")


def _model_args(ns) -> list[str]:
    return ["--num-layers", str(ns.num_layers), "--hidden-size", str(ns.hidden_size), "--num-attention-heads", "8",
            "--seq-length", str(ns.seq_length), "--normalization", "RMSNorm", "--swiglu",
            "--position-embedding-type", "rope", "--disable-bias-linear", "--mock-data",
            "--tokenizer-type", "NullTokenizer", "--vocab-size", str(ns.vocab_size),
            "--exit-layer-nums", str(ns.num_layers // 2), "--use-exit-norm"]  # fmt: skip


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def worker(ns) -> None:
    """Under torchrun: train in one mode, time it, report (rank 0 prints one JSON line)."""
    import torch
    import torch.distributed as dist

    from megatron.early_exit.arguments import parse_args
    from megatron.early_exit.training import trainer as trainer_module

    torch.set_num_threads(1)
    # The baseline: torch, megatron-core's datasets (imported lazily by the trainer) and the
    # code, no model yet; what the peak adds to it is the model, its state and activations.
    from megatron.core.datasets import blended_megatron_dataset_builder, gpt_dataset  # noqa: F401

    base_mib = _rss_mib()
    argv = [*_model_args(ns), "--micro-batch-size", str(ns.micro_batch_size),
            "--global-batch-size", str(2 * ns.micro_batch_size * ns.micro_batches), "--train-iters", "1000",
            "--lr", "1e-4", "--eval-interval", "0", "--device", "cpu"]  # fmt: skip
    if ns.mode.startswith("fsdp2"):
        argv.append("--use-torch-fsdp2")
    if ns.mode == "legacy":  # no DP engine: sync_gradients falls back to the per-tensor all-reduce
        trainer_module.build_data_parallel = lambda *a: None
    if ns.mode == "fsdp2-unit":
        from megatron.early_exit.parallel.data_parallel import FSDP2

        trainer_module.build_data_parallel = lambda model, ps, args: FSDP2(model, ps, per_layer=False)
    trainer = trainer_module.Trainer(parse_args(argv))
    for _ in range(ns.warmup):
        trainer.train_step()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(ns.iters):
        trainer.train_step()
    ms = 1000 * (time.perf_counter() - start) / ns.iters
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    params = sum(p.numel() for p in trainer.model.parameters())
    mine = {"rank": dist.get_rank(), "ms": ms, "peak_mib": peak - base_mib, "params": params}
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, mine)
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps(out), flush=True)
    dist.destroy_process_group()


def run(ns, mode: str) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", __file__, "--worker", "--mode", mode,
           "--iters", str(ns.iters), "--warmup", str(ns.warmup), "--micro-batches", str(ns.micro_batches),
           "--micro-batch-size", str(ns.micro_batch_size), "--num-layers", str(ns.num_layers),
           "--hidden-size", str(ns.hidden_size), "--seq-length", str(ns.seq_length),
           "--vocab-size", str(ns.vocab_size)]  # fmt: skip
    # A fixed mmap threshold: glibc otherwise raises it after the first large free and serves
    # later tensors from its heap, which it rarely gives back, so the resident peak would track
    # the allocator's history rather than the live tensors (FSDP2 frees and regathers layers).
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, MALLOC_MMAP_THRESHOLD_="131072")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(proc.stdout[-2000:] + proc.stderr[-3000:])
    return json.loads(lines[0][len("RESULT ") :])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--num-layers", type=int, default=8)
    p.add_argument("--hidden-size", type=int, default=512)
    p.add_argument("--seq-length", type=int, default=64)
    p.add_argument("--vocab-size", type=int, default=16000)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--micro-batches", type=int, default=2, help="micro-batches per rank per iteration")
    p.add_argument("--iters", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    ns = p.parse_args()
    if ns.worker:
        worker(ns)
        return
    results = {mode: run(ns, mode) for mode in MODES}
    params = results["legacy"][0]["params"]
    print(
        f"DP2 under torchrun on {os.cpu_count()} cores, 1 thread per rank; {ns.num_layers} layers, hidden "
        f"{ns.hidden_size}, vocab {ns.vocab_size}, seq {ns.seq_length}, exit after layer {ns.num_layers // 2}; "
        f"{params / 1e6:.1f}M parameters ({4 * params / 2**20:.0f} MiB of fp32 gradients to reduce); "
        f"{ns.micro_batches} micro-batches of {ns.micro_batch_size} per rank; {ns.iters} timed iterations\n"
    )
    print(f"{'mode':10s} {'rank':>4s} {'ms/iter':>9s} {'vs legacy':>10s} {'peak MiB':>9s} {'vs legacy':>10s}")
    for mode in MODES:
        for r, ref in zip(results[mode], results["legacy"]):
            print(
                f"{mode:10s} {r['rank']:4d} {r['ms']:9.0f} {r['ms'] / ref['ms']:10.3f} {r['peak_mib']:9.0f} "
                f"{r['peak_mib'] / ref['peak_mib']:10.3f}"
            )
    iteration = {mode: max(r["ms"] for r in results[mode]) for mode in MODES}
    peak = {mode: max(r["peak_mib"] for r in results[mode]) for mode in MODES}
    print("\niteration vs legacy: " + ", ".join(f"{m} {iteration[m] / iteration['legacy']:.3f}x" for m in MODES[1:]))
    for mode in ("fsdp2-unit", "fsdp2"):
        print(
            f"peak memory per rank, {mode}: {peak[mode] / peak['bucketed']:.3f}x bucketed "
            f"({peak[mode] - peak['bucketed']:+.0f} MiB)"
        )
    print(f"fsdp2 per layer vs one unit: peak {peak['fsdp2'] / peak['fsdp2-unit']:.3f}x, "
          f"iteration {iteration['fsdp2'] / iteration['fsdp2-unit']:.3f}x")  # fmt: skip


if __name__ == "__main__":
    main()

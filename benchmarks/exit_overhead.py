#!/usr/bin/env python
"""Training cost of exit heads: time per iteration and peak memory with 0, 1 and 2 exits.

Same model, same data (mock), same seed; each configuration runs in its own fresh process
(so peak RSS is its own) and the ratios to the no-exit run are printed side by side.
CPU: peak resident memory (ru_maxrss) of the process; CUDA: torch.cuda.max_memory_allocated.

    python benchmarks/exit_overhead.py                 # defaults below, ~1-2 minutes
    python benchmarks/exit_overhead.py --iters 20 --hidden-size 512 --bf16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child(ns: argparse.Namespace) -> None:
    """Run one configuration and print a JSON line with its measurements."""
    import torch

    sys.path.insert(0, ROOT)
    from megatron.early_exit.arguments import parse_args
    from megatron.early_exit.training.trainer import Trainer

    torch.set_num_threads(ns.threads)
    argv = [
        "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", str(ns.vocab_size),
        "--num-layers", str(ns.num_layers), "--hidden-size", str(ns.hidden_size),
        "--num-attention-heads", str(ns.heads), "--seq-length", str(ns.seq_length),
        "--micro-batch-size", str(ns.micro_batch_size), "--global-batch-size", str(ns.micro_batch_size),
        "--train-iters", str(ns.iters + ns.warmup), "--lr", "1e-4", "--log-interval", "1000000",
        "--eval-interval", "0", "--device", ns.device, "--no-progress-bar",
    ]  # fmt: skip
    if ns.exits:
        argv += ["--exit-layer-nums", *map(str, ns.exits), "--use-exit-norm"]
    if ns.bf16:
        argv.append("--bf16")
    trainer = Trainer(parse_args(argv))
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(ns.warmup):
        trainer.train_step()
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(ns.iters):
        trainer.train_step()
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB
    elapsed = time.perf_counter() - start
    print(json.dumps({"ms_per_iter": 1000 * elapsed / ns.iters, "peak_mib": peak, "rss_before_mib": rss0 / 1024}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-layers", type=int, default=8)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 1))
    p.add_argument("--device", default="auto")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--exits", type=int, nargs="*", help=argparse.SUPPRESS)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ns = p.parse_args()
    if ns.child:
        child(ns)
        return
    layers = ns.num_layers
    configs = {"no exits": [], "1 exit": [layers // 2], "2 exits": [layers // 4, layers // 2]}
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"python {platform.python_version()}\n"
        f"model: {layers} layers, hidden {ns.hidden_size}, vocab {ns.vocab_size}, seq {ns.seq_length}, "
        f"micro batch {ns.micro_batch_size}, {'bf16' if ns.bf16 else 'fp32'}; exits are norm + tied output; "
        f"{ns.iters} timed iterations after {ns.warmup} warm-up"
    )
    base_args = [a for a in sys.argv[1:] if a != "--child"]
    results = {}
    for name, exits in configs.items():
        cmd = [sys.executable, __file__, "--child", *base_args, "--exits", *map(str, exits)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout
        results[name] = json.loads(out.strip().splitlines()[-1])
        print(f"  ran {name:9s} (exits after {exits or '-'})", flush=True)
    base = results["no exits"]
    print(f"\n{'config':10s} {'ms/iter':>9s} {'time ratio':>11s} {'peak MiB':>9s} {'memory ratio':>13s}")
    for name, r in results.items():
        print(
            f"{name:10s} {r['ms_per_iter']:9.1f} {r['ms_per_iter'] / base['ms_per_iter']:11.3f} "
            f"{r['peak_mib']:9.0f} {r['peak_mib'] / base['peak_mib']:13.3f}"
        )


if __name__ == "__main__":
    main()

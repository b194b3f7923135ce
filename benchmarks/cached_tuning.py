#!/usr/bin/env python
"""Tokens/s of EE-Tuning from cached activations against today's ce+kd tuning step.

    python benchmarks/cached_tuning.py --load runs/ee_tuning_smollm2/with_exits \\
        --data-path data/aclsum/smollm2_text_document --bf16           # SmolLM2, exits 8/15/22
    python benchmarks/cached_tuning.py --load TINY_CKPT --mock-data --seq-length 16 --cache-samples 16

Same machine, same exits, one run, in this order: (1) `--tune-exit --exit-loss-type ce+kd`
through the frozen backbone, `--steps` timed steps after one warm-up step; (2) the one-off
cost of caching `--cache-samples` sequences (`tools/checkpoint/cache_exit_activations.py`,
top-k `--top-k`); (3) one cached ce+kd epoch over the whole cache with the full vocabulary,
and (4) with `--exit-candidate-vocab` sampled negatives. Prints tokens/s and the ratios.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megatron.early_exit.arguments import parse_args  # noqa: E402
from megatron.early_exit.training.cached_tuning import CachedTuner  # noqa: E402
from megatron.early_exit.training.trainer import Trainer  # noqa: E402


def cache_tool():
    spec = importlib.util.spec_from_file_location(
        "cache_exit_activations", os.path.join(ROOT, "tools", "checkpoint", "cache_exit_activations.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def timed_steps(trainer, steps: int) -> float:
    """Seconds per step after one warm-up step."""
    trainer.train_step()
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    return (time.perf_counter() - start) / steps


def common_args(a) -> list[str]:
    data = ["--mock-data"] if a.mock_data else ["--data-path", *a.data_path]
    args = ["--load", a.load, "--tune-exit", "--exit-loss-type", "ce+kd", "--micro-batch-size",
            str(a.micro_batch_size), "--global-batch-size", str(a.global_batch_size), "--seq-length",
            str(a.seq_length), "--train-iters", "100000", "--lr", "1e-4", "--eval-interval", "0", "--device", "cpu",
            "--log-interval", "100000", "--split", a.split]  # fmt: skip
    return args + (["--bf16"] if a.bf16 else []), data


def make_cache(a, out: str) -> float:
    data = ["--mock-data"] if a.mock_data else ["--data-path", *a.data_path]
    argv = ["--load", a.load, *data, "--output", out, "--seq-length", str(a.seq_length), "--num-samples",
            str(a.cache_samples), "--top-k", str(a.top_k), "--dtype", "bf16" if a.bf16 else "fp32",
            "--micro-batch-size", str(a.micro_batch_size), "--split", a.split]  # fmt: skip
    argv += ["--bf16"] if a.bf16 else []
    start = time.perf_counter()
    cache_tool().main(argv)
    return time.perf_counter() - start


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="checkpoint with exits (tools/checkpoint/add_exits.py)")
    p.add_argument("--data-path", nargs="+")
    p.add_argument("--mock-data", action="store_true")
    p.add_argument("--split", default="98,2,0")
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--global-batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=3, help="timed steps of tuning through the backbone")
    p.add_argument("--cache-samples", type=int, default=256, help="sequences cached (one cached epoch)")
    p.add_argument("--top-k", type=int, default=16)
    p.add_argument("--exit-candidate-vocab", type=int, default=2048)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast everywhere, bf16 cache")
    a = p.parse_args()
    if bool(a.mock_data) == bool(a.data_path):
        p.error("give exactly one of --data-path and --mock-data")
    if a.cache_samples < 2 * a.global_batch_size:
        p.error("--cache-samples must be at least 2 global batches (one warms up)")
    return a


def main() -> None:
    a = parse()
    common, data = common_args(a)
    tokens_per_step = a.global_batch_size * a.seq_length
    live_s = timed_steps(Trainer(parse_args([*common, *data])), a.steps)
    out = tempfile.mkdtemp(prefix="exit_cache_")
    cache_s = make_cache(a, out)
    epoch_steps = a.cache_samples // a.global_batch_size - 1  # after the warm-up step
    full_s = timed_steps(CachedTuner(parse_args([*common, "--exit-activation-cache", out])), epoch_steps)
    cand = ["--exit-activation-cache", out, "--exit-candidate-vocab", str(a.exit_candidate_vocab)]
    cand_s = timed_steps(CachedTuner(parse_args([*common, *cand])), epoch_steps)
    live, full, sampled = (tokens_per_step / s for s in (live_s, full_s, cand_s))
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; {a.load}; micro-batch {a.micro_batch_size} x {a.seq_length}, "
        f"global batch {a.global_batch_size}, {'bf16' if a.bf16 else 'fp32'}"
    )
    print(f"tuning through the backbone (ce+kd):   {live:10.0f} tokens/s")
    print(f"caching {a.cache_samples} sequences (one-off):  {a.cache_samples * a.seq_length / cache_s:10.0f} tokens/s")
    print(f"cached epoch, full vocabulary:         {full:10.0f} tokens/s  ({full / live:.1f}x)")
    print(f"cached epoch, {a.exit_candidate_vocab} sampled negatives: {sampled:7.0f} tokens/s  ({sampled / live:.1f}x)")
    print(f"ratio cached (candidates) / backbone: {sampled / live:.1f}x (target >= 20x)")


if __name__ == "__main__":
    main()

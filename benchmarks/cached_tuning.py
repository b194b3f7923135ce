#!/usr/bin/env python
"""Tokens/s of EE-Tuning from cached activations against today's ce+kd tuning step.

    python benchmarks/cached_tuning.py --load runs/ee_tuning_smollm2/with_exits \\
        --data-path data/aclsum/smollm2_text_document --bf16           # SmolLM2, exits 8/15/22
    python benchmarks/cached_tuning.py --load TINY_CKPT --mock-data --seq-length 16 --cache-samples 16

Same machine, same exits, one run. First the one-off cost of caching `--cache-samples`
sequences (`tools/checkpoint/cache_exit_activations.py`, top-k `--top-k`). Then three tuners,
each warmed up by one step: (1) `--tune-exit --exit-loss-type ce+kd` through the frozen
backbone, (2) ce+kd from the cache with the full vocabulary, (3) the same with
`--exit-candidate-vocab` sampled negatives. They run in `--rounds` alternating rounds (in one
round: `--steps` steps of (1), then `--cached-steps` steps of (2) and of (3); the cached
tuners run on through further epochs of the cache), so a host whose speed drifts over minutes slows every side
alike. Prints each side's median tokens/s over the rounds and the median, min and max of the
per-round ratios to (1). `--clock cpu` times CPU seconds of this process (all its threads)
instead of the wall clock, for a machine that other processes load.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.decode_speed import cpu_model_name  # noqa: E402
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


def timed_steps(trainer, steps: int, clock) -> float:
    """Seconds per step over `steps` steps."""
    start = clock()
    for _ in range(steps):
        trainer.train_step()
    return (clock() - start) / steps


def alternating(tuners: dict, steps: dict[str, int], rounds: int, clock) -> dict[str, list[float]]:
    """Seconds per step of each tuner in each of `rounds` rounds, the tuners in turn."""
    times = {name: [] for name in tuners}
    for r in range(rounds):
        for name, tuner in tuners.items():
            times[name].append(timed_steps(tuner, steps[name], clock))
        print(f"round {r + 1}/{rounds}: " + ", ".join(f"{n} {t[-1]:.3f} s/step" for n, t in times.items()), flush=True)
    return times


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
    p.add_argument("--steps", type=int, default=2, help="steps through the backbone per round")
    p.add_argument("--cached-steps", type=int, default=8, help="at least this many cached steps per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    p.add_argument("--cache-samples", type=int, default=256, help="sequences cached")
    p.add_argument("--top-k", type=int, default=16)
    p.add_argument("--exit-candidate-vocab", type=int, default=512, help="negatives (tune_smollm2.sh uses 512)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast everywhere, bf16 cache")
    a = p.parse_args()
    if bool(a.mock_data) == bool(a.data_path):
        p.error("give exactly one of --data-path and --mock-data")
    if a.cache_samples < a.global_batch_size:
        p.error("--cache-samples must be at least one global batch")
    if min(a.steps, a.cached_steps, a.rounds) < 1:
        p.error("--steps, --cached-steps and --rounds must be at least 1")
    return a


def main() -> None:
    a = parse()
    clock = time.process_time if a.clock == "cpu" else time.perf_counter
    common, data = common_args(a)
    tokens_per_step = a.global_batch_size * a.seq_length
    out = tempfile.mkdtemp(prefix="exit_cache_")
    cache_s = make_cache(a, out)
    cand = ["--exit-activation-cache", out, "--exit-candidate-vocab", str(a.exit_candidate_vocab)]
    tuners = {
        "backbone": Trainer(parse_args([*common, *data])),
        "cached full": CachedTuner(parse_args([*common, "--exit-activation-cache", out])),
        "cached candidates": CachedTuner(parse_args([*common, *cand])),
    }
    for tuner in tuners.values():
        tuner.train_step()  # warm-up
    steps = {"backbone": a.steps, "cached full": a.cached_steps, "cached candidates": a.cached_steps}
    times = alternating(tuners, steps, a.rounds, clock)
    print(
        f"machine: {cpu_model_name()}, {os.cpu_count()} cores, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads, {a.clock} clock; {a.load}; micro-batch "
        f"{a.micro_batch_size} x {a.seq_length}, global batch {a.global_batch_size}, {'bf16' if a.bf16 else 'fp32'}"
    )
    print(f"caching {a.cache_samples} sequences (one-off): {a.cache_samples * a.seq_length / cache_s:10.0f} tokens/s")
    live = [tokens_per_step / t for t in times["backbone"]]
    ratios = {}
    for name in tuners:
        tps = [tokens_per_step / t for t in times[name]]
        r = ratios[name] = [x / y for x, y in zip(tps, live)]
        print(
            f"{name:18s} {statistics.median(tps):8.0f} tokens/s (median of {a.rounds} rounds)  "
            f"ratio to backbone: median {statistics.median(r):.1f}x, min {min(r):.1f}x, max {max(r):.1f}x"
        )
    ratio = statistics.median(ratios["cached candidates"])
    print(f"cached (candidates) / backbone: {ratio:.1f}x (median of per-round ratios; target >= 20x)")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Which EE-Tuning objective brings the exits toward the final head fastest: ce, kd or ce+kd.

    python benchmarks/tuning_objectives.py --load runs/ee_tuning_smollm2/with_exits \
        --data data/aclsum/smollm2_text_document --iters 20

From the same checkpoint, with the same data order and seed, each objective tunes the exits
(`--tune-exit --exit-loss-type ...`, backbone frozen, bf16 autocast) for --iters steps; then
every exit's validation loss and top-1 agreement with the final head are measured on the
same held-out sequences. Prints seconds per step, and per exit the loss and agreement
before tuning and after each objective, so the objectives compare at equal tokens and at
equal time.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "examples", "ee_tuning"))

from report_exits import evaluate_exits  # noqa: E402

from megatron.early_exit.arguments import parse_args  # noqa: E402
from megatron.early_exit.training.trainer import Trainer  # noqa: E402

OBJECTIVES = ("ce", "kd", "ce+kd")


def tune(args, objective: str) -> tuple[dict, float]:
    argv = ["--load", args.load, "--tune-exit", "--exit-loss-type", objective, "--data-path", args.data,
            "--split", "98,2,0", "--seq-length", str(args.seq_length), "--micro-batch-size",
            str(args.micro_batch_size), "--global-batch-size", str(args.global_batch_size), "--train-iters",
            str(args.iters), "--lr", str(args.lr), "--lr-warmup-iters", "2", "--eval-interval", "0",
            "--log-interval", "1000", "--seed", "1234", "--bf16"]  # fmt: skip
    torch.manual_seed(1234)
    trainer = Trainer(parse_args(argv))
    start = time.perf_counter()
    for _ in range(args.iters):
        trainer.train_step()
    per_step = (time.perf_counter() - start) / args.iters
    return evaluate_exits(trainer.model, trainer.tokenizer, args.data, args.eval_samples, args.seq_length), per_step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="a checkpoint with (untuned) exits, e.g. from add_exits.py")
    p.add_argument("--data", required=True, help="a .bin/.idx prefix in the checkpoint's tokenizer")
    p.add_argument("--objectives", nargs="+", choices=OBJECTIVES, default=list(OBJECTIVES))
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--global-batch-size", type=int, default=8)
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-samples", type=int, default=16)
    args = p.parse_args()
    from megatron.early_exit import load_checkpoint

    model, tok = load_checkpoint(args.load)
    before = evaluate_exits(model, tok, args.data, args.eval_samples, args.seq_length)
    del model
    results = {}
    for objective in args.objectives:
        results[objective] = tune(args, objective)
        print(f"  tuned with {objective}: {results[objective][1]:.1f} s/step", flush=True)
    tokens = args.iters * args.global_batch_size * args.seq_length
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; {args.iters} steps "
          f"x {args.global_batch_size} x {args.seq_length} = {tokens} tokens per objective")  # fmt: skip
    head = f"{'exit':>4s} {'before: loss / agree':>21s}"
    head += "".join(f" {o + ': loss / agree':>21s}" for o in args.objectives)
    print(head)
    for n in sorted(before):
        row = f"{n:4d} {before[n][0]:11.2f} / {before[n][1]:6.1%}"
        row += "".join(f" {results[o][0][n][0]:11.2f} / {results[o][0][n][1]:6.1%}" for o in args.objectives)
        print(row)
    print("s/step".rjust(26) + "".join(f" {results[o][1]:21.1f}" for o in args.objectives))


if __name__ == "__main__":
    main()

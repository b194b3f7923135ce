#!/usr/bin/env python
"""Decode-time attention on the CPU: one query row per K/V group against two.

A decode step attends one query row per head to the cache. PyTorch's CPU SDPA in bf16 takes a
slow path for a single query row, so `model.attention.group_rows_attention` sends such a row in
twice and keeps the first result. This prints, for a model's head layout (or the one given),
SDPA's time with one row and with the row twice at several cache lengths and batch sizes, in
each dtype, as ratios side by side in one run (best of --rounds, alternating); then, with
--load, whole decode steps of that checkpoint in bf16 with the helper's rule on and off,
alternating in one process.

    python benchmarks/decode_attention.py                         # 6 groups of 64 (the CPU reference model)
    python benchmarks/decode_attention.py --groups 3 --per-group 3   # SmolLM2-135M's layout
    python benchmarks/decode_attention.py --load runs/ee_aclsum/tuned --contexts 80 300 600
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def best_time(fn, rounds: int, calls: int) -> float:
    """Best mean seconds per call over `rounds` rounds of `calls` calls (after a warm-up)."""
    for _ in range(calls // 4 + 1):
        fn()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def sdpa_table(args) -> None:
    import torch
    import torch.nn.functional as F

    print(f"SDPA, {args.groups} groups x {args.per_group} query rows, head dim {args.head_dim}: one call's us, "
          "rows as they are -> one row more (ratio)")  # fmt: skip
    for dtype in args.dtypes:
        dt = getattr(torch, dtype)
        for batch in args.batches:
            cells = []
            for keys in args.contexts:
                g = torch.Generator().manual_seed(keys)
                q = torch.randn(batch, args.groups, args.per_group, args.head_dim, generator=g).to(dt)
                k, v = (torch.randn(batch, args.groups, keys, args.head_dim, generator=g).to(dt) for _ in range(2))
                twice = torch.cat([q, q[:, :, :1]], 2)  # one more row: the helper's call where a group has one
                one = lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v)  # noqa: E731
                two = lambda q=twice, k=k, v=v: F.scaled_dot_product_attention(q, k, v)  # noqa: E731
                t1 = t2 = float("inf")
                for _ in range(args.rounds):  # alternate the two, best of each
                    t1 = min(t1, best_time(one, 1, args.calls))
                    t2 = min(t2, best_time(two, 1, args.calls))
                cells.append(f"{keys} keys {t1 * 1e6:.1f} -> {t2 * 1e6:.1f} ({t2 / t1:.2f})")
            print(f"  {dtype:8s} batch {batch:2d}: " + " | ".join(cells), flush=True)


def decode_steps(args) -> None:
    import torch
    import torch.nn.functional as F

    from megatron.early_exit import load_checkpoint
    from megatron.early_exit.inference import EarlyExitEngine, ExitPolicy, lean
    from megatron.early_exit.model import attention

    model, _ = load_checkpoint(args.load, dtype=torch.bfloat16)
    engine = EarlyExitEngine(model)
    helper = attention.group_rows_attention
    plain = lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m)  # noqa: E731

    def use(fn) -> None:  # the modules and the lean layers both call it by these names
        attention.group_rows_attention = lean.group_rows_attention = fn

    print(f"Decode steps of {args.load} in bf16, batch 1: ms per step, one row -> twice (ratio)")
    try:
        for ctx in args.contexts:
            prompt = [(7 * j + 3) % engine.vocab for j in range(ctx)]
            state = engine.new_state(1, ctx + 2)
            engine.prefill(state, {0: prompt})

            def step(state=state, ctx=ctx) -> None:
                engine.decode_one_token(state, {0: 5}, ExitPolicy())
                state.reset(0, ctx)

            best = {"one": float("inf"), "twice": float("inf")}
            with engine.packed:
                for _ in range(args.rounds):
                    for name, fn in (("one", plain), ("twice", helper)):
                        use(fn)
                        best[name] = min(best[name], best_time(step, 1, args.steps))
            print(f"  {ctx} positions: {best['one'] * 1e3:.3f} -> {best['twice'] * 1e3:.3f} "
                  f"({best['twice'] / best['one']:.3f})", flush=True)  # fmt: skip
    finally:
        use(helper)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--groups", type=int, default=6)
    p.add_argument("--per-group", type=int, default=1, help="query rows per K/V group (query heads per group)")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--contexts", type=int, nargs="+", default=[32, 80, 300, 1024])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float16", "float32"])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=400)
    p.add_argument("--steps", type=int, default=40, help="decode steps per timing round (--load)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--load", default=None, help="a checkpoint: also time its decode steps with and without the rule")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads")
    sdpa_table(args)
    if args.load:
        if not os.path.isdir(args.load):
            raise SystemExit(f"--load: no such checkpoint directory: {args.load}")
        decode_steps(args)


if __name__ == "__main__":
    main()

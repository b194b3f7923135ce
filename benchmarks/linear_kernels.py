#!/usr/bin/env python
"""Per weight shape: the CPU kernels of `inference/kernels.py` side by side on a model's own weights.

    python benchmarks/linear_kernels.py --load runs/ee_tuning_smollm2/base --dtypes fp32 bf16 --rows 1 8

For each (dtype, rows, weight shape) it runs every applicable kernel over all the model's
weights of that shape (each weight once per round, so they stream from memory as in a decode
step), alternating kernels, best of --rounds, and prints microseconds per weight, GB/s, the
ratio to `F.linear` (time / F.linear's time: below 1 is faster) and the kernel the selector
picks (measured separately, as the engine does). Timings are CPU time of one thread
(`time.process_time`, --threads 1) by default: robust on a shared machine, where wall time is
not; `--threads 2 --clock wall` shows what a second thread buys. Where bf16 products run on
Intel's matrix tiles (`native.amx()`), a `sweep` column times the native kernel with them off
(`native.amx(False)`: the `vdpbf16ps` sweep over the same panels) in the same alternation.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from decode_speed import cpu_model_name  # noqa: E402

from megatron.early_exit.inference import kernels, native  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def groups(model) -> dict[tuple[int, int], list[torch.Tensor]]:
    """The model's matrices by shape (the tied embedding is the vocabulary head)."""
    out = defaultdict(list)
    for _, p in model.named_parameters():
        if p.dim() == 2:
            out[tuple(p.shape)].append(p.detach())
    return dict(out)


def table(weights: list[torch.Tensor], rows: int, rounds: int, clock) -> dict[str, float]:
    """Seconds per weight of each kernel (best round of `clock`)."""
    x = torch.randn(rows, weights[0].shape[1]).to(weights[0].dtype)
    funcs = {k: kernels._FUNCS[k] for k in kernels.candidates(rows, weights[0].dtype)}
    if "native" in funcs and sweep_column(weights[0].dtype):
        funcs[SWEEP] = funcs["native"]  # timed with the tiles off
    best = dict.fromkeys(funcs, float("inf"))
    for r in range(rounds + 1):  # round 0 warms up (and makes the packed / transposed copies)
        for name, f in funcs.items():
            if name == SWEEP:
                native.amx(False)
            try:
                start = clock()
                for w in weights:
                    f(x, w, None)
                took = clock() - start
            finally:
                if name == SWEEP:
                    native.amx(True)
            if r:
                best[name] = min(best[name], took / len(weights))
    return best


SWEEP = "sweep"  # the native kernel with AMX tiles off (`native.amx(False)`)


def sweep_column(dtype: torch.dtype) -> bool:
    """Whether bf16 products run on AMX tiles here, so that the sweep without them is a column."""
    return dtype == torch.bfloat16 and native.amx()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="a checkpoint of ours (e.g. runs/ee_tuning_smollm2/base)")
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["fp32", "bf16"])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                   help="this process's CPU time (default; sums threads) or wall time")  # fmt: skip
    args = p.parse_args()
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    from megatron.early_exit import load_checkpoint

    print(f"machine: {cpu_model_name()}, {os.cpu_count()} cores, {args.threads} threads, torch {torch.__version__}; "
          f"{args.clock} time per weight, best of {args.rounds} alternating rounds")  # fmt: skip
    for name in args.dtypes:
        model, _ = load_checkpoint(args.load, dtype=DTYPES[name])
        by_shape = groups(model)
        kernels.register(w for ws in by_shape.values() for w in ws)
        for rows in args.rows:
            print(f"\n== {name}, {rows} row(s)")
            columns = [*kernels.KERNELS, *([SWEEP] if sweep_column(DTYPES[name]) else [])]
            print(f"  {'shape':>12s} {'n':>3s}  " + "  ".join(f"{k:>18s}" for k in columns) + "  chosen")
            with torch.no_grad():
                for shape, ws in sorted(by_shape.items()):
                    t = table(ws, rows, args.rounds, clock)
                    nbytes = ws[0].numel() * ws[0].element_size()
                    cells = [f"{t[k] * 1e6:7.1f}us {t[k] / t['plain']:4.2f}x" if k in t else f"{'-':>18s}"
                             for k in columns]  # fmt: skip
                    chosen = kernels.kernel_for(ws[0], rows)
                    gbs = nbytes / t[chosen] / 1e9
                    print(f"  {str(shape):>12s} {len(ws):3d}  " + "  ".join(cells) + f"  {chosen} ({gbs:.1f} GB/s)",
                          flush=True)  # fmt: skip
        del model


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Cost of a non-firing learned exit check as a share of one decoder layer, batch 1, one thread,
CPU time: the fused check (`inference/fused_check.py`) against the probe modules' path.

    python benchmarks/probe_cost.py CKPT [CKPT ...] [--dtype fp32 bf16] [--rounds 30] [--inner 50]

Per checkpoint and dtype, with the decoder's own cost probes (`exit_decision.cost_probes`:
"layer/1" = one layer's decode step for one row; "probe/1" = the learned check of the first
exit without a block as `Passes.probe_check` runs it, no row firing: its norm and probe, or the
fused check), timed on two engines over the same model, one with `fused_checks` off (the module
path: the norm, the probe, a sigmoid); also the bare probe module on a random row and the
vocabulary check (max_prob). Alternating rounds, best of R, each call repeated N times; CPU time
(`time.process_time`), so a loaded machine's figures stay comparable.
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.early_exit import load_checkpoint  # noqa: E402
from megatron.early_exit.inference import EarlyExitEngine  # noqa: E402
from megatron.early_exit.inference.cost_model import best_times  # noqa: E402
from megatron.early_exit.inference.exit_decision import cost_probes  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def timed(fns: dict, rounds: int, inner: int) -> dict:
    """Each function's best time per call: best of `rounds` alternating rounds of `inner` calls."""
    batched = {k: (lambda f=f: [f() for _ in range(inner)]) for k, f in fns.items()}
    return {k: t / inner for k, t in best_times(batched, torch.device("cpu"), rounds, time.process_time).items()}


def calls(path: str, dtype: torch.dtype) -> dict:
    """The timed calls of one checkpoint in one dtype."""
    model, tok = load_checkpoint(path)
    model = model.to(dtype=dtype).eval()
    fused, plain = EarlyExitEngine(model, tok).passes, EarlyExitEngine(model, tok).passes
    plain.fused_checks = False
    probes, plain_probes = cost_probes(fused, 1), cost_probes(plain, 1)
    if "probe/1" not in probes:
        raise SystemExit(f"{path}: no exit without a block has a confidence probe")
    head = next(model.exits[str(n)] for n in fused.exits if model.exits[str(n)].confidence is not None)
    x = torch.randn(1, 1, model.config.hidden_size, dtype=dtype)
    return {
        "layer": probes["layer/1"],
        "check fused": probes["probe/1"],
        "check plain": plain_probes["probe/1"],
        "probe module": lambda: head.confidence_logit(x),
        "vocab check": probes["vocab/1"],
    }


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("checkpoints", nargs="+", help="checkpoint directories whose exits carry confidence probes")
    p.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    p.add_argument("--rounds", type=int, default=30, help="alternating rounds (best counts)")
    p.add_argument("--inner", type=int, default=50, help="calls per round")
    return p.parse_args(argv)


@torch.no_grad()
def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    for name in args.dtype:
        for path in args.checkpoints:
            t = timed(calls(path, DTYPES[name]), args.rounds, args.inner)
            print(f"{path} {name}: layer {t['layer'] * 1e6:.1f} us")
            for k, v in t.items():
                print(f"  {k:14s} {v * 1e6:8.1f} us  {v / t['layer'] * 100:6.2f}% of a layer")
            print(f"  fused / plain check: {t['check fused'] / t['check plain']:.3f}")


if __name__ == "__main__":
    main()

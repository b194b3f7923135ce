#!/usr/bin/env python
"""Cost of a confidence check as a share of one decoder layer, batch 1, one thread, CPU time.

    python benchmarks/probe_cost.py LINEAR_PROBE_CKPT MLP_PROBE_CKPT

Uses the decoder's own cost probes (`exit_decision.cost_probes`: "layer/1" = one layer's decode
step for one row, "probe/1" = exit hidden state (its norm) + the probe, as decoding runs it) and
times the bare probe modules too. Alternating rounds, best of R, each call repeated N times.
CPU time (`time.process_time`), so a loaded machine's figures stay comparable; fp32 then bf16.
"""

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.early_exit import load_checkpoint  # noqa: E402
from megatron.early_exit.inference import EarlyExitEngine  # noqa: E402
from megatron.early_exit.inference.cost_model import best_times  # noqa: E402
from megatron.early_exit.inference.exit_decision import cost_probes  # noqa: E402

torch.set_num_threads(1)
ROUNDS, INNER = 30, 50


def timed(fns):
    """Each function's best time per call: best of ROUNDS alternating rounds of INNER calls."""
    batched = {k: (lambda f=f: [f() for _ in range(INNER)]) for k, f in fns.items()}
    return {k: t / INNER for k, t in best_times(batched, torch.device("cpu"), ROUNDS, time.process_time).items()}


@torch.no_grad()
def main():
    for dtype in (torch.float32, torch.bfloat16):
        fns = {}
        for name, path in (("linear", sys.argv[1]), ("mlp", sys.argv[2])):
            model, tok = load_checkpoint(path)
            model = model.to(dtype=dtype).eval()
            passes = EarlyExitEngine(model, tok).passes
            probes = cost_probes(passes, 1)
            fns["layer"] = probes["layer/1"]
            fns[f"check {name}"] = probes["probe/1"]
            head = model.exits["3"]
            x = torch.randn(1, 1, model.config.hidden_size, dtype=dtype)
            fns[f"probe {name}"] = lambda h=head, x=x: h.confidence_logit(x)
            fns["vocab check"] = probes["vocab/1"]
        t = timed(fns)
        print(f"{dtype}: layer {t['layer'] * 1e6:.1f} us")
        for k, v in t.items():
            print(f"  {k:14s} {v * 1e6:8.1f} us  {v / t['layer'] * 100:6.2f}% of a layer")


if __name__ == "__main__":
    main()

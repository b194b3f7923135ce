#!/usr/bin/env python
"""Predict 1F1B iteration time and bubble fraction for early-exit pipelines.

From per-layer and per-head costs (measured on this machine, or given in layer units), an
event-driven simulation of Megatron's 1F1B schedule as our trainer runs it (exit heads
evaluated lazily right before each backward, so their forward and backward cost lands in
the stage's backward step) gives the iteration time and the share of idle stage-time.

    python benchmarks/pipeline_simulator.py            # the paper's 1.3B / 7B layouts, in layer units
    python benchmarks/pipeline_simulator.py --pp 4 --micro-batches 16 --layers 24 --exits 6 12

Costs are in units of one transformer layer's forward time; backward = `--backward-forward-ratio`
times forward (2.0 by default: two matmuls per forward one). A vocabulary head over V with
hidden h costs about V / (12 h) + ... layers (see megatron.early_exit.parallel.pipeline.head_cost).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass
class StageCost:
    forward: float  # one micro-batch's forward through the stage's layers (+ embedding / final head)
    backward: float  # its backward
    exit_work: float  # its exits: forward + backward, done right before the backward


def one_f_one_b_order(pp: int, rank: int, m: int) -> list[tuple[str, int]]:
    warmup = min(pp - rank - 1, m)
    order = [("F", k) for k in range(warmup)]
    for i in range(m - warmup):
        order += [("F", warmup + i), ("B", i)]
    order += [("B", k) for k in range(m - warmup, m)]
    return order


def simulate(stages: list[StageCost], m: int, p2p: float = 0.0) -> dict[str, float]:
    """Event-driven 1F1B: each stage runs its ops in order; F(s, k) needs F(s-1, k), B(s, k)
    needs B(s+1, k) (the last stage: its own F(s, k)), each plus a transfer time."""
    pp = len(stages)
    orders = [one_f_one_b_order(pp, r, m) for r in range(pp)]
    done: dict[tuple[str, int, int], float] = {}
    clock = [0.0] * pp
    busy = [0.0] * pp
    pos = [0] * pp
    while any(pos[r] < len(orders[r]) for r in range(pp)):
        progressed = False
        for r in range(pp):
            if pos[r] >= len(orders[r]):
                continue
            kind, k = orders[r][pos[r]]
            if kind == "F":
                dep = done.get(("F", r - 1, k)) if r > 0 else 0.0
                cost = stages[r].forward
            else:
                dep = done.get(("B", r + 1, k)) if r < pp - 1 else done.get(("F", r, k))
                cost = stages[r].backward + stages[r].exit_work
            if dep is None:
                continue
            start = max(clock[r], dep + (p2p if (kind == "F" and r > 0) or (kind == "B" and r < pp - 1) else 0.0))
            clock[r] = start + cost
            busy[r] += cost
            done[(kind, r, k)] = clock[r]
            pos[r] += 1
            progressed = True
        if not progressed:
            raise RuntimeError("schedule deadlock in the simulator")
    total = max(clock)
    return {"time": total, "bubble": 1.0 - sum(busy) / (pp * total), "busy": busy}


def stage_costs(
    num_layers: int,
    pp: int,
    exits: list[int],
    exit_cost: float,
    final_cost: float,
    bwd_ratio: float,
    bounds: list[tuple[int, int]] | None = None,
) -> list[StageCost]:
    from megatron.early_exit.parallel.pipeline import split_stages

    if bounds is None:
        bounds = [s.layer_range for s in split_stages(num_layers, pp, uniform=num_layers % pp == 0)]
    costs = []
    for i, (a, b) in enumerate(bounds):
        fwd = float(b - a) + (final_cost if i == pp - 1 else 0.0)
        n_exits = sum(1 for n in exits if a < n <= b)
        costs.append(StageCost(fwd, bwd_ratio * fwd, n_exits * exit_cost * (1 + bwd_ratio)))
    return costs


def head_cost_layers(hidden: int, vocab: int, ffn: int, swiglu: bool) -> float:
    mlp = (3 if swiglu else 2) * hidden * ffn
    return hidden * vocab / (4 * hidden * hidden + mlp)


PAPER = {
    # name: layers, hidden, ffn, vocab, exits
    "1.3B": (24, 2048, 8192, 50304, [6, 12]),
    "7B": (32, 4096, 11008, 50304, [8, 16]),
}


def paper_table(bwd_ratio: float) -> list[str]:
    rows = [
        "| model | PP | micro-batches | iteration (no exits) | with exits | exit overhead | bubble (no exits) |"
        " bubble (exits) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, (layers, hidden, ffn, vocab, exits) in PAPER.items():
        head = head_cost_layers(hidden, vocab, ffn, name == "7B")
        for pp in (4, 8, 16):
            if layers % pp:
                continue
            for m in (8, 32, 128):
                base = simulate(stage_costs(layers, pp, [], head, head, bwd_ratio), m)
                ee = simulate(stage_costs(layers, pp, exits, head, head, bwd_ratio), m)
                rows.append(
                    f"| {name} | {pp} | {m} | {base['time']:.0f} | {ee['time']:.0f} | "
                    f"{ee['time'] / base['time'] - 1:+.1%} | {base['bubble']:.1%} | {ee['bubble']:.1%} |"
                )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pp", type=int)
    p.add_argument("--micro-batches", type=int, default=16)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--exits", type=int, nargs="*", default=[6, 12])
    p.add_argument("--exit-cost", type=float, default=1.0, help="one exit head, in layer-forward units")
    p.add_argument("--final-cost", type=float, default=1.0, help="the final head, in layer-forward units")
    p.add_argument("--backward-forward-ratio", type=float, default=2.0)
    a = p.parse_args()
    if a.pp is None:
        print(
            "Simulated 1F1B, times in layer-forward units (backward/forward = "
            f"{a.backward_forward_ratio}); exits are norm + vocabulary heads, evaluated lazily.\n"
        )
        print("\n".join(paper_table(a.backward_forward_ratio)))
        return
    for label, exits in (("no exits", []), ("exits", a.exits)):
        costs = stage_costs(a.layers, a.pp, exits, a.exit_cost, a.final_cost, a.backward_forward_ratio)
        r = simulate(costs, a.micro_batches)
        print(
            f"{label:9s} iteration {r['time']:.1f}  bubble {r['bubble']:.1%}  busy per stage "
            + " ".join(f"{b:.1f}" for b in r["busy"])
        )


if __name__ == "__main__":
    main()

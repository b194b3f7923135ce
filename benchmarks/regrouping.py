#!/usr/bin/env python
"""What regrouping early-exit rows would save at batch > 1: a simulation, not a timing.

Decoding a batch in lock step, a pass runs until its deepest row has its token: a row that leaves
at an exit rides along while others go on, and a memory-bound layer costs about the same for
fewer rows (t(r) = a + b*r, b << a). Regrouping (DREX, arXiv 2512.15705; SkipDecode, arXiv
2307.02628) parks the rows that would go deeper at the exit where others leave, and runs the
deeper layers later for several parked rows at once. This script simulates both on a batch of
`--batch` sequences of `--tokens` tokens whose exits are drawn independently from `--shares`
(an exit distribution, e.g. a sweep row's `exit_share`) and prices every layer run as
a + b*rows (`--row-cost` = b/a; `exit_decision.ExitCosts` measures both). The parking rule: at an
exit where some rows leave, the rows going deeper are parked unless at least `--min-rows` rows
(those going on and those parked deeper) would run the next layers, or one of them has waited
`--max-wait` passes. It prints the speedup over full decoding of lock step and of each rule.

    python benchmarks/regrouping.py --exits 8 15 22 30 --shares 0.16 0.21 0.20 0.43 --batch 4
"""

from __future__ import annotations

import argparse
import random


def simulate(exits, shares, batch, tokens, row_cost, rule=None, seed=0) -> float:
    """Layer-cost units per token. rule: None (lock step) or (min_rows, max_wait)."""
    rng = random.Random(seed)
    left, need, at, waited = [tokens] * batch, [None] * batch, [0] * batch, [0] * batch
    cost = 0.0
    while any(left):
        live = [i for i in range(batch) if left[i]]
        for i in live:
            if at[i] == 0 and need[i] is None:
                need[i] = rng.choices(exits, shares)[0]
        depth, running, parked = 0, set(), set()  # parked: in this pass (they join the next one)
        for end in exits:
            running |= {i for i in live if at[i] == depth and i not in parked}  # rows parked before join here
            deeper = [i for i in live if at[i] > depth and i not in parked]
            if running:
                cost += (end - depth) * (1 + row_cost * len(running))
            elif not deeper:
                break
            depth = end
            for i in [i for i in running if need[i] == end]:  # these rows have their token
                left[i], need[i], at[i], waited[i] = left[i] - 1, None, 0, 0
                running.discard(i)
            if not running or end == exits[-1] or rule is None:
                continue
            min_rows, max_wait = rule
            later = sum(at[i] >= depth and i not in parked for i in live)  # parked before, here or deeper
            go_on = len(running) + later >= min_rows or max(waited[i] for i in running) >= max_wait
            if not go_on and len(running) < len(live):
                for i in running:
                    at[i], waited[i] = depth, waited[i] + 1
                parked |= running
                running = set()
    return cost / (batch * tokens)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--exits", type=int, nargs="+", required=True, help="exit depths, the last = all layers")
    p.add_argument("--shares", type=float, nargs="+", required=True, help="share of tokens leaving at each")
    p.add_argument("--batch", type=int, nargs="+", default=[4, 16])
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--row-cost", type=float, default=0.03, help="b/a: one row's share of a layer's fixed cost")
    p.add_argument("--min-rows", type=int, nargs="+", default=[2, 3, 4])
    p.add_argument("--max-wait", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--seeds", type=int, default=20)
    args = p.parse_args()
    if len(args.exits) != len(args.shares) or sorted(args.exits) != args.exits:
        p.error("--exits (increasing) and --shares need one value per exit")
    mean = sum(e * s for e, s in zip(args.exits, args.shares)) / sum(args.shares)
    print(f"batch 1: {args.exits[-1] / mean:.3f}x over full decoding (layers alone)")
    for batch in args.batch:
        print(f"batch {batch}: lock step {speedup(args, batch, None):.3f}x; parked rows regrouped:", end="")
        for m in args.min_rows:
            print(f"  min {m} rows " + " ".join(f"{speedup(args, batch, (m, w)):.3f}" for w in args.max_wait), end="")
        print(f"  (per --max-wait {' '.join(map(str, args.max_wait))})")


def speedup(args, batch: int, rule) -> float:
    """Full decoding's cost per token over the simulated one, averaged over --seeds draws."""
    full = args.exits[-1] * (1 + args.row_cost * batch) / batch
    runs = [simulate(args.exits, args.shares, batch, args.tokens, args.row_cost, rule, s) for s in range(args.seeds)]
    return full / (sum(runs) / len(runs))


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""What self-speculation's rounds cost against the clock, on a checkpoint.

    python benchmarks/self_spec_overhead.py --load runs/ee_aclsum/tuned --bf16
    python benchmarks/self_spec_overhead.py --load runs/ee_tuning_smollm2/tuned --bf16 --rounds 100

1. The controller's overhead: a self-speculative round whose controller decides to draft
   nothing (every exit's acceptance set near 0, no exploration due) against a plain `full`
   round (one decode step and its acceptance), the two timed back to back, per round, for
   --rounds rounds: the median and mean of the per-round ratio. Above 1.0 is what drafting
   nothing costs beyond the step (planning, bookkeeping, the verify wrapper).
2. The draft costs the controller uses (`strategies/draft_costs.py`: rounds of 1 and 4 drafts
   from each exit, and the drafts alone, each as a ratio to a plain round; where the native
   loop runs them, "loop n/g" too: rounds as the loop runs them, the unit then its plain step)
   next to the weight-count model's (`self_speculative.weight_count_costs`).

CPU seconds of this process (`time.process_time`), one thread; a prompt of --context tokens.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.early_exit import load_checkpoint  # noqa: E402
from megatron.early_exit.inference import EarlyExitEngine, GenerationSettings  # noqa: E402
from megatron.early_exit.inference.settings import GenerationResult  # noqa: E402
from megatron.early_exit.inference.strategies import Batch, get_strategy  # noqa: E402
from megatron.early_exit.inference.strategies import self_speculative as ss  # noqa: E402
from megatron.early_exit.inference.strategies.draft_costs import measure_draft_costs  # noqa: E402


def round_ratios(engine, context: int, rounds: int) -> list[float]:
    """Per round: a self-speculative round that drafts nothing over a plain full round."""
    prompt = [(7 * j) % engine.vocab for j in range(context)]
    state = engine.new_state(1, context + 4)
    engine.prefill(state, {0: prompt})
    ctl = ss.controller_for(engine, 1, context)
    for st in ctl.stats.values():  # acceptance ~0: drafting never pays
        st.accepted, st.rejected = 0.0, 1e6
    ctl.share = dict.fromkeys(ctl.share, 1e-12)  # exploration never due
    kinds = {name: get_strategy(name) for name in ("full", "self_speculative")}
    settings = {name: GenerationSettings(name, max_new_tokens=1 << 20, ignore_eos=True) for name in kinds}
    policy = {name: kinds[name].policy(engine, settings[name], engine.exits) for name in kinds}

    def one(name: str) -> float:
        batch = Batch(settings[name], policy[name], {0: GenerationResult(prompt, tokens=[prompt[-1]])}, {0: [0, 0]})
        with engine.packed:
            start = time.process_time()
            kinds[name].round(engine, state, [0], batch)
            took = time.process_time() - start
        state.reset(0, context)
        if batch.counts[0][0]:
            raise RuntimeError("the controller drafted: this round is not the one to measure")
        return took

    one("full"), one("self_speculative")  # warm-up
    ratios = []
    for _ in range(rounds):
        plain = one("full")
        ratios.append(one("self_speculative") / plain)
    return ratios


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--load", required=True)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--context", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=5, help="paired rounds per draft-cost ratio")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, tok = load_checkpoint(args.load, dtype=torch.bfloat16 if args.bf16 else None)
    engine = EarlyExitEngine(model, tok)
    r = round_ratios(engine, args.context, args.rounds)
    print(f"round drafting nothing / plain round: median {statistics.median(r):.3f} mean {statistics.mean(r):.3f} "
          f"over {len(r)} rounds")  # fmt: skip
    costs, ratios = measure_draft_costs(engine, 1, args.context, args.repeats)
    print("timed (ratio to a plain round):", {k: round(v, 3) for k, v in ratios.items()})
    for name, c in (("measured", costs), ("weight counts", ss.weight_count_costs(engine))):
        print(
            f"{name:14s}",
            " | ".join(
                f"exit {n}: draft {c.draft[n]:.3f} row {c.row[n]:.3f} base {c.base.get(n, 1.0):.3f}" for n in c.draft
            ),
        )


if __name__ == "__main__":
    main()

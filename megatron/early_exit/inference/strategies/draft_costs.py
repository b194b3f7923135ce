"""What self-speculative rounds cost on this machine, from the clock (DESIGN.md section 6).

The draft controller (`draft_control`) weighs a round of g drafts from exit n against a plain
decode step. Priced from weight counts (`costs_from_config`), a draft at exit 6 of the CPU
reference model (12 layers, exits 3/6, bf16, batch 1) cost 0.59 of a step where the clock
said about 0.4, and rounds that would have paid were not drafted. Here rounds are timed
through the strategy's own code (`SelfSpeculative.run_plan`: drafting, the verify pass,
keeping the agreeing prefix, rolling the caches back) at the batch size, dtype and context
length being decoded, by `cost_model.work_clock` (CPU seconds on a CPU running one thread, else
the wall clock), each timed right
after a plain round and taken as its ratio to it, the median of `repeats` such pairs
(`cost_model.paired_ratios`):

  plain      a round that drafts nothing (a plain decode step and its bookkeeping): the unit;
  draft[n]   one draft step at exit n: the slope of g drafts alone over g in LENGTHS;
  base[n]    a round's cost that does not grow with g (the verify pass's own, 1 row deep);
             at least 1: the verify pass runs its newest row through every layer as a plain
             step does, and more (a fit below 1 is noise: 0.69 once, with row 0.22; the
             slope is then fitted through base 1);
  row[n]     what one more drafted row adds to the verify pass: the slope of whole rounds
             over g in LENGTHS, less draft[n].

Measured once per engine and batch size on first use (some tenths of a second to seconds),
except where decisions must not depend on the clock (`exit_decision.costs_from_parameters`:
several processes decoding together, or `EE_EXIT_COSTS=parameters` as in the test suite).
"""

from __future__ import annotations

import torch

from megatron.early_exit.inference.cost_model import fit_line, paired_ratios, work_clock
from megatron.early_exit.inference.passes import ExitPolicy
from megatron.early_exit.inference.settings import GenerationResult, GenerationSettings
from megatron.early_exit.inference.strategies.base import Batch
from megatron.early_exit.inference.strategies.draft_control import DraftCosts, Plan

LENGTHS = (1, 4)  # draft lengths timed per exit (rounds are linear in g: see the module docstring)


@torch.no_grad()
def measure_draft_costs(engine, batch: int, context: int, repeats: int = 3) -> tuple[DraftCosts, dict[str, float]]:
    """`DraftCosts` of `batch` sequences `context` tokens long on `engine`; also the timed ratios
    to the plain round ("round n/g", "draft n/g") for reports."""
    from megatron.early_exit.inference.strategies import get_strategy

    strategy, exits = get_strategy("self_speculative"), engine.draft_exits()
    prompts = [[(7 * j + 3 * b) % engine.vocab for j in range(max(context, 1))] for b in range(batch)]
    state = engine.new_state(batch, max(context, 1) + 2 * max(LENGTHS) + 4)
    with engine.packed:
        engine.prefill(state, dict(enumerate(prompts)))
    fed = list(state.fed)

    def timed(plan: Plan, drafts_only: bool = False):
        def run() -> None:
            results = {b: GenerationResult(prompts[b], tokens=[prompts[b][-1]]) for b in range(batch)}
            s = GenerationSettings("self_speculative", max_new_tokens=1 << 20, ignore_eos=True)
            job = Batch(s, ExitPolicy(), results, {b: [0, 0] for b in range(batch)})  # draft() forces plan.exit
            running = list(range(batch))
            with engine.packed:
                if drafts_only:
                    strategy.draft(engine, state, running, job, plan, None)
                else:
                    strategy.run_plan(engine, state, running, job, plan, None)
            for b in running:
                state.reset(b, fed[b])

        return run

    fns = {}
    for n in exits:
        for g in LENGTHS:
            fns[f"round {n}/{g}"] = timed(Plan(n, g, 1.0))
            fns[f"draft {n}/{g}"] = timed(Plan(n, g, 1.0), drafts_only=True)
    t = paired_ratios(fns, timed(Plan(None, 0, 1.0)), engine.device, repeats, work_clock(engine.device))
    return costs_of(t, exits), t


def costs_of(t: dict[str, float], exits: list[int]) -> DraftCosts:
    """Fit `DraftCosts` from timed ratios to the plain round (see `measure_draft_costs`)."""
    draft, row, base = {}, {}, {}
    for n in exits:
        slope, _ = fit_line([(g, t[f"draft {n}/{g}"]) for g in LENGTHS])
        rounds = [(g, t[f"round {n}/{g}"]) for g in LENGTHS]
        per_g, fixed = fit_line(rounds)
        if fixed < 1.0:  # least squares through (0, 1)
            fixed, per_g = 1.0, sum(g * (r - 1.0) for g, r in rounds) / sum(g * g for g, _ in rounds)
        draft[n] = max(slope, 0.0)
        row[n] = max(per_g - slope, 0.0)
        base[n] = fixed
    return DraftCosts(draft, row, base)

"""What self-speculative rounds cost on this machine, from the clock (DESIGN.md section 6).

The draft controller (`draft_control`) weighs a round of g drafts from exit n against a plain
decode step. Priced from weight counts (`costs_from_config`), a draft at exit 6 of the CPU
reference model (12 layers, exits 3/6, bf16, batch 1) cost 0.59 of a step where the clock
said about 0.4, and rounds that would have paid were not drafted. Here rounds are timed
through the strategy's own code (`SelfSpeculative.run_plan`: drafting, the verify pass,
keeping the agreeing prefix, rolling the caches back; at one sequence, where the native loop
runs them, as it does: `loop_timed`, and the unit is then its plain step, full decoding's) at
the batch size, dtype and context length being decoded, by `cost_model.work_clock` (CPU
seconds on a CPU running one thread, else the wall clock): each its best time of `repeats`
rounds that run every kind in turn (`cost_model.best_times`), taken as a ratio to the plain
round's best. Best times, because a quiet machine's interruptions only add time and the fit
below amplifies noise: measured four times in one process (CPU reference model, bf16, 2
threads), the median of 3 paired ratios gave a verify round's fixed cost (base) from exit 6 of
1.00-1.41 and from exit 3 1.00-1.19 (and 11 pairs 1.08-1.37 and 1.00-1.27), the best of 11 rounds
1.04-1.14 and 1.14-1.17; a base read 0.3 too high made the controller decode 80% of rounds
plainly (1.10x instead of 1.3x).

  plain      a round that drafts nothing (a plain decode step and its bookkeeping): the unit;
  draft[n]   one draft step at exit n: the slope of g drafts alone over g in LENGTHS;
  base[n]    a round's cost that does not grow with g (the verify pass's own, 1 row deep);
             at least 1: the verify pass runs its newest row through every layer as a plain
             step does, and more (a fit below 1 is noise: 0.69 once, with row 0.22); one for
             every exit, their fits' mean (`costs_of`);
  row[n]     what one more drafted row adds to the verify pass: the slope of whole rounds
             over g in LENGTHS through (0, base), less draft[n].

Measured once per engine and batch size on first use (some tenths of a second to seconds),
except where decisions must not depend on the clock (`exit_decision.costs_from_parameters`:
several processes decoding together, or `EE_EXIT_COSTS=parameters` as in the test suite).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from megatron.early_exit.inference.cost_model import best_times, fit_line, work_clock
from megatron.early_exit.inference.lookup import LOOKUP
from megatron.early_exit.inference.passes import ExitPolicy
from megatron.early_exit.inference.settings import GenerationResult, GenerationSettings
from megatron.early_exit.inference.strategies.base import Batch
from megatron.early_exit.inference.strategies.draft_control import UNIT_RUN, DraftCosts, Plan

LENGTHS = (1, 4)  # draft lengths timed per exit (rounds are linear in g: see the module docstring)
PERIOD = 16  # the timing prompts repeat with this period (drafts from the context find proposals)
# Drafting rounds per timed call of the native loop (`loop_timed`): as many as a call made in
# decoding (CPU reference model, 40 aclsum abstracts, batch 1: 393 rounds in 61 calls), so that
# what a call sets up is shared by its rounds as it is there.
ROUNDS_A_CALL = 6


@torch.no_grad()
def measure_draft_costs(
    engine, batch: int, context: int, repeats: int = 11, lookup: bool = False
) -> tuple[DraftCosts, dict[str, float]]:
    """`DraftCosts` of `batch` sequences `context` tokens long on `engine`; also the timed ratios
    to the plain round ("round n/g", "draft n/g"; "loop n/g" where the native loop runs the rounds)
    for reports. `lookup`: rounds drafting from the context timed too (key `LOOKUP`; the prompts
    repeat every PERIOD tokens, so that each finds a proposal of every length timed). At one
    sequence, where the native loop runs a drafting exit's rounds and full decoding's steps
    (`loop_timed`), the rounds are priced as it runs them and the unit is its plain step."""
    exits = engine.draft_exits()
    # each sequence its own length, as in a batch of real prompts (equal ones would take the block
    # layout's slicing, which such a batch's verify passes rarely get)
    prompts = [[(7 * (j % PERIOD) + 3 * b) % engine.vocab for j in range(max(context - b, 1))] for b in range(batch)]
    room = 2 * max(LENGTHS) + 4 + (ROUNDS_A_CALL * (max(LENGTHS) + 1) + UNIT_RUN if batch == 1 else 0)
    state = engine.new_state(batch, max(context, 1) + room)  # the longest prompt's room
    with engine.packed:
        engine.prefill(state, dict(enumerate(prompts)))
    fed = list(state.fed)

    fns = plan_timed(engine, state, prompts, fed, exits, lookup)
    made: dict[str, int] = {}  # the rounds (steps) each loop call makes
    if batch == 1 and exits:
        loops = {f"loop {n}/{g}": Plan(n, g, 1.0) for n in exits for g in LENGTHS} | {"loop plain": None}
        loops = {name: loop_timed(engine, state, prompts[0], fed[0], plan, made, name) for name, plan in loops.items()}
        for fn in loops.values():
            fn()
        if all(made.values()):  # the loop runs every kind: priced as it runs them
            fns.update(loops)
    best = best_times(fns, engine.device, repeats, work_clock(engine.device))
    best = {name: v / made[name] if name in made else v for name, v in best.items()}
    unit = best.pop("loop plain") if "loop plain" in best else best.pop("plain")
    t = {name: v / unit for name, v in best.items()}
    costs = costs_of(t, exits)
    if lookup:  # no draft step; its verify pass runs every row through every layer: its own line
        row, base = fit_line([(g, t[f"round {LOOKUP}/{g}"]) for g in LENGTHS])
        costs.draft[LOOKUP], costs.row[LOOKUP], costs.base[LOOKUP] = 0.0, max(row, 0.0), max(base, 1.0)
    return costs, t


def plan_timed(engine, state, prompts: list[list[int]], fed: list[int], exits: list[int], lookup: bool) -> dict:
    """`measure_draft_costs`' functions that run one round of each kind it times through
    `SelfSpeculative.run_plan` (the drafts alone through `draft`) on `state`'s sequences (`prompts`,
    `fed` positions fed each) and put the state back."""
    from megatron.early_exit.inference.strategies import get_strategy

    strategy, batch = get_strategy("self_speculative"), len(prompts)

    def timed(plan: Plan, drafts_only: bool = False):
        def run() -> None:
            results = {b: GenerationResult(prompts[b], tokens=[prompts[b][-1]]) for b in range(batch)}
            s = GenerationSettings("self_speculative", max_new_tokens=1 << 20, ignore_eos=True, prompt_lookup_max=3)
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
    branch = getattr(engine, "can_branch", False)
    for n in exits:
        for g in LENGTHS:
            fns[f"round {n}/{g}"] = timed(Plan(n, g, 1.0))
            fns[f"draft {n}/{g}"] = timed(Plan(n, g, 1.0), drafts_only=True)
            if branch:  # every draft's alternative verified (no controller: all of them)
                fns[f"alt {n}/{g}"] = timed(Plan(n, g, 1.0, alternatives=True))
    for g in LENGTHS if lookup else ():
        fns[f"round {LOOKUP}/{g}"] = timed(Plan(LOOKUP, g, 1.0))
    fns["plain"] = timed(Plan(None, 0, 1.0))
    return fns


def loop_timed(engine, state, prompt: list[int], fed: int, plan: Plan | None, made: dict[str, int], name: str):
    """A function that runs one call of the native decode loop on `state`'s sequence 0 (`prompt`,
    `fed` positions fed) and puts the state back: ROUNDS_A_CALL rounds of `plan` as
    `SelfSpeculative.native_run` runs a sequence's rounds (the controller's part aside), or, plan
    None, UNIT_RUN plain steps as `native_rounds` runs full decoding's and the loop clock's unit
    (`draft_control.LoopClock`). It sets made[name] to the rounds (steps) the call made: 0 where the
    loop did not run them. Timed through `run_plan` instead, a round and a plain round each bore
    the Python around one round (CPU reference model, bf16, batch 1: ~0.75 ms of a ~5 ms drafting
    round, ~0.2 of a ~1.4 ms step), which the loop does not."""
    from megatron.early_exit.inference.native_loop import native_rounds
    from megatron.early_exit.inference.strategies.self_speculative import NEXT_PLAN, PLAIN, SelfSpeculative

    left = [0]

    class Fixed(SelfSpeculative):  # `plan` for ROUNDS_A_CALL rounds, then a plain plan: the loop returns
        def plan(self, engine, batch, running):
            left[0] -= 1
            return (plan if left[0] > 0 else Plan(None, 0, 1.0)), None

    def run() -> None:
        left[0] = ROUNDS_A_CALL
        r = GenerationResult(prompt, tokens=[prompt[-1]])
        job = Batch(GenerationSettings("self_speculative", max_new_tokens=1 << 20, ignore_eos=True),
                    ExitPolicy(), {0: r}, {0: [0, 0]})  # fmt: skip
        with engine.packed:
            if plan is None:
                still = native_rounds(engine, state, [0], job, PLAIN, UNIT_RUN)
            else:
                still = Fixed().native_run(engine, state, [0], job, plan, None)
        counts = job.counts[0][2:]  # the telemetry `record` keeps, once a round is recorded
        rounds = len(r.tokens) - 1 if plan is None else sum(counts[0]["draft_lengths"].values()) if counts else 0
        made[name] = 0 if still is None else rounds
        state.memo.pop(NEXT_PLAN, None)
        state.reset(0, fed)

    return run


def costs_of(t: dict[str, float], exits: list[int]) -> DraftCosts:
    """Fit `DraftCosts` from timed ratios to the plain round (see `measure_draft_costs`). One base
    for every exit, the mean of their fits (each at least 1), and each exit's row fitted through
    it: the verify passes after drafts from different exits differ by the general path's overhead
    on the layers between them (~0.015 of a step per layer, CPU reference model, bf16), less than
    the fits' spread (exit 3's base read 0.1-0.2 above exit 6's, and then the controller drafted
    from exit 6: 1.25-1.28x where exit 3 gave 1.31-1.39x)."""
    if not exits:  # a model without exits: drafts from the context alone (`measure_draft_costs`)
        return DraftCosts({}, {})
    draft, fitted = {}, {}
    key = "loop" if f"loop {exits[0]}/{LENGTHS[0]}" in t else "round"  # rounds as the native loop runs them
    for n in exits:
        draft[n] = max(fit_line([(g, t[f"draft {n}/{g}"]) for g in LENGTHS])[0], 0.0)
        fitted[n] = max(fit_line([(g, t[f"{key} {n}/{g}"]) for g in LENGTHS])[1], 1.0)  # below 1: noise
    base = sum(fitted.values()) / len(fitted)
    row, alt, alt_base = {}, {}, {}
    for n in exits:  # least squares through (0, base)
        per_g = sum(g * (t[f"{key} {n}/{g}"] - base) for g in LENGTHS) / sum(g * g for g in LENGTHS)
        row[n] = max(per_g - draft[n], 0.0)
        if f"alt {n}/{LENGTHS[0]}" in t:  # what g alternatives add to a round of g drafts
            slope, fixed = fit_line([(g, t[f"alt {n}/{g}"] - t[f"round {n}/{g}"]) for g in LENGTHS])
            alt[n], alt_base[n] = max(slope, 0.0), max(fixed, 0.0)
    return DraftCosts(draft, row, dict.fromkeys(exits, base), alt, alt_base)


def between(lo: tuple[int, DraftCosts], hi: tuple[int, DraftCosts], batch: int) -> DraftCosts:
    """The costs at `batch` from those timed at a smaller and a larger batch (`lo`, `hi`: (batch,
    costs)), each term on the line between theirs in log2(batch), for the terms both have. A
    server's start-up times its smallest and largest batch buckets only (`EarlyExitEngine.draft_costs`):
    timing every bucket took 224 s of SmolLM2's 244 s start-up (AVX2 EPYC, fp32, buckets 1-16:
    27 / 23 / 34 / 51 / 89 s), and the controller's loop clock corrects a warm start's costs
    from the rounds it runs (`LoopClock`)."""
    (b0, c0), (b1, c1) = lo, hi
    w = math.log2(batch / b0) / math.log2(b1 / b0) if b1 != b0 else 0.0

    def mix(x: dict, y: dict) -> dict:
        return {k: (1.0 - w) * x[k] + w * y[k] for k in x if k in y}

    return DraftCosts(**{f.name: mix(getattr(c0, f.name), getattr(c1, f.name)) for f in dataclasses.fields(DraftCosts)})


# ----- what a run's rounds are worth, and what the exits allow (`tools/eval/ee_sweep.py`) -----------


def rounds_units(results: list[GenerationResult], costs: DraftCosts) -> float:
    """The decode time of self-speculative `results` decoded one sequence at a time, in plain
    rounds: each round its `DraftCosts.round_time` (telemetry `draft_rounds`; a plain round 1).
    At one sequence a plain round is a full decode step, so a run's decode tokens over these units,
    against full decoding's tokens over its decode steps, is the speedup its rounds would reach if
    the engine added nothing to the timed costs (`speculative_ideal`)."""
    units = 0.0
    for r in results:
        st = r.stats
        units += st.get("draft_lengths", {}).get(0, 0)
        for n, per in st.get("draft_rounds", {}).items():
            units += sum(k * costs.round_time(n, g) for g, k in per.items())
    return units


def oracle_units(agree: dict[int, list[bool]], costs: DraftCosts, max_draft: int) -> float:
    """The fewest plain rounds' worth in which one sequence's decode steps can be made by
    self-speculation that knows each draft's fate: agree[n][i] whether exit n's greedy token at
    decode step i (given full decoding's tokens before it) is full decoding's. From each point
    (its tokens so far full decoding's) a round is plain (1 unit, one token) or drafts g <= max_draft
    tokens from an exit n that agrees at the next g steps, `DraftCosts.round_time(n, g)`, and keeps
    all of them and the final head's token after them (g + 1 tokens; at the end, those left). The
    least total by dynamic programming: the decisions' bound on lossless self-speculation with
    these exits at these costs, as `ee_sweep.oracle_of` is early exit's."""
    steps = len(next(iter(agree.values()), []))
    runs = {}  # runs[n][i]: how many steps from step i on exit n agrees at, in a row
    for n, ok in agree.items():
        run = [0] * (steps + 1)
        for i in range(steps - 1, -1, -1):
            run[i] = run[i + 1] + 1 if ok[i] else 0
        runs[n] = run
    best = [0.0] * (steps + 1)  # best[i]: the least units for steps i.. (step i is the next to make)
    for i in range(steps - 1, -1, -1):
        b = 1.0 + best[i + 1]
        for n, run in runs.items():
            for g in range(1, min(run[i], max_draft) + 1):
                b = min(b, costs.round_time(n, g) + best[min(i + g + 1, steps)])
        best[i] = b
    return best[0]


def forced_units(steps, lengths: list[int], exits: list[int], costs: DraftCosts, max_draft: int) -> float:
    """`oracle_units` summed over sequences of `lengths` tokens each (the first the prefill's), from
    full decoding's decode steps teacher-forced (`calibration.forced_steps`: a row per decode step,
    sequence after sequence; exit n's greedy token there, onto the draft vocabulary where the
    steps hold one: what a draft from n would be)."""
    tokens = steps.tokens if steps.draft_tokens is None else steps.draft_tokens
    units, at = 0.0, 0
    for length in lengths:
        k = max(length - 1, 0)
        agree = {n: (tokens[at : at + k, steps.exits.index(n)] == steps.target[at : at + k]).tolist() for n in exits}
        units += oracle_units(agree, costs, max_draft)
        at += k
    return units


def with_prefill(decode_speedup: float, prefill_share: float) -> float:
    """A whole call's speedup where decoding alone speeds up `decode_speedup` times and the prefill,
    `prefill_share` of full decoding's call, is the same: 1 / (p + (1 - p) / s)."""
    return 1.0 / (prefill_share + (1.0 - prefill_share) / max(decode_speedup, 1e-12))

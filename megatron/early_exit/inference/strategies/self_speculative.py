"""`self_speculative`: greedy and lossless. Draft up to g tokens from an exit, verify them with
one pass of the deeper layers (which reuse the drafts' pending states), keep the longest
agreeing prefix plus the final head's own token, and roll the caches back past it.

The draft exit and length are fixed (`draft_exit_layer`: an exit, None = the deepest;
`num_draft_tokens`: k) or chosen each round by `draft_control.DraftController` ("auto", the
default for either): from every verify round's acceptance and the cost model, the exit and
length with the most expected tokens per unit of time, or g = 0 (a plain full step: the
verify pass with nothing drafted) when no draft pays; a sequence also stops drafting early
when its draft's confidence says another draft does not pay. With `prompt_lookup_max` the
context is one more source (`lookup.py`, `draft_control.LOOKUP`: no draft step; its tokens go to
the verify pass after the last kept one, through every layer), and on a model without exits (an
imported one) the only one: its rounds draft from the context or are plain steps. Whatever is drafted, every kept
token is the final head's greedy token, so the output equals full greedy decoding.

One controller per engine (it learns across calls), warm-started from the checkpoint's
calibrated per-exit agreement where it has one (`model.calibrated_thresholds["agreement"]`); its
costs are rounds timed on first use at the batch size being decoded (`draft_costs.py`), the
config's weight counts where decisions must not depend on the clock, or a measured
`cost_model.DecodeCosts` set as `engine.decode_costs` (`draft_costs_for`). A round that drafts
nothing is a plain decode step on full decoding's fast path; on a greedy request without
log-probabilities its verify passes take the final head's tokens from the engine's certified
int8 head where it uses one (`token_only`).
"""

from __future__ import annotations

import math
import time
import weakref

import torch

from megatron.early_exit.inference import kernels, native
from megatron.early_exit.inference import lookup as context_lookup
from megatron.early_exit.inference.exit_decision import costs_from_parameters
from megatron.early_exit.inference.lookup import LOOKUP
from megatron.early_exit.inference.native_loop import native_rounds, step_once
from megatron.early_exit.inference.native_spec import loop_parts, spec_round
from megatron.early_exit.inference.passes import ExitPolicy
from megatron.early_exit.inference.strategies.base import Batch, Strategy
from megatron.early_exit.inference.strategies.draft_control import (
    BINS,
    MAX_DRAFT,
    DraftController,
    DraftCosts,
    Plan,
    batch_bucket,
    costs_from_config,
    costs_from_measured,
)
from megatron.early_exit.inference.strategies.draft_costs import between, measure_draft_costs

AUTO = "auto"
_CONTROLLERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # engine -> controller
_COSTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # engine -> {source: DraftCosts}


def controller_for(engine, batch: int = 1, context: int = 1, lookup: bool = False) -> DraftController:
    """The engine's controller, its costs those of `draft_costs_for` (what it learned is kept
    when they change: another batch size, a measured `engine.decode_costs` set, drafts from the
    context asked for)."""
    costs = draft_costs_for(engine, batch, context, lookup)
    ctl = _CONTROLLERS.get(engine)
    if ctl is None:
        ctl = _CONTROLLERS[engine] = DraftController(costs, agreement=calibrated_agreement(engine))
        if rounds_timed(engine):
            ctl.use_loop_clock()  # timed costs: the loop's own round times correct them (`LoopClock`)
    ctl.costs = costs
    return ctl


def rounds_timed(engine) -> bool:
    """Whether `draft_costs_for` times rounds on this engine (neither a measured
    `engine.decode_costs` set nor costs from parameter counts)."""
    return getattr(engine, "decode_costs", None) is None and not costs_from_parameters()


def draft_costs_for(engine, batch: int, context: int, lookup: bool = False) -> DraftCosts:
    """The controller's costs at `batch` sequences: from a measured `cost_model.DecodeCosts` set as
    `engine.decode_costs`; from the config's weight counts where decisions must not depend on
    the clock (`costs_from_parameters`); else rounds timed on first use at this batch size and
    the running context length (`draft_costs.measure_draft_costs`), kept for the engine's life.
    `lookup`: drafts from the context priced too (key `LOOKUP`)."""
    cache = _COSTS.setdefault(engine, {})  # source -> DraftCosts (looked up every round)
    measured = getattr(engine, "decode_costs", None)
    if measured is not None:
        held = cache.get(("decode_costs", lookup))
        if held is None or held[0] is not measured:
            held = (measured, costs_from_measured(measured, draft_depths(engine), lookup))
            cache[("decode_costs", lookup)] = held
        return held[1]
    key = ("parameters" if costs_from_parameters() else batch, lookup)
    if key not in cache:
        if key[0] == "parameters":
            cache[key] = weight_count_costs(engine, lookup)
        else:
            timed = measure_draft_costs(engine, batch, context, lookup=lookup)[0]
            cache[key] = rows_at_least(timed, weight_count_costs(engine, lookup))
    return cache[key]


def rows_at_least(costs: DraftCosts, floor: DraftCosts) -> DraftCosts:
    """`costs` (timed) with each source's verify row at least `floor`'s (the weight-count model's, a
    row at ROW_SHARE of reading the layers above the exit and the head: the CPU reference's exits 3 / 6
    0.073 / 0.053 of a plain step), in place. Fitted through two draft lengths, a row read 0.00 in 5 of
    ~25 timings on a host whose memory speed moved (AMD EPYC, bf16, batch 1; its fixed part then read up
    to 1.39 plain steps): rounds priced so and timed in the loop taught exit 3's factor the difference
    and left it drafting less than exit 6. Replayed (exits at 0.84 / 0.90 acceptance, rounds at their
    true costs, 20 seeds x 600 rounds, with `LoopClock.forget`), from such costs 4/20 runs drafted mostly
    from exit 6 and made 1.48 tokens a unit of time on average (worst 1.41); floored, 0/20 and 1.59
    (1.46), against 1.65 from the true costs."""
    for n, row in floor.row.items():
        if n in costs.row and costs.row[n] < row:
            costs.row[n] = row
    return costs


def draft_costs_at(engine, buckets: list[int], context: int) -> list[int]:
    """Costs ready for every batch bucket in `buckets` (ascending): rounds timed at the smallest and
    the largest (`draft_costs_for`) and the buckets between priced on the line between them
    (`draft_costs.between`), unless timed already. Returns the buckets timed."""
    ends = sorted({buckets[0], buckets[-1]})
    for b in ends:
        draft_costs_for(engine, b, context)
    cache = _COSTS[engine]
    lo, hi = (ends[0], cache[(ends[0], False)]), (ends[-1], cache[(ends[-1], False)])
    for b in buckets[1:-1]:
        cache.setdefault((b, False), between(lo, hi, b))
    return ends


def weight_count_costs(engine, lookup: bool = False) -> DraftCosts:
    """`costs_from_config` for the engine's draft exits, a draft vocabulary's projection priced
    where the engine drafts onto one (and drafts from the context with `lookup`)."""
    drafts = getattr(getattr(engine, "passes", None), "draft_vocab", None)  # a pipeline engine has none
    return costs_from_config(engine.config, draft_depths(engine), None if drafts is None else len(drafts), lookup)


def draft_depths(engine) -> dict[int, int]:
    return {n: engine.depth(n) for n in engine.draft_exits()}


def calibrated_agreement(engine) -> dict[int, float] | None:
    """Each exit's agreement with the final head from the checkpoint's calibration record
    (`model.calibrated_thresholds`), the controller's warm start; None without one, or for a
    record written before agreement was recorded."""
    record = getattr(getattr(engine, "model", None), "calibrated_thresholds", None)
    return (record or {}).get("agreement")


def candidates(engine, allowed: list[int]) -> list[int]:
    """The exits "auto" may draft from: below the last layer and allowed by the request."""
    drafts = engine.draft_exits()
    cands = [n for n in drafts if n in allowed]
    if not cands:
        raise ValueError(f"exit_layers: draft_exit_layer auto needs an allowed exit among {drafts}")
    return cands


def is_dynamic(s) -> bool:
    return s.draft_exit_layer == AUTO or s.num_draft_tokens == AUTO


class SelfSpeculative(Strategy):
    name = "self_speculative"
    shares_passes = False
    drafts = True
    token_only = True  # the verify keeps drafts by the final head's greedy tokens alone

    def policy(self, engine, s, allowed: list[int]) -> ExitPolicy:
        """force: the fixed draft exit (with "auto": the deepest candidate, `candidates`)."""
        if s.temperature > 0:
            raise ValueError("self_speculative decoding is greedy only: use temperature 0")
        drafts = engine.draft_exits()
        if not drafts and s.prompt_lookup_max:  # drafts from the context alone: no draft step
            if s.draft_exit_layer != AUTO:
                raise ValueError(
                    f"draft_exit_layer: {s.draft_exit_layer} is not an exit of this model (it has none below "
                    'the last layer); "auto" drafts from the context alone'
                )
            return ExitPolicy()
        if not engine.exits:
            raise ValueError("self_speculative needs a model with exits (or prompt_lookup_max: context drafts)")
        if not drafts:
            raise ValueError(
                "self_speculative needs an exit below the last layer to draft from (or prompt_lookup_max: "
                "drafts from the context)"
            )
        if s.draft_exit_layer == AUTO:
            return ExitPolicy(force=max(candidates(engine, allowed)))
        if s.draft_exit_layer is not None and s.draft_exit_layer not in drafts:
            raise ValueError(
                f"draft_exit_layer: {s.draft_exit_layer} is not an exit below the last layer (choose from {drafts})"
            )
        return ExitPolicy(force=s.draft_exit_layer if s.draft_exit_layer is not None else max(drafts))

    def plan(self, engine, batch: Batch, running: list[int]) -> tuple[Plan, DraftController | None]:
        """This round's draft exit and length: fixed, or the controller's choice."""
        s, policy = batch.settings, batch.policy
        alternatives = s.draft_alternatives and getattr(engine, "can_branch", False)
        if not is_dynamic(s):
            return Plan(policy.force, s.num_draft_tokens, 0.0, alternatives=alternatives), None
        ctl, exits, lengths = self.planning(engine, batch, running)
        if not s.prompt_lookup_max:
            plan = ctl.plan(exits, lengths, len(running), alternatives)
            if plan.exit is None and plan.observe is None and len(running) >= PLAIN_RUN_BATCH:  # may run at once
                plan.run = max(plan.run, ctl.plain_run(exits))  # (the loop clock's unit: `UNIT_RUN` at least)
            return plan, ctl
        found = proposals(batch, running, max(lengths))
        seen = [context_lookup.confidences(n, s.prompt_lookup_max, len(toks)) for toks, n in found.values()]
        plan = ctl.plan(exits, lengths, len(running), alternatives, lookup=seen)
        plan.proposals = found
        return plan, ctl

    def planning(self, engine, batch: Batch, running: list[int]) -> tuple[DraftController, list[int], list[int]]:
        """(the controller, the exits and the draft lengths it weighs) for a round of `running`:
        worked out once per batch bucket of a batch's rounds (`Batch.memo`). Asked each round, they
        took ~75 of the ~210 us of Python a round's `after` cost inside the native loop (CPU
        reference, bf16, batch 1, AMD EPYC), where the whole round took ~4.4 ms."""
        s, policy, bucket = batch.settings, batch.policy, batch_bucket(len(running))
        held = batch.memo.get(("self_speculative", bucket))
        if held is None:
            context = max(len(batch.results[b].prompt_tokens) for b in running)
            ctl = controller_for(engine, bucket, context, lookup=s.prompt_lookup_max > 0)
            if policy.force is None:  # a model without exits: the context is the only source (`policy`)
                exits = []
            else:
                exits = candidates(engine, engine.allowed_exits(s)) if s.draft_exit_layer == AUTO else [policy.force]
            lengths = list(range(1, MAX_DRAFT + 1)) if s.num_draft_tokens == AUTO else [s.num_draft_tokens]
            held = batch.memo[("self_speculative", bucket)] = (ctl, exits, lengths, ctl.costs)
        ctl, exits, lengths, costs = held
        if ctl.costs is not costs:  # the engine's controller priced another batch's bucket since
            ctl.costs = costs
        return ctl, exits, lengths

    def round(self, engine, state, running: list[int], batch: Batch) -> list[int]:
        """Draft (feed the last token, take the draft exit's greedy token, up to g and never a
        token that could not be kept), verify (feed the last draft, every drafted row through
        the deeper layers), keep the agreeing prefix, and tell the controller what agreed. One
        sequence's rounds run on in one native call while their plans allow (`native_run`)."""
        held = state.memo.pop(NEXT_PLAN, None)  # the plan `native_run`'s last round made for this one
        if held is not None and len(running) == 1 and held[0] is batch.results[running[0]]:
            plan, ctl = held[1], held[2]
        else:
            plan, ctl = self.plan(engine, batch, running)
        still = self.native_run(engine, state, running, batch, plan, ctl)
        if still is not None:
            return still
        if ctl is None or ctl.loop is None:
            return self.run_plan(engine, state, running, batch, plan, ctl)
        measured, start = kernels.measured_count(), time.perf_counter()
        first = plan.exit is not None and (FIRST_DRAFT, plan.exit) not in state.memo
        still = self.run_plan(engine, state, running, batch, plan, ctl)
        if first:  # a decode state's first round drafting from an exit makes what its rounds reuse
            state.memo[(FIRST_DRAFT, plan.exit)] = True
        elif kernels.measured_count() == measured:  # nor a round that timed kernels (a new row count's first)
            ctl.timed(plan, time.perf_counter() - start)  # the loop's own clock
        return still

    def native_run(self, engine, state, running: list[int], batch: Batch, plan: Plan, ctl) -> list[int] | None:
        """One sequence's drafting rounds in one native call (`native.spec_rounds`): each round the
        calls `fused_round` makes and what `verified_round` and `round` do after them (its tokens to
        `engine.acceptance`, the counts and telemetry, the controller told what agreed and, with its
        loop clock, what the round took: `after_rounds`), then the controller's next plan, asked of
        Python once a round: the loop goes on while that plan drafts from the same exit, else it
        stops and the next `round` takes that plan. The same drafts, tokens, exit layers,
        confidences, K/V and decisions as those rounds one by one (`tests/test_native_spec.py`).
        None where it does not apply (`native_start`): nothing done. Measured first (CPU reference,
        bf16, batch 1, 40 aclsum abstracts): a round took 4.9-5.2 ms, its native calls 4.1-4.4 and
        the Python around them 0.74-0.80 ms (py-spy: 14% of a round, ~40 functions, none above 2%)."""
        start = self.native_start(engine, state, running, batch, plan, ctl)
        if start is None:
            return None
        cap, most, parts = start
        b, acc, p = running[0], engine.acceptance, engine.passes
        r, s = batch.results[b], batch.settings_of(b)

        def keep(j: int, token: int, layer: int, conf: float) -> bool:
            acc.append(r, token, layer, conf, None)
            return not acc.stopped(r, s)

        after, now = self.after_rounds(engine, state, running, batch, plan, ctl, most)
        try:
            with engine.packed:
                native.spec_rounds(
                    b, r.tokens[-1], state.fed[b], state.cache.filled, p.num_layers, state.pending[b],
                    p.model.embedding.word_embeddings.weight, parts.draft.run.native, parts.draft.head, plan.exit,
                    parts.verify.run.native, parts.verify.head, parts.draft.run.shape, parts.tables, parts.room,
                    cap, most, stop_numbers(ctl, plan), keep, after,
                )  # fmt: skip
        finally:  # its last whole round's end (every layer's fill count: `DecodeState.reset`), an error or not
            state.fed[b] = int(state.cache.filled[p.num_layers - 1, b])
        state.memo[(FIRST_DRAFT, plan.exit)] = True  # what the state's rounds from this exit reuse is made
        still = r.finish_reason != "stop" and len(r.tokens) < s.max_new_tokens
        if still and now[0] is not plan and NEXT_PLAN not in state.memo:  # planned, then no room: the next round's
            state.memo[NEXT_PLAN] = (r, now[0], ctl)
        return [b] if still else []

    @staticmethod
    def native_start(engine, state, running: list[int], batch: Batch, plan: Plan, ctl) -> tuple | None:
        """`native_run`'s (first cap, the most drafts a round of it may take, `native_spec.LoopParts`),
        or None where it does not apply: more than one sequence, a plan that drafts nothing, reads an
        exit, verifies alternatives or drafts from the context, log-probabilities, no draft left to
        make, or `native_spec.loop_parts`' None. (A decode state's first round from an exit, which
        `round` does not time, is timed here: `loop_parts` makes what it reuses before the loop's clock
        starts.)"""
        if len(running) != 1 or plan.exit is None or plan.exit == LOOKUP or plan.observe is not None:
            return None
        r, s = batch.results[running[0]], batch.settings_of(running[0])
        if plan.alternatives or plan.proposals is not None or r.logprobs is not None:
            return None
        if getattr(engine, "passes", None) is None:
            return None
        cap, most = min(plan.cap, s.max_new_tokens - len(r.tokens) - 1), max(MAX_DRAFT, plan.cap)
        parts = None if cap <= 0 else loop_parts(engine, state, running[0], plan.exit, most)
        return None if parts is None else (cap, most, parts)

    def after_rounds(self, engine, state, running: list[int], batch: Batch, plan: Plan, ctl, most: int):
        """`native.spec_rounds`' after(round, drafts, confidences, agreed, ended, stop numbers) for
        `native_run`: the round's counts and telemetry (`record`), the controller's `worth`, `update`
        and, with its loop clock, `timed` (the round from the end of the previous one's bookkeeping),
        then the next plan (`plan`): its cap, its early stop's numbers written in, where it drafts from
        the same exit with the same controller, up to `most`; else 0, the plan left for the next `round`
        (`NEXT_PLAN`: the sequence's result, the plan, its controller). Returns (after, [the plan of
        the round under way, when its time began])."""
        b = running[0]
        r, s = batch.results[b], batch.settings_of(b)
        now = [plan, time.perf_counter()]  # the round's plan, when its time began

        def after(i: int, drafts: list[int], confs: list[float], ok: int, ended: bool, numbers) -> int:
            done, begun = now
            batch.counts[b][0] += len(drafts)
            batch.counts[b][1] += ok
            record(batch.counts[b], done.exit, len(drafts))
            done.drafted = len(drafts)
            if ctl is not None:
                done.kept, done.expected = ctl.worth(done.exit, [(confs, ok)])
                ctl.update(done.exit, [(confs, ok)])
                if ctl.loop is not None:
                    ctl.timed(done, time.perf_counter() - begun)
            if ended:
                return 0
            nxt, nctl = self.plan(engine, batch, running)
            cap = min(nxt.cap, s.max_new_tokens - len(r.tokens) - 1)
            same = nxt.exit == done.exit and nxt.observe is None and not nxt.alternatives and nxt.proposals is None
            if not (same and nctl is ctl and 0 < cap and nxt.cap <= most):
                state.memo[NEXT_PLAN] = (r, nxt, nctl)
                return 0
            for k, v in enumerate(stop_numbers(ctl, nxt)):
                numbers[k] = v
            now[:] = nxt, time.perf_counter()
            return cap

        return after, now

    def run_plan(self, engine, state, running: list[int], batch: Batch, plan: Plan, ctl) -> list[int]:
        """`round` with its plan made (`draft_costs` times rounds of chosen plans through it)."""
        if plan.exit is None and not plan.proposals:
            ran = self.plain_run(engine, state, running, batch, plan, ctl)
            if ran is not None:
                still, plan.steps = ran
                return still
        return self.verified_round(engine, state, running, batch, plan, ctl)

    def verified_round(self, engine, state, running: list[int], batch: Batch, plan: Plan, ctl) -> list[int]:
        """`run_plan`'s round through drafting and its verify pass (a plain plan's too: `plain_round`
        makes the same tokens with less around them)."""
        s, results = batch.settings, batch.results
        start = {b: state.fed[b] for b in running}  # position of the first token fed this round
        out = None  # the verify pass's, where the round's drafts made it too (`fused_round`)
        if plan.exit == LOOKUP:
            drafts, confs, last, guesses, alts = self.lookup_drafts(running, batch, plan, ctl)
        else:
            fused = self.fused_round(engine, state, running, batch, plan, ctl)
            if fused is not None:
                drafts, confs, last, guesses, alts, out = fused
            else:
                drafts, confs, last, guesses, alts = self.draft(engine, state, running, batch, plan, ctl)
        drafted = any(drafts.values())
        plan.drafted = max(map(len, drafts.values()), default=0)
        if ctl is not None and plan.alternatives:  # those whose chance of a token pays for their row
            alts = {b: {j: a[j] for j in ctl.worth_verifying(plan, confs[b])} for b, a in alts.items()}
        alts = {b: a for b, a in alts.items() if a and state.fed[b] + 1 + len(a) <= state.cache.capacity}  # room
        if out is None and plan.exit == LOOKUP and drafted:  # nothing fed yet: the last kept token, then the drafts
            out = engine.verify(state, {b: [last[b], *drafts[b]] for b in running})
        elif out is None:
            greedy = all(results[b].logprobs is None for b in running)
            out = verify(engine, state, last, drafted, None if drafted else plan.observe, alts, drafts, greedy)
        if ctl is not None and plan.observe is not None:
            seen = observations(out, plan.observe, guesses if drafted else None)
            if seen:
                ctl.update(plan.observe, seen)
        if ctl is not None and plan.proposals and plan.exit != LOOKUP:  # the context's proposals, observed free
            seen = lookup_observations(out, plan.proposals, s.prompt_lookup_max)
            if seen:
                ctl.update(LOOKUP, seen)
        still, observed, tried = [], [], []
        for b in running:
            ok, row = self.keep(engine, out, b, drafts[b], confs[b], batch, plan.exit, alts.get(b))
            kept = int(row > 0)
            if drafts[b]:
                observed.append((confs[b], ok))
            if ok in alts.get(b, ()):  # a rejection its alternative could catch
                tried.append(kept)
            record(batch.counts[b], plan.exit, len(drafts[b]), kept)
            if row:  # the kept alternative's K/V (the pass's row `row`: index start + row) into its position
                state.cache.move(b, start[b] + row, start[b] + ok + 1)
            state.reset(b, start[b] + ok + 1 + kept)  # K/V of the fed rows whose tokens were kept
            r = results[b]
            if r.finish_reason != "stop" and len(r.tokens) < batch.settings_of(b).max_new_tokens:
                still.append(b)
        if ctl is not None and observed:
            plan.kept, plan.expected = ctl.worth(plan.exit, observed)  # what the loop clock weighs its time by
            ctl.update(plan.exit, observed)
        if ctl is not None and tried:
            ctl.update_alternatives(plan.exit, tried)
        return still

    def plain_run(self, engine, state, running: list[int], batch: Batch, plan: Plan, ctl) -> tuple | None:
        """Up to `plan.run` plain rounds at once (`DraftController.plain_run`): full decoding's steps
        in one native call where the loop runs them (`native_loop.native_rounds`, each token kept as
        `plain_round` keeps it); else one `plain_round`. (The slots still running, the most steps a
        sequence made.) At 16 sequences (CPU reference, bf16), where no draft pays, self-speculation
        decoded at 0.93x full decoding with a plain round a step, 0.99x in runs; at 4 (aclsum, 48
        tokens) 0.873x -> 0.950x; at one, the demo SmolLM2 (whose exits never pay a draft) 0.946x ->
        0.977x, the CPU reference (drafting most rounds) 1.430x -> 1.444x. A plain plan reading an
        exit (`Plan.observe`) runs as `reading_run`, or gives None (the caller's `verified_round`)."""
        greedy = all(batch.results[b].logprobs is None for b in running)
        if plan.observe is not None:
            return self.reading_run(engine, state, running, batch, plan, ctl) if plan.run > 1 and greedy else None
        if plan.run > 1 and greedy:
            before = {b: len(batch.results[b].tokens) for b in running}
            still = native_rounds(engine, state, running, batch, PLAIN, plan.run)
            if still is not None:
                made = {b: len(batch.results[b].tokens) - before[b] for b in running}
                for b in running:
                    for _ in range(made[b]):
                        record(batch.counts[b], None, 0)
                steps = max(made.values())
                if ctl is not None and steps > 1:
                    ctl.ran_plain(ctl.planned, steps)
                return still, steps
        return self.plain_round(engine, state, running, batch), 1

    @staticmethod
    def reading_run(engine, state, running: list[int], batch: Batch, plan: Plan, ctl) -> tuple | None:
        """Plain rounds reading exit plan.observe's token on the way (one sequence), up to plan.run
        of them in one native call (`native_rounds` with a watch): after each step, the controller
        learns from the exit's token against the step's as `verified_round` teaches it from one
        such round, and the run goes on while the next round's plan would be the same
        (`DraftController.reads_on`). (The slots still running, the steps made), or None where the
        loop does not run it (nothing done: the caller runs one round its own way)."""
        n, result = plan.observe, batch.results[running[0]]
        before = len(result.tokens)

        def watch(b: int, token: int, guess: int, conf: float, last: bool) -> bool:
            record(batch.counts[b], None, 0)
            if guess >= 0:
                ctl.update(n, [([conf], int(guess == token))])
            return not last and ctl.reads_on(n)

        still = native_rounds(engine, state, running, batch, observing(n), plan.run, watch)
        return None if still is None else (still, len(result.tokens) - before)

    @staticmethod
    def plain_round(engine, state, running: list[int], batch: Batch) -> list[int]:
        """A round that drafts nothing and reads no exit: full decoding's step, each sequence's
        token kept as `keep` keeps the final head's (its layer, confidence and logits), without the
        drafting round's bookkeeping around it (drafts, verify rows, rollbacks). Through it, a plain
        round at 16 sequences (CPU reference, bf16) cost 3.44 ms against full decoding's 3.32 (the
        loop: 3.48 against 3.23), ~8 us a sequence more. Its step runs in the native loop where
        that applies (`native_loop.step_once`), as full decoding's do: the demo SmolLM2, whose
        exits agree too little to draft from, had decoded at 0.93x full decoding through `run`."""
        results, acc, layer = batch.results, engine.acceptance, engine.num_layers
        tokens = {b: results[b].tokens[-1] for b in running}
        out = plain_step(engine, state, tokens, PLAIN, all(results[b].logprobs is None for b in running))
        still = []
        for b in running:
            r, logits = results[b], out.logits.get(b)
            tok = out.argmax.get(b)  # a native head's, made with its logits; else the int8 head's or the logits'
            if tok is None:
                tok = out.tokens[b] if logits is None else int(logits.argmax())
            acc.append(r, tok, layer, out.confidence[b], logits)
            record(batch.counts[b], None, 0)
            if not acc.stopped(r, batch.settings_of(b)):
                still.append(b)
        return still

    def fused_round(self, engine, state, running: list[int], batch: Batch, plan: Plan, ctl) -> tuple | None:
        """`draft`'s results and the verify pass's `StepOutput` (None where the caller must verify)
        where the round's drafts from plan.exit and its verify pass run one after the other
        (`native_spec.spec_round`: no exit read on the way, no alternatives, every sequence with a
        token to draft); else None (nothing done)."""
        if plan.observe is not None or plan.alternatives or getattr(engine, "passes", None) is None:
            return None
        results = batch.results
        budget = {b: min(plan.cap, batch.settings_of(b).max_new_tokens - len(results[b].tokens) - 1) for b in running}
        last = {b: results[b].tokens[-1] for b in running}
        made = spec_round(engine, state, last, plan.exit, budget, early_stop(ctl, plan))
        if made is None:
            return None
        made, out = made
        drafts, confs = {b: made[b][0] for b in running}, {b: made[b][1] for b in running}
        return drafts, confs, dict.fromkeys(running), {}, {b: {} for b in running}, out

    def draft(self, engine, state, running: list[int], batch: Batch, plan: Plan, ctl) -> tuple[dict, ...]:
        """Up to plan.cap draft tokens per sequence from plan.exit, fewer where the controller's
        early stop says another does not pay; (drafts, confidences, last token, the first draft
        step's `StepOutput.guesses`: exit plan.observe's token there, where the plan reads one,
        and per sequence {draft index: the exit's second choice there} where `plan.alternatives`,
        else {})."""
        results = batch.results
        budget = {b: min(plan.cap, batch.settings_of(b).max_new_tokens - len(results[b].tokens) - 1) for b in running}
        last = {b: results[b].tokens[-1] for b in running}
        if plan.observe is None and not plan.alternatives:
            made = native_drafts(engine, state, running, last, budget, plan, ctl)
            if made is not None:
                return made
        drafts: dict[int, list[int]] = {b: [] for b in running}
        confs: dict[int, list[float]] = {b: [] for b in running}
        policy = batch.policy if plan.exit == batch.policy.force else ExitPolicy(force=plan.exit)
        guesses: dict = {}
        alts: dict[int, dict[int, int]] = {b: {} for b in running}  # b -> {draft index: second choice}
        for j in range(max(budget.values(), default=0)):
            feed = {b: last[b] for b in running if budget[b] > j}
            if not feed:
                break
            if j == 0 and plan.observe is not None:  # a shallower exit read on the way up
                out = engine.decode_one_token(state, feed, ExitPolicy(force=plan.exit, observe=(plan.observe,)))
                guesses = out.guesses
            else:
                out = engine.decode_one_token(state, feed, policy)
            for b, logits in out.logits.items():
                if plan.alternatives:
                    last[b], alts[b][j] = logits.topk(2).indices.tolist()
                else:
                    top = out.argmax.get(b)  # made with the logits where the draft's head ran natively
                    last[b] = int(logits.argmax()) if top is None else top
                drafts[b].append(last[b])
                confs[b].append(out.confidence[b])
                if ctl is not None and not ctl.keep_drafting(plan, confs[b]):
                    budget[b] = j + 1
        return drafts, confs, last, guesses, alts

    def lookup_drafts(self, running: list[int], batch: Batch, plan: Plan, ctl) -> tuple[dict, ...]:
        """`draft`'s results for a plan drafting from the context: each sequence's proposal
        (`plan.proposals`, made now where the plan came without them) up to plan.cap and the
        tokens left, cut where the controller's early stop says another draft does not pay; the
        last token is the last kept one (nothing is fed before the verify pass)."""
        s, results = batch.settings, batch.results
        found = plan.proposals if plan.proposals is not None else proposals(batch, running, plan.cap)
        drafts, confs = {}, {}
        for b in running:
            toks, n = found.get(b, ([], 0))
            toks = toks[: min(plan.cap, batch.settings_of(b).max_new_tokens - len(results[b].tokens) - 1)]
            conf = context_lookup.confidences(n, s.prompt_lookup_max, len(toks))
            k = len(toks) if ctl is None else min(len(toks), 1)
            while k < len(toks) and ctl.keep_drafting(plan, conf[:k], conf[k]):
                k += 1
            drafts[b], confs[b] = toks[:k], conf[:k]
        return drafts, confs, {b: results[b].tokens[-1] for b in running}, {}, {}

    def keep(
        self, engine, out, b: int, drafts: list[int], confs: list[float], batch: Batch, layer, alts=None
    ) -> tuple[int, int]:
        """Append slot b's agreeing drafts and the final head's token; where the first rejected
        draft's alternative (`alts`) is that token, the final head's token after the alternative's
        row too. Returns (how many drafts agreed, the kept alternative's row in the pass, or 0:
        the fed rows are the drafted chain's k + 1, then the alternatives in `alts`' order)."""
        final = final_tokens(out, b)  # the final head's token after each fed row, then each alternative's
        k, ok = len(drafts), 0
        while ok < k and final[ok] == drafts[ok]:
            ok += 1
        batch.counts[b][0] += k
        batch.counts[b][1] += ok
        r, acc = batch.results[b], engine.acceptance
        # the alternative at the rejected position is the final head's token: its row's token follows
        alt = k + 1 + list(alts).index(ok) if alts and alts.get(ok) == final[ok] else 0
        rows = list(range(ok + 1)) + ([alt] if alt else [])  # the rows whose final-head tokens are kept
        made = out.all_confidences.get(b)  # a native verify pass's max-probabilities (`native_run`'s too)
        for i, j in enumerate(rows):
            exit_layer, conf = (layer, confs[j]) if i < ok else (engine.num_layers, out.confidence[b])
            if i >= ok and made is not None:
                conf = made[j]
            elif i >= ok and j < len(final) - 1:  # not the pass's newest row: the final head's distribution there
                conf = float(torch.softmax(out.all_logits[b][j], -1).max())
            acc.append(r, final[j], exit_layer, conf, out.all_logits[b][j] if b in out.all_logits else None)
            if acc.stopped(r, batch.settings_of(b)):
                return ok, alt if i == len(rows) - 1 else 0  # the alternative is kept if its token is
        return ok, alt


# A decode state's memo key marking that a round drafted from an exit (its first is not timed: it
# makes the drafts' and verify pass's plans the later rounds reuse, `Passes.draft_plan` /
# `verify_plan`; CPU reference, bf16, batch 1: 1.75x its predicted time where later rounds took
# 1.2x, and an exit's loop factor, learned from few rounds, kept it plain for whole runs)
FIRST_DRAFT = "self-speculative round drafted"
# A decode state's memo key holding the plan `native_run`'s last round made and did not run: (the
# sequence's result, the plan, its controller), the next `round`'s plan for that sequence (the server
# makes a `Batch` a round; the result is the sequence's own)
NEXT_PLAN = "self-speculative next plan"
# the fewest sequences whose plain rounds run at once (`SelfSpeculative.plain_run`)
PLAIN_RUN_BATCH = 1
PLAIN = ExitPolicy()  # a plain round's: one object, which a decode state finds its checks for by identity
_OBSERVING: dict[int, ExitPolicy] = {}  # exit -> a plain round's policy that reads its token (one object each)


def observing(n: int | None) -> ExitPolicy:
    """A plain round's policy, reading exit n's greedy token on the way where n is given."""
    if n is None:
        return PLAIN
    if n not in _OBSERVING:
        _OBSERVING[n] = ExitPolicy(observe=(n,))
    return _OBSERVING[n]


def native_drafts(engine, state, running: list[int], last: dict[int, int], caps: dict[int, int], plan: Plan, ctl):
    """`SelfSpeculative.draft`'s results for the running sequences drafting up to caps[b] tokens
    from plan.exit in one native call (`Passes.native_drafts_of`: the same drafts, K/V and pending
    rows as its decode steps, each step's rows together, the controller's early stop applied in the
    loop: `early_stop`), or None where they would not run there (a pipeline engine, an exit or kernels it
    does not take): draft's own loop then runs."""
    drafts_of = getattr(getattr(engine, "passes", None), "native_drafts_of", None)
    if drafts_of is None or max(caps.values(), default=0) <= 0:
        return None
    with engine.packed:  # the last draft fed below the exit too: nothing left to feed (`verify`: last None)
        made = drafts_of(state, {b: last[b] for b in running}, plan.exit, caps, early_stop(ctl, plan), feed_last=True)
    if made is None:
        return None
    drafts = {b: made[b][0] for b in running}
    confs = {b: made[b][1] for b in running}
    return drafts, confs, {b: None if drafts[b] else last[b] for b in running}, {}, {b: {} for b in running}


def stop_numbers(ctl, plan: Plan) -> list[float]:
    """`early_stop`'s numbers as `native.spec_rounds` takes them: with no early stop, a bar every
    draft reaches (-inf) and BINS bins."""
    numbers = None if ctl is None else ctl.stop_numbers(plan)
    if numbers is None:
        return [-math.inf, 1.0] + [1.0] * BINS
    bar, accept, ok = numbers
    return [bar, accept, *ok]


def early_stop(ctl, plan: Plan) -> native.EarlyStop | None:
    """The controller's early stop for a round's native drafts (no alternatives) as the loop
    applies it (`DraftController.stop_numbers`): asked of Python after each draft instead, it
    cost ~0.05 ms of a ~5 ms round (CPU reference, bf16, batch 1). None: every draft kept."""
    numbers = None if ctl is None else ctl.stop_numbers(plan)
    return None if numbers is None else native.EarlyStop(*numbers)


def verify(
    engine, state, last: dict[int, int], drafted: bool, observe: int | None = None, alts=None, drafts=None,
    greedy: bool = False,
):  # fmt: skip
    """The verify pass: every drafted row and `last` through the remaining layers, the final
    head on each row (`all_logits`; on a greedy request, `all_tokens` from the certified int8
    head where the engine uses it). A round that drafted nothing is a plain decode step: it
    takes full decoding's uniform fast path (the general pass, which gathers rows and builds a
    causal layout per layer, cost 1.4x a full step on SmolLM2 at batch 1), same tokens; with
    `observe`, that exit's greedy token is read on the way (`ExitPolicy.observe`). `greedy` (the
    round's requests want tokens alone): such a step runs in the native loop where it applies
    (`native_loop.step_once`, `all_tokens` and no logits), as a plain round's does: a plain round
    reading exit 3 on the way had cost 1.5-2x a plain one through `Passes.run` (CPU reference,
    bf16, batch 1), the exit's check itself ~0.01 of a step."""
    if drafted and alts:  # alternative drafts after each sequence's newest draft (`kv_cache.RowIndex`)
        branch = {b: tuple(len(drafts[b]) - j for j in alts.get(b, {})) for b in last}  # draft j: k - j before the end
        return engine.verify(state, {b: [t, *alts.get(b, {}).values()] for b, t in last.items()}, branch=branch)
    if drafted:  # last[b] None: the drafts' loop fed it already (`native_drafts`)
        return engine.verify(state, {b: [] if t is None else [t] for b, t in last.items()})
    out = plain_step(engine, state, last, observing(observe), greedy)
    for b, logits in out.logits.items():
        out.all_logits[b] = logits[None]  # (1, V): the one fed row
    for b, token in out.tokens.items():  # the int8 head: a token, no logits
        out.all_tokens[b] = [token]
    for b, token in out.argmax.items():  # a native head: its logits' argmax, made with them
        out.all_tokens[b] = [token]
    return out


def plain_step(engine, state, tokens: dict[int, int], policy: ExitPolicy, greedy: bool):
    """A decode step of `tokens` under a plain round's `policy` (`PLAIN`, or `observing(n)`): in the
    native loop where it runs it and the requests want tokens alone (`greedy`: `step_once`, each
    token in `argmax`, no logits), else through `decode_one_token`."""
    out = step_once(engine, state, tokens, policy) if greedy and getattr(engine, "passes", None) is not None else None
    return out if out is not None else engine.decode_one_token(state, tokens, policy)


def proposals(batch: Batch, running: list[int], limit: int) -> dict[int, tuple[list[int], int]]:
    """Each running sequence's draft from its context (prompt and tokens so far: `lookup.propose`)."""
    s, found = batch.settings, {}
    for b in running:
        r = batch.results[b]
        context = r.prompt_tokens + r.tokens  # tokens are only ever appended: the text is extended
        r.lookup_text += context_lookup.as_text(context[len(r.lookup_text) :])
        found[b] = context_lookup.propose(context, s.prompt_lookup_max, limit, r.lookup_text)
    return found


def lookup_observations(out, found: dict, max_ngram: int) -> list[tuple[list[float], int]]:
    """A round's free observations of the context's drafts: per sequence with a proposal, ([its
    confidence], 1 if its first token is the final head's token after the round's first fed row)."""
    seen = []
    for b, (toks, n) in found.items():
        if toks and b in out.exit_layer:
            seen.append((context_lookup.confidences(n, max_ngram, 1), int(toks[0] == final_tokens(out, b)[0])))
    return seen


def observations(out, n: int, guesses: dict | None = None) -> list[tuple[list[float], int]]:
    """A round's observations of exit n for the controller, one per sequence with a guess: ([its
    max-probability], 1 if it is the final head's token after the round's first fed row else 0),
    as a round that drafted that one token would have told it. The guesses (`StepOutput.guesses`)
    are `out`'s (a plain round) or a drafting round's first draft step's (the same position)."""
    seen = []
    for b, (exit_layer, token, conf) in (out.guesses if guesses is None else guesses).items():
        if exit_layer == n and b in out.exit_layer:
            seen.append(([conf], int(token == final_tokens(out, b)[0])))
    return seen


def final_tokens(out, b: int) -> list[int]:
    """The final head's greedy token after each row slot b fed to the verify pass."""
    if b in out.all_tokens:
        return out.all_tokens[b]
    return out.all_logits[b].argmax(-1).tolist()


def record(counts: list, exit_layer: int | None, length: int, alt: int = 0) -> None:
    """Telemetry in slot b's counts ([drafted, accepted, extra stats]): rounds per draft exit,
    rounds per draft length (0: a plain full step), rounds per draft exit and length
    (`draft_rounds` {exit: {g: rounds}}: what `draft_costs.rounds_units` prices), the share of
    plain rounds and the alternative drafts kept."""
    if len(counts) < 3:
        counts.append(
            {"draft_exits": {}, "draft_lengths": {}, "draft_rounds": {}, "plain_share": 0.0, "alternatives_kept": 0}
        )
    t = counts[2]
    t["alternatives_kept"] += alt
    t["draft_lengths"][length] = t["draft_lengths"].get(length, 0) + 1
    if length:
        t["draft_exits"][exit_layer] = t["draft_exits"].get(exit_layer, 0) + 1
        per = t["draft_rounds"].setdefault(exit_layer, {})
        per[length] = per.get(length, 0) + 1
    t["plain_share"] = t["draft_lengths"].get(0, 0) / sum(t["draft_lengths"].values())

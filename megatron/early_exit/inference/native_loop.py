"""Greedy decode steps in one native call: full decoding, and early exit with learned checks
under the exact policy or cost_aware's windows, for the rounds of `Strategy.round` (`native_rounds`).

A decode step on the CPU reference model (bf16, batch 1) took ~1.2 ms, ~1.0 of it in its native
calls (the run of layers, the head) and ~0.2 ms in the Python around them: the pass's setup
(`Passes.run`: the policy, the uniform layers, the layout and rotary angles, the checks), the
head's bookkeeping (`StepOutput`, `record_head`), the strategy's round and `Acceptance.accept`
(~270 Python calls a step). A step leaving at exit 3 ran ~0.27 ms natively and paid the same
~0.2 ms around it, so the Python was 45% of what early exit decodes at and hid a third of what
its skipped layers save. `native.decode` runs the steps themselves in C, the same calls in the
same order as `Passes.run` makes them (the uniform run of layers with the checks on its way,
pending rows joining at the layers where they start, the exit's head or the final head), so the
same tokens, exit layers, confidences and K/V (`tests/test_native_loop.py`), and comes back to
Python once a token, for `Acceptance` to record it and say whether the sequence stops.

It applies to greedy rounds that need tokens alone (no log-probabilities, no logit bias), on a
whole model on the CPU with the native kernels at every row count a step can take (`rows_cap`),
lean layers, a plain embedding, no forward hook, no profiling, no int8 head, no exit with a block
of its own; each exit's check a native learned probe (`UniformCheck.native`) on an exit that is
its norm alone or a lean MLP sub-block and its norm (`exit_parts`). Under cost_aware (at one
sequence it is exact with native checks: `Passes.solo_policy`) the loop runs its clock's windows
(`Window`): a paused one's steps as full decoding's, an on or free one's asking the decider at
each exit of each step whether it evaluates and whether the rows that fire leave (`native.decode`'s
decide: the calls `Passes.run`'s checks make, in its order, so the same decisions and the same
records). Those passes had run step by step in Python, whose ~0.2 ms a step is what a batch-4 step
saves by leaving: CPU reference, bf16, 32 tokens, learned 0.8 at batch 4 decoded at 0.88x full
decoding paired under the clock (its on windows at 0.83x), 1.06x with them in the loop (on
1.09x). Elsewhere `plan` gives None and the round runs as before. `Passes.native_loop` (class
attribute) False turns it off.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import numpy as np

from megatron.early_exit.inference import kernels, lean, native
from megatron.early_exit.inference.exit_clock import PAUSED
from megatron.early_exit.inference.exit_decision import decider_of
from megatron.early_exit.inference.fused_check import sigmoid
from megatron.early_exit.inference.passes import ExitPolicy, Rows
from megatron.early_exit.inference.uniform_check import PlannedCheck, UniformCheck, uniform_checks
from megatron.early_exit.model.gpt import HeadOps
from megatron.early_exit.model.norm import RMSNorm


@dataclass
class LoopPlan:
    """What `native.decode` takes of a decode state and policy, worked out once: the layers' run
    (`lean.NativeRun`), the exits (`native.DecodeExit`) and the final head, their shifts (a
    check's confidence is sigmoid(score + shift)), the most rows a layer call may take (every row
    count up to it checked native: `lean.runs_natively`, raised as steps want more: `more_rows`)."""

    run: lean.NativeRun
    exits: list[native.DecodeExit]
    head: native.DecodeHead
    shifts: dict[int, float]
    rows_cap: int
    # each exit's `UniformCheck` where the policy is cost_aware (its decider says, at each exit of
    # each step, whether it is evaluated and whether firing rows leave: `Window.decide`); [] exact
    checks: list = dataclasses.field(default_factory=list)

    @functools.cached_property
    def heads(self) -> native.DecodeArgs:
        """The exits and final head as `native.decode` takes them, made once."""
        return native.DecodeArgs(self.exits, self.head)

    def more_rows(self, wanted: int, linear: lean.LeanKernels) -> bool:
        """Raise `rows_cap` to `wanted` where the layers run natively at every row count up to it
        (a count first met is measured then, as the general pass would measure it), and on through
        the counts of wanted's kernel bucket (`kernels.bucket_top`: its counts share wanted's kernels)
        that run natively; whether it rose. Raised to `wanted` alone, it rose one row a step where
        tokens left early step after step (each adds a pending row above the exit, which a step that
        goes through would take): the CPU reference model at threshold 0.3 (bf16, batch 1) made each
        step in two native calls, one handing back for the next row count, and one round a step."""
        if not all(lean.runs_natively(self.run, a, linear) for a in range(self.rows_cap + 1, wanted + 1)):
            return False
        self.rows_cap = wanted
        for a in range(wanted + 1, min(kernels.bucket_top(wanted), lean.FOLD_ROWS) + 1):
            if not lean.runs_natively(self.run, a, linear):
                break
            self.rows_cap = a
        return True

    def confidence(self, layer: int, conf: float, score: float) -> float:
        """A token's confidence as the step path records it: at an exit its check's sigmoid(score +
        shift), at the final head the head's max-probability `conf`."""
        return sigmoid(score + self.shifts[layer]) if layer in self.shifts else conf

    def steps(
        self, engine, state, seqs: list[int], tokens: list[int], limits: list[int], keep, decide=None, seen=None
    ) -> tuple:  # fmt: skip
        """`native.decode` of the sequences `seqs` from `tokens`, up to limits[i] steps each, their
        positions fed updated (`decide`: the cost_aware checks' decisions, `Window.decide`; `seen`:
        `native.Seen`, an observed exit's tokens); where
        its first step wanted more rows than `rows_cap`, the cap raised (`more_rows`) and the call
        made again; where a later step did, the cap raised for the next call (which would otherwise
        make no step and hand back once more). Returns (steps made, rows a step wanted, else 0)."""
        if self.checks and decide is None:
            raise ValueError("a cost_aware plan's loop needs its decider's decisions (decide)")
        passes = engine.passes
        cos, _, neg = passes.rotary_tables(max(state.fed[b] + n for b, n in zip(seqs, limits)) + 1)[:3]
        while True:
            fed = [state.fed[b] for b in seqs]
            with engine.packed:
                made, wanted = native.decode(
                    tokens, seqs, fed, state.cache.filled, state.pending, limits, self.rows_cap,
                    passes.model.embedding.word_embeddings.weight, self.run.native, self.run.shape, (cos, neg),
                    self.heads, keep, decide, seen,
                )  # fmt: skip
            for b, f in zip(seqs, fed):
                state.fed[b] = f
            raised = bool(wanted) and self.more_rows(wanted, passes.lean_kernels)  # after steps made: the next call's
            if made or not raised:
                return made, wanted


def plan(passes, state, policy, batch: int) -> LoopPlan | None:
    """The loop's plan for `batch` sequences of `state` under `policy` (as `Passes.run` resolves
    it), or None where the loop does not apply (see the module docstring). Memoised per decode
    state, by the policy's identity (a decode's rounds pass one object; a replayed step alternates
    two or three: `cost_model.saved_steps`) and batch size."""
    key = ("native loop", id(policy), batch)  # the policy kept beside its plan: its id is not reused while kept
    kept = state.memo.get(key)
    if kept is not None and kept[0] is policy:
        return kept[1]
    made = _plan(passes, state, policy, batch)
    state.memo[key] = (policy, made)
    return made


def _plan(passes, state, policy, batch: int) -> LoopPlan | None:
    m, L = passes.model, passes.num_layers
    if not (getattr(passes, "native_loop", False) and native.library() and passes.lean_on()):
        return None
    if passes.profile or passes.start or passes.end != L or passes.device.type != "cpu" or m.rotary is None:
        return None
    if passes.block_slots or passes.int8_head() or not passes.plain_embedding() or policy.force is not None:
        return None
    if state.pending.shape[1] == 0 or type(m.head_ops) is not HeadOps:
        return None
    if policy.observe and (
        len(policy.observe) > 1 or policy.mode != "exact" or any(policy.threshold_of(n) < 1.0 for n in policy.allowed)
    ):
        return None  # one observed exit alone (`step_once` reads its tokens): else the step path's
    run = passes.layer_run(state, 0, L)
    emb = m.embedding.word_embeddings.weight
    if run is None or run.native.dtype != emb.dtype or not state.pending.is_contiguous():
        return None
    passes.lean_kernels.sync()
    exits, final = loop_exits(passes, state, policy, batch), m.decoder.final_layernorm
    if exits is None or batch > lean.FOLD_ROWS or not takes_head(m.output_weight(), final, emb.dtype):
        return None
    if not all(lean.runs_natively(run, a, passes.lean_kernels) for a in range(1, batch + 1)):
        return None
    head = native.DecodeHead(kernels.native_copy(m.output_weight()), passes.vocab, None, (final.weight, final.eps))
    shifts = {e.layer: shift for e, shift, _ in exits if shift is not None}  # a vocabulary check's: its max-probability
    checks = [c for _, _, c in exits] if policy.mode == "cost_aware" else []
    return LoopPlan(run, [e for e, _, _ in exits], head, shifts, batch, checks)


def takes_head(weight, norm, dtype) -> bool:
    """Whether the loop's native head (`ee_head`) takes `weight` through the RMSNorm `norm` on rows of
    `dtype`. The loop's heads take the native kernel whatever a head's own kernel choice would be
    at these few rows (`kernels`: the native kernel and F.linear within a few % there, so that which
    one a process measured faster was chance: a draft head's 747 x 384 fp32 rows took F.linear in 3
    processes of 3 timed alone, and early exit's steps then ran through `Passes.run` at 1.2x full
    decoding where they run here at 1.7x); a step's numbers there differ from a head on F.linear by
    round-off, as two processes' kernel choices do."""
    if weight.dtype != dtype or weight.dim() != 2 or type(norm) is not RMSNorm or norm.weight.dtype != dtype:
        return False
    return not lean.watched((norm,))


def loop_exits(passes, state, policy, batch: int) -> list[tuple[native.DecodeExit, float, UniformCheck]] | None:
    """(exit, its shift, its check) for each exit `policy` evaluates, by depth, where each is a
    native learned check (`UniformCheck.native`) on an exit whose head the loop runs natively at up
    to `batch` rows (`exit_parts`); [] where it evaluates none; None where an exit does not
    qualify."""
    by_depth = passes.exits_by_depth(policy)
    if not by_depth:
        return []
    if any(len(ns) != 1 or d >= passes.num_layers for d, ns in by_depth.items()):
        return None
    if policy.observe:  # exits whose tokens are read (`plan`: nothing else evaluated)
        return observed_exits(passes, state, by_depth)
    checks, out = uniform_checks(passes, state, policy, by_depth), []
    for d in sorted(by_depth):
        n = by_depth[d][0]
        check = checks.get(n)
        vocab = isinstance(check, PlannedCheck) and policy.measure == "max_prob"  # the head itself checks
        if not isinstance(check, UniformCheck) or (check.native is None and not vocab):
            return None
        made = decode_head(passes, state, check.head, draft=not vocab and policy.vocab == "draft")
        if made is None:
            return None
        if vocab:  # compared as torch compares an fp32 confidence with a Python float: in fp32
            probe, bound, shift = None, float(np.float32(policy.threshold_of(n))), None
        else:
            (probe, bound), shift = check.native, check.shift
        out.append((native.DecodeExit(d, n, probe, bound, *made), shift, check))
    return out


def observed_exits(passes, state, by_depth: dict[int, list[int]]) -> list[tuple] | None:
    """(exit, None, None) for each observed exit (`ExitPolicy.observe`), by depth: a vocabulary
    check whose bound (+inf) no row reaches, its head over the draft vocabulary where the passes
    draft onto one (`Passes.observe_exit`'s token and max-probability: `native.Seen`); None where
    an exit's head does not run natively."""
    out = []
    for d in sorted(by_depth):
        n = by_depth[d][0]
        made = decode_head(passes, state, passes.exit_head(state, n), draft=passes.draft_vocab is not None)
        if made is None:
            return None
        out.append((native.DecodeExit(d, n, None, math.inf, *made), None, None))
    return out


def decode_head(passes, state, head, draft: bool) -> tuple | None:
    """(exit `head` as `native.DecodeHead` takes it: its output weight's rows at the draft
    vocabulary where `draft`, else the whole (real) vocabulary's, through its norm; its MLP
    sub-block as `native.DecodeExit.mlp` takes it, or None), where the loop runs it natively
    (`exit_parts`, temperature 1, `takes_head`); else None."""
    norm, mlp = exit_parts(passes, state, head)
    if norm is None or head.temperature != 1.0:
        return None
    if draft:
        rows, count, ids = passes.draft_rows(head), len(passes.draft_vocab), passes.draft_vocab
    else:
        rows, count, ids = head.output_weight(passes.model.tied_output_weight()), passes.vocab, None
    if not takes_head(rows, norm, passes.dtype):
        return None
    return native.DecodeHead(kernels.native_copy(rows), count, ids, (norm.weight, norm.eps)), mlp


def exit_parts(passes, state, head) -> tuple:
    """(the exit's last RMSNorm, its MLP sub-block as `native.DecodeExit.mlp` takes it or None)
    where the loop runs its head: its norm alone, or a lean MLP sub-block (`lean.ExitMLP`, bias-free
    SwiGLU, no hook on it) and an RMSNorm; (None, None) else."""
    norm = lean.exit_norm(head)
    if norm is not None:
        return norm, None
    mlp = state.remembered(("exit mlp", id(head)), lambda: lean.exit_mlp(head))
    if mlp is None or mlp.hooked() or type(head.norm) is not RMSNorm or mlp.fc1.dtype != passes.dtype:
        return None, None
    width = mlp.fc2.shape[1]
    return head.norm, (kernels.native_copy(mlp.fc1), kernels.native_copy(mlp.fc2), width, (mlp.w, mlp.eps))


FULL = ExitPolicy()  # a paused window's passes: no exit evaluated (one object: `plan` finds it by identity)


def native_rounds(
    engine, state, running: list[int], batch, policy=None, cap: int | None = None, watch=None
) -> list[int] | None:  # fmt: skip
    """`Strategy.round`'s rounds for the `running` slots in one native call, each token recorded
    by `engine.acceptance` as `accept` records it (its exit layer, its confidence: the check's
    sigmoid(score + shift) at an exit, the final head's max-probability) until every sequence
    stops, reaches its length, the clock's window ends (`Window`), or the loop must hand a step
    back (more rows than the native kernels were found to take: the round then runs that step its
    own way); the slots still running, or None where the loop does not apply or made no step
    (nothing done). `policy`: the rounds' own (default the batch's); `cap`: at most that many
    steps a sequence (self-speculation's plain runs: `SelfSpeculative.plain_round`). `watch`: where
    `policy` reads an exit's token on the way (`ExitPolicy.observe`), watch(b, token, the exit's
    token or -1, its max-probability, whether b's rounds end with this step) after each step
    (recorded), whose False stops every sequence after it (self-speculation's reading runs)."""
    found = loop_for(engine, state, running, batch, policy, reading=watch is not None)
    if found is None:
        return None
    passes, made, window = found
    results, acc, room = batch.results, engine.acceptance, state.cache.capacity - 1
    left = {b: min(batch.settings_of(b).max_new_tokens - len(results[b].tokens), room - state.fed[b]) for b in running}
    if cap is not None:
        left = {b: min(n, cap) for b, n in left.items()}
    if min(left.values()) <= 0:
        return None
    stopped: set[int] = set()
    seen = None if watch is None else native.Seen(len(running))

    def keep(s: int, step: int, token: int, layer: int, conf: float, score: float) -> int:
        if window is not None:
            window.passed(step)
        b = running[s]
        r = results[b]
        acc.append(r, token, layer, made.confidence(layer, conf, score), None)
        left[b] -= 1
        done = acc.stopped(r, batch.settings_of(b))
        if done:
            stopped.add(b)
        if seen is not None and not watch(b, token, seen.tokens[s], float(seen.conf[s]), done or left[b] <= 0):
            return 0 if done else -1
        if window is None:
            return 0 if done else 1
        window.mark = window.clock.clock()  # the next step's time starts after this bookkeeping
        return -1 if window.halted else 0 if done else 1

    decide = None if window is None else window.begin(running, made.checks)
    tokens, limits = [results[b].tokens[-1] for b in running], [left[b] for b in running]
    steps, _ = made.steps(engine, state, running, tokens, limits, keep, decide, seen)
    return None if steps == 0 else [b for b in running if b not in stopped]


def loop_for(engine, state, running: list[int], batch, policy=None, reading: bool = False) -> tuple | None:
    """(passes, `LoopPlan`, `Window` or None) for a round of the `running` slots: greedy, tokens
    alone, the policy as `Passes.run` resolves it (cost_aware: its clock's current window);
    None where the loop does not apply. A policy reading an exit's tokens (`ExitPolicy.observe`)
    only where the caller reads them (`reading`: `native_rounds`'s watch, `step_once`)."""
    passes = getattr(engine, "passes", None)
    if passes is None or not running or getattr(batch.settings, "logit_bias", None):
        return None
    if (batch.policy if policy is None else policy).observe and not reading:
        return None
    if any(batch.settings_of(b).temperature > 0 or batch.settings_of(b).return_logprobs for b in running):
        return None
    found = planned(passes, state, running, batch.policy if policy is None else policy)
    return None if found is None else (passes, *found)


def planned(passes, state, seqs: list[int], policy) -> tuple | None:
    """(`LoopPlan`, `Window` or None) for a pass of `seqs` under `policy` as `Passes.run` resolves it
    (`Passes.solo_policy`; cost_aware with exits to evaluate: its clock's current window, whose
    policy the loop runs), or None where the loop does not apply."""
    policy, window = passes.solo_policy(state, {b: [0] for b in seqs}, policy), None
    if policy.mode == "cost_aware" and passes.exits_by_depth(policy):  # its clock's window (none to evaluate: full's)
        window = clock_window(passes, state, policy, len(seqs))
        if window is None:
            return None
        policy = window.runs
    made = plan(passes, state, policy, len(seqs))
    return None if made is None else (made, window)


class Window:
    """cost_aware's clock (`exit_clock.ExitClock`, or a `FixedMode`) while its current window for
    (policy, pass size) runs: PAUSED (the loop runs `FULL`'s passes), ON or FREE (the policy's
    own: at each exit the decider says whether it is evaluated and whether the rows that fire
    leave, `decide`, the calls `Passes.run`'s checks make), each native step charged to it as
    `Passes.run` charges a pass (`Track.charge`: the seconds of the step itself, not of the
    callback's bookkeeping); the loop halts where the window ends and the next one is another
    mode (`halted`)."""

    def __init__(self, clock, track, mode: int, runs, decider=None, passes=None) -> None:
        self.clock, self.track, self.mode, self.runs = clock, track, mode, runs
        self.decider, self.passes = decider, passes
        self.halted, self.mark, self.step = False, 0.0, -1
        self.seqs: list[int] = []  # the call's sequences, in its order
        self.checks: list = []  # the plan's checks, by exit index (`LoopPlan.checks`)
        self.begins = True  # the next `decide` is the first of a step
        self.rows: Rows | None = None  # the sequences at the exit last asked about, and their rows
        self.cand: list[int] = []

    def begin(self, seqs: list[int], checks: list):
        """A native call over `seqs` with the plan's `checks` begins: its first step's time starts.
        Returns the call's decide callback (`decide`), or None where no exit is checked (paused)."""
        self.seqs, self.checks, self.begins = seqs, checks, True
        self.mark, self.step = self.clock.clock(), -1
        return self.decide if checks else None

    def passed(self, step: int) -> None:
        """Told once per sequence after each step (`step`: its number in the call): at the
        first, the step's seconds since the last bookkeeping are charged and `halted` says whether
        the window ended with it."""
        if step != self.step:
            self.step, self.begins = step, True
            self.track.charge(self.clock.clock() - self.mark)
            self.halted = self.track.mode != self.mode

    def decide(self, e: int, phase: int, info: list[int], fires: list[int]) -> bool:
        """`native.decode`'s decide at the plan's exit e: phase 0, whether its check evaluates the
        rows there (`info`: each sequence's rows there, then whether it held pending rows as the
        step began), counting a skip as the step's check counts it (`UniformCheck.due` where each
        sequence has its new row alone there, else `ExitDecider.worth_checking` as
        `Passes.check_exit` asks it); phase 1, whether the rows `fires` (indices among the
        sequences there) leave (`ExitDecider.choose`, which records the evaluation). As
        `exit_decision.pass_begins` and `Passes.run_pass` do before a pass, the first call of a
        step sets which sequences hold pending rows (`Passes.holding`) and the track's `fired`."""
        check, passes, decider = self.checks[e], self.passes, self.decider
        if phase == 1:
            return bool(decider.choose(passes, check.n, fires, self.rows, self.cand, self.runs))
        k = len(self.seqs)
        if self.begins:
            self.begins = False
            passes.holding = {b for b, held in zip(self.seqs, info[k:]) if held}
            self.track.fired = decider.may_fire(passes, self.runs)
        at = [s for s in range(k) if info[s]]
        self.rows = rows = Rows([self.seqs[s] for s in at], None, [info[s] for s in at], None)
        self.cand = check.candidates(len(at))
        if all(info[s] == 1 for s in at):
            return check.due(rows)
        return decider.worth_checking(passes, check.n, rows, self.cand, self.runs)


def clock_window(passes, state, policy, batch: int) -> Window | None:
    """A `Window` where the decider's clock times this policy's decode steps at this pass size
    (the decider set to its current window's mode), else None: the round runs its own way."""
    decider = decider_of(passes)
    if decider.costs is None or passes.profile or not passes.exits_by_depth(policy):
        return None
    clock = decider.clock_for(passes)
    track = None if clock is None else clock.track_of((policy, batch))
    if track is None:
        return None
    track.fired = decider.may_fire(passes, policy)  # as `exit_decision.pass_begins` tells it each pass
    decider.set_mode(track.mode)
    if track.mode == PAUSED:
        return Window(clock, track, PAUSED, FULL)
    return Window(clock, track, track.mode, policy, decider, passes)


def step_once(engine, state, tokens: dict[int, int], policy):
    """One decode step of each sequence in `tokens` as the loop runs it (a `StepOutput` with each
    one's token in `argmax`, its exit layer and confidence, no logits): a replayed step timed as
    greedy decoding runs it (`cost_model.saved_steps`), a self-speculative plain round
    (`SelfSpeculative.plain_round`), a server's greedy step (`EarlyExitEngine.decode_one_token`
    with `argmax`); under cost_aware, its clock's window's step, charged to it (`Window`). None
    where the loop would not run it (`plan` gives none, or cost_aware's clock times no window
    for it: nothing done)."""
    from megatron.early_exit.inference.passes import StepOutput

    passes, seqs = engine.passes, list(tokens)
    found = planned(passes, state, seqs, policy)
    if found is None:
        return None
    (made, window), out = found, StepOutput()
    seen = native.Seen(len(seqs)) if policy.observe else None

    def keep(s: int, step: int, token: int, layer: int, conf: float, score: float) -> int:
        if window is not None:
            window.passed(step)
        b = seqs[s]
        out.argmax[b], out.exit_layer[b], out.confidence[b] = token, layer, made.confidence(layer, conf, score)
        if seen is not None and seen.tokens[s] >= 0:  # the observed exit's token (`Passes.observe_exit`)
            out.guesses[b] = (policy.observe[0], seen.tokens[s], float(seen.conf[s]))
        return 0

    decide = None if window is None else window.begin(seqs, made.checks)
    steps, _ = made.steps(engine, state, seqs, [tokens[b] for b in seqs], [1] * len(seqs), keep, decide, seen)
    if not steps:
        return None
    layer = out.exit_layer  # the order the pass gives them in: by exit layer, then as fed (`StepOutput.order`)
    out.exit_layer = {b: layer[b] for b in sorted(layer, key=lambda b: layer[b])}
    return out

"""The pass machinery: KV cache, rows, pending-state fill, exits evaluated at their depth.

One *pass* pushes, for every sequence in it, the rows that lack K/V at each layer through
that layer. At layer i the rows of sequence b are its positions [filled[i, b], end), where
`end` is how far depth i reaches: the states of earlier tokens that exited after exactly i
layers ("pending", remembered at their exit depth), then the rows carried up from layer
i-1 (which end with the newest token). This is EE-LLM's KV recomputation: a deeper layer's
missing K/V are computed from exactly the input the full model would have given it, the
next time a token of that sequence goes deeper, inside the same batched pass. Every
sequence has its own positions (starting at 0) and its own number of rows; rows are
right-padded to the longest in the pass and the padding is masked out.

An exit at layer n reads the hidden state after `depth(n)` layers: n, or n - 1 with
`pre_exit`. An exit with its own transformer block (`use_exit_block`) keeps its own KV
cache; its inputs are recorded as rows pass its depth and the block catches up lazily, only
when the exit is evaluated.

`Passes` runs a model's layers [start, end) (all of them, or one pipeline stage's); nothing
here knows about strategies, sampling or stopping.

Shape legend: B batch slots, A sequences in one pass, R rows per sequence in that pass
(padded), T cache capacity, h hidden, V vocabulary (real, unpadded).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from megatron.early_exit.derived import DerivedCopies
from megatron.early_exit.inference import greedy_head, kernels, lean, native
from megatron.early_exit.inference.confidence import get_measure, max_prob
from megatron.early_exit.inference.exit_decision import decide, exits_paused, pass_begins, worth_checking
from megatron.early_exit.inference.fused_check import folded_probe, logit_threshold, sigmoid
from megatron.early_exit.inference.kv_cache import DecodeIndex, KVCache, RowIndex, row_positions
from megatron.early_exit.inference.uniform_check import DraftCheck, UniformCheck, layer_probe, uniform_checks
from megatron.early_exit.model.gpt import Embedding, HeadOps
from megatron.early_exit.model.norm import RMSNorm


@dataclass(frozen=True)
class ExitPolicy:
    """Which exits a pass evaluates and when they fire. The default runs the full model."""

    allowed: tuple[int, ...] = ()  # exit layer numbers that may fire
    threshold: float = 1.0
    measure: str = "max_prob"
    force: int | None = None  # this exit always fires (self-speculative drafting)
    per_exit: tuple[tuple[int, float], ...] = ()  # (exit, threshold) pairs overriding `threshold` (calibrated)
    mode: str = "exact"  # exact: every allowed exit, every row; cost_aware: where leaving pays (exit_decision.py)
    # Exits whose greedy token and max-probability are recorded for every new row's sequence
    # (`StepOutput.guesses`), never firing: a plain round of dynamic self-speculation observes
    # its draft exit's agreement with the final head (`draft_control.Plan.observe`).
    observe: tuple[int, ...] = ()
    # What a leaving token is chosen from: "full" (the exit's whole projection) or "draft" (its
    # rows at `Passes.draft_vocab` alone: `GenerationSettings.exit_vocabulary`).
    vocab: str = "full"

    def threshold_of(self, n: int) -> float:
        """Exit n's threshold: its own calibrated one where given, else the shared one."""
        for layer, threshold in self.per_exit:  # a few pairs at most: no dict built per check
            if layer == n:
                return threshold
        return self.threshold


@dataclass
class StepOutput:
    """What one pass produced for each sequence b that got a token out of it, in the order the
    pass produced them (shallowest exit first, then by slot): token acceptance samples in it."""

    logits: dict[int, torch.Tensor] = field(default_factory=dict)  # b -> [V] logits of the newest token
    exit_layer: dict[int, int] = field(default_factory=dict)
    confidence: dict[int, float] = field(default_factory=dict)
    all_logits: dict[int, torch.Tensor] = field(default_factory=dict)  # b -> [R, V] final logits of every row
    tokens: dict[int, int] = field(default_factory=dict)  # b -> greedy token where no logits came (pipeline, int8)
    # b -> the final head's greedy token of every row, where the int8 head made them (`all_logits`
    # then holds its near-exact logits: the candidates' exact values, the others within the bound)
    all_tokens: dict[int, list[int]] = field(default_factory=dict)
    row_exit_layer: dict[int, list[int]] = field(default_factory=dict)  # b -> layer per new row (scoring.py)
    guesses: dict[int, tuple[int, int, float]] = field(default_factory=dict)  # b -> (exit, token, max-prob): `observe`
    argmax: dict[int, int] = field(default_factory=dict)  # b -> logits[b]'s argmax, where the pass made it (a draft)
    # b -> the final head's max-probability of every row, where a native verify pass made them with
    # its tokens (`record_rows`: its kernel's 1 / the softmax's sum; a self-speculative round keeps them)
    all_confidences: dict[int, list[float]] = field(default_factory=dict)

    def order(self) -> list[int]:
        return list(self.exit_layer)


@dataclass
class DraftPlan:
    """A round's drafts from one exit as `Passes.native_drafts_of` runs them (`Passes.draft_plan`)."""

    run: lean.NativeRun  # the layers below the exit
    head: tuple  # the draft head as `native.drafts` takes it: packed rows, their count, the ids, the norm's args
    hooks: tuple  # the hook dicts of the embedding, the layers and the exit's norm (`lean.hooks_set`)


@dataclass
class VerifyPlan:
    """A verify pass of rows pending at one depth as `Passes.verify_pending` runs it (`Passes.verify_plan`)."""

    run: lean.NativeRun  # the layers from the depth on
    head: native.DecodeHead  # the final head
    hooks: tuple  # the layers' hook dicts (`lean.hooks_set`; the final norm's: `Passes.vocab_native`)
    norm_hooks: tuple = ()  # the final norm's hook dicts
    rows: dict[tuple, bool] = field(default_factory=dict)  # (row count, dtype, packed) -> `takes` but the hooks

    def takes(self, passes, rows: int, dtype) -> bool:
        """Whether the pass over `rows` rows of `dtype` runs in one native call: the layers' and the
        head's kernels at that row count (`lean.runs_natively`, `Passes.vocab_native`), looked up
        once (~0.05 ms a verify pass at batch 1 looked up each time), the final norm's hooks
        checked each time."""
        key = (rows, dtype, passes.lean_kernels.packed)
        ok = self.rows.get(key)
        if ok is None:
            m, ok = passes.model, lean.rows_natively(self.run.products, rows, passes.lean_kernels)
            ok = self.rows[key] = ok and passes.vocab_native(rows, dtype, m.output_weight(), m.decoder.final_layernorm)
        return ok and not lean.hooks_set(self.norm_hooks)


@dataclass
class DecodeState:
    """Per-batch state: the caches and how far each sequence has been fed."""

    cache: KVCache
    pending: torch.Tensor  # [B, T+1, h]: hidden state of each early-exited position at its exit depth
    fed: list[int]  # positions 0..fed-1 of sequence b have been embedded
    exit_cache: KVCache | None = None  # one "layer" per exit with a transformer block
    exit_inputs: torch.Tensor | None = None  # [E, B, T+1, h] block inputs per position
    exit_time: float = 0.0
    # What exit checks look up once per state: ("head", n) -> exit n's module, ("folded", id(head))
    # -> its folded probe or None (`fused_check.folded_probe`), ("uniform checks",) -> the checks
    # of uniform decode steps per policy (`uniform_check.uniform_checks`). Right after a layer has streamed
    # its weights through the caches, checking that a probe's tensors are unchanged costs ~17 us
    # and finding a module in the model ~9 us, together half a fused check; modules and weights
    # are not changed in the middle of a decode (a new `generate` call sees any change).
    memo: dict[tuple, object] = field(default_factory=dict)

    def remembered(self, key: tuple, make):
        """`memo[key]`, made by `make()` the first time."""
        if key not in self.memo:
            self.memo[key] = make()
        return self.memo[key]

    def reset(self, b: int, length: int = 0) -> None:
        """Forget slot b's K/V at positions >= length (0: the slot is free for a new sequence)."""
        self.cache.truncate(b, length)
        if self.exit_cache is not None:
            self.exit_cache.truncate(b, length)
        self.fed[b] = length


@dataclass
class Rows:
    """A pass's rows at some depth: sequence b = seqs[a] has rows x[a, :n[a]] at positions lo[a]..lo[a]+n[a]-1."""

    seqs: list[int]
    lo: list[int]
    n: list[int]
    x: torch.Tensor  # (A, R, h)
    layout: tuple | None = None  # (RowIndex, rotary) of these rows in the pass's cache, once looked up (`advance`)

    def subset(self, keep) -> Rows:
        """The rows of the sequences in `keep`, padding trimmed to the longest kept."""
        idx = [a for a, b in enumerate(self.seqs) if b in keep]
        n = [self.n[a] for a in idx]
        return Rows([self.seqs[a] for a in idx], [self.lo[a] for a in idx], n, self.x[idx, : max(n, default=1)])


def counted(checks: dict, exits, rows: Rows) -> None:
    """What the uniform checks of `exits` count on reaching these rows (`UniformCheck.due`)."""
    for n in exits:
        if checks[n] is not None:
            checks[n].due(rows)


def tick(device: torch.device) -> float:
    """A wall-clock reading after the device has finished its queued work."""
    if device.type != "cpu" and hasattr(torch, "accelerator"):
        torch.accelerator.synchronize(device)
    return time.perf_counter()


def run_layer(layer, x, rotary, attn_mask, view) -> torch.Tensor:
    """One layer's decode call (what `Passes.enable_compile` compiles)."""
    return layer(x, rotary, attn_mask, view)


def local_kv_groups(model) -> int:
    """K/V heads this model's attention holds: every query group, or this rank's share when
    tensor parallelism sharded the QKV projection (found the way `split_qkv` finds it)."""
    attn = model.decoder.layers[str(model.layer_ids[0])].self_attention
    rows_per_group = (attn.num_heads // attn.num_groups + 2) * attn.head_dim
    return attn.linear_qkv.weight.shape[0] // rows_per_group


class Passes:
    """Pushes rows through a model's layers [start, end) with a KV cache; evaluates exits."""

    def __init__(self, model, layer_range: tuple[int, int] | None = None) -> None:
        self.model, self.config = model, model.config
        self.num_layers = self.config.num_layers
        self.start, self.end = layer_range or (0, self.num_layers)
        self.vocab = self.config.real_vocab_size or self.config.vocab_size
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.exits = list(self.config.exit_layer_nums)
        # Exits with a transformer block that this model holds (all of them, or a pipeline stage's own).
        own = model.exit_layer_numbers
        self.block_slots = {n: s for s, n in enumerate(n for n in own if model.exits[str(n)].block is not None)}
        self.block_depths = {self.depth(n) for n in self.block_slots}  # where their inputs are recorded
        self.kv_groups = local_kv_groups(model)
        self.profile = False
        self.fast = True  # False: every pass takes the exact (general) path, uniform decode steps too
        self.fused_checks = True  # False: learned checks through the probe modules (`fused_check.py`)
        self.compiled = None  # `enable_compile`: the compiled layer call of uniform steps
        # Passes run supported layers as `lean.LeanLayer` (the modules' arithmetic, fewer
        # operations; `lean_for`); False: through the modules. `lean_kernels`: their products' kernels.
        self.lean = True
        self.lean_layers: dict[int, lean.LeanLayer | None] = {}
        self.lean_kernels = lean.LeanKernels(packed=False)
        # (rows.x, scaled, eps): the newest exit check's `lean.scaled_rows` of a uniform step's
        # rows, which the next lean layer takes for its input norm (`folded_scores`, `decode_layer`).
        self.scaled: tuple[torch.Tensor, torch.Tensor, float] | None = None
        # (probe, rows.x, scores): the scores of the next exit's native probe that the layer before
        # it made in its own call (`decode_layer`), which its check takes (`shared_norm_scores`).
        self.layer_scores: tuple | None = None
        self.argmax_head = "full"  # the final head's whole logits, or its certified int8 argmax
        # Ascending token ids a forced exit (a self-speculative draft) projects onto alone, or
        # None: the whole vocabulary (`draft_logits`; the engine sets it from the calibration record).
        self.draft_vocab: torch.Tensor | None = None
        self.draft_weights = DerivedCopies()  # exit weight -> its draft vocabulary's rows
        self.native_drafting = True  # False: a round's drafts step by step, never in one call (`native_drafts`)
        # The model's rotary angles at positions 0..n-1: (cos, sin, sin with its first half
        # negated) [n, hd] fp32, and these viewed [n, 1, 1, hd], made once (`rotary_tables`).
        self.rope_tables: tuple | None = None
        self.depth_memo: dict[ExitPolicy, dict[int, list[int]]] = {}  # `exits_by_depth`
        self.depth_last: tuple | None = None  # (policy, its exits by depth) of the latest `exits_by_depth`
        self.stops_memo: dict[tuple, list[int]] = {}  # `uniform_stops`
        self.branch: dict[int, tuple[int, ...]] | None = None  # the running verify pass's alternative drafts (`run`)
        # The running cost_aware pass's sequences that held pending rows when it began (`holders`;
        # None: not asked), for `ExitDecider.starts_pending`.
        self.holding: set[int] | None = None

    def depth(self, n: int) -> int:
        """How many layers run before exit n reads the hidden state."""
        return n - 1 if self.config.pre_exit else n

    def new_state(self, batch: int, capacity: int, pending: bool = True) -> DecodeState:
        """Caches for `batch` sequences of up to `capacity` positions; `pending`: room for the
        hidden states of early-exited positions (none on a pipeline stage)."""
        c, groups, kw = self.config, self.kv_groups, dict(dtype=self.dtype, device=self.device)
        cache = KVCache(self.end - self.start, batch, capacity, groups, c.head_dim, **kw)
        state = DecodeState(cache, torch.zeros(batch, capacity + 1 if pending else 0, c.hidden_size, **kw), [0] * batch)
        if self.block_slots:
            e = len(self.block_slots)
            state.exit_cache = KVCache(e, batch, capacity, groups, c.head_dim, **kw)
            state.exit_inputs = torch.zeros(e, batch, capacity + 1, c.hidden_size, **kw)
        return state

    # ----- the single-device pass ----------------------------------------------------------

    # cost_aware's passes of one sequence with native learned checks take exact's decisions
    # (`solo_policy`); False (an engine's passes, or the class in tests of the decider at batch 1):
    # they follow the decider and its clock (`benchmarks/decode_speed.py --clock-modes`)
    solo_exact = True
    # Greedy rounds of full decoding and exact early exit run their steps in one native call
    # (`native_loop.native_rounds`: the same numbers); False: step by step through `run`
    native_loop = True
    # A self-speculative round's drafts and verify pass one after the other in the same Python call
    # (`native_spec.spec_round`: the same calls); False: each through its own path
    native_spec = True
    # One sequence's self-speculative rounds one after another in one native call, Python asked once
    # a round for the next plan (`native_spec.loop_parts`, `SelfSpeculative.native_run`); False: a
    # round a call
    native_spec_rounds = True

    @torch.no_grad()
    def run(
        self, state: DecodeState, new_tokens: dict[int, list[int]], policy: ExitPolicy, all_rows=False, scores=None,
        branch: dict[int, tuple[int, ...]] | None = None,
    ) -> StepOutput:  # fmt: skip
        """Feed `new_tokens` (b -> ids, [] for none) through every layer, pending rows catching up;
        exits fire under `policy`; the final head on what is left (every row with `all_rows`).
        `scores` (a `scoring.RowScores`, with `all_rows`): evaluates its exits on every new row.
        A decode step (one new token per sequence) runs uniformly (`run_uniform`) up to the first
        layer where some sequence of the pass has pending rows, and the general way from there;
        so does a verify pass (`all_rows`: the newest draft alone up to the draft exit, then the
        drafted rows join it), which takes the general path throughout only where nothing is
        pending at all (its final head must see every row). `branch` (b -> backs, a verify pass):
        the last len(backs) of b's new tokens are alternative drafts, the t-th standing for the
        position backs[t] before the end of b's drafted chain (`kv_cache.row_positions`).
        Under cost_aware a decode step may run with its exits paused, and is timed
        (`exit_decision.pass_begins`, `exit_clock.py`); a pass of one sequence whose exits are
        all native learned checks takes exact's decisions (`solo_policy`)."""
        policy = self.solo_policy(state, new_tokens, policy)
        clock = pass_begins(self, new_tokens, policy, all_rows, scores, branch)
        out = self.run_pass(state, new_tokens, policy, all_rows, scores, branch)
        if clock is not None:
            clock.stop()
        return out

    def solo_policy(self, state: DecodeState, new_tokens: dict, policy: ExitPolicy) -> ExitPolicy:
        """The policy a pass runs under: `policy`, but exact in its place where it is cost_aware,
        the pass feeds one sequence (`solo_exact` on), no exit is forced or observed, and every
        exit it evaluates is a learned check the native kernel runs (`exact_where_cheap`).
        What cost_aware weighs does not arise there: a row that fires ends the pass, so leaving
        saves every layer left less its K/V, filled in the next pass beside that pass's own row
        (two rows of a memory-bound product cost about one), and a check that does not fire costs
        ~5% of a layer. Its clock's windows cost more than the checks they could spare: on the CPU
        reference at batch 1, each mode held alone (learned 0.8, bf16), exact decoded at
        1.46-1.50x full decoding, free 1.41-1.45x (the decider's bookkeeping), on 1.27-1.43x,
        the clock 1.29-1.42x (its paused windows, 2-7% of passes); every sweep row of both models
        read exact >= cost_aware. Worked out once per decode state and policy."""
        if (
            policy.mode != "cost_aware"
            or len(new_tokens) != 1
            or not self.solo_exact
            or policy.force is not None
            or policy.observe
        ):
            return policy
        last = state.memo.get(("solo policy", "last"))  # a decode's steps pass the same policy object:
        if last is not None and last[0] is policy:  # found by identity, without hashing the policy
            return last[1]
        made = state.remembered(("solo policy", policy), lambda: self.exact_where_cheap(state, policy))
        state.memo[("solo policy", "last")] = (policy, made)
        return made

    def exact_where_cheap(self, state: DecodeState, policy: ExitPolicy) -> ExitPolicy:
        """`policy` as exact where every exit it evaluates is a learned check through a native
        probe (`fused_check.FoldedProbe.native`: no block of its own, fused checks on, the native
        kernel built), else `policy`."""
        if policy.measure != "learned" or not self.fused_checks:
            return policy
        for n in (n for exits in self.exits_by_depth(policy).values() for n in exits):
            folded = None if n in self.block_slots else self.folded_probe(state, self.exit_head(state, n))
            if folded is None or folded.native is None:
                return policy
        return dataclasses.replace(policy, mode="exact")

    def run_pass(self, state: DecodeState, new_tokens, policy: ExitPolicy, all_rows, scores, branch) -> StepOutput:
        """`run`'s pass."""
        out = StepOutput()
        self.branch = branch or None
        self.holding = self.holders(state, new_tokens) if policy.mode == "cost_aware" else None
        self.lean_kernels.sync()  # lean layers look their kernels up again where one may be forced now
        self.scaled = self.layer_scores = None
        by_depth = {} if exits_paused(self, policy) else self.exits_by_depth(policy)
        verify = all_rows and not by_depth and scores is None and self.branch is None
        if verify and self.verify_pending(state, new_tokens, out):
            return out
        clean = self.uniform_layers(state, new_tokens) if self.fast and scores is None else 0
        if all_rows and clean >= self.num_layers:
            clean = 0  # nothing pending: `run_uniform` would end with the newest rows' head only
        if clean > 0:
            rows = self.run_uniform(state, new_tokens, policy, clean, by_depth, out)
            if rows is None:
                return out
            first, active = clean + 1, list(rows.seqs)  # layers [0, clean) and exits at depth <= clean done
        else:
            rows, first, active = self.embed(state, new_tokens), self.first_pending(state, new_tokens), list(new_tokens)
        has_new = {b for b, t in new_tokens.items() if t}
        memo: dict[tuple, tuple] = {}  # one RowIndex (+ rotary) per distinct layout of this pass
        d = first
        while d <= self.num_layers:
            if d > 0:
                rows = self.gather(state, d - 1, rows, active)
                if rows is None:
                    return out
                end = self.run_end(state, rows, active, d, by_depth, scores)
                if end > d and self.advance_layers(state, d - 1, end, rows, memo):
                    d = end  # layers d-1 .. end-1 over the same rows in one native call
                else:  # the last layer of a pass that keeps its newest rows' outputs alone: those rows go on
                    newest = d == self.num_layers and not all_rows and scores is None
                    self.advance(state, d - 1, rows, memo, newest=newest)
            self.record_block_inputs(state, d, rows)
            if scores is not None:
                scores.at_depth(self, state, d, rows)
            for n in by_depth.get(d, []):
                fired = self.check_exit(state, n, rows, has_new, policy, out)
                if fired:
                    self.remember_pending(state, rows, fired)
                    active = [b for b in active if b not in fired]
                    rows = rows.subset(set(rows.seqs) - fired)  # the layout has R = max(n): trim it too
            d += 1
        self.final_head(rows, all_rows, out)
        return out

    def verify_pending(self, state: DecodeState, new_tokens: dict[int, list[int]], out: StepOutput) -> bool:
        """A verify pass that feeds no token (each sequence's drafts fed below their exit by
        `native_drafts_of`), its rows one block per sequence pending at one depth d for all: the
        rows straight from `state.pending` through layers d .. L - 1, each row at its own slot and
        position and attending up to it (`ee_layers` without a mask), then the final head on every
        row (`ee_head`), in one native call (`native.verify`): the general pass's calls on the same
        rows (`gather`, `advance_layers`, `final_head`), so the same numbers, without its layout,
        masks and gathering (0.26 -> 0.19 ms of Python a batch-1 round on the CPU reference model;
        the rows' gathering, angles and the head in the one call: ~0.05 ms less).
        False where the pass is not of that form or would not run so (nothing done)."""
        if not self.fast or self.profile or self.start or not new_tokens or any(new_tokens.values()):
            return False
        if self.block_slots:  # exits that keep a block's input at every position: the general pass records them
            return False
        layers, filled, seqs = self.num_layers, state.cache.filled, list(new_tokens)
        depth, los = None, []
        for b in seqs:
            fed, col = state.fed[b], filled[:layers, b]
            d = int((col < fed).argmax())
            lo = int(col[d])
            if lo >= fed or (depth is not None and d != depth) or (col[:d] != fed).any() or (col[d:] != lo).any():
                return False
            depth = d
            los.append(lo)
        if depth == 0 or not native.library() or not state.pending.is_contiguous():
            return False
        plan = self.verify_plan(state, depth)
        n = [state.fed[b] - lo for b, lo in zip(seqs, los)]
        if plan is None or self.int8_head() or lean.hooks_set(plan.hooks):
            return False
        if not plan.takes(self, sum(n), state.pending.dtype):
            return False
        his = [state.fed[b] for b in seqs]
        cos, _, neg = self.rotary_tables(max(his))[:3]
        logits, tokens, conf = native.verify(seqs, los, his, filled, depth, state.pending, plan.run.native,
                                             plan.run.shape, (cos, neg), plan.head)  # fmt: skip
        self.record_rows(seqs, n, logits, tokens, conf, out)
        return True

    # What `run` sets for the pass it runs, which the code it calls reads back
    PASS_STATE = ("branch", "holding", "scaled", "layer_scores")

    @contextlib.contextmanager
    def pass_state_kept(self):
        """Around work that runs passes in the middle of another (the cost_aware costs timed in a
        decode step's exit check: `exit_decision.time_exit_costs`): the running pass's own state
        (`PASS_STATE`) set aside (the work sees none) and restored after it."""
        saved = [getattr(self, name) for name in self.PASS_STATE]
        for name in self.PASS_STATE:
            setattr(self, name, None)
        try:
            yield
        finally:
            for name, value in zip(self.PASS_STATE, saved, strict=True):
                setattr(self, name, value)

    def holders(self, state: DecodeState, seqs) -> set[int]:
        """The sequences of `seqs` that hold pending rows: positions fed that the last layer
        (this stage's) has not had yet."""
        last = state.cache.filled[self.end - self.start - 1]
        return {b for b in seqs if last[b] < state.fed[b]}

    def first_pending(self, state: DecodeState, new_tokens: dict[int, list[int]]) -> int:
        """Where a general pass starts: depth 0, or where it feeds no token at all (a verify pass
        whose drafts were fed below their exit: `native_drafts`' feed_last), the depth of the first
        layer that holds a pending row of its sequences (its rows gathered there); depth 0 where
        none does (nothing to do). Single-device passes only."""
        if any(new_tokens.values()) or self.start:
            return 0
        filled, layers = state.cache.filled, self.end - self.start
        behind = [filled[:layers, b] < state.fed[b] for b in new_tokens]
        return min((int(row.argmax()) + 1 for row in behind if row.any()), default=0)

    def run_end(self, state: DecodeState, rows: Rows, active: list[int], d: int, by_depth, scores) -> int:
        """The deepest depth e >= d that a general pass can reach from depth d - 1 over the same
        `rows` (just gathered for layer d - 1): nothing to do at depths d .. e - 1 (no exit, no
        block exit's input, no scoring), and no pending row joining at layers d .. e - 1 (each
        one's fill is where the rows start: `gather` would return them as they are)."""
        if scores is not None or active != rows.seqs:
            return d
        filled, e = state.cache.filled, d
        while e < self.num_layers and e not in by_depth and e not in self.block_depths:
            if any(filled[e, b] != rows.lo[a] for a, b in enumerate(rows.seqs)):
                break
            e += 1
        return e

    def advance_layers(self, state: DecodeState, lo: int, hi: int, rows: Rows, memo: dict) -> bool:
        """`advance` over layers lo .. hi-1 in one native call where each would run its general
        pass in one (`lean.native_run`: the same numbers); False where not (nothing done). Rows that
        one call would not take (a prompt's: too many, or a kernel other than the native one at
        their count) are turned away before the run of layers is worked out (`layer_run`): a
        prefill of an aclsum prompt had made and dropped one for each layer, ~2 ms of Python a
        request (CPU reference, 12 layers)."""
        a = rows.x.numel() // rows.x.shape[-1]
        first = self.lean_layer(lo) if self.lean_on() else None
        if type(first) is not lean.LeanLayer or not lean.rows_natively(first.products, a, self.lean_kernels):
            return False
        cache = state.cache
        if rows.layout is None:
            rows.layout = self.layout(cache, rows.seqs, rows.lo, rows.n, memo)
        index = rows.layout[0]
        angles = getattr(index, "lean_tables", None)  # made by `layout` for rotary models alone (lean layers')
        if angles is None:
            return False
        made = self.native_run(state, lo, hi, rows.x, angles, index)
        if made is None:
            return False
        rows.x = made[0]
        return True

    def native_run(self, state, lo: int, hi: int, x, angles: tuple, index, probes=None) -> tuple | None:
        """Layers lo .. hi-1 over x in one native call (`lean.native_run`, angles (cos, signed
        sine) as it takes them, the rows as `index`'s layout places them, `probes` ({depth: (probe,
        bound)}, as `decode_layers` takes them) on the way), their fill counts set for the layers
        run; None where a layer is not a lean one, or would not run in one call (nothing done).
        The run's `lean.NativeRun` is worked out once per decode state (its caches and the model's
        weights stay where they are), and no cache view is made: a layout's `native_kv` says where
        each row reads and writes."""
        run = self.layer_run(state, lo, hi)
        if run is None:
            return None
        made = lean.native_run(
            run, x, *angles, index.native_kv(state.cache, lo - self.start)[2:], self.lean_kernels, probes, lo + 1
        )
        if made is not None:
            state.cache.filled[lo - self.start : lo + made[1] - self.start, index.filled_b] = index.filled_end
        return made

    def layer_run(self, state: DecodeState, lo: int, hi: int) -> lean.NativeRun | None:
        """Layers lo .. hi-1 (global numbers) and their caches as `lean.native_run` takes them,
        worked out once per decode state; None where lean layers are off or one of them is not
        a lean layer (a wrapped one runs its own calls)."""
        if not self.lean_on():
            return None
        key = ("native run", lo, hi)
        if key not in state.memo:
            fast = [self.lean_layer(i) for i in range(lo, hi)]
            kv = [(state.cache.k[i - self.start], state.cache.v[i - self.start]) for i in range(lo, hi)]
            state.memo[key] = lean.NativeRun.of(fast, kv) if all(type(f) is lean.LeanLayer for f in fast) else None
        return state.memo[key]

    def uniform_layers(self, state: DecodeState, new_tokens: dict[int, list[int]]) -> int:
        """How many layers from the first a decode step can run uniformly: every sequence of the
        pass gets exactly one new token, and has K/V for all its earlier positions at each of
        these layers (nothing pending there). 0 where the step is not a decode step."""
        if not new_tokens or any(len(t) != 1 for t in new_tokens.values()):
            return 0
        filled, layers = state.cache.filled, self.end - self.start
        last = filled[layers - 1]  # a layer never holds more positions than the one below it,
        if all(last[b] == state.fed[b] for b in new_tokens):  # so the last one filled: all are
            return layers
        if len(new_tokens) == 1:  # one sequence: its column, no fancy indexing
            b = next(iter(new_tokens))
            return int((filled[:layers, b] == state.fed[b]).argmin())  # the last layer is not filled
        seqs = list(new_tokens)
        fed = np.asarray([state.fed[b] for b in seqs], dtype=np.int64)
        ok = (filled[:layers, seqs] == fed).all(axis=1)  # per layer
        return int(ok.argmin()) if not ok.all() else len(ok)

    def run_uniform(
        self, state: DecodeState, new_tokens: dict[int, list[int]], policy: ExitPolicy, layers: int, by_depth, out
    ) -> Rows | None:
        """`run` for the first `layers` layers of a decode step (`uniform_layers`) and the exits
        at depth <= `layers`: one row per sequence, so no gathering, one layout and one rotary
        per step (again only after an exit fires), no causal mask (none at all where every
        sequence has the same length), K/V written and read by slicing, fill counts set with one
        array write per layer. Same rows, same K/V, same exits as `run`. Returns the rows still
        going (None: every sequence has its token, the final head's too where `layers` is all)."""
        seqs = list(new_tokens)
        pos = [state.fed[b] for b in seqs]
        for b in seqs:
            state.fed[b] += 1
        ids = torch.tensor([t[0] for t in new_tokens.values()], dtype=torch.long).view(-1, 1)
        index, rotary = self.uniform_layout(state, seqs, pos)
        rows = Rows(seqs, pos, [1] * len(seqs), self.embed_ids(ids.to(self.device), index))  # (A, 1, h)
        has_new, checks = set(seqs), uniform_checks(self, state, policy, by_depth) if by_depth else {}
        stops = self.uniform_stops(by_depth, layers)
        soft: dict[int, tuple] = {}  # depth -> (its check, whether it evaluates) for the run of layers
        ran, at = self.ride(state, policy, by_depth, layers, checks, rows, (rotary, index), stops)
        while at < len(stops):
            d, at = stops[at], at + 1
            exits = by_depth.get(d, ())
            on_the_way = self.on_the_way(checks, exits, d, layers, rows) if d > ran else None
            if on_the_way is not None:  # skipped, or its probe in the native run: a stop only where it fires
                soft[d] = on_the_way
                continue
            # the first exit here whose check is due; none, no block input to record and layers
            # left: the layers run on through this depth
            first = next((i for i, n in enumerate(exits) if checks[n] is None or checks[n].peek(rows)), len(exits))
            if first == len(exits) and d < layers and d not in self.block_depths and not soft:
                counted(checks, exits, rows)  # their skips (nothing on the way can change the rows first)
                continue
            if d > ran:  # the layers up to depth d in one native call where they run in one each
                probe = layer_probe(checks, exits[first : first + 1], len(rows.seqs))
                reached = self.run_layers(state, ran, d, rows, rotary, index, soft, probe)
                if reached < d:  # stopped at a check on the way: a row reached its threshold there
                    d, at, first = reached, stops.index(reached) + 1, 0
                    exits = by_depth[d]
                ran = d
            counted(checks, exits[: first + 1], rows)  # skipped here, and the due one's refresh
            self.record_block_inputs(state, d, rows)
            for i, n in enumerate(exits[first:]):
                check = checks[n]  # every row is a candidate: the learned check in one call where it applies
                if check is None:
                    fired = self.check_exit(state, n, rows, has_new, policy, out)
                else:
                    fired = check(state, rows, out, i == 0)
                if fired:
                    self.remember_pending(state, rows, fired)
                    if len(fired) == len(rows.seqs):
                        return None  # every sequence has its token (a draft step ends here)
                    rows = rows.subset(set(rows.seqs) - fired)
                    index, rotary = self.uniform_layout(state, rows.seqs, rows.lo)
        if layers < self.num_layers:
            return rows
        self.final_head(rows, False, out)
        return None

    def ride(self, state, policy, by_depth: dict, layers: int, checks: dict, rows: Rows, at: tuple, stops) -> tuple:
        """(depth reached, index of that depth in `stops`) after running `run_uniform`'s layers in
        one `decode_layers` call (rows.x replaced; `at`: its rotary and index) where every exit
        rides the run (`riding_probes`): stopping only where a row fires, the stop loop then goes
        on from there as after `run_layers`. (0, 0) where not (nothing done)."""
        riding = self.riding_probes(state, policy, by_depth, layers, checks) if by_depth else None
        if riding is None:
            return 0, 0
        rows.x, ran = self.decode_layers(state, 0, layers, rows.x, *at, riding)
        return ran, stops.index(ran)

    def riding_probes(self, state: DecodeState, policy: ExitPolicy, by_depth: dict, layers: int, checks: dict):
        """{depth: (native probe, bound)} where an exact step of `layers` layers would take every
        exit's check on the run's way (`on_the_way`: one exit a depth, below `layers`, a
        `UniformCheck` with a native probe; no block exit's input to record below `layers`), so
        that `run_uniform` runs them in one `decode_layers` call without walking its stops (the
        same calls: an exact check on the way counts nothing); else None. Worked out once per
        decode state, policy and `layers`, found by identity: one dict object for every step."""
        memo = state.memo.get(("riding", "last"))
        if memo is not None and memo[0] is policy and memo[1] == layers and memo[2] is checks:
            return memo[3]
        plan = None
        if policy.mode == "exact" and all(b >= layers for b in self.block_depths):
            # `on_the_way` for each depth, rows aside: an exact check's `peek` reads none (it evaluates)
            ways = {d: self.on_the_way(checks, exits, d, layers, None) for d, exits in by_depth.items()}
            if all(way is not None for way in ways.values()):
                plan = {d: check.native for d, (check, _) in ways.items()}
        state.memo[("riding", "last")] = (policy, layers, checks, plan)
        return plan

    def on_the_way(self, checks: dict, exits, d: int, layers: int, rows: Rows) -> tuple | None:
        """(check, whether it evaluates) where depth d's one exit has a `UniformCheck` that a run
        of layers can take past d: one that will skip (`UniformCheck.peek`), or one with a native
        probe, which the run evaluates in its call, stopping only where a row reaches the bound
        (`decode_layers`); counted as passed after the run (`run_layers`). Else None. Not at the
        last layer (the step stops there anyway) nor at a block exit's depth."""
        if len(exits) != 1 or d >= layers or d in self.block_depths:
            return None
        check = checks[exits[0]]
        if not isinstance(check, UniformCheck):
            return None
        evaluates = check.peek(rows)
        if evaluates and (check.folded is None or check.folded.native is None):
            return None
        return check, evaluates

    def run_layers(self, state, ran: int, d: int, rows: Rows, rotary, index, soft: dict, probe) -> int:
        """`decode_layers` from depth `ran` to d over `rows` (their x replaced), the checks `soft`
        (`on_the_way`) on the way and `probe` (or None) at d; each check passed below the depth
        reached counted (`UniformCheck.passed`; the one it stopped at, if any, is the caller's).
        Returns the depth reached."""
        probes = {e: c.native for e, (c, evaluates) in soft.items() if evaluates}
        if probe is not None:
            probes[d] = (probe, math.inf)
        rows.x, reached = self.decode_layers(state, ran, d, rows.x, rotary, index, probes)
        for e, (c, evaluates) in soft.items():
            if e < reached and not c.exact:  # (exact counts nothing)
                c.passed(rows, evaluates)
        soft.clear()
        return reached

    def uniform_stops(self, by_depth: dict, layers: int) -> list[int]:
        """The depths a uniform step of `layers` layers stops at between its layers: 0, each with
        an exit to check or a block exit's input to record, and `layers` (ascending)."""
        key = (tuple(by_depth), layers)
        stops = self.stops_memo.get(key)
        if stops is None:
            events = set(by_depth) | self.block_depths | {0, layers}
            stops = self.stops_memo[key] = sorted(d for d in events if 0 <= d <= layers)
        return stops

    def decode_layers(
        self, state: DecodeState, lo: int, hi: int, x: torch.Tensor, rotary, index: DecodeIndex, probes=None
    ) -> tuple[torch.Tensor, int]:
        """Layers lo .. hi-1 (global numbers) over one row per sequence x (A, 1, h), as
        `decode_layer` over each in turn, in one native call where each would run in one
        (`lean.native_run`: the same numbers, without the Python between layers, which a decode
        step pays cold: ~60 us a layer on the CPU reference model). `probes`: {depth d: (a native
        probe, bound)} for lo < d <= hi: the probe runs on the output at depth d (kept in
        `layer_scores`), and below hi the run stops there where a row's score reaches the bound.
        Returns (the rows at the depth reached, that depth)."""
        probes = probes or {}
        if hi - lo > 1 and self.scaled is None and rotary is not None and rotary[2] is not None:
            # the probes as they are, numbered by depth (`first`): the run checks that they take
            # the rows when it first sees them (re-keying them and asking `native.Probe.takes` at
            # every call cost ~1.3 us a probe, paid cold right after the previous run of layers)
            made = self.native_run(state, lo, hi, x, (rotary[0], rotary[2]), index, probes)
            if made is not None:
                y, ran, scores = made
                if scores is not None:
                    self.layer_scores = (probes[lo + ran][0], y, scores)
                return y, lo + ran
        for i in range(lo, hi):
            probe, bound = probes.get(i + 1, (None, 0.0))
            x = self.decode_layer(state, i, x, rotary, index, probe)
            if probe is not None and i + 1 < hi:
                made = self.layer_scores
                if made is None or made[1] is not x or max(made[2]) >= bound:
                    return x, i + 1  # a row reached the bound (or its scores were not made): the caller checks
        return x, hi

    def uniform_layout(self, state: DecodeState, seqs: list[int], pos: list[int]) -> tuple:
        """The `DecodeIndex` of one row per sequence at `pos`, and its rotary angles (cos, sin,
        and for lean layers sin with its first half negated: `lean.signed_sine`)."""
        index = DecodeIndex(seqs, pos, state.cache, self.device)
        if self.model.rotary is None:
            return index, None
        if index.same:  # every sequence at one position: a slice of each table, (1, 1, 1, hd), broadcast
            p, (cos, sin, neg) = pos[0], self.rotary_tables(pos[0] + 1)[3]
            return index, (cos[p : p + 1], sin[p : p + 1], neg[p : p + 1] if self.lean_on() else None)
        return index, self.rotary_at(index.positions, max(pos) + 1, signed=self.lean_on())

    def rotary_at(self, positions: torch.Tensor, top: int, signed: bool = False) -> tuple:
        """The model's rotary angles at `positions` [A, S] (each below `top`): cos, sin
        [A, 1, S, hd] fp32, then with `signed` sin with its first half negated
        (`lean.signed_sine`), else None. Read from tables the model's rotary made once for
        positions 0..n-1 (n a power of two, made again larger when a position reaches it): a
        step's angles then cost an index each instead of the module's ~8 operations (~25-40 us
        a step on the CPU), and every pass, uniform or general, reads the same numbers."""
        cos, sin, neg = self.rotary_tables(top)[:3]
        return cos[positions][:, None], sin[positions][:, None], neg[positions][:, None] if signed else None

    def rotary_tables(self, top: int) -> tuple:
        """`rope_tables`, made (again) where they end below position `top`: (cos, sin, signed
        sine) [n, hd], then the same three viewed [n, 1, 1, hd]."""
        tables = self.rope_tables
        if tables is None or tables[0].shape[0] < top:
            n = 1 << max(top - 1, 255).bit_length()
            cos, sin = self.model.rotary(torch.arange(n, device=self.device)[None])  # (1, 1, n, hd)
            flat = (cos[0, 0], sin[0, 0], lean.signed_sine(sin[0, 0]))
            tables = self.rope_tables = (*flat, tuple(t.view(n, 1, 1, -1) for t in flat))
        return tables

    def embed_ids(self, ids: torch.Tensor, index: DecodeIndex) -> torch.Tensor:
        """`model.embedding(ids, index.positions)`; where it is a plain word embedding alone (rotary
        positions, no dropout at decode time, not a tensor-parallel shard) and no forward hook
        watches it, its lookup alone (the same numbers, without two module calls and a dropout
        call: ~10 us a step)."""
        emb = self.model.embedding
        if not self.plain_embedding():
            return emb(ids, index.positions)
        return F.embedding(ids, emb.word_embeddings.weight)

    def plain_embedding(self) -> bool:
        """Whether the embedding is a plain word embedding alone (`embed_ids`)."""
        emb = self.model.embedding
        plain = type(emb) is Embedding and type(emb.word_embeddings) is torch.nn.Embedding
        return plain and emb.position_embeddings is None and not emb.training and not self.embedding_hooked()

    def embedding_hooked(self) -> bool:
        emb = self.model.embedding
        return lean.watched((emb, emb.word_embeddings))

    def decode_layer(
        self, state: DecodeState, i: int, x: torch.Tensor, rotary, index: DecodeIndex, probe=None
    ) -> torch.Tensor:
        """Layer i (global number) over one row per sequence x (A, 1, h); fills their K/V there.
        `probe`: the next exit's `native.Probe` (`layer_probe`), run on the layer's output in the
        layer's own native call where it makes one (kept in `layer_scores` for the check)."""
        view = index.layer(state.cache, i - self.start)
        fast = self.lean_for(i)
        if fast is not None and rotary[2] is not None:  # none: compilation fell back during this step
            made, self.scaled = self.scaled, None
            scaled = made[1] if made is not None and made[0] is x and made[2] == fast.eps_in else None
            if probe is not None and probe.takes(x):
                x, scores = fast(x, rotary[0], rotary[2], index.attn_mask, view, self.lean_kernels, scaled, probe)
                self.layer_scores = None if scores is None else (probe, x, scores)
            else:
                x = fast(x, rotary[0], rotary[2], index.attn_mask, view, self.lean_kernels, scaled)
        else:
            x = self.layer_fn(i)(x, rotary and rotary[:2], index.attn_mask, view)
        state.cache.filled[i - self.start, index.filled_b] = index.filled_end
        return x

    def lean_on(self) -> bool:
        """Whether passes may run lean layers: asked for, not compiled, rotary positions."""
        return self.lean and self.compiled is None and self.model.rotary is not None

    def lean_for(self, i: int) -> lean.LeanLayer | None:
        """What runs layer i in this pass if not its module: its `lean.LeanLayer` where lean
        layers are on, it is supported and no forward hook watches it; else None."""
        fast = self.lean_layer(i) if self.lean_on() else None
        return fast if fast is not None and not fast.hooked() else None

    def lean_layer(self, i: int) -> lean.LeanLayer | None:
        """Layer i as a `lean.LeanLayer` where it is supported (made once), else None."""
        if i not in self.lean_layers:
            layer = self.model.decoder.layers[str(i)]
            self.lean_layers[i] = lean.LeanLayer(layer) if lean.supports(layer) else None
        return self.lean_layers[i]

    def layer_fn(self, i: int):
        """What runs layer i in a uniform step: the module, or the compiled decode call."""
        layer = self.model.decoder.layers[str(i)]
        if self.compiled is None:
            return layer
        return functools.partial(self.compiled_layer, layer)

    def enable_compile(self) -> None:
        """Run uniform decode steps' layers through `torch.compile` (inductor; CPU too). One
        function serves every layer (modules are inlined, their weights are graph inputs), the
        cache position and length are dynamic, so graphs are made once per batch size and mask
        kind (lengths equal or not), not per step or per layer."""
        self.compiled = torch.compile(run_layer, dynamic=True)

    def compiled_layer(self, layer, x, rotary, attn_mask, view) -> torch.Tensor:
        """The compiled call; where compilation fails, one warning line and eager from then on."""
        try:
            return self.compiled(layer, x, rotary, attn_mask, view)
        except Exception as e:  # inductor raises many kinds (missing compiler, lowering errors)
            first = str(e).splitlines()[0][:200] if str(e) else ""
            warnings.warn(f"torch.compile failed ({type(e).__name__}: {first}); decoding eagerly", stacklevel=2)
            self.compiled = None
            return layer(x, rotary, attn_mask, view)  # rewrites the same K/V: idempotent

    def exits_by_depth(self, policy: ExitPolicy) -> dict[int, list[int]]:
        """depth -> the exits `policy` evaluates there that this model holds (worked out once per
        policy: a server's requests bring a few; read, never changed, by the passes; a decode's
        steps pass the same policy object, found by identity without hashing it)."""
        last = self.depth_last
        if last is not None and last[0] is policy:
            return last[1]
        by_depth = self.depth_memo.get(policy)
        if by_depth is None:
            if len(self.depth_memo) >= 64:
                self.depth_memo.clear()
            by_depth = self.depth_memo[policy] = self.find_exits_by_depth(policy)
        self.depth_last = (policy, by_depth)
        return by_depth

    def find_exits_by_depth(self, policy: ExitPolicy) -> dict[int, list[int]]:
        wanted = {n for n in policy.allowed if policy.threshold_of(n) < 1.0} | set(policy.observe)
        by_depth: dict[int, list[int]] = {}
        for n in sorted(wanted | ({policy.force} if policy.force is not None else set())):
            if str(n) in self.model.exits:
                by_depth.setdefault(self.depth(n), []).append(n)
        return by_depth

    def embed(self, state: DecodeState, new_tokens: dict[int, list[int]]) -> Rows:
        seqs = [b for b, t in new_tokens.items() if t]
        if not seqs:  # a verify pass whose drafts were all fed below their exit: no lookup to make
            h = self.config.hidden_size
            return Rows([], [], [], torch.empty(0, 1, h, dtype=self.dtype, device=self.device))
        lo = [state.fed[b] for b in seqs]
        n = [len(new_tokens[b]) for b in seqs]
        r = max(n)  # seqs is not empty (above)
        for a, b in enumerate(seqs):
            state.fed[b] += n[a]
        ids = torch.tensor([list(new_tokens[b]) + [0] * (r - k) for b, k in zip(seqs, n)], dtype=torch.long)
        ids = ids.to(self.device)  # (A, R), right-padded
        if self.plain_embedding():  # rotary positions: the word embedding's lookup alone (`embed_ids`)
            return Rows(seqs, lo, n, F.embedding(ids, self.model.embedding.word_embeddings.weight))
        backs = [self.branch.get(b, ()) if self.branch else () for b in seqs]  # alternative drafts
        pos = [row_positions(x, k, back) + [0] * (r - k) for x, k, back in zip(lo, n, backs)]
        return Rows(seqs, lo, n, self.model.embedding(ids, torch.tensor(pos, dtype=torch.long).to(self.device)))

    def gather(self, state: DecodeState, i: int, rows: Rows, active: list[int]) -> Rows | None:
        """The rows layer i must process: pending states at depth i, then the carried rows."""
        filled = state.cache.filled
        carried = {b: a for a, b in enumerate(rows.seqs)}
        seqs, los, parts, same = [], [], [], True
        for b in active:
            lo = int(filled[i, b])
            end = state.fed[b] if i == 0 else int(filled[i - 1, b])
            if end <= lo:
                continue
            a = carried.get(b)
            c_lo = rows.lo[a] if a is not None else end
            piece = []
            if c_lo > lo:  # positions that exited after exactly i layers: recompute them now
                piece.append(state.pending[b, lo:c_lo])
                same = False
            if a is not None:
                piece.append(rows.x[a, : rows.n[a]])
            seqs.append(b)
            los.append(lo)
            parts.append(piece)
        if not seqs:
            return None
        if same and seqs == rows.seqs:
            return rows  # the usual decode step: nothing pending, nobody left
        n = [sum(p.shape[0] for p in piece) for piece in parts]
        if min(n) == max(n):  # no padding (one sequence, a verify pass): one stacking copy
            return Rows(seqs, los, n, torch.stack([torch.cat(p) if len(p) > 1 else p[0] for p in parts]))
        x = rows.x.new_zeros(len(seqs), max(n), rows.x.shape[-1])  # (A, R, h)
        for a, piece in enumerate(parts):
            x[a, : n[a]] = torch.cat(piece) if len(piece) > 1 else piece[0]
        return Rows(seqs, los, n, x)

    def layout(self, cache: KVCache, seqs: list[int], lo: list[int], n: list[int], memo: dict) -> tuple:
        key = (id(cache), tuple(seqs), tuple(lo), tuple(n))
        if key not in memo:
            branch = [self.branch.get(b, ()) for b in seqs] if self.branch else None
            index, rotary = RowIndex(seqs, lo, n, cache, self.device, branch), None
            if self.model.rotary is not None:  # the lean layers' angles too (`lean.rows_tables`)
                if index.block is not None and not index.alternatives:
                    # one block of positions lo..end-1: slices of the tables, (1, 1, R, hd); the
                    # lean layers' native calls take a row of angles per row: (A, 1, R, hd) copies
                    _, start, end = index.block
                    cos, sin, neg = (t[start:end][None, None] for t in self.rotary_tables(end)[:3])
                    k = len(seqs)
                    lean_cos, lean_neg = (t.expand(k, -1, -1, -1).contiguous() if k > 1 else t for t in (cos, neg))
                else:
                    cos, sin, neg = self.rotary_at(index.positions, max(a + b for a, b in zip(lo, n)), signed=True)
                    lean_cos, lean_neg = cos, neg
                rotary, index.lean_tables = (cos, sin), lean.rows_tables(lean_cos, lean_neg)
            memo[key] = (index, rotary)
        return memo[key]

    def advance(self, state: DecodeState, i: int, rows: Rows, memo: dict, newest: bool = False) -> None:
        """Layer i (global number) over `rows`, in place; their K/V are then filled at layer i.
        `newest` (the last layer of a pass whose outputs are its newest rows'): where a sequence has
        several rows and the layer's attention is native, only each sequence's newest row goes on
        past its K/V (`lean.newest_only`); `rows` then holds those rows alone."""
        cache = state.cache
        if rows.layout is None:  # the same rows go on through every layer until an exit or a gather changes them
            rows.layout = self.layout(cache, rows.seqs, rows.lo, rows.n, memo)
        index, rotary = rows.layout
        view = cache.layer(i - self.start, index)
        fast = self.lean_for(i)
        if fast is not None:
            cos, sin_signed = index.lean_tables
            r = rows.x.shape[1]
            last = [k - 1 for k in rows.n] if newest and r > 1 and not self.block_slots else None
            rows.x = fast.rows(rows.x, cos, sin_signed, index.attn_mask, view, self.lean_kernels, newest=last)
            if rows.x.shape[1] < r:  # the newest rows alone went on
                rows.lo, rows.n, rows.layout = [lo + k for lo, k in zip(rows.lo, last)], [1] * len(last), None
        else:
            rows.x = self.model.decoder.layers[str(i)](rows.x, rotary, index.attn_mask, view)
        cache.filled[i - self.start, index.filled_b] = index.filled_end

    # ----- exits ---------------------------------------------------------------------------

    def record_block_inputs(self, state: DecodeState, d: int, rows: Rows) -> None:
        """Exits with a transformer block need their input at every position: keep it as it passes."""
        for n, slot in self.block_slots.items():
            if self.depth(n) != d:
                continue
            for a, b in enumerate(rows.seqs):
                state.exit_inputs[slot, b, rows.lo[a] : rows.lo[a] + rows.n[a]] = rows.x[a, : rows.n[a]]

    def check_exit(
        self, state, n: int, rows: Rows, has_new: set, policy: ExitPolicy, out: StepOutput, due: bool = False
    ) -> set[int]:
        """Exit n's decision for the newest token of each sequence in `rows` that is in `has_new`;
        records the leavers in `out` and returns them. `due`: the caller has asked cost_aware's
        `worth_checking` already, which said to evaluate (`uniform_check.PlannedCheck`)."""
        forced, threshold = policy.force == n, policy.threshold_of(n)
        cand = [a for a, b in enumerate(rows.seqs) if b in has_new]
        if cand and n in policy.observe and not forced:
            self.observe_exit(state, n, rows, cand, out)
            return set()
        if not cand or (not forced and threshold >= 1.0):
            return set()  # threshold 1.0 never exits: no head
        if not due and not worth_checking(self, n, rows, cand, policy):
            return set()  # cost_aware skips a check that cannot pay: no head
        start = tick(self.device) if self.profile else 0.0
        head, seqs = self.exit_head(state, n), [rows.seqs[a] for a in cand]
        measure = get_measure("max_prob" if forced else policy.measure)
        if measure.needs_vocab:
            fire, conf, logits = self.vocab_check(state, n, head, rows, cand, policy, measure, forced)
        else:  # no vocabulary projection for the exits that stay
            fire, conf, logits = self.probe_check(state, n, head, rows, cand, policy, measure)
        leavers = self.record_leavers(n, seqs, fire, conf, logits, out)
        if self.profile:
            state.exit_time += tick(self.device) - start
        return leavers

    def observe_exit(self, state, n: int, rows: Rows, cand: list[int], out: StepOutput) -> None:
        """Exit n's greedy token and max-probability for each candidate's newest row, recorded
        in `out.guesses` (the row goes on): what a draft from n would have been, over the draft
        vocabulary where the passes draft onto one."""
        head = self.exit_head(state, n)
        hidden = self.exit_hidden(state, n, head, rows, cand)  # (A, 1, h)
        if self.draft_vocab is not None:
            _, part = self.draft_logits(head, hidden, parts=True)  # (A, K)
            tokens = self.draft_vocab[part.argmax(-1)]
        else:
            part = self.exit_logits(head, hidden)  # (A, V)
            tokens = part.argmax(-1)
        for a, t, c in zip(cand, tokens.tolist(), max_prob(part).tolist()):
            out.guesses[rows.seqs[a]] = (n, t, c)

    @staticmethod
    def record_leavers(n: int, seqs: list[int], fire: list[int], conf: list[float], logits, out) -> set[int]:
        """Candidates `fire` (indices into `seqs`) leave at exit n with confidences `conf` and
        logits [F, V] (row j, conf[j]: candidate fire[j]): recorded in `out`; their sequences."""
        for j, a in enumerate(fire):
            b = seqs[a]
            out.logits[b], out.exit_layer[b], out.confidence[b] = logits[j], n, conf[j]
        return {seqs[a] for a in fire}

    def vocab_check(self, state, n: int, head, rows: Rows, cand: list[int], policy, measure, forced: bool) -> tuple:
        """A check on the exit's logits: (leavers as `cand` indices, their confidences, their
        logits [F, V])."""
        hidden = self.exit_hidden(state, n, head, rows, cand)  # (A, 1, h)
        if forced and self.draft_vocab is not None:  # max-probability over the K drafted logits:
            logits, part = self.draft_logits(head, hidden, parts=True)  # the others are -inf
            conf = measure.from_logits(part)
        else:
            logits = self.exit_logits(head, hidden)  # (A, V)
            conf = measure.from_logits(logits)
        fire = list(range(len(cand))) if forced else decide(self, n, conf >= policy.threshold_of(n), rows, cand, policy)
        if len(fire) < len(cand):
            logits = logits[torch.tensor(fire, dtype=torch.long, device=self.device)]
        conf = conf.tolist()
        return fire, [conf[a] for a in fire], logits

    def probe_check(self, state, n: int, head, rows: Rows, cand: list[int], policy, measure) -> tuple:
        """A check on the exit's hidden state or the backbone row alone, the projection only for
        the leavers: (leavers as `cand` indices, their confidences, their logits [F, V] or None).
        The fused check where the probe can be folded (`fused_check.py`), else the measure's."""
        threshold = policy.threshold_of(n)
        folded = self.folded_probe(state, head) if measure.probe_logit and self.fused_checks else None
        if folded is not None:  # the exit's own layers only for the leavers, as below
            scores, shift = self.folded_scores(folded, rows, cand)  # logits less shift, as floats
            bound = logit_threshold(threshold) - shift
            fire = decide(self, n, [z >= bound for z in scores], rows, cand, policy)
            conf = [sigmoid(scores[j] + shift) for j in fire]
            leaving = [cand[j] for j in fire]
            return fire, conf, self.leavers_logits(state, n, head, rows, leaving, policy.vocab)[0] if fire else None
        elif measure.from_backbone is not None and head.probe_reads_backbone:
            c = measure.from_backbone(head, self.newest_rows(rows, cand))  # (A,)
            fire = decide(self, n, c >= threshold, rows, cand, policy)
            conf = c[fire].tolist()
            hidden = self.exit_hidden(state, n, head, rows, [cand[j] for j in fire]) if fire else None
        else:
            hidden = self.exit_hidden(state, n, head, rows, cand)  # (A, 1, h)
            c = measure.from_hidden(head, hidden)
            fire = decide(self, n, c >= threshold, rows, cand, policy)
            conf = c[fire].tolist()
            hidden = hidden[torch.tensor(fire, dtype=torch.long, device=self.device)] if fire else None
        return fire, conf, self.leaver_logits(head, hidden, policy.vocab) if fire else None

    def leaver_logits(self, head, hidden: torch.Tensor, vocab: str) -> torch.Tensor:
        """Leaving rows' logits [F, V] from their exit hidden states [F, 1, h]: `exit_logits`, or
        over the draft vocabulary alone (-inf elsewhere, `draft_logits`) where `vocab` is "draft"."""
        return self.draft_logits(head, hidden) if vocab == "draft" else self.exit_logits(head, hidden)

    def leavers_logits(self, state, n: int, head, rows: Rows, cand: list[int], vocab: str = "full") -> tuple:
        """(exit n's logits [F, V] at the newest row of each of `cand` (the rows leaving), their
        greedy tokens or None): where the exit is its RMSNorm alone, the norm, projection and argmax
        in one native call (`native_vocab`; a uniform step's `UniformCheck.leave` and a general
        pass's `probe_check` both take it); else `exit_hidden`, `exit_logits`. A general pass (a
        fill) leaving at exit 6 of the CPU reference model (bf16) spent ~0.3 ms in the exit's norm
        and projection as separate operations."""
        lean_input = self.exit_input(state, head, rows, cand)  # None for a block exit too
        if lean_input is None:
            return self.leaver_logits(head, self.exit_hidden(state, n, head, rows, cand), vocab), None
        x, norm = lean_input
        if vocab != "draft":
            weight = head.output_weight(self.model.tied_output_weight())
            made = self.native_vocab(x[:, 0], weight, norm, head.temperature)
        elif norm is None or not lean.watched((norm,)):  # `native_vocab` asks this of its norm itself
            made = self.native_draft(head, x.contiguous(), None if norm is None else (norm.weight, norm.eps))
        else:
            made = None
        if made is not None:
            return made[0], made[1]
        return self.leaver_logits(head, x if norm is None else self.norm(norm, x), vocab), None

    def exit_input(self, state, head, rows: Rows, cand: list[int]) -> tuple | None:
        """(x [A, 1, h], norm): the newest row of each candidate as exit `head` has it right before
        its last norm `norm` (an RMSNorm, or None), where the exit is that norm alone (x: the
        backbone's rows) or a lean MLP sub-block and its norm (`lean.ExitMLP`, run here where lean
        layers are on and no hook watches it); None where it is anything else (a block, another
        MLP or norm): `head.hidden`."""
        norm = state.remembered(("exit norm", id(head)), lambda: lean.exit_norm(head))
        if norm is not None:
            return self.newest_rows(rows, cand), norm
        mlp = state.remembered(("exit mlp", id(head)), lambda: lean.exit_mlp(head))
        if mlp is None or not self.lean or mlp.hooked():
            return None
        x = self.newest_rows(rows, cand)
        a = x.shape[0]
        return mlp(x.reshape(a, -1), self.lean_kernels).view(a, 1, -1), head.norm

    def folded_probe(self, state: DecodeState, head):
        """`fused_check.folded_probe(head)`, looked up once per decode state."""
        return state.remembered(("folded", id(head)), lambda: folded_probe(head))

    def exit_head(self, state: DecodeState, n: int):
        """Exit n's module, looked up once per decode state."""
        return state.remembered(("head", n), lambda: self.model.exits[str(n)])

    def folded_scores(self, folded, rows: Rows, cand: list[int]) -> tuple[list[float], float]:
        """(scores, shift): the folded probe's logit of the newest row of each candidate, less
        shift, as floats (fp32 arithmetic). Where the probe reads an RMSNorm of one row per
        sequence (a decode step) and every row is a candidate, through `lean.scaled_rows`: the
        rows are kept (`self.scaled`) for the next lean layer, whose input norm makes the same
        ones where its eps is the probe norm's, so that a check that does not fire costs that
        layer one product and its value (`FoldedProbe.scores_of_scaled`); where the native
        kernel is built, one call (`native.Probe`, see `shared_norm_scores`). Else (a general
        pass's newest rows, some candidates) one native call on those rows where it is built,
        as a uniform step's check makes them (the torch operations cost a fill ~0.3 ms in bf16)."""
        if folded.norm != "rms" or len(cand) != len(rows.seqs) or rows.x.shape[1] != 1:
            x = self.newest_rows(rows, cand)  # (A, 1, h): a general pass's (a fill's) newest rows
            if folded.norm == "rms" and folded.native is not None and folded.native.takes(x):
                return folded.native(x), folded.shift  # one native call, as a uniform step's check
            return folded.logit(x[:, 0]).tolist(), 0.0
        return self.shared_norm_scores(folded, rows.x), folded.shift

    def shared_norm_scores(self, folded, x: torch.Tensor) -> list[float]:
        """An RMSNorm probe's scores (`FoldedProbe.scores_of_scaled`) of one row per sequence x
        (A, 1, h): in one call where the native kernel is built (`folded.native`: nothing kept,
        the next layer folds its norm into its product), else through `lean.scaled_rows`, which
        are kept (`self.scaled`) for the next lean layer."""
        probe = folded.native
        made, self.layer_scores = self.layer_scores, None
        if made is not None and made[0] is probe and made[1] is x:  # made by the layer before, in its call
            self.scaled = None
            return made[2]
        if probe is not None and probe.takes(x):  # in one native call; the next layer folds its own norm
            self.scaled = None
            return probe(x)
        scaled = lean.scaled_rows(x.view(x.shape[0], -1), folded.norm_eps)  # (A, h) fp32
        self.scaled = (x, scaled, folded.norm_eps)
        return folded.scores_of_scaled(scaled)

    def exit_hidden(self, state, n: int, head, rows: Rows, cand: list[int]) -> torch.Tensor:
        """Exit n's hidden state [A, 1, h] at the newest row of each candidate `rows` index."""
        if head.block is not None:
            return self.block_exit_hidden(state, n, head, [rows.seqs[a] for a in cand])
        lean_input = self.exit_input(state, head, rows, cand)  # its norm alone, or a lean MLP and norm
        if lean_input is None:
            return head.hidden(self.newest_rows(rows, cand))
        x, norm = lean_input
        return x if norm is None else self.norm(norm, x)

    def newest_rows(self, rows: Rows, cand: list[int]) -> torch.Tensor:
        """The newest row [A, 1, h] of each candidate `rows` index (the backbone at this depth)."""
        if all(rows.n[a] == 1 for a in cand):  # one row per sequence (decode): a slice where possible
            return rows.x[:, :1] if len(cand) == len(rows.seqs) else rows.x[torch.tensor(cand, device=self.device), :1]
        idx = torch.tensor(cand, device=self.device)
        return rows.x[idx, torch.tensor([rows.n[a] - 1 for a in cand], device=self.device)][:, None]  # (A, 1, h)

    def exit_logits(self, head, hidden: torch.Tensor) -> torch.Tensor:
        """Exit hidden [A, 1, h] -> whole-vocabulary logits [A, V] in fp32: in one native call
        where the projection's kernel is the native one (`native_vocab`: the same product, so the
        same numbers, without the torch operations around it)."""
        m = self.model
        weight = head.output_weight(m.tied_output_weight())
        made = self.native_vocab(hidden.reshape(hidden.shape[0], -1), weight, None, head.temperature)
        if made is not None:
            return made[0]
        return self.vocab_logits(head.project(hidden, m.tied_output_weight(), m.head_ops)[:, 0])

    def draft_logits(self, head, hidden: torch.Tensor, parts: bool = False, norm: tuple | None = None):
        """A draft's logits [A, V] in fp32 from exit hidden [A, 1, h]: the projection onto the
        draft vocabulary's rows alone (`self.draft_vocab`; their copy is made once per weight),
        -inf at every other token, so that its argmax and max-probability are those over the
        draft vocabulary. The verify pass keeps a draft only where it is the final head's token,
        so drafts from part of the vocabulary lose nothing but the drafts whose token lies outside it.
        `parts`: (logits, the draft vocabulary's own logits [A, K] fp32). `norm` (gain, eps): the
        exit's RMSNorm, and hidden the backbone's rows before it (a uniform step's draft:
        `uniform_check.DraftCheck`), folded into the product's call where the native kernel runs
        it (`lean.LeanKernels.folded`; on the other kernels the norm's own operations)."""
        m, ids, rows = self.model, self.draft_vocab, self.draft_rows(head)
        if self.lean and self.lean_kernels.packed and type(m.head_ops) is HeadOps:
            # the kernel the head's packed projection would run (`packed.packed_linear`), looked up once a pass
            part = self.lean_kernels.folded(hidden.reshape(hidden.shape[0], -1), rows, norm=norm)  # (A, K)
            part = (part if head.temperature == 1.0 else part / head.temperature).float()
        else:
            hidden = hidden if norm is None else lean.rms_norm(hidden, *norm)
            part = head.project_onto(hidden, rows, m.head_ops)[:, 0].float()  # (A, K)
        logits = part.new_full((part.shape[0], self.vocab), float("-inf")).index_copy_(1, ids, part)
        return (logits, part) if parts else logits

    def native_vocab(self, x: torch.Tensor, weight: torch.Tensor, norm, temperature: float = 1.0):
        """A head's (logits [A, vocab] fp32, greedy tokens, max-probabilities) from rows x [A, h]
        through the RMSNorm `norm` (an `RMSNorm` module, or None) onto `weight`'s first vocab rows in
        one native call (`native.head`), where the projection's kernel is the native one at this
        pass's rows, the head ops are plain, the temperature 1 and no forward hook watches the norm;
        else None. Its logits are the native product's, the norm folded in (its mean within
        round-off of `lean.rms_norm`'s), as every lean layer's norm on that kernel."""
        a = x.shape[0]
        if temperature != 1.0 or not self.vocab_native(a, x.dtype, weight, norm):
            return None
        gain = None if norm is None else (norm.weight, norm.eps)
        logits, _, tokens, conf = native.head(x.reshape(a, -1), kernels.native_copy(weight), self.vocab, gain)
        return logits, tokens, conf

    def vocab_native(self, a: int, dtype: torch.dtype, weight: torch.Tensor, norm) -> bool:
        """Whether `native_vocab` (temperature 1) takes `a` rows of `dtype` onto `weight` through `norm`."""
        if not (self.lean and self.lean_kernels.packed and type(self.model.head_ops) is HeadOps):
            return False
        if a > lean.FOLD_ROWS or dtype != weight.dtype or weight.dim() != 2:
            return False
        if norm is not None and (type(norm) is not RMSNorm or norm.weight.dtype != dtype or lean.watched((norm,))):
            return False
        return kernels.is_native(self.lean_kernels.head_func(weight, a))

    def draft_rows(self, head) -> torch.Tensor:
        """The rows of `head`'s output weight at the draft vocabulary's tokens (a copy made once per weight)."""
        ids = self.draft_vocab
        weight = head.output_weight(self.model.tied_output_weight())
        return self.draft_weights.get(weight, ("draft vocabulary", id(ids)), lambda w: w.index_select(0, ids))

    def native_draft(self, head, x: torch.Tensor, norm: tuple | None, rows: torch.Tensor | None = None):
        """`draft_logits(head, x, norm=norm)`, each row's argmax and max-probability over the draft
        vocabulary in one native call (`native.head`): (logits [A, V], tokens, confidences),
        where the draft projection's kernel is the native one at this pass's rows, the head's
        projection is plain and its temperature 1; else None. x: [A, 1, h]; `rows`: `draft_rows(head)`
        where the caller kept them (looking the weight up costs ~5 us right after a layer)."""
        a = x.shape[0]
        rows = self.draft_rows(head) if rows is None else rows
        if not self.draft_head_native(head, norm, rows, a, x.dtype):
            return None
        panels, ids = kernels.native_copy(rows), self.draft_vocab
        logits, _, tokens, conf = native.head(x.view(a, -1), panels, len(ids), norm, ids, self.vocab)
        return logits, tokens, conf

    def draft_head_native(self, head, norm: tuple | None, rows: torch.Tensor, a: int, dtype: torch.dtype) -> bool:
        """Whether a draft's head over `a` rows of `dtype` runs in one native call (`native.head`):
        lean passes on packed kernels, a plain projection at temperature 1, the norm's gain (if any)
        of that dtype, not too many rows, and the native kernel for the draft rows `rows` at `a` rows."""
        if not (self.lean and self.lean_kernels.packed and type(self.model.head_ops) is HeadOps):
            return False
        if head.temperature != 1.0 or a > lean.FOLD_ROWS or (norm is not None and norm[0].dtype != dtype):
            return False
        return kernels.is_native(self.lean_kernels.head_func(rows, a))

    def native_drafts(
        self, state: DecodeState, b: int, token: int, n: int, cap: int, keep=None, feed_last: bool = False
    ) -> tuple | None:
        """Up to `cap` self-speculative drafts of sequence b from exit n in one native call
        (`native_drafts_of` for one sequence; keep(j, confidence)): (drafts, confidences), or None."""
        ask = keep if keep is None or isinstance(keep, native.EarlyStop) else (lambda _, j, c: keep(j, c))
        made = self.native_drafts_of(state, {b: token}, n, {b: cap}, ask, feed_last)
        return None if made is None else made[b]

    def native_drafts_of(
        self, state: DecodeState, tokens: dict[int, int], n: int, caps: dict[int, int], keep=None,
        feed_last: bool = False,
    ) -> dict[int, tuple[list[int], list[float]]] | None:  # fmt: skip
        """Up to caps[b] self-speculative drafts of each sequence b in `tokens` from exit n in one
        native call (`native.drafts`): the decode steps `run` makes under `ExitPolicy(force=n)`
        feeding tokens[b], then each draft, one by one (a norm-only exit, its head onto the draft
        vocabulary: `DraftCheck`), each step the rows of the sequences still drafting together,
        with their K/V, pending rows, fill counts and numbers, without the Python between and
        around them (~0.15-0.2 ms a step on the CPU reference model at batch 1, a third of a draft
        step; ~0.3 at batch 4). keep(b, j, confidence): whether b drafts another after its draft j
        (or a `native.EarlyStop`: the controller's rule applied in the loop);
        `feed_last`: each sequence's last draft fed below the exit too (the verify pass then feeds
        it nothing: `run`). Returns {b: (drafts, confidences)}, or None where those steps would not
        each run in one native call (an exit with a block or more than a norm, no draft
        vocabulary, rows pending below the exit, a kernel other than the native one at any of the
        steps' row counts, a forward hook, profiling, `native_drafting` off): nothing done."""
        d, seqs = self.depth(n), list(tokens)
        room = min(state.cache.capacity, state.pending.shape[1])
        if any(state.fed[b] + caps[b] + feed_last > room for b in seqs):
            return None
        plan = self.drafting_plan(state, seqs, n)
        if plan is None:
            return None
        run, emb = plan.run, self.model.embedding.word_embeddings.weight
        top = max(state.fed[b] + caps[b] for b in seqs)
        cos, _, neg = self.rotary_tables(top + 1)[:3]  # positions up to the last fed (with feed_last)
        at = [(b, state.fed[b]) for b in seqs]
        pending = [state.pending[b, p : p + caps[b] + feed_last] for b, p in at]
        ask = keep if keep is None or isinstance(keep, native.EarlyStop) else (lambda s, j, c: keep(seqs[s], j, c))
        made = native.drafts([tokens[b] for b in seqs], emb, run.native, run.shape, (cos, neg), at, pending,
                             plan.head, ask, feed_last)  # fmt: skip
        if made is None:
            return None
        for (b, pos), (drafts, _) in zip(at, made):
            state.fed[b] = state.cache.filled[:d, b] = pos + len(drafts) + (feed_last and len(drafts) > 0)
        return dict(zip(seqs, made))

    def drafting_plan(self, state: DecodeState, seqs: list[int], n: int) -> DraftPlan | None:
        """`draft_plan` for sequences `seqs` drafting from exit n where their drafts run in one native
        call (`native_drafts_of`; `native_spec.loop_parts`): natively drafting on the CPU with the
        library loaded, no profiling, no pipeline stage, an exit that is its norm alone, a draft
        vocabulary, nothing pending below the exit and no hook on the way; else None."""
        if not self.native_drafting or self.profile or self.start or n in self.block_slots or self.draft_vocab is None:
            return None
        if self.device.type != "cpu" or native.library() is None:
            return None
        if self.uniform_layers(state, {b: [0] for b in seqs}) < self.depth(n):  # nothing pending below the exit
            return None
        plan = self.draft_plan(state, n, len(seqs))  # None where the embedding is not a plain one
        if plan is None or lean.hooks_set(plan.hooks):  # a hook on the embedding, a layer, the exit norm
            return None
        return plan

    def draft_plan(self, state: DecodeState, n: int, batch: int) -> DraftPlan | None:
        """What `native_drafts_of` takes of `state` for `batch` sequences drafting from exit n, worked
        out once per decode state, exit, batch size and selection of kernels (`kernels.selection`):
        the layers below the exit, the draft head as `native.drafts` takes it, every drafting step's
        row count on the native kernel; None where not (an exit that is more than its norm, a layer
        not lean, a kernel other than the native one, an embedding that is not a plain word
        embedding alone: `plain_embedding`, its hooks then). Forward hooks are the caller's to check
        (`DraftPlan.hooks`): they come and go without the kernels' selection changing."""
        key, selection = ("draft plan", n, batch), kernels.selection()
        kept = state.memo.get(key)
        if kept is not None and kept[0] == selection:
            return kept[1]
        self.lean_kernels.sync()
        made = self._draft_plan(state, n, batch)
        state.memo[key] = (selection, made)
        return made

    def _draft_plan(self, state: DecodeState, n: int, batch: int) -> DraftPlan | None:
        check = state.remembered(("drafts", n), lambda: DraftCheck(self, n, self.exit_head(state, n)))
        run, emb = self.layer_run(state, 0, self.depth(n)), self.model.embedding.word_embeddings.weight
        if check.norm is None or run is None or not self.plain_embedding():
            return None
        rows = check.draft_rows()
        for a in range(1, batch + 1):  # the steps' rows: every sequence, then fewer as they stop
            if not lean.rows_natively(run.products, a, self.lean_kernels):
                return None
            if not self.draft_head_native(check.head, check.norm_args, rows, a, emb.dtype):
                return None
        head = (kernels.native_copy(rows), len(self.draft_vocab), self.draft_vocab, check.norm_args)
        embedding = self.model.embedding
        return DraftPlan(run, head, run.hooks + lean.hook_dicts((check.norm, embedding, embedding.word_embeddings)))

    def verify_plan(self, state: DecodeState, depth: int) -> VerifyPlan | None:
        """What a verify pass of rows pending at `depth` takes of `state` (`verify_pending`): the
        layers from `depth` on and the final head as `native.verify` takes them, worked out once per
        decode state, depth and selection of kernels; None where a layer is not lean. Forward hooks
        and the row count's kernels are the caller's to check (`VerifyPlan.hooks`, `takes`)."""
        key, selection = ("verify plan", depth), kernels.selection()
        kept = state.memo.get(key)
        if kept is not None and kept[0] == selection:
            return kept[1]
        self.lean_kernels.sync()
        run, made = self.layer_run(state, depth, self.num_layers), None
        if run is not None:
            norm = self.model.decoder.final_layernorm
            gain = None if norm is None else (norm.weight, norm.eps)
            head = native.DecodeHead(kernels.native_copy(self.model.output_weight()), self.vocab, None, gain)
            made = VerifyPlan(run, head, run.hooks, lean.hook_dicts(() if norm is None else (norm,)))
        state.memo[key] = (selection, made)
        return made

    def block_exit_hidden(self, state: DecodeState, n: int, head, seqs: list[int]) -> torch.Tensor:
        """Bring exit n's own block cache up to each sequence's newest token; its hidden there [A, 1, h]."""
        h, cnt = self.block_catch_up(state, n, head, seqs)
        last = torch.tensor([c - 1 for c in cnt], device=self.device)
        return h[torch.arange(len(seqs), device=self.device), last][:, None]

    def block_catch_up(self, state: DecodeState, n: int, head, seqs: list[int]) -> tuple[torch.Tensor, list[int]]:
        """Bring exit n's own block cache up to each sequence's newest token: its hidden states
        (A, R, h) at the positions caught up, cnt[a] of them for seqs[a] (the newest last)."""
        slot, cache = self.block_slots[n], state.exit_cache
        lo = [int(cache.filled[slot, b]) for b in seqs]
        cnt = [state.fed[b] - lo[a] for a, b in enumerate(seqs)]
        x = state.exit_inputs.new_zeros(len(seqs), max(cnt), self.config.hidden_size)  # (A, R, h)
        for a, b in enumerate(seqs):
            x[a, : cnt[a]] = state.exit_inputs[slot, b, lo[a] : state.fed[b]]
        index, rotary = self.layout(cache, seqs, lo, cnt, {})
        h = head.hidden(x, rotary, index.attn_mask, cache.layer(slot, index))  # (A, R, h)
        for b in seqs:
            cache.filled[slot, b] = state.fed[b]
        return h, cnt

    def remember_pending(self, state: DecodeState, rows: Rows, fired: set[int]) -> None:
        """Rows that stop here keep their hidden state: the deeper layers' input, for later."""
        for a, b in enumerate(rows.seqs):
            if b in fired:
                state.pending[b, rows.lo[a] : rows.lo[a] + rows.n[a]] = rows.x[a, : rows.n[a]]

    def final_head(self, rows: Rows, all_rows: bool, out: StepOutput) -> None:
        """The final head's token for every sequence in `rows` (max_prob confidence); with
        `all_rows`, every row's logits too (and tokens, where the int8 head made them)."""
        if not rows.seqs:
            return
        m = self.model
        if all_rows and not self.int8_head():  # every row's norm, projection, argmax and max-probability in one call
            made = self.native_vocab(self.real_rows(rows), m.output_weight(), m.decoder.final_layernorm)
            if made is not None:
                return self.record_rows(rows.seqs, rows.n, *made, out)
        if all_rows:
            x = self.norm(m.decoder.final_layernorm, rows.x)  # (A, R, h)
            if self.int8_head():
                return self.final_row_tokens(rows, x, out)
            logits = self.vocab_logits(m.head_ops.project(x, m.output_weight()))
            for a, b in enumerate(rows.seqs):
                out.all_logits[b] = logits[a, : rows.n[a]]  # logits: (A, R, V)
            last = torch.stack([logits[a, rows.n[a] - 1] for a in range(len(rows.seqs))])
        else:
            h = self.newest_rows(rows, list(range(len(rows.seqs))))[:, 0]  # (A, h): only the newest rows
            if not self.int8_head():  # the norm, projection, argmax and max-probability in one call
                made = self.native_vocab(h, m.output_weight(), m.decoder.final_layernorm)
                if made is not None:
                    return self.record_head(rows.seqs, self.num_layers, *made, out)
            h = self.norm(m.decoder.final_layernorm, h)
            if self.int8_head():
                return self.final_tokens(rows, h, out)
            last = self.vocab_logits(m.head_ops.project(h, m.output_weight()))  # (A, V)
        conf = max_prob(last).tolist()
        for a, b in enumerate(rows.seqs):
            out.logits[b], out.exit_layer[b], out.confidence[b] = last[a], self.num_layers, conf[a]

    @staticmethod
    def record_head(seqs: list[int], layer: int, logits, tokens: list[int], conf: list[float], out) -> None:
        """Each of `seqs` gets its row of `logits`, its greedy token (`out.argmax`) and its
        confidence from a head at `layer` (`native_vocab`)."""
        for a, b in enumerate(seqs):
            out.logits[b], out.exit_layer[b], out.confidence[b], out.argmax[b] = logits[a], layer, conf[a], tokens[a]

    def norm(self, norm, x: torch.Tensor) -> torch.Tensor:
        """`norm(x)` (the final norm, or an exit that is its norm alone); an RMSNorm that no forward
        hook watches as `lean.rms_norm` where lean layers are on (the same operations, no module call)."""
        if self.lean and type(norm) is RMSNorm and not lean.watched((norm,)):
            return lean.rms_norm(x, norm.weight, norm.eps)
        return norm(x)

    @property
    def argmax_head(self) -> str:
        """'full': the final head's whole logits; 'auto' / 'int8': where only the token is needed,
        the certified argmax of greedy_head.py (the engine sets it per request)."""
        return self._argmax_head

    @argmax_head.setter
    def argmax_head(self, head: str) -> None:
        # whether it takes the int8 head, worked out here (a request sets it) rather than in every
        # decode step's final head, where it cost ~85 us paid cold (SmolLM2, bf16)
        self._argmax_head = head
        self.int8 = head != "full" and greedy_head.wants_int8(self.model.output_weight(), head)

    def int8_head(self) -> bool:
        """Whether this pass takes the final head's tokens from the certified int8 argmax."""
        return self.int8

    def certified_tokens(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h [N, h] (after the final norm) -> (greedy tokens [N], near-exact logits [N, V] fp32)."""
        m, weight = self.model, self.model.output_weight()
        head = greedy_head.int8_head(weight, self.vocab)
        full = lambda x: self.vocab_logits(m.head_ops.project(x, weight))  # noqa: E731 (the plain path)
        return greedy_head.certified_argmax(h, weight[: self.vocab], head, full)

    def final_tokens(self, rows: Rows, h: torch.Tensor, out: StepOutput) -> None:
        """The final head's greedy token for each sequence (`out.tokens`, no logits) from the
        certified int8 argmax on h [A, h]; confidence from its near-exact logits."""
        tokens, logits = self.certified_tokens(h)
        conf = max_prob(logits).tolist()
        for a, (b, t) in enumerate(zip(rows.seqs, tokens.tolist())):
            out.tokens[b], out.exit_layer[b], out.confidence[b] = t, self.num_layers, conf[a]

    @staticmethod
    def real_rows(rows: Rows) -> torch.Tensor:
        """The rows of `rows` (A, R, h) that hold positions, without the padding: (N, h)."""
        if len(rows.seqs) == 1:
            return rows.x[0, : rows.n[0]]
        return torch.cat([rows.x[a, : rows.n[a]] for a in range(len(rows.seqs))])

    def record_rows(self, seqs: list[int], n: list[int], logits, tokens: list[int], conf: list[float], out) -> None:
        """A verify pass's final head on every real row (`real_rows`, `native_vocab`; sequence
        seqs[a]'s n[a] rows one after another): per sequence every row's logits and greedy token
        (`all_logits`, `all_tokens`), the newest row's as the step's token."""
        end = 0
        for b, k in zip(seqs, n, strict=True):
            start, end = end, end + k
            out.all_tokens[b], out.all_logits[b] = tokens[start:end], logits[start:end]
            out.all_confidences[b] = conf[start:end]
            last = end - 1
            out.logits[b], out.exit_layer[b], out.confidence[b] = logits[last], self.num_layers, conf[last]
            out.argmax[b] = tokens[last]

    def final_row_tokens(self, rows: Rows, x: torch.Tensor, out: StepOutput) -> None:
        """`final_tokens` for every row of x [A, R, h] (a verify pass): `all_tokens` and the
        near-exact `all_logits` per sequence, the newest row's token in `tokens`."""
        h = torch.cat([x[a, : rows.n[a]] for a in range(len(rows.seqs))])  # (N, h): the real rows, no padding
        tokens, logits = self.certified_tokens(h)
        conf, tokens = max_prob(logits).tolist(), tokens.tolist()
        end = 0
        for a, b in enumerate(rows.seqs):
            start, end = end, end + rows.n[a]
            out.all_tokens[b], out.all_logits[b] = tokens[start:end], logits[start:end]
            out.tokens[b], out.exit_layer[b], out.confidence[b] = tokens[end - 1], self.num_layers, conf[end - 1]

    def vocab_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Whole-vocabulary logits (the head ops all-gather the shards under TP; identity
        on one device), without the padded entries (never tokens), in fp32."""
        return self.model.head_ops.full_logits(logits)[..., : self.vocab].float()

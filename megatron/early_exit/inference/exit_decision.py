"""Which rows leave at an exit, and whether an exit is worth evaluating at all (DESIGN.md section 6,
"Batches"): the `cost_aware` exit policy.

Decoding at small batch is memory-bound: one layer over r rows costs t(r) = a + b*r with a
(reading the layer's weights) much larger than b (one row's arithmetic). A row that leaves at
exit n while others go on saves b per remaining layer, and the next time a token of its
sequence goes deeper its state is recomputed through those layers: `row` per layer, about b
or more. So a leaver pays only when the whole pass ends (everyone leaves: the remaining layers
and the final head are not run at all), or where b exceeds the recompute (a cost model that
says so). Rows that do not leave go on to the next exit or the final head, so the output can
only move toward full decoding's.

`exact` (the policy every equality test uses) lets each row whose confidence reaches the
threshold leave; `cost_aware`:
  (a) lets the rows that would fire leave together only where the time their leaving saves
      over the remaining layers exceeds their later recompute (`net_saving`); else none leaves;
  (b) skips evaluating exit n where the chance that its evaluation lets rows leave times
      that saving is below the check's own cost at the pass's size; a skipped exit is still
      evaluated every `REFRESH`-th time so that the chance can recover. The chance (per engine,
      exit, measure, threshold and pass size k) is the smaller of two running estimates: this
      size's share of evaluations that let rows leave (the mean of the evaluations so far, an
      optimistic 1.0 counted as one of them, then, after 1/(1 - DECAY) of them, an exponential
      average; a size not evaluated yet starts from the largest smaller one's), and a bound from
      the per-row firing rate p that all sizes share (rows that reached the threshold over rows
      evaluated, an optimistic one fired row as prior, averaged the same way): where only the
      whole pass ending pays, P(all k rows fire) <= p whatever their correlation. In continuous
      batching pass sizes come and go with the requests (a server's passes shrink as requests
      finish): a size seen for the first time starts from what the others learned (after one
      evaluation of 16 rows none of which fired, p = 1/17: every size whose saving is under
      17 checks skips the exit). An exit
      that never fires is thus evaluated a few times in all, then once in REFRESH passes per
      size: its overhead tends to check/REFRESH per pass (max_prob on the CPU reference model
      at batch 16: ~0.3% of a step per exit).

A leaver's recompute is priced as what the pending path costs: `row` per layer for each row,
and, for the sequences that held no pending row when the pass began (`starts_pending`), what the
pass that will fill them pays besides their rows, once per run of leaving tokens (`fill_of`: the
general path's gathering, layout and mask, a second native call after the uniform layers; timed
with one sequence and with several, `fill_probes`), however long the run: a run whose tokens go
on leaving (learned at 0.5: 97% leave at exit 3) pays it once for many. Priced once for any
number of sequences, with a two-position context, it read 0.09-0.22 ms on the CPU reference model
(bf16, AMX) where a pass filling one row of each of 4 sequences of 64 positions cost 0.41-0.56
over a plain one (1 sequence 0.25), and at batch 4 learned at 0.8 let rows leave at exit 6 whose
fill cost what leaving saved (0.92-0.95x paired).

What the decisions add up to is timed as decoding runs them (`exit_clock.py`): per policy and
pass size, windows of decode steps in one of three modes (`ExitDecider.set_mode`): paused (no
exit evaluated, no skip counted), on (these verdicts) or free (every exit evaluated, every firing
row leaves: `exact`'s decisions, which pay where rows that leave go on leaving and are rarely
recomputed: learned 0.5 at batch 16), the fastest kept and the others explored now and then;
only where decisions may follow the clock (`costs_from_parameters` false) and on a CPU device.

Regrouping sequences by exit depth into separate passes is not done: a second group reads the
shared layers' weights again (d*a), against (L - d)*b*k saved for k rows: see the README.

Costs come from `ExitCosts`: measured once per engine on first use or when a server starts
(`EarlyExitEngine.exit_costs`; a few layer, head and
check timings at batch 1 and 8, and a full-depth step filling one pending row against a plain
one (`fill_probes`), inside the engine's packed weights, in CPU seconds on a CPU:
wall-clock timings on a loaded machine once gave a layer no fixed cost at all, after which no
row ever left; each cost the median of three such timings, `measure_exit_costs`), taken from a fitted
`cost_model.DecodeCosts` (`ExitCosts.from_cost_model`), or, where several processes decode
together (tensor or pipeline parallelism, whose ranks must take the same decisions), derived
from the parameter counts alone (also wherever `EE_EXIT_COSTS=parameters`: decisions that do
not depend on the clock, as the test suite asks). Set `passes.exit_decider = ExitDecider(costs)`
to fix them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import statistics
import warnings
from dataclasses import dataclass, field

import torch

from megatron.early_exit.inference.confidence import get_measure
from megatron.early_exit.inference.exit_clock import FREE, ON, PAUSED, ExitClock, decode_step

EXIT_POLICIES = ("exact", "cost_aware")
REFRESH = 32  # a skipped exit is evaluated once in this many passes (its chance can recover)
# ... where its check costs at least CHEAP of what leaving there saves; a cheaper check comes back
# sooner, once in REFRESH * (check / saving) / CHEAP passes (at least 2): a skip of it saves
# little, and a stretch that stays skipped after the exit fires again loses the saving each pass
# (CPU reference, bf16, batch 1, learned 0.8: exit 3's check is 0.028 of its saving, and its
# running chance fell under that in hard stretches; skipped for 32 passes at a time, on left
# 41.7-47.3% of tokens there where free left 49.5%).
CHEAP = 0.25
DECAY = 0.9  # weight of the past in the running chance
MEAN_EVALUATIONS = round(1 / (1 - DECAY))  # the firing rate: a plain mean of this many evaluations, then decays
# Evaluations of an exit (per measure and threshold) in which no row fired before the clock takes
# it for one that does not fire (`ExitDecider.may_fire`: no free window until one does). One: the
# decider's first look at max_prob 0.9 at batch 1 (a vocabulary projection, several layers' time)
# is often its last for 32 passes, and at 3 the CPU reference's 32-token runs stayed in the trusted
# windows (17% of passes paused, 0.92x paired, against 72% and 0.97-0.99x at 1).
QUIET_EVALUATIONS = 1
TOLERANCE = 1e-9  # a saving within this share of a layer is a tie: the rows stay (toward full decoding)


@dataclass(frozen=True)
class ExitCosts:
    """Seconds (or any one unit) of the pieces a decision weighs."""

    layer_fixed: float  # a: one layer's cost that does not depend on the rows (weights read)
    layer_row: float  # b: what each row adds to one layer
    row: float  # one row recomputed later through one layer (pending fill)
    head: float  # a vocabulary projection of one row (final head, or an exit's for its leavers)
    vocab: float  # a check of one row that projects onto the vocabulary (max_prob, entropy, ...)
    probe: float  # a check of one row that reads the exit's hidden state alone (learned)
    head_row: float = 0.0  # what each further row adds to `head`
    vocab_row: float = 0.0  # ... to `vocab`
    probe_row: float = 0.0  # ... to `probe`
    # What a pass that fills pending rows pays once besides its rows: the general path's own work
    # (gathering, a layout and mask, a second native call after the uniform layers). Leaving rows
    # whose sequence held no pending row starts a run that a later pass must fill (`net_saving`).
    fill: float = 0.0
    # A projection of one row onto the draft vocabulary alone, and what each further row adds:
    # what a leaver costs where its policy chooses leaving tokens from it (`ExitPolicy.vocab`
    # "draft"); None where not timed (such a leaver is priced at `head`, never below it).
    draft: float | None = None
    draft_row: float = 0.0
    # What each further sequence whose rows that pass fills adds to `fill`: its own gathering and
    # a ragged layout's rows (CPU reference model, bf16, AMX: a pass filling one row of each of 4
    # sequences cost 0.41-0.56 ms over a plain one, of 1 sequence 0.21-0.29).
    fill_seq: float = 0.0

    def fill_of(self, sequences: int) -> float:
        """What the pass that fills the pending rows of `sequences` sequences pays besides their rows."""
        return self.fill + self.fill_seq * (sequences - 1) if sequences > 0 else 0.0

    def layer(self, rows: int) -> float:
        """One layer over `rows` rows (none: not run)."""
        return self.layer_fixed + self.layer_row * rows if rows > 0 else 0.0

    def check(self, needs_vocab: bool, rows: int = 1) -> float:
        """One exit check over `rows` rows."""
        if needs_vocab:
            return self.vocab + self.vocab_row * max(rows - 1, 0)
        return self.probe + self.probe_row * max(rows - 1, 0)

    def projection(self, rows: int) -> float:
        """A vocabulary projection of `rows` rows (none: not run)."""
        return self.head + self.head_row * (rows - 1) if rows > 0 else 0.0

    def leavers(self, rows: int, vocab: str) -> float:
        """The projection of `rows` leaving rows (`ExitPolicy.vocab`): onto the draft vocabulary
        where they are chosen from it and its cost is known, else the whole one."""
        if vocab == "draft" and self.draft is not None:
            return self.draft + self.draft_row * (rows - 1) if rows > 0 else 0.0
        return self.projection(rows)

    @classmethod
    def from_cost_model(cls, c) -> ExitCosts:
        """From a fitted `cost_model.DecodeCosts` (measured at batch c.batch; its `row` is one
        more row per sequence through one layer, i.e. c.batch rows, and its `pend` a layer
        filling one pending row per sequence: a recomputed row costs the larger share). Its head
        and checks are of the whole batch: taken for any pass size, which overprices checks of
        smaller passes (they are then skipped sooner, never later)."""
        batch = max(c.batch, 1)
        per_row = c.row / batch
        vocab = sum(c.vocab.values()) / len(c.vocab) if c.vocab else c.head
        probe = sum(c.probe.values()) / len(c.probe) if c.probe else vocab
        recompute = max(per_row, c.pend / batch)
        layer = c.streamed("layer")  # weights read from memory, as in decoding deeper than the cache holds
        return cls(
            max(layer - per_row * batch, 0.0), per_row, recompute, c.streamed("head"), vocab, probe, fill=c.pend_pass,
            draft=sum(c.draft.values()) / len(c.draft) if c.draft else None,
        )  # fmt: skip

    @classmethod
    def from_parameters(cls, passes) -> ExitCosts:
        """Deterministic costs from parameter counts (every rank derives the same): a layer's
        weights read, a row 1/32 of it, a projection its matrix, a probe its weights but at
        least 1/50 of a layer (a linear probe's few weights cost a call's overhead); no `fill`
        (parameters say nothing of the general path's own work)."""
        layer = sum(p.numel() for p in passes.model.decoder.layers[str(passes.start)].parameters())
        head = float(passes.vocab * passes.config.hidden_size)
        c = passes.config  # the probe's size from the config: the same on every pipeline stage
        probe = (c.hidden_size + 2) * c.exit_confidence_hidden_size + 1 if c.exit_confidence_hidden_size else 0
        drafts = getattr(passes, "draft_vocab", None)
        draft = None if drafts is None else float(len(drafts) * c.hidden_size)
        return cls(float(layer), layer / 32, layer / 32, head, head, max(layer / 50, float(probe)), draft=draft)


MEASURE_TRIES = 3  # medians of timings `measure_exit_costs` takes until one is `plausible`
# Timings whose field-wise median is one measurement: at batch 4 (CPU reference model, bf16) whether
# four rows leaving together pay turns on layer(4) / (4 row), which twelve timings in one process
# read 1.02-1.55; at 1.02 the checks never paid and nothing left in one run where 94% had left in
# the run before (`benchmarks/decode_speed.py`). A median of three drops one burst's timing.
TIMINGS = 3


def plausible(c: ExitCosts) -> bool:
    """Whether timed costs can be the machine's: a layer over one row costs more than one row
    recomputed through it later (reading a layer's weights, which decoding at batch 1 is bound
    by, against one more row riding a pass that reads them anyway). Timings that say otherwise
    came from a burst of a neighbour's load in the few ms they took (the CPU reference model,
    bf16: one process in about ten timed each row dearer than a layer's weights), and under them
    no batch-1 row ever leaves: `net_saving` is (layers left) x (layer(1) - row) there."""
    return c.layer(1) > c.row >= 0


@torch.no_grad()
def measure_exit_costs(passes, batch: int = 8, repeats: int = 5, tries: int = MEASURE_TRIES) -> ExitCosts:
    """The field-wise median of TIMINGS `time_exit_costs` (`median_costs`), until it is
    `plausible`, at most `tries` times; then, where none was, the parameter counts'
    (`ExitCosts.from_parameters`), with a warning: decisions on costs that say no row ever pays
    would turn early exit off for the engine's lifetime. ~0.1 s on the CPU reference model."""
    for _ in range(tries):
        costs = median_costs([time_exit_costs(passes, batch, repeats) for _ in range(TIMINGS)])
        if plausible(costs):
            return costs
    warnings.warn(
        f"cost_aware: {tries} timings of the exit costs each priced a recomputed row above a layer "
        f"(last: layer {costs.layer(1):.3g} s, row {costs.row:.3g} s; a loaded machine?); "
        "deciding from parameter counts instead",
        RuntimeWarning,
        stacklevel=2,
    )
    return ExitCosts.from_parameters(passes)


def median_costs(timings: list[ExitCosts]) -> ExitCosts:
    """Each cost the median of its timings'."""

    def median(name: str):  # a cost some timing lacks (None: not timed) stays untimed
        values = [getattr(c, name) for c in timings]
        return None if None in values else statistics.median(values)

    return ExitCosts(*(median(f.name) for f in dataclasses.fields(ExitCosts)))


@torch.no_grad()
def time_exit_costs(passes, batch: int = 8, repeats: int = 5) -> ExitCosts:
    """Time one layer over 1 and `batch` rows and over `batch` sequences of 2 rows, the final
    head and one check of the first exit of each kind over 1 and `batch` rows, best of `repeats`
    (CPU seconds on a CPU device; some ms)."""
    from megatron.early_exit.inference.cost_model import best_times, cpu_clock

    fns = cost_probes(passes, batch)
    with passes.pass_state_kept():  # measured in the middle of a decode step's exit check
        t = best_times(fns, passes.device, repeats, cpu_clock(passes.device))

    def slope(name: str) -> float:  # what each row past the first adds
        return max(t[f"{name}/{batch}"] - t[f"{name}/1"], 0.0) / (batch - 1)

    b = slope("layer")
    row = max((t["two"] - t[f"layer/{batch}"]) / batch, b)  # a recomputed row rides a pass as one more row, at least b
    vocab = "vocab" if "vocab/1" in t else "head"  # no plain exit: a check priced as a projection
    probe = "probe" if "probe/1" in t else vocab
    # the fill's own work: a step that fills one row (of each of `batch` sequences), less the plain
    # step and those rows' layers
    plain = plain_exits(passes)
    fill = fill_seq = 0.0
    if plain:
        m = passes.num_layers - passes.depth(plain[0])
        fill = max(t["fill"] - t["plain"] - m * row, 0.0)
        if batch > 1:  # (at one sequence the probes are "plain" and "fill" themselves)
            fill_seq = max(t[f"fill/{batch}"] - t[f"plain/{batch}"] - m * row * batch - fill, 0.0) / (batch - 1)
    draft = t.get("draft/1")  # None: the engine has no draft vocabulary
    return ExitCosts(
        max(t["layer/1"] - b, 0.0), b, row, t["head/1"], t[f"{vocab}/1"], t[f"{probe}/1"],
        head_row=slope("head"), vocab_row=slope(vocab), probe_row=slope(probe), fill=fill,
        draft=draft, draft_row=slope("draft") if draft is not None else 0.0, fill_seq=fill_seq,
    )  # fmt: skip


def plain_exits(passes) -> list[int]:
    """The exits on this stage without a transformer block of their own."""
    return [n for n in passes.exits if str(n) in passes.model.exits and n not in passes.block_slots]


def cost_probes(passes, batch: int) -> dict:
    """The calls `measure_exit_costs` times: "layer/r", "head/r", "vocab/r", "probe/r" over r in
    (1, batch) rows (the checks where an exit without a block has them; "probe/r": the learned
    check as a decode step runs it, none of the rows firing), "two": 2 rows each; "plain" and
    "fill" (`fill_probes`), and "plain/batch" and "fill/batch" of `batch` sequences (batch > 1),
    where an exit without a block has them."""
    from megatron.early_exit.inference.confidence import max_prob
    from megatron.early_exit.inference.passes import ExitPolicy, Rows, StepOutput
    from megatron.early_exit.inference.uniform_check import UniformCheck, applies

    learned = get_measure("learned")
    never = ExitPolicy(threshold=2.0, measure="learned")  # a threshold no confidence reaches

    state, h = passes.new_state(batch, 4), passes.config.hidden_size
    x = torch.randn(batch, 2, h, generator=torch.Generator().manual_seed(0)).to(passes.device, passes.dtype)

    def rows(a: int, r: int) -> Rows:
        return Rows(list(range(a)), [0] * a, [r] * a, x[:a, :r].clone())  # (a, r, h)

    i, memo = passes.start, {}
    fns = {"two": lambda: passes.advance(state, i, rows(batch, 2), memo)}
    plain = plain_exits(passes)
    head = passes.model.exits[str(plain[0])] if plain else None
    if plain:
        fns["plain"], fns["fill"] = fill_probes(passes, passes.depth(plain[0]))
        if batch > 1:
            fns[f"plain/{batch}"], fns[f"fill/{batch}"] = fill_probes(passes, passes.depth(plain[0]), batch)
    for a in (1, batch):
        fns[f"layer/{a}"] = lambda a=a: passes.advance(state, i, rows(a, 1), memo)
        fns[f"head/{a}"] = lambda a=a: passes.final_head(rows(a, 1), False, StepOutput())
        if head is None:
            continue
        hidden = lambda a=a: passes.exit_hidden(state, plain[0], head, rows(a, 1), list(range(a)))  # noqa: E731
        fns[f"vocab/{a}"] = lambda hidden=hidden: max_prob(passes.exit_logits(head, hidden()))
        if passes.draft_vocab is not None:  # a leaver's projection where leaving tokens come from it
            fns[f"draft/{a}"] = lambda hidden=hidden: passes.draft_logits(head, hidden())
        if head.confidence is None:
            continue
        # as a decode step runs it, no row firing: in one call where it applies (`uniform_check`),
        # else `probe_check` (fused where the probe folds)
        folded = passes.folded_probe(state, head) if passes.fused_checks else None
        if applies(folded):
            check = UniformCheck(passes, plain[0], never, head, folded)
            fns[f"probe/{a}"] = lambda a=a, check=check: check(state, rows(a, 1), StepOutput())
        else:
            check = functools.partial(passes.probe_check, state, plain[0], head)
            fns[f"probe/{a}"] = lambda a=a, check=check: check(rows(a, 1), list(range(a)), never, learned)
    return fns


def fill_probes(passes, depth: int, sequences: int = 1, context: int | None = None) -> tuple:
    """Two full-depth decode steps of `sequences` sequences through `Passes.run` (no exit), each
    sequence `context` positions long: the first feeding nothing pending, the second with the row
    before each one's token pending at `depth` (as a token that left at an exit there leaves it),
    which the step fills: the uniform layers up to `depth`, then the general path over both rows.
    Context FILL_CONTEXT: at 2 positions a fill read 0.17 ms over a plain step, at 32-128 0.26-0.29
    (CPU reference model, bf16, batch 1: attention over the pending rows' keys, a wider mask)."""
    from megatron.early_exit.inference.passes import ExitPolicy

    context = FILL_CONTEXT if context is None else context
    state, local = passes.new_state(sequences, context + 4), depth - passes.start
    rows = torch.randn(sequences, passes.config.hidden_size, generator=torch.Generator().manual_seed(1))
    rows = rows.to(passes.device, passes.dtype)
    full, seqs = ExitPolicy(), range(sequences)

    def step(pending: bool):
        def run():
            state.cache.filled[:, :sequences] = context  # positions 0 .. context - 1 through every layer
            for b in seqs:
                state.fed[b] = context
                if pending:  # position `context` through the layers below `depth` alone
                    state.cache.filled[:local, b], state.fed[b] = context + 1, context + 1
                    state.pending[b, context] = rows[b]
            passes.run(state, {b: [1] for b in seqs}, full)

        return run

    return step(False), step(True)


FILL_CONTEXT = 32  # positions of each sequence in the fill probes (`fill_probes`)
COSTS_ENV = "EE_EXIT_COSTS"  # "measured" (default) or "parameters": deterministic decisions


def costs_from_parameters() -> bool:
    """Whether decisions use costs derived from parameter counts instead of timings: always where
    several processes decode together, and wherever `EE_EXIT_COSTS=parameters` asks for
    decisions that do not depend on the clock (the test suite; reproducible runs)."""
    choice = os.environ.get(COSTS_ENV, "measured")
    if choice not in ("measured", "parameters"):
        raise ValueError(f"{COSTS_ENV}={choice!r}: expected 'measured' or 'parameters'")
    return choice == "parameters" or distributed()


CLOCK_ENV = "EE_EXIT_CLOCK"  # "on" (default) or "off": cost_aware's decisions not timed as they run


def clock_wanted() -> bool:
    """Whether cost_aware times its decisions as decoding runs them (`exit_clock.py`) where it may:
    `EE_EXIT_CLOCK=off` leaves them to the costs alone (the same decisions for the same costs)."""
    choice = os.environ.get(CLOCK_ENV, "on")
    if choice not in ("on", "off"):
        raise ValueError(f"{CLOCK_ENV}={choice!r}: expected 'on' or 'off'")
    return choice == "on"


def distributed() -> bool:
    """Several processes decode together: their decisions must not depend on their own clocks."""
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )


@dataclass
class ExitDecider:
    """One engine's costs; per (exit, measure, threshold, candidates) the running chance that
    evaluating the exit lets rows leave (`seen`: evaluations that went into it) and `skipped`:
    passes since the last evaluation; per (exit, measure, threshold) the running per-row firing
    rate shared by every pass size (`rows_fired` / `rows_seen`, `evaluated`: evaluations that went
    into it)."""

    costs: ExitCosts | None = None
    chance: dict[tuple, float] = field(default_factory=dict)
    seen: dict[tuple, int] = field(default_factory=dict)
    skipped: dict[tuple, int] = field(default_factory=dict)
    every: dict[tuple, int] = field(default_factory=dict)  # key -> passes between its refreshes (`refresh_every`)
    rows_fired: dict[tuple, float] = field(default_factory=dict)
    rows_seen: dict[tuple, float] = field(default_factory=dict)
    evaluated: dict[tuple, int] = field(default_factory=dict)
    terms: dict[tuple, tuple] = field(default_factory=dict)  # pass shape -> `worth_checking`'s (cost, saving, alone)
    terms_costs: ExitCosts | None = None  # the costs `terms` were worked out from
    # Counts `record` calls and changes of `paused`: `verdict` reads nothing else that changes
    # (with the costs), so its answer for a pass shape holds while this and `costs` do
    # (`uniform_check.UniformCheck`).
    version: int = 0
    # Times the decisions as decoding runs them and pauses them where they do not pay
    # (`exit_clock.py`): None until `clock_for` asks, False where decisions must not follow the clock.
    clock: ExitClock | bool | None = None
    # The running pass's mode (`ExitClock`): `paused`, no exit evaluated; `free`, every allowed exit
    # evaluated and every row that fires leaves (`exact`'s decisions); neither: the verdicts above.
    paused: bool = False
    free: bool = False
    # (exit, measure, threshold) where an evaluated row has reached the threshold (`may_fire`);
    # policy -> (len(fired) when last asked, whether every exit had its evaluations, the answer)
    fired: set = field(default_factory=set)
    fired_memo: dict = field(default_factory=dict)

    def clock_for(self, passes) -> ExitClock | None:
        """The decider's `ExitClock` (made on first use), or None: decisions that must not follow
        the clock (`costs_from_parameters`), `EE_EXIT_CLOCK=off`, or a device whose passes a clock
        would not time."""
        if self.clock is None:
            timed = passes.device.type == "cpu" and not costs_from_parameters()
            self.clock = ExitClock() if timed and clock_wanted() else False
        return self.clock or None

    def may_fire(self, passes, policy) -> bool:
        """Whether a row may reach the threshold at one of the exits `policy` evaluates: one has, in
        any evaluation so far (any mode, any pass size), or one of them has been evaluated fewer
        than QUIET_EVALUATIONS times (not known: costs measured so that no check looked worth it
        once left learned 0.5 on the CPU reference, which fires for 97% of tokens, unevaluated and
        paused, where only a free window would have evaluated it). Worked out again only where
        `record` has counted a new firing, or while some exit is short of its evaluations."""
        memo = self.fired_memo.get(policy)
        if memo is None or memo[0] != len(self.fired) or not memo[1]:
            exits = [
                (n, policy.measure, policy.threshold_of(n)) for ns in passes.exits_by_depth(policy).values() for n in ns
            ]
            known = all(self.evaluated.get(e, 0) >= QUIET_EVALUATIONS for e in exits)
            answer = not known or any(e in self.fired for e in exits)
            if len(self.fired_memo) >= 64:
                self.fired_memo.clear()
            memo = self.fired_memo[policy] = (len(self.fired), known, answer)
        return memo[2]

    def set_mode(self, mode: int) -> None:
        """The coming pass's mode: `exit_clock.PAUSED` (no exit evaluated, no skip counted), `ON`
        (the decider's verdicts) or `FREE` (every exit evaluated, every firing row leaves)."""
        paused, free = mode == PAUSED, mode == FREE
        if (paused, free) != (self.paused, self.free):
            self.paused, self.free = paused, free
            self.version += 1

    def costs_for(self, passes) -> ExitCosts:
        if self.costs is None:
            self.costs = ExitCosts.from_parameters(passes) if costs_from_parameters() else measure_exit_costs(passes)
        return self.costs

    def net_saving(
        self, passes, n: int, rows, leaving: list[int], measure: str, fresh: int = 0, vocab: str = "full"
    ) -> float:
        """Time saved if the sequences at `rows` indices `leaving` leave at exit n, less their
        later recompute (and, for a measure without the projection, the leavers' projection:
        onto the draft vocabulary where `vocab` (`ExitPolicy.vocab`) says so);
        `fresh` (`starts_pending`: how many of their sequences start pending rows; True: one):
        less the pass that will fill them too (`ExitCosts.fill_of`)."""
        c, m = self.costs_for(passes), passes.num_layers - passes.depth(n)
        total, gone = sum(rows.n), sum(rows.n[a] for a in leaving)
        saved = m * (c.layer(total) - c.layer(total - gone)) + (c.projection(len(rows.seqs)) if gone == total else 0.0)
        projection = 0.0 if get_measure(measure).needs_vocab else c.leavers(len(leaving), vocab)
        return saved - gone * m * c.row - projection - (c.fill_of(int(fresh)) if gone else 0.0)

    def starts_pending(self, passes, rows, among: list[int]) -> int:
        """How many sequences of the rows `among` (indices into `rows`) would start pending rows
        by leaving, rows that a later pass must fill, paying `ExitCosts.fill_of` them: those that
        held none when the pass began (`Passes.holding`). One that held some gets that pass anyway,
        so a run of tokens leaving one after another pays it once. 0 where no fill is priced."""
        holding = getattr(passes, "holding", None)
        c = self.costs_for(passes)
        if holding is None or not (c.fill or c.fill_seq):
            return 0
        return sum(rows.seqs[a] not in holding for a in among)

    def worth_checking(self, passes, n: int, rows, cand: list[int], policy) -> bool:
        """(b): evaluate exit n only where its chance of paying times the saving beats the
        check over the pass's candidates; else skip, but look again every REFRESH-th pass."""
        key, worth = self.verdict(passes, n, rows, cand, policy)
        return worth or self.skip(key)

    def skip(self, key: tuple) -> bool:
        """A pass that `verdict` says not to evaluate exit n in: counted; True (evaluate after
        all) every REFRESH-th time, so that the chance can recover."""
        if self.paused:
            return False
        refresh = self.refreshes(key)
        self.skipped[key] = 0 if refresh else self.skipped.get(key, 0) + 1
        return refresh

    def refreshes(self, key: tuple) -> bool:
        """Whether the next `skip(key)` is a refreshing one (evaluates after all: every REFRESH-th,
        sooner for a cheap check, `refresh_every`); nothing counted."""
        return not self.paused and self.skipped.get(key, 0) + 1 >= self.every.get(key, REFRESH)

    def verdict(self, passes, n: int, rows, cand: list[int], policy) -> tuple[tuple, bool]:
        """(the chance's key, whether the chance of paying times the saving beats the check):
        `worth_checking` before its skip count. Depends on the pass's shape, whether its
        candidates would start pending rows (`starts_pending`), the costs and what `record` has
        counted (`version`) only; no exit is worth it in a paused pass, every one in a free pass
        (`set_mode`)."""
        key = (n, policy.measure, policy.threshold_of(n), len(cand))
        if self.paused or self.free:
            return key, self.free
        costs = self.costs_for(passes)
        if self.terms_costs is not costs:
            self.terms, self.terms_costs = {}, costs
        fresh = self.starts_pending(passes, rows, cand)
        # The cost and saving terms depend on the pass's shape only (what `net_saving` and the
        # check read: sequences, rows in all, rows of the candidates and of the first, candidates),
        # worked out once per shape: a decode step asks the same every step, and right after a
        # layer each term's Python costs microseconds (the skip path cost a third of a layer's 5%).
        gone = sum(rows.n[a] for a in cand)
        shape = (n, policy.measure, policy.vocab, len(rows.seqs), sum(rows.n), gone, rows.n[cand[0]], len(cand), fresh)
        terms = self.terms.get(shape)
        if terms is None:
            cost = costs.check(get_measure(policy.measure).needs_vocab, len(cand))
            saving = self.net_saving(passes, n, rows, cand, policy.measure, fresh, policy.vocab)
            first = self.starts_pending(passes, rows, cand[:1])
            one = self.net_saving(passes, n, rows, cand[:1], policy.measure, first, policy.vocab)  # priced no lower
            alone = len(cand) > 1 and self.pays(passes, one)
            terms = self.terms[shape] = (cost, saving, alone)
        cost, saving, alone = terms
        worth = self.chance_of(key, alone) * saving > cost
        if not worth:
            self.every[key] = refresh_every(cost, saving)
        return key, worth

    def choose(self, passes, n: int, fires: list[int], rows, cand: list[int], policy) -> list[int]:
        """(a): `fires` (indices into `cand`) leave together where that pays, else nobody does.
        Under t(r) = a + b*r the saving is linear in the leavers but for the whole pass ending,
        so the firing set or nothing is the best choice among its subsets."""
        leavers, net = [cand[j] for j in fires], 0.0
        if fires and not self.free:  # a free pass (`set_mode`): whoever fires leaves
            fresh = self.starts_pending(passes, rows, leavers)
            net = self.net_saving(passes, n, rows, leavers, policy.measure, fresh, policy.vocab)
        leave = fires if self.free or self.pays(passes, net) else []
        self.record(n, policy, len(cand), len(fires), bool(leave))
        return leave

    def pays(self, passes, net: float) -> bool:
        """Whether a net saving is one: a tie (round-off) stays, toward full decoding."""
        return net > TOLERANCE * self.costs_for(passes).layer(1)

    def record(self, n: int, policy, candidates: int, fired: int, paid: bool) -> None:
        """One evaluation of `candidates` rows, `fired` of them reaching the threshold, into the
        running chance of this pass size and the running firing rate of every size: the mean of
        the outcomes so far and an optimistic prior (a chance of 1.0; one row that fired), so that
        an exit that never pays is skipped after ~saving/check evaluations, not
        ~log(check/saving)/log(DECAY); an exponential average with weight DECAY from then on."""
        shared = (n, policy.measure, policy.threshold_of(n))
        key = (*shared, candidates)
        self.version += 1
        k = self.seen[key] = self.seen.get(key, 0) + 1
        weight = max(1.0 / (k + 1), 1 - DECAY)
        self.chance[key] = (1 - weight) * self.own_chance(key) + weight * float(paid)
        past = DECAY if self.evaluated.get(shared, 0) >= MEAN_EVALUATIONS else 1.0
        self.evaluated[shared] = self.evaluated.get(shared, 0) + 1
        if fired:
            self.fired.add(shared)
        self.rows_fired[shared] = past * self.rows_fired.get(shared, 1.0) + fired
        self.rows_seen[shared] = past * self.rows_seen.get(shared, 1.0) + candidates

    def firing_rate(self, shared: tuple) -> float:
        """The running share of evaluated rows (all pass sizes) whose confidence reached the
        threshold at (exit, measure, threshold); 1.0 before any evaluation."""
        return self.rows_fired.get(shared, 1.0) / self.rows_seen.get(shared, 1.0)

    def chance_of(self, key: tuple, alone: bool = False) -> float:
        """The chance that evaluating `key`'s exit at its pass size k lets rows leave: the smaller
        of this size's running chance (`own_chance`) and a bound from the firing rate p that every
        size shares. Where only the whole pass ending pays, rows leave only if all k fire, and
        P(all k fire) <= P(one given row fires) = p however the rows' firing is correlated (p^k
        if they were independent, which rows of one batch often are not: lower would skip too
        soon); where one leaver pays `alone`, rows leave if any fires: P <= min(1, k*p) (the
        union bound). So a pass size a server sees for the first time (they come and go with
        its requests) starts from what the other sizes learned, not from 1.0."""
        rate = self.firing_rate(key[:3])
        return min(self.own_chance(key), min(1.0, key[3] * rate) if alone else rate)

    def own_chance(self, key: tuple) -> float:
        """The running chance of `key`'s pass size; where it has no evaluations yet, that of the
        largest smaller pass size of the same exit, measure and threshold that has (where leaving
        takes every row, more rows fire together less often), else 1.0."""
        if key in self.chance:
            return self.chance[key]
        smaller = [k[3] for k in self.chance if k[:3] == key[:3] and k[3] < key[3]]
        return self.chance[(*key[:3], max(smaller))] if smaller else 1.0


def refresh_every(cost: float, saving: float) -> int:
    """Passes between a skipped exit's refresh evaluations: REFRESH where its check costs at
    least CHEAP of its saving (or leaving there saves nothing), else proportionally fewer, at
    least 2."""
    if saving <= 0 or cost >= CHEAP * saving:
        return REFRESH
    return max(2, min(REFRESH, math.ceil(REFRESH * cost / (CHEAP * saving))))


def decider_of(passes) -> ExitDecider:
    """The engine's decider (made on first use)."""
    if getattr(passes, "exit_decider", None) is None:
        passes.exit_decider = ExitDecider()
    return passes.exit_decider


def pass_begins(passes, new_tokens: dict, policy, all_rows: bool = False, scores=None, branch=None):
    """Before a pass (`Passes.run`): under cost_aware, its mode (the decider's `ExitClock`, for a
    decode step it times; any other pass runs ON: the decider's verdicts). Returns the clock to
    stop after the pass where it times it, else None. A policy with no exit to evaluate (every
    threshold 1.0) is not timed: its modes are one."""
    if policy.mode != "cost_aware":
        return None
    decider = decider_of(passes)
    timed = (
        decider.costs is not None
        and not passes.profile
        and decode_step(new_tokens, policy, all_rows, scores, branch)
        and bool(passes.exits_by_depth(policy))
    )
    clock = decider.clock_for(passes) if timed else None  # no costs yet: this pass measures them
    fired = clock is not None and decider.may_fire(passes, policy)
    decider.set_mode(clock.start((policy, len(new_tokens)), fired) if clock is not None else ON)
    return clock


def exits_paused(passes, policy) -> bool:
    """Whether a pass under `policy` runs with its exits paused (`ExitDecider.set_mode`, set by
    `pass_begins` for every cost_aware pass): none is evaluated and no skip is counted, so the pass
    need not stop at them at all and runs as full decoding does (in one native call where its
    layers run in one): the clock pauses exits where they do not pay, and asking each exit to be
    told so was Python at every exit of every such step (with `UniformCheck.passed` taking
    `peek`'s verdict, cost_aware's checks that never fire went from ~15 to ~7 us an exit of a
    SmolLM2 step's Python, measured warm with the native calls stubbed out). A pass that observes
    an exit (`ExitPolicy.observe`) or forces one is never paused."""
    if policy.mode != "cost_aware" or policy.observe or policy.force is not None:
        return False
    decider = getattr(passes, "exit_decider", None)
    return decider is not None and decider.paused


def worth_checking(passes, n: int, rows, cand: list[int], policy) -> bool:
    """Whether check_exit evaluates exit n at all: always under `exact` and for a forced exit."""
    if policy.mode == "exact" or policy.force == n:
        return True
    return decider_of(passes).worth_checking(passes, n, rows, cand, policy)


def decide(passes, n: int, fire: torch.Tensor | list[bool], rows, cand: list[int], policy) -> list[int]:
    """The candidates (indices into `cand`) that leave at exit n, from `fire` ([A] bool tensor or
    list: the confidence reached the threshold): all of them under `exact`, else `ExitDecider.choose`."""
    fires = [j for j, f in enumerate(fire.tolist() if isinstance(fire, torch.Tensor) else fire) if f]
    if policy.mode == "exact":
        return fires
    return decider_of(passes).choose(passes, n, fires, rows, cand, policy)

"""The cost model of early-exit decoding (DESIGN.md section 6): what a decode step costs, and
the ideal speedup a run's exit distribution allows.

Early exit is worth exactly what it saves: per token, the layers skipped minus the checks and
the extra rows it adds. `measure_costs` times, on this machine at one batch size and dtype and
through the engine's own code (`Passes`, prepacked weights entered as in decoding):

  layer, fixed  one decoder layer over the batch's newest rows, and everything a decode step
                does once (embedding, row bookkeeping, acceptance, Python): fitted by least
                squares through (layers run, step time minus heads and checks) over timed decode
                steps of full decoding and of "every token leaves at exit k" for each exit;
  layer_direct  one layer timed alone (`Passes.advance`), to compare with the fitted `layer`;
  head          the final norm and head projection for the batch's newest rows;
  probe[n]      the learned check called alone, firing for no row: in one call where it applies
                (`uniform_check.UniformCheck`), else `Passes.probe_check`: fused where the probe
                reads a norm of the backbone row (`fused_check.py`), else the probe on the exit's
                hidden state (its norm and MLP included): what a check costs a step that stops
                at it (where it fires, before the projection; where the probe cannot run in the
                step's native run of layers);
  check_step[mode] what one learned check that fires for no row adds to a whole decode step as
                the step runs it, under `exact` (evaluated every step: where the probe runs in
                the step's native run of layers, a few microseconds of C and the Python around
                it) and `cost_aware` (its decider and clock as they settle: evaluated, skipped or
                paused), from replayed steps against full decoding's (`check_in_step`): what an
                exit that does not fire costs;
  probe_exit[n] the probe on the exit's hidden state, whichever input the probe reads (to
                compare the two inputs on one model);
  fire_hidden[n] exit n's hidden state (its norm, MLP), where the probe reads the backbone:
                then a firing check adds it before the projection (none where the native head
                call makes it);
  vocab[n]      exit n's hidden state, vocabulary projection and max_prob (a max_prob check);
  project[n]    exit n's vocabulary projection alone (what a firing `learned` check adds); for
                an exit that is its RMSNorm alone whose head runs in one native call
                (`Passes.native_vocab`), that call from the backbone row (norm included);
  draft[n]      exit n's projection onto the draft vocabulary alone (`Passes.draft_logits`,
                or the native call from the backbone row for an RMSNorm-only exit), where the
                engine has one: what a firing `learned` check adds where leaving tokens are
                chosen from it (`ExitPolicy.vocab` "draft", the default for greedy decoding of a
                checkpoint that records one; `leave_vocab` says which the priced runs used);
  pend          a layer where the pass fills pending rows (one row per sequence beyond the
                newest): the general path's gather, layout and mask there, and the row;
  pend_pass     what a pass that fills pays once besides (`pending_costs`: the line through
                each exit's fill over the layers above it). Timed
                through the engine's own pending path (`fill_time`): a full-depth step after a
                step that left at the first exit against one after a full-depth step, each
                replayed from a saved state, back to back, median of the differences (a decode
                step runs uniformly up to the first layer with pending rows, `Passes.run`);
  row           each further row per sequence through one layer (several pending positions,
                and the drafted rows self-speculative verification pushes through the deeper
                layers): through the same pending path, a full-depth step after 1 + 4 steps that
                left at the first exit against one after 1 such step (a layer over 1 + 4 rows
                against 1 row alone read a third of it: the pending path's work per row);
  cold[piece]   what the layer, the final head and each exit's projection cost more where their
                weights come from memory and not from the last-level cache, where the model's
                weights are more than the cache holds (`last_level_cache_bytes`): their bytes
                times a cost per byte timed through the engine's own steps (`memory_time`: a
                step leaving at the first exit right after a full-depth step against right after
                a step like itself, over its layers' and exit head's bytes). A
                `WeightCache` follows a run's reads step by step (least recently used over each
                piece's bytes) and says which pieces pay it: full decoding of a model larger
                than the cache streams every layer, a run whose tokens all leave at an early exit
                keeps its layers and head in the cache, a run that mixes the two reads an early
                exit's layers after deeper steps evicted them. `layer` and `fixed` are fitted
                with each timed setting's pieces in their own regime, so `layer` is a layer whose
                weights are in the cache.
  stream, hot_bytes  what a step pays a byte for its own reads beyond `hot_bytes` (what the
                cache keeps from one step to the next): where full decoding's steps (and the
                deeper exits' steps) cost more than the line through the shallower exits' steps
                by over STREAM_EXCESS, their reads stream from memory, and their excess over the
                bytes they read beyond `hot_bytes` is `stream` (`fit_steps`, `stream_fits`: the
                split of the steps that prices them best; on Intel Xeon VMs whose L3 kept
                SmolLM2's bf16 exit steps, or its shallower ones, but not its full steps). Full
                decoding's prediction is then its measured time by construction.

The timings are taken minutes apart, and a host shared with other work ran 1.2-1.6x faster or
slower between them, which a fit through step times less piece times cannot tell from what the
pieces cost. So each measurement (the pieces, the memory timing, the pending rows) also times one
full-depth step replayed from a saved state (`ReferenceStep`) in its own rounds, as `step_times`
does in its, and its times are divided by its speed against the steps' (`DecodeCosts.host`).

`predict` turns a batch's `GenerationResult.exit_layers` back into its decode steps (step t
fed every sequence's token t-1; it reached the depth of exit_layers[t]) and prices each step;
`ideal_speedup` compares that with the same tokens decoded in full (each run's cache regime
followed from the prefill on). Batches are taken as
memory-bound: a layer costs the same for any number of sequences up to the measured batch.
An exit with a transformer block of its own is priced as one that fires a token after it last
fired (its block over that newest position); a block that catches up several positions at once
(an exit that fires after tokens that went deeper) costs more than that.
"""

from __future__ import annotations

import functools
import glob
import math
import os
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from megatron.early_exit.inference import lean
from megatron.early_exit.inference.confidence import get_measure, learned, max_prob
from megatron.early_exit.inference.native_loop import FULL, plan, step_once
from megatron.early_exit.inference.passes import ExitPolicy, Rows, StepOutput, tick
from megatron.early_exit.inference.settings import GenerationResult, GenerationSettings


@dataclass
class DecodeCosts:
    """Seconds per decode step of a batch (see the module docstring for each term)."""

    num_layers: int
    depth: dict[int, int]  # exit -> layers run before it reads the hidden state
    layer: float
    fixed: float
    head: float
    probe: dict[int, float] = field(default_factory=dict)
    vocab: dict[int, float] = field(default_factory=dict)
    project: dict[int, float] = field(default_factory=dict)
    draft: dict[int, float] = field(default_factory=dict)  # the projection onto the draft vocabulary alone
    leave_vocab: str = "full"  # what the priced runs' leaving tokens are chosen from ("draft": `draft`)
    row: float = 0.0
    layer_direct: float = 0.0
    batch: int = 1
    fire_hidden: dict[int, float] = field(default_factory=dict)  # exit's own layers, run only when it fires
    probe_exit: dict[int, float] = field(default_factory=dict)  # the probe on the exit's hidden state
    # mode ("exact", "cost_aware") -> what one learned check that fires for no row adds to a decode
    # step as the step runs it (`check_in_step`; `probe` is the check called alone), and the
    # standard error of each
    check_step: dict[str, float] = field(default_factory=dict)
    check_step_error: dict[str, float] = field(default_factory=dict)
    pend: float = 0.0  # a layer that fills pending rows: its first extra row and the general path's work there
    pend_pass: float = 0.0  # a pass that fills pending rows, once: the general path's work that no layer owns
    # ((k, a layer's seconds filling k pending rows per sequence), ...) for k ascending, timed
    # (`pending_costs`); a fill of k rows per layer is priced between them (past the last, at the
    # last two's slope); empty: `pend` + (k - 1) `row`
    fill_rows: tuple[tuple[int, float], ...] = ()
    # Whether a pass that fills pads every sequence's pending rows to the longest's (`Passes.run`'s
    # general pass: its layout is one block of rows per sequence) or runs each sequence's own (the
    # native loop, `native_loop`: the rows of the pass as they are). CPU reference, bf16, batch 4,
    # learned 0.8 under exact: priced padded, 1.025x predicted against 1.213x measured.
    padded: bool = True
    # ((r, a layer's native call over r sequences' rows over one over all `batch`), ...) for r
    # ascending to `batch` (`piece_times`' "layer/r"): a step whose sequences leave at several
    # depths runs its deeper layers over fewer rows (`layers_over`). CPU reference, bf16, batch 4:
    # the sweep's 0.8 / 0.6 rows read efficiency 1.13-1.17 with every layer priced at 4 rows.
    layer_rows: tuple[tuple[int, float], ...] = ()
    # The weights' cache regime (`WeightCache`): a piece ("layer", "head", "project/<n>") that reads
    # its weights from memory instead of the last-level cache costs `cold[piece]` more; `reads`
    # gives each piece's weights (a name shared by tied heads, and their bytes); `cache_bytes` the
    # cache (0: no regime, every piece at its timed cost, as before it was modelled).
    cold: dict[str, float] = field(default_factory=dict)
    reads: dict[str, tuple[str, float]] = field(default_factory=dict)
    cache_bytes: float = 0.0
    # A step whose own reads are more than the cache keeps from one step to the next pays `stream`
    # seconds per byte it reads beyond `hot_bytes` (`fit_steps`: fitted from full decoding's steps,
    # and the deeper exits', where they cost more than the line through the shallower exits' steps;
    # 0: not seen).
    stream: float = 0.0
    hot_bytes: float = 0.0
    # The host's speed in each measurement ("pieces", "memory", "fill") against `step_times`': the
    # same full-depth step's median time there over its median time in `step_times` (`ReferenceStep`;
    # 1.0: one speed throughout); that measurement's times were divided by it.
    host: dict[str, float] = field(default_factory=dict)
    # The full-depth step of `ReferenceStep`, its median seconds in `step_times`' rounds: the host
    # speed every piece above is put at, and what `retime` compares a later timing's speed with.
    reference: float = 0.0

    def streamed(self, piece: str) -> float:
        """A piece's cost with its weights read from memory: what it costs where every step reads
        more weights than the cache holds (full decoding of a model larger than the cache)."""
        if piece.startswith(("project/", "draft/")):
            kind, n = piece.split("/")
            base = getattr(self, kind)[int(n)]
        else:
            base = getattr(self, piece)
        return base + self.cold.get(piece, 0.0)

    def new_cache(self) -> WeightCache:
        """The cache as a decode step finds it after the prefill (every layer, then the final head, read)."""
        cache = WeightCache(self.cache_bytes)
        for i in range(self.num_layers):
            self.touch(cache, "layer", i)
        self.touch(cache, "head")
        return cache

    def touch(self, cache: WeightCache | None, piece: str, index: int = 0) -> float:
        """A piece runs: the extra seconds its weights' share from memory costs (`cold`)."""
        if cache is None or piece not in self.reads:
            return 0.0
        name, size = self.reads[piece]
        return self.cold.get(piece, 0.0) * cache.read(f"{name}#{index}", size)

    def reach(self, exit_layer: int) -> int:
        """Layers a token that left at `exit_layer` ran (the final head: all of them)."""
        return self.num_layers if exit_layer >= self.num_layers else self.depth[exit_layer]

    def leaves_onto_draft(self, n: int) -> bool:
        """Whether exit n's leaving rows are priced at the draft vocabulary's projection: the priced
        runs choose leaving tokens from it, and its projection was timed."""
        return self.leave_vocab == "draft" and n in self.draft

    def leaver_piece(self, n: int) -> str:
        """The piece that projects exit n's leaving rows: "draft/n" or "project/n" (`leaves_onto_draft`)."""
        return f"draft/{n}" if self.leaves_onto_draft(n) else f"project/{n}"

    def check(self, n: int, needs_vocab: bool, fired: bool) -> float:
        """One evaluation of exit n for the batch."""
        if needs_vocab:
            return self.vocab[n]
        if not fired:
            return self.probe[n]
        projection = (self.draft if self.leaves_onto_draft(n) else self.project)[n]
        return self.probe[n] + projection + self.fire_hidden.get(n, 0.0)

    def fill(self, extra: Sequence[float]) -> float:
        """Pending-state fill: `extra[i]` more rows per sequence at layer i (`predicted_steps`: the
        most of any sequence of the pass where rows are padded to the longest, else the pass's
        rows over the `batch` sequences the fill was timed at: `padded`)."""
        layers = [k for k in extra if k > 0]
        return (self.pend_pass if layers else 0.0) + sum(self.fill_layer(k) for k in layers)

    def layers_over(self, exits: Sequence[int], deepest: int) -> float:
        """The step's layers 0 .. deepest - 1, each over the sequences that have not left below it
        (`layer_rows`: a layer over r of the batch's sequences, timed alone; without it every
        layer at the batch's rows)."""
        if len(self.layer_rows) < 2 or len(exits) < 2:
            return deepest * self.layer
        reach = sorted(self.reach(e) for e in exits)
        t, below = 0.0, 0
        for i, depth in enumerate(reach):  # layers below[i] .. depth - 1 run len(exits) - i sequences
            t += (depth - below) * self.layer * self.layer_share(len(exits) - i)
            below = depth
        return t

    def layer_share(self, r: int) -> float:
        """A layer over r sequences' rows over one over the batch's (`layer_rows`, between the timed counts)."""
        table = self.layer_rows
        for (r0, s0), (r1, s1) in zip(table, table[1:]):
            if r <= r1:
                return s0 + (max(r, r0) - r0) * (s1 - s0) / (r1 - r0)
        return 1.0

    def fill_layer(self, k: float) -> float:
        """A layer's seconds filling k pending rows per sequence (`fill_rows`, else `pend` + (k - 1) `row`)."""
        table = self.fill_rows
        if k < 1:  # fewer rows than one per sequence (unpadded fills of a batch): that share of one each
            return k * self.fill_layer(1)
        if len(table) < 2:
            return self.pend + (k - 1) * self.row
        for (k0, t0), (k1, t1) in zip(table, table[1:]):
            if k <= k1 or (k1, t1) == table[-1]:
                return max(t0 + (k - k0) * (t1 - t0) / (k1 - k0), 0.0)
        return table[-1][1]

    def step(
        self,
        exits: Sequence[int],
        evaluated: Sequence[int],
        needs_vocab: bool,
        extra: Sequence[int] = (),
        cache: WeightCache | None = None,
    ) -> float:
        """One decode step whose sequences left at `exits`, evaluating the exits in `evaluated`
        (sorted; those the policy checks) while rows remain, filling `extra` rows per layer.
        `cache`: the weights' cache regime (`new_cache`), updated by the step's reads in order."""
        t, read = self.walk(exits, evaluated, needs_vocab, extra, cache)
        return t + self.stream * max(read - self.hot_bytes, 0.0) if self.stream else t

    def walk(
        self,
        exits: Sequence[int],
        evaluated: Sequence[int],
        needs_vocab: bool,
        extra: Sequence[int] = (),
        cache: WeightCache | None = None,
    ) -> tuple[float, float]:
        """`step`'s seconds but what its reads beyond `hot_bytes` stream (`stream`), and the bytes
        of weights it reads (`reads`: its layers, the projections it runs, the final head)."""
        deepest = max(self.reach(e) for e in exits)
        t = self.fixed + self.layers_over(exits, deepest) + self.fill(extra)
        left, ran, pieces = list(exits), 0, ["layer"] * deepest
        for n in evaluated:
            if not any(e >= n for e in left):
                break  # every sequence has left: no deeper exit runs
            t += sum(self.touch(cache, "layer", i) for i in range(ran, self.depth[n]))
            ran = max(ran, self.depth[n])
            fired = n in left
            t += self.check(n, needs_vocab, fired)
            if needs_vocab:  # the exit's vocabulary projection ran
                t += self.touch(cache, f"project/{n}")
                pieces.append(f"project/{n}")
            elif fired:  # the leavers' projection
                t += self.touch(cache, self.leaver_piece(n))
                pieces.append(self.leaver_piece(n))
            left = [e for e in left if e != n]
        t += sum(self.touch(cache, "layer", i) for i in range(ran, deepest))
        if any(e >= self.num_layers for e in exits):
            t += self.head + self.touch(cache, "head")
            pieces.append("head")
        return t, sum(self.reads[piece][1] for piece in pieces if piece in self.reads)

    def steady(self, exits: Sequence[int], evaluated: Sequence[int], needs_vocab: bool) -> float:
        """One step of a run whose every step is this one (the cache as those steps leave it)."""
        cache = self.new_cache()
        for _ in range(2):
            self.step(exits, evaluated, needs_vocab, cache=cache)
        return self.step(exits, evaluated, needs_vocab, cache=cache)


class WeightCache:
    """Which weights a decode step finds in the last-level cache: least recently used over the
    bytes each piece reads. Decoding on a CPU reads every weight once a step, so full decoding of
    a model larger than the cache streams every layer from memory, while a run whose tokens all
    leave at an early exit keeps its few layers and head in the cache; a run that mixes the two
    reads an early exit's layers after the deeper ones evicted them (the CPU reference model,
    bf16, AMD EPYC with a 32 MB L3: a 3.4 MB layer ~0.02-0.06 ms dearer from memory, on
    ~0.12-0.15 ms). A read's share from memory grows with its stack distance (the bytes read since
    the same weights were last read, theirs included): none up to RAMP[0] of the cache, all from
    RAMP[1] on, in proportion between: a real cache is neither fully associative nor LRU, and
    other cores share it (a hard edge at the cache's size called the CPU reference's fp32 steps
    at its first exit, 33 MB, all from memory). Capacity 0: every read hits (no regime)."""

    RAMP = (0.5, 1.5)

    def __init__(self, capacity: float) -> None:
        self.capacity = capacity
        self.order: dict[str, float] = {}  # weights -> bytes, least recently read first

    def read(self, name: str, size: float) -> float:
        """Read `size` bytes of weights `name`: the share of them that comes from memory."""
        if self.capacity <= 0:
            return 0.0
        distance = math.inf  # never read: from memory
        if name in self.order:
            distance = size
            for other, b in reversed(self.order.items()):
                if other == name:
                    break
                distance += b
            del self.order[name]
        self.order[name] = size
        lo, hi = (r * self.capacity for r in self.RAMP)
        return min(max((distance - lo) / (hi - lo), 0.0), 1.0)


def last_level_cache_bytes(device: torch.device) -> int:
    """The cache the weights compete for in `WeightCache`: on a CPU its last-level cache as Linux
    reports it (cpu0's highest level), `EE_CACHE_BYTES` where set (0: no regime modelled); 0 on
    other devices (their caches are not modelled)."""
    env = os.environ.get("EE_CACHE_BYTES")
    if env is not None:
        try:
            return int(float(env))
        except ValueError:
            raise ValueError(f"EE_CACHE_BYTES={env!r}: expected a number of bytes") from None
    if device.type != "cpu":
        return 0
    best = (0, 0)
    for index in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*"):
        try:
            with open(f"{index}/level") as f:
                level = int(f.read())
            with open(f"{index}/type") as f:
                kind = f.read().strip()
            with open(f"{index}/size") as f:
                text = f.read().strip()
        except (OSError, ValueError):
            continue
        if kind == "Instruction" or not text:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1].upper(), 1)
        size = int(text.rstrip("KMGkmg")) * scale
        best = max(best, (level, size))
    return best[1]


def fill_rows(reached: list[int], depth: int) -> list[int]:
    """One sequence's new position goes `depth` layers deep: the earlier positions still short
    of it (`reached`, their depths, updated in place) are recomputed alongside it. Returns the
    extra rows at each layer 0..depth-1."""
    extra = [0] * depth
    for j, r in enumerate(reached):
        for i in range(r, depth):
            extra[i] += 1
        reached[j] = max(r, depth)
    reached.append(depth)
    return extra


def predict(
    results: Sequence[GenerationResult], costs: DecodeCosts, evaluated: Sequence[int], needs_vocab: bool
) -> float:
    """Predicted decode time (prefill excluded) of one `early_exit` or `full` batch from its
    exit telemetry. `evaluated`: the exits the policy checks (none for full decoding)."""
    return sum(t for _, t in predicted_steps(results, costs, evaluated, needs_vocab))


def predicted_steps(
    results: Sequence[GenerationResult], costs: DecodeCosts, evaluated: Sequence[int], needs_vocab: bool
) -> list[tuple[str, float]]:
    """Each decode step of one batch, in order (step t fed every live sequence's token t-1): its
    kind (`step_kind`) and predicted seconds."""
    reached: list[list[int]] = [[] for _ in results]
    steps, cache = [], costs.new_cache()  # the weights as the prefill left them
    for t in range(1, max(len(r.exit_layers) for r in results)):
        live = [b for b, r in enumerate(results) if len(r.exit_layers) > t]
        exits = [results[b].exit_layers[t] for b in live]
        per_layer = [fill_rows(reached[b], costs.reach(e)) for b, e in zip(live, exits)]
        at = [[rows[i] if i < len(rows) else 0 for rows in per_layer] for i in range(costs.num_layers)]
        # per layer: the longest sequence's rows (a padded pass), or the pass's rows per sequence timed
        extra = [max(r) if costs.padded else sum(r) / costs.batch for r in at]
        kind = step_kind(max(exits), costs.num_layers, any(extra))
        steps.append((kind, costs.step(exits, sorted(evaluated), needs_vocab, extra, cache)))
    return steps


def step_kind(deepest: int, num_layers: int, fills: bool) -> str:
    """A decode step's kind: how deep its deepest sequence went, and whether it filled pending rows."""
    depth = "full depth" if deepest >= num_layers else f"exit {deepest}"
    return depth + (" + fill" if fills else "")


class StepClock:
    """Times every `decode_one_token` call of `engine` while entered (wall clock after the
    device's queued work): `seconds` in call order, one per decode step of a `shares_passes`
    strategy (`early_exit`, `full`)."""

    def __init__(self, engine) -> None:
        self.engine, self.seconds = engine, []

    def __enter__(self) -> StepClock:
        step, device = self.engine.decode_one_token, self.engine.device

        def timed(*args, **kwargs):
            start = tick(device)
            out = step(*args, **kwargs)
            self.seconds.append(tick(device) - start)
            return out

        self.engine.decode_one_token = timed  # an instance attribute over the method
        return self

    def __exit__(self, *exc) -> None:
        del self.engine.decode_one_token


@dataclass
class KindTimes:
    """One step kind of a run: its steps, their measured and predicted seconds."""

    steps: int = 0
    measured: float = 0.0
    predicted: float = 0.0


def explain(
    batches: Sequence[tuple[Sequence[GenerationResult], Sequence[float]]],
    costs: DecodeCosts,
    evaluated: Sequence[int],
    needs_vocab: bool,
) -> dict[str, KindTimes]:
    """Where a run's time goes against the cost model: per step kind (`step_kind`), the steps and
    their measured (`StepClock`) and predicted seconds, over `batches` of (results, step seconds)."""
    kinds: dict[str, KindTimes] = {}
    for results, seconds in batches:
        steps = predicted_steps(results, costs, evaluated, needs_vocab)
        if len(steps) != len(seconds):
            raise ValueError(f"explain: {len(seconds)} timed decode steps for {len(steps)} in the telemetry")
        for (kind, predicted), measured in zip(steps, seconds):
            k = kinds.setdefault(kind, KindTimes())
            k.steps, k.measured, k.predicted = k.steps + 1, k.measured + measured, k.predicted + predicted
    return kinds


def ideal_speedup(
    batches: Sequence[Sequence[GenerationResult]],
    costs: DecodeCosts,
    evaluated: Sequence[int],
    needs_vocab: bool,
    prefill_s: float = 0.0,
    full: Sequence[Sequence[GenerationResult]] | None = None,
) -> float:
    """What the run's exit distribution is worth if the engine added nothing beyond the
    measured costs: its predicted tokens/s over full decoding's. `full`: full decoding's own
    batches (its tokens, its lengths), the run a measured speedup is taken against; None: the
    run's tokens decoded in full (the same lengths). The two differ where a batch's sequences
    end at different steps: a batch decodes until its longest sequence ends, fewer rows per step
    from then on, so the run's and full decoding's lengths weigh in at batch > 1.
    `prefill_s`: the batches' prefill time (the same in both)."""
    final = costs.num_layers
    run = prefill_s + sum(predict(b, costs, evaluated, needs_vocab) for b in batches)
    if full is None:
        full = [[replace(r, exit_layers=[final] * len(r.exit_layers)) for r in b] for b in batches]
    reference = prefill_s + sum(predict(b, costs, (), True) for b in full)
    return (generated(batches) / run) / (generated(full) / reference)


def generated(batches: Sequence[Sequence[GenerationResult]]) -> int:
    """Tokens generated over `batches` (what tokens/s counts): one exit layer each."""
    return sum(len(r.exit_layers) for b in batches for r in b)


# ----- measuring on this machine -----------------------------------------------------------


def cpu_clock(device: torch.device) -> Callable[[], float]:
    """This process's CPU seconds on a CPU device (time spent waiting for a core shared with
    other processes does not count, so a loaded machine's figures stay comparable); else `tick`
    (the wall clock after the device's queued work)."""
    return time.process_time if device.type == "cpu" else functools.partial(tick, device)


def work_clock(device: torch.device) -> Callable[[], float]:
    """What self-speculative rounds are priced by (`draft_costs`). On a CPU running one thread,
    `cpu_clock` (robust to a shared machine). With more threads, the wall clock: CPU time then
    counts every thread's share of a product and the idle threads' spinning between products as
    work, so it misprices a round's serial Python against its parallel products (the CPU reference
    model, bf16, 2 threads, AMD EPYC: a verify round's fixed cost read 0.73-1.39 plain rounds in
    CPU time over three measurements in one process, 1.18-1.21 by the wall clock)."""
    if device.type == "cpu" and torch.get_num_threads() > 1:
        return time.perf_counter
    return cpu_clock(device)


def best_times(
    fns: dict[str, Callable[[], object]],
    device: torch.device,
    repeats: int = 5,
    clock: Callable[[], float] | None = None,
    warm: Sequence[str] = (),
) -> dict[str, float]:
    """Each function's best time of `repeats` rounds, after one warm-up call each; every round
    runs every function once, in turn, so that a neighbour's load slows all of them alike.
    `clock`: what reads the time (default: the wall clock, `tick`). The functions named in `warm`
    run once more right before each timed call: timed with what they read in the cache, not as
    the function before them in the round left it (`piece_times`: `DecodeCosts.cold` adds what
    reading from memory costs where a step finds a piece's weights there; timed right after the
    round's full-depth reference steps had evicted them, the CPU reference model's exit
    projection and probe read 0.08 and 0.034 ms, bf16, against 0.057 and a few us in its steps,
    and every token leaving at exit 3 was priced 1.1-1.5x its time)."""
    clock = clock or functools.partial(tick, device)
    for fn in fns.values():
        fn()
    best = dict.fromkeys(fns, math.inf)
    for _ in range(repeats):
        for name, fn in fns.items():
            if name in warm:
                fn()
            start = clock()
            fn()
            best[name] = min(best[name], clock() - start)
    return best


def paired_ratios(
    fns: dict[str, Callable[[], object]],
    unit: Callable[[], object],
    device: torch.device,
    repeats: int = 5,
    clock: Callable[[], float] | None = None,
) -> dict[str, float]:
    """Each function's time over `unit`'s, the two timed back to back: the median over `repeats`
    rounds (each runs every function once, in turn, after one warm-up call each). On a machine
    shared with other work, whose load changes over seconds, a ratio of neighbours in time
    drifts far less than either time (best-of times of one 12-layer step ranged 1-3x there)."""
    clock = clock or functools.partial(tick, device)
    unit()
    for fn in fns.values():
        fn()
    ratios: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = clock()
            unit()
            mid = clock()
            fn()
            ratios[name].append((clock() - mid) / max(mid - start, 1e-12))
    return {name: statistics.median(r) for name, r in ratios.items()}


def step_times(
    engine, prompts, settings: dict[str, GenerationSettings], steps: int, repeats: int, reference=None
) -> dict[str, float]:
    """Seconds per decode step of each setting: generate `1 + steps` tokens minus generate 1
    (prefill only), EOS ignored, best of `repeats` alternating rounds each. `reference`: a
    callable run in the same rounds (`ReferenceStep.timed`), its own time not returned."""
    fns = {}
    for name, s in settings.items():
        for tag, new in (("short", 1), ("long", 1 + steps)):
            one = replace(s, max_new_tokens=new, ignore_eos=True, stop_strings=(), stop_token_ids=())
            fns[f"{name}/{tag}"] = lambda one=one: engine.generate(prompts, one)
        if reference is not None and "reference" not in fns:
            # right after the first setting's steps (full decoding's, `exit_settings`): its weights
            # then come as a full-depth step after another finds them, not left by an early exit's
            fns["reference"] = reference
    best = best_times(fns, engine.device, repeats)
    return {name: (best[f"{name}/long"] - best[f"{name}/short"]) / steps for name in settings}


@torch.no_grad()
def piece_times(engine, prompts: list[list[int]], repeats: int, extra_rows: int = 4, reference=None) -> dict:
    """The final head, each exit's checks, one layer alone and, for a model without exits, one with
    `extra_rows` more rows per sequence, for the newest position after the prompts (K/V of the prompts
    in the cache), each warm (`best_times`). `reference`: run in the same rounds (`ReferenceStep.timed`)."""
    from megatron.early_exit.inference.uniform_check import UniformCheck, applies

    p, batch = engine.passes, len(prompts)
    state = engine.new_state(batch, max(map(len, prompts)) + extra_rows + 2)
    engine.prefill(state, dict(enumerate(prompts)))  # records a block exit's input at every position
    gen = torch.Generator().manual_seed(0)
    lo = [state.fed[b] for b in range(batch)]

    def rows(n: int) -> Rows:
        x = torch.randn(batch, n, p.config.hidden_size, generator=gen).to(p.device, p.dtype)  # (B, n, h)
        return Rows(list(range(batch)), lo, [n] * batch, x)

    one, more, mid, memo = rows(1), rows(1 + extra_rows), p.start + (p.end - p.start) // 2, {}
    learned_measure, never = get_measure("learned"), ExitPolicy(threshold=2.0, measure="learned")  # fires for none
    cand = list(range(batch))
    fns = {
        "head": lambda: p.final_head(one, False, StepOutput()),
        "layer": lambda: p.advance(state, mid, replace(one), memo),
    }
    if not p.exits:  # `row` where no exit leaves rows pending (else timed on the pending path, `fill_time`)
        fns["layer+rows"] = lambda: p.advance(state, mid, replace(more), memo)
    for n in p.exits:
        head, one_row = p.model.exits[str(n)], newest_row(p, state, n)
        hidden = one_row(lambda n=n, h=head: p.exit_hidden(state, n, h, one, cand))()  # (B, 1, h)
        fns[f"vocab/{n}"] = one_row(
            lambda n=n, h=head: max_prob(p.exit_logits(h, p.exit_hidden(state, n, h, one, cand)))
        )
        native_fire = projection_times(engine, state, n, one, hidden, fns)
        if head.confidence is not None:
            fns[f"probe_exit/{n}"] = one_row(lambda n=n, h=head: learned(h, p.exit_hidden(state, n, h, one, cand)))
            # as a decode step runs it: in one call where it applies (`uniform_check`, as
            # `exit_decision.cost_probes` times it), else `probe_check`
            folded = p.folded_probe(state, head) if p.fused_checks else None
            if applies(folded):
                check = UniformCheck(p, n, never, head, folded)
                fns[f"probe/{n}"] = one_row(lambda check=check: check(state, one, StepOutput()))
            else:
                fns[f"probe/{n}"] = one_row(
                    lambda n=n, h=head: p.probe_check(state, n, h, one, cand, never, learned_measure)
                )
        if head.confidence is not None and head.probe_reads_backbone and not native_fire:
            fns[f"hidden/{n}"] = one_row(lambda n=n, h=head: p.exit_hidden(state, n, h, one, cand))
    loop_pieces(engine, state, one, fns)
    fns.update(layer_calls(engine, state, lo, mid, gen))
    warm = list(fns)  # every piece; not the reference step
    if reference is not None:
        fns["reference"] = reference
    with engine.packed:
        return {name: t for name, t in best_times(fns, p.device, repeats, warm=warm).items() if name != "reference"}


def layer_shares(pieces: dict, batch: int) -> tuple[tuple[int, float], ...]:
    """`DecodeCosts.layer_rows` from `piece_times`' "layer/r" (each over the batch's, kept below
    1 and rising with r: noise may not make fewer rows dearer); () where they were not timed."""
    timed = sorted((int(k.split("/")[1]), t) for k, t in pieces.items() if k.startswith("layer/"))
    if len(timed) < 2 or timed[-1][0] != batch or timed[-1][1] <= 0:
        return ()
    whole, out, top = timed[-1][1], [], 0.0
    for r, t in timed:
        top = min(max(top, t / whole), 1.0)
        out.append((r, top))
    return tuple(out)


def layer_calls(engine, state, lo: list[int], mid: int, gen) -> dict:
    """ "layer/r": layer `mid`'s native call (`native.layer_step`) over one row of each of the
    first r sequences, at their next positions, for r = 1 .. the batch (at most 8 counts); {} at
    batch 1 or where the layer does not run natively."""
    from megatron.early_exit.inference import native

    p, batch = engine.passes, len(lo)
    fast = p.lean_for(mid) if batch > 1 and p.lean_on() else None
    if type(fast) is not lean.LeanLayer or not native.library():
        return {}
    weights, eps = fast.native_parts()
    shape = (fast.groups, fast.per, fast.head_dim, fast.ffn)
    k, v = state.cache.k[mid - p.start], state.cache.v[mid - p.start]
    cos, _, neg = p.rotary_tables(max(lo) + 2)[:3]
    counts = sorted({max(1, round(batch * j / 8)) for j in range(1, 9)} | {1, batch})
    out = {}
    for r in counts:
        x = torch.randn(r, p.config.hidden_size, generator=gen).to(p.device, p.dtype)
        pos = torch.tensor(lo[:r], dtype=torch.int64)
        kv = (k, v, torch.arange(r, dtype=torch.int64), pos, max(lo[:r]) + 1, None)
        c, s = cos.index_select(0, pos), neg.index_select(0, pos)
        if native.layer_step(x, weights, shape, eps, c, s, kv) is None:
            return {}
        out[f"layer/{r}"] = lambda x=x, c=c, s=s, kv=kv: native.layer_step(x, weights, shape, eps, c, s, kv)
    return out


def loop_pieces(engine, state, one: Rows, fns: dict) -> None:
    """Where greedy decoding runs its steps in one native call (`native_loop`: the final head, a
    learned check on a norm-only exit and its head, each a C call there), those pieces timed as
    the loop's calls (`native.Probe`, `native.head`) in place of the step-by-step path's, whose
    Python around them the loop does not pay: the CPU reference model's exit 3 (bf16) priced a
    check at 10 us and its draft head at 43 us through `UniformCheck` and `leavers_logits`, and
    "every token leaves at exit 3" at 1.08x its time, a mixed run at 1.06x."""
    from megatron.early_exit.inference import kernels, native

    p, m, x = engine.passes, engine.model, one.x[:, 0]
    with engine.packed:
        if plan(p, state, FULL, len(one.seqs)) is None:
            return
        final = m.decoder.final_layernorm
        panels = kernels.native_copy(m.output_weight())
    fns["head"] = lambda: native.head(x, panels, p.vocab, (final.weight, final.eps))
    for n in p.exits:
        head = m.exits[str(n)]
        folded = p.folded_probe(state, head) if p.fused_checks else None
        norm = lean.exit_norm(head)
        if folded is None or folded.native is None or norm is None:
            continue
        fns[f"probe/{n}"] = lambda probe=folded.native: probe(x)
        weight = head.output_weight(m.tied_output_weight())
        whole = kernels.native_copy(weight)
        fns[f"project/{n}"] = lambda w=whole, g=norm: native.head(x, w, p.vocab, (g.weight, g.eps))
        if p.draft_vocab is not None:
            rows, ids = kernels.native_copy(p.draft_rows(head)), p.draft_vocab
            fns[f"draft/{n}"] = lambda r=rows, g=norm, i=ids: native.head(x, r, len(i), (g.weight, g.eps), i, p.vocab)


def projection_times(engine, state, n: int, one, hidden: torch.Tensor, fns: dict) -> bool:
    """Into `fns` (`piece_times`): "project/n", exit n's projection of the rows `one` (exit hidden
    states `hidden`), and "draft/n", onto the draft vocabulary alone, where the engine has one.
    Returns whether the exit's head runs in one native call from the backbone row (a firing
    norm-only exit, `UniformCheck.leave`: the norm, projection and argmax, so no hidden state is
    priced apart)."""
    p, head, cand = engine.passes, engine.model.exits[str(n)], list(range(len(one.seqs)))
    fns[f"project/{n}"] = lambda: p.exit_logits(head, hidden)
    norm, weight = lean.exit_norm(head), head.output_weight(p.model.tied_output_weight())
    with engine.packed:
        native_fire = norm is not None and p.native_vocab(one.x[:, 0], weight, norm, head.temperature) is not None
    if native_fire:
        fns[f"project/{n}"] = lambda: p.native_vocab(one.x[:, 0], weight, norm, head.temperature)
    if p.draft_vocab is not None and native_fire:  # leaving tokens from the draft vocabulary (`leave_vocab`)
        fns[f"draft/{n}"] = lambda: p.leavers_logits(state, n, head, one, cand, "draft")  # the norm too
    elif p.draft_vocab is not None:  # the projection alone, as `project/n` (`fire_hidden` prices the rest)
        fns[f"draft/{n}"] = lambda: p.draft_logits(head, hidden)
    return native_fire


def weight_reads(p) -> dict[str, tuple[str, float]]:
    """piece -> the weights it reads, as `DecodeCosts.reads` keeps them: a layer's (every layer
    alike), the final head's and each exit's projection's."""
    layer = p.model.decoder.layers[str(p.start)]
    reads = {"layer": ("layer", float(sum(w.numel() * w.element_size() for w in layer.parameters())))}
    reads["head"] = weight_read(p.model.output_weight(), p.dtype, int8=p.int8_head())
    for n in p.exits:
        head = p.model.exits[str(n)]
        reads[f"project/{n}"] = weight_read(head.output_weight(p.model.tied_output_weight()), p.dtype)
        if p.draft_vocab is not None:
            reads[f"draft/{n}"] = weight_read(p.draft_rows(head), p.dtype)
    return reads


def weight_read(weight: torch.Tensor, dtype: torch.dtype, int8: bool = False) -> tuple[str, float]:
    """A head's weights as `WeightCache` counts them: named by their storage (tied heads read the
    same weights), their bytes in the decoding dtype (one byte each for the int8 head's copy)."""
    size = 1 if int8 else torch.empty((), dtype=dtype).element_size()
    return f"weight@{weight.data_ptr()}", float(weight.numel() * size)


def newest_row(passes, state, n: int) -> Callable[[Callable], Callable]:
    """For exit n with a transformer block of its own, wrap a timed call so that the block runs
    on each sequence's newest position alone, over the K/V of the ones before it, as in a decode
    step where the exit fires one token after it last did (its cache is filled to one short of
    the positions fed before every call; `Passes.block_catch_up`). Other exits: the call as is."""
    slot = passes.block_slots.get(n)
    if slot is None:
        return lambda fn: fn
    short = [max(f - 1, 0) for f in state.fed]

    def wrap(fn: Callable) -> Callable:
        def run():
            state.exit_cache.filled[slot, : len(short)] = short
            return fn()

        return run

    return wrap


def fill_time(
    engine, prompts: list[list[int]], policy, steps: int, repeats: int, rows: Sequence[int] = (1,), reference=None
) -> list[float]:
    """Seconds that recomputing k pending rows per sequence adds to a decode step, for each k in
    `rows`, through the engine's own pending path: a full-depth decode step right after k steps
    whose tokens all left under `policy` (one exit, threshold 0: their rows pending above it),
    against a full-depth step after a full-depth step (nothing pending, timed once a round for
    every k). Each is one step timed alone from a saved state (the cache's fill counts and the
    positions fed are restored before every call; the step rewrites the same K/V), back to back;
    the median of `steps * repeats` differences. A difference of whole runs (prefill and many
    steps each) once read 0 on a noisy host. `reference`: a callable run once a round
    (`ReferenceStep.timed`)."""
    full = type(policy)()
    fills = [replayed_step(engine, prompts, policy, full, k) for k in rows]
    plain = replayed_step(engine, prompts, full, full)
    for fill in (*fills, plain):  # warm-up: the pending path's kernels and layouts
        fill()
    diffs: list[list[float]] = [[] for _ in rows]
    for _ in range(max(steps * repeats, 1)):
        start = tick(engine.device)
        plain()
        base = tick(engine.device) - start
        for fill, out in zip(fills, diffs):
            start = tick(engine.device)
            fill()
            out.append(tick(engine.device) - start - base)
        if reference is not None:
            reference()
    return [max(statistics.median(d), 0.0) for d in diffs]


def memory_time(engine, prompts: list[list[int]], policy, steps: int, repeats: int, reference=None) -> float:
    """Seconds a decode step whose tokens all leave under `policy` (one exit, threshold 0) spends
    more right after a full-depth step, which read every weight and evicted its layers and exit
    head from the cache, than right after a step like itself, which left them there: the same
    replayed step (`replayed_step`) timed after each, back to back, median of `steps * repeats`
    differences. What reading the step's weights from memory costs, as decode steps read them.
    `reference`: a callable run before the rounds and after them (`ReferenceStep.timed`), not
    between them: a full-depth reference step after every round lowered what this read, with the
    same steps and host, to a third to a half (CPU reference model: 0.016-0.033 ms against
    0.077-0.129 fp32, 0.027-0.045 against 0.065-0.130 bf16; before and after, 0.046-0.057 against
    0.040-0.046 bf16, 0.061-0.082 against 0.066-0.085 fp32), and the model then fitted a full step's
    cost of reading from memory into every layer: steps leaving at the first exit were priced
    1.17-1.24x their time (bf16)."""
    full = type(policy)()
    step, deep = replayed_step(engine, prompts, full, policy), replayed_step(engine, prompts, full, full)
    step(), deep()  # warm-up
    if reference is not None:
        reference()
    diffs = []
    for _ in range(max(steps * repeats, 1)):
        step()
        start = tick(engine.device)
        step()  # its weights as it left them
        mid = tick(engine.device)
        deep()
        again = tick(engine.device)
        step()  # after a full-depth step
        diffs.append((tick(engine.device) - again) - (mid - start))
    if reference is not None:
        reference()
    return max(statistics.median(diffs), 0.0)


class ReferenceStep:
    """The step every timing of `measure_costs` is put at one host speed by: a full-depth decode
    step replayed from a saved state (`replayed_step`), run inside each measurement's own rounds
    (the memory timing's: before and after them; `timed`), each measurement's times then divided by
    `speed`: the median of its times there over the median of its times in `step_times`' rounds. A
    host shared with other work ran
    1.2-1.6x faster or slower from one measurement to the next, minutes apart, and a fit of
    layers through step times less piece times taken at two speeds read 0.03-0.35 ms a layer.
    Medians: robust to a neighbour's bursts, and not biased by how many times each measurement
    runs it (a best time of 80 calls is lower than one of 5 on a noisy host)."""

    def __init__(self, engine, prompts: list[list[int]]) -> None:
        full = ExitPolicy()
        self.step, self.device = replayed_step(engine, prompts, full, full), engine.device
        self.times: dict[str, list[float]] = {}

    def timed(self, name: str, calls: int = 1) -> Callable[[], None]:
        """A callable that runs the step `calls` times, each timed into `times[name]`."""
        into = self.times.setdefault(name, [])

        def run() -> None:
            for _ in range(calls):
                start = tick(self.device)
                self.step()
                into.append(tick(self.device) - start)

        return run

    def speed(self, name: str, base: str = "steps") -> float:
        """How much slower the host ran in measurement `name` than in `base` (1.0: as fast)."""
        return statistics.median(self.times[name]) / statistics.median(self.times[base])


def replayed_step(engine, prompts: list[list[int]], first, then, times: int = 1) -> Callable[[], StepOutput]:
    """A decode step under `then` that can be run again and again from the same state
    (`saved_steps`)."""
    run = saved_steps(engine, prompts, first, times)
    return lambda: run(then)


def saved_steps(engine, prompts: list[list[int]], first, times: int = 1) -> Callable[[object], StepOutput]:
    """A decode step under any policy, run again and again from the same state: the prompts
    prefilled and `times` steps decoded under `first` (token 1 for every sequence), then the
    caches' fill counts (an exit block's too) and the positions fed saved; each call restores them
    and decodes token 1 again under the policy it is given (it rewrites the same K/V, so every call
    under one policy computes the same step)."""
    batch = dict.fromkeys(range(len(prompts)), 1)
    state = engine.new_state(len(prompts), max(map(len, prompts)) + times + 4)
    engine.prefill(state, dict(enumerate(prompts)))
    for _ in range(times):
        engine.decode_one_token(state, batch, first)
    filled, fed = state.cache.filled.copy(), list(state.fed)
    exit_cache = state.exit_cache  # exits with a block of their own: their cache too
    exit_filled = None if exit_cache is None else exit_cache.filled.copy()

    def step(policy) -> StepOutput:
        state.cache.filled[...] = filled
        state.fed[:] = fed
        if exit_filled is not None:
            exit_cache.filled[...] = exit_filled
        made = step_once(engine, state, batch, policy)  # as greedy decoding runs it: in the loop where it does
        return engine.decode_one_token(state, batch, policy) if made is None else made

    return step


# A learned threshold no probe score reaches in practice (its logit ~16): `check_in_step`'s
# checks are evaluated and fire for no row (a step where one fired is refused)
NEVER = 1.0 - 1e-7


def check_in_step(engine, prompts: list[list[int]], rounds: int, reference=None) -> dict[str, tuple[float, float]]:
    """mode -> (seconds one learned check that fires for no row adds to a decode step as the step
    pays it, the standard error of that median): one full-depth decode step replayed from one
    saved state (nothing pending) under full decoding and with every exit that has a probe allowed
    at `NEVER`, under `exact` (each check evaluated every step: on the way through the step's
    native run of layers where the probe runs there, `Passes.run_uniform`) and under `cost_aware`
    (its decider and clock as they settle for checks that never fire: evaluated, skipped or
    paused); each of `rounds` rounds runs the three in a shuffled order, and each mode's median
    difference from full decoding's step is divided over the exits. One state for all three: two
    states replayed alike differed by ~70 us a SmolLM2 step (where their caches lie). The
    differences are a few microseconds a check on steps whose own times spread ~1 ms (SmolLM2,
    bf16, AMD EPYC), so the error (a bootstrap of the median) is returned with each: take
    thousands of rounds. `probe[n]` times the check called alone, its Python paid cold as where
    it fires. {} where no exit has a probe. `reference`: run once a round."""
    p = engine.passes
    exits = tuple(n for n in p.exits if p.model.exits[str(n)].confidence is not None)
    if not exits:
        return {}
    full = ExitPolicy()
    run = saved_steps(engine, prompts, full)
    policies = {"full": full, **{m: ExitPolicy(exits, NEVER, "learned", mode=m) for m in ("exact", "cost_aware")}}
    diffs: dict[str, list[float]] = {"exact": [], "cost_aware": []}
    order, shuffle = list(policies), random.Random(0).shuffle

    def step(name: str) -> float:
        start = tick(p.device)
        out = run(policies[name])
        took = tick(p.device) - start
        if any(layer < p.num_layers for layer in out.exit_layer.values()):
            raise RuntimeError(f"check_in_step: a learned check fired at threshold {NEVER} ({name})")
        return took

    with engine.packed:
        for name in policies:
            for _ in range(8):  # warm: kernels, layouts; cost_aware's costs timed on its first steps
                step(name)
        for _ in range(max(rounds, 1)):
            shuffle(order)
            t = {name: step(name) for name in order}
            for mode, d in diffs.items():
                d.append(t[mode] - t["full"])
            if reference is not None:
                reference()
    return {mode: median_and_error([t / len(exits) for t in d]) for mode, d in diffs.items()}


def median_and_error(values: Sequence[float], resamples: int = 200) -> tuple[float, float]:
    """(the median of `values`, its standard error: the spread of the medians of `resamples`
    bootstrap resamples, seeded)."""
    a, rng = np.asarray(values, dtype=np.float64), np.random.default_rng(0)
    spread = [np.median(rng.choice(a, a.size)) for _ in range(resamples)]
    return float(np.median(a)), float(np.std(spread))


def fit_layer(points: list[tuple[float, float]], alone: float, held: float = 0.0) -> tuple[float, float]:
    """(layer, fixed) through (layers run, step seconds less what else it ran) points, the first
    full decoding's: the least-squares line; through the origin where its intercept comes out
    below zero, unless the cache explains it (`held`: the layers' worth of weights the last-level
    cache keeps from one step to the next, `cache_held`; the intercept no lower than that many
    layers, nor than the shallowest point's); where that still makes layers free (no exits, or the
    host's speed moved between the timed settings: a fit that made layers free turned every check
    of the cost-aware policy off), the layer timed `alone` and the rest of full decoding's step
    fixed."""
    layer, fixed = fit_line(points) if len({x for x, _ in points}) > 1 else (0.0, 0.0)
    if fixed < 0 and not (layer > 0 and -fixed <= layer * min(held, min(x for x, _ in points))):
        layer, fixed = sum(x * y for x, y in points) / sum(x * x for x, _ in points), 0.0
    if layer <= 0:
        layer, fixed = alone, max(points[0][1] - points[0][0] * alone, 0.0)
    return layer, fixed


def exit_reads(costs: DecodeCosts, needs_vocab: dict[int, bool]) -> list[float]:
    """The bytes of weights each exit's `exit_settings` step reads (`DecodeCosts.walk`)."""
    return [costs.walk(*setting_step(costs, f"exit {n}"), vocab)[1] for n, vocab in needs_vocab.items()]


def cache_held(costs: DecodeCosts, reads: list[float]) -> float:
    """How many layers' weights the last-level cache keeps between steps that each read more than
    it holds (`fit_layer`'s `held`): every one of `exit_settings`' steps (`reads`: `exit_reads`)
    reads more than `cache_bytes`, so none runs from the cache alone, yet a real cache (neither fully associative
    nor least recently used) keeps part of a step's reads for the next one: a step of the tuned
    SmolLM2 (bf16, 6.8 MB a layer) leaving at exit 8 read 56 MB through the AMD EPYC's 32 MiB L3
    and cost ~0.4 ms less than 8 of the 0.237 ms a layer its deeper steps paid, and the line
    through the origin priced it at 1.11-1.22x its time. At most the cache's bytes over a layer's;
    0 where a step fits in the cache (its line's intercept is the step's fixed cost: the CPU
    reference model's, whose steps all fit, fitted as far as -0.2 ms from noise) or none is known."""
    size = costs.reads.get("layer", ("", 0.0))[1]
    if not costs.cache_bytes or size <= 0 or not reads:
        return 0.0
    return costs.cache_bytes / size if min(reads) > costs.cache_bytes else 0.0


def fit_line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares (slope, intercept) through (x, y) points with at least two distinct x."""
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    return slope, my - slope * mx


def exit_settings(engine, measure: str | None, exit_vocabulary: str = "auto") -> dict[str, GenerationSettings]:
    """Full decoding and, for each exit, every token leaving there (threshold 0.0, the `exact`
    policy: every token leaves there whatever the `cost_aware` decider's costs say), leaving tokens
    chosen from `exit_vocabulary` (`GenerationSettings.exit_vocabulary`: what the priced runs use)."""
    out = {"full": GenerationSettings(strategy="full")}
    for n in engine.exits:
        out[f"exit {n}"] = GenerationSettings(
            strategy="early_exit", early_exit_threshold=0.0, exit_layers=(n,), measure=measure, exit_policy="exact",
            exit_vocabulary=exit_vocabulary,
        )  # fmt: skip
    return out


def measure_costs(
    engine,
    prompts: list[list[int]],
    measure: str | None = None,
    steps: int = 16,
    repeats: int = 5,
    exit_vocabulary: str = "auto",
    check_rounds: int = 0,
) -> tuple[DecodeCosts, dict[str, float]]:
    """Measure a `DecodeCosts` at batch len(prompts) and the engine's dtype; also returns the
    measured seconds per decode step of each of `exit_settings` (the fit's data, for checking),
    whose leaving tokens are chosen from `exit_vocabulary` (priced so: `DecodeCosts.leave_vocab`).
    `check_rounds`: `check_in_step`'s rounds (0, the default: not timed; it wants thousands)."""
    p, extra = engine.passes, 4
    ref = ReferenceStep(engine, prompts)  # each timing below put at `step_times`' host speed
    pieces = piece_times(engine, prompts, repeats, extra, ref.timed("pieces", steps))
    settings = exit_settings(engine, measure, exit_vocabulary)
    measured = step_times(engine, prompts, settings, steps, repeats, ref.timed("steps", steps))
    host = {"pieces": ref.speed("pieces")}
    pieces = {name: t / host["pieces"] for name, t in pieces.items()}
    depth = {n: p.depth(n) for n in p.exits}
    costs = DecodeCosts(
        p.num_layers, depth, pieces["layer"], 0.0, pieces["head"],
        probe={n: pieces[f"probe/{n}"] for n in p.exits if f"probe/{n}" in pieces},
        probe_exit={n: pieces[f"probe_exit/{n}"] for n in p.exits if f"probe_exit/{n}" in pieces},
        fire_hidden={n: pieces[f"hidden/{n}"] for n in p.exits if f"hidden/{n}" in pieces},
        vocab={n: pieces[f"vocab/{n}"] for n in p.exits},
        project={n: pieces[f"project/{n}"] for n in p.exits},
        draft={n: pieces[f"draft/{n}"] for n in p.exits if f"draft/{n}" in pieces},
        row=max(pieces.get("layer+rows", 0.0) - pieces["layer"], 0.0) / extra,
        layer_rows=layer_shares(pieces, len(prompts)),
        layer_direct=pieces["layer"], batch=len(prompts),
        reads=weight_reads(p), cache_bytes=float(last_level_cache_bytes(p.device)), host=host,
    )  # fmt: skip
    policies = checked_policies(engine, settings, prompts, p.exits)
    costs.leave_vocab = leave_vocab(policies)
    model_bytes = sum(size for _, size in costs.reads.values()) + (p.num_layers - 1) * costs.reads["layer"][1]
    if p.exits and 0 < costs.cache_bytes < model_bytes:  # weights streamed in full decoding: time the regime
        n = min(p.exits)
        policy = policies[n]
        needs_vocab = get_measure(policy.measure).needs_vocab
        # the bytes that step reads from memory after a full-depth step and not after itself
        unit = replace(costs, cold={piece: size for piece, (_, size) in costs.reads.items()})
        cache, exits = unit.new_cache(), [n] * costs.batch
        unit.step([p.num_layers] * costs.batch, (), True, cache=cache)
        moved = unit.step(exits, (n,), needs_vocab, cache=cache) - unit.steady(exits, (n,), needs_vocab)
        if moved > 0:  # else the step stays in the cache either way: nothing to time
            seconds = memory_time(engine, prompts, policy, steps, repeats, ref.timed("memory", steps))
            host["memory"] = ref.speed("memory")
            per_byte = seconds / host["memory"] / moved
            costs.cold = {piece: per_byte * size for piece, (_, size) in costs.reads.items()}
    if p.exits:  # pending layers through the engine's own path (gather, layout, mask), not a layer alone
        made = pending_costs(engine, prompts, policies, steps, repeats, extra, ref)
        costs.pend, costs.pend_pass, costs.row, costs.fill_rows = made
        host["fill"] = ref.speed("fill")
    if p.exits and check_rounds:
        time_checks(engine, prompts, costs, check_rounds, ref)
    costs.reference = statistics.median(ref.times["steps"])
    costs.padded = plan(p, engine.new_state(len(prompts), 8), FULL, len(prompts)) is None  # the loop fills unpadded
    return fit_steps(costs, measured, vocab_needs(policies)), measured


def time_checks(engine, prompts, costs: DecodeCosts, rounds: int, ref: ReferenceStep) -> None:
    """`costs.check_step` and its errors (`check_in_step` over `rounds` rounds), at the host speed
    of `step_times` (`ReferenceStep`, in their rounds)."""
    in_step = check_in_step(engine, prompts, rounds, ref.timed("checks"))
    if in_step:
        speed = costs.host["checks"] = ref.speed("checks")
        costs.check_step = {mode: t / speed for mode, (t, _) in in_step.items()}
        costs.check_step_error = {mode: e / speed for mode, (_, e) in in_step.items()}


def checked_policies(engine, settings: dict[str, GenerationSettings], prompts: list[list[int]], exits) -> dict:
    """Each exit's `exit_settings` row as the engine runs it (`engine.check`: its measure resolved)."""
    return {n: engine.check(settings[f"exit {n}"], prompts) for n in exits}


def leave_vocab(policies: dict) -> str:
    """What the `exit_settings` runs choose leaving tokens from (`ExitPolicy.vocab`): "draft"
    where every exit's run does (the engine's default for greedy decoding with a draft vocabulary)."""
    return "draft" if policies and all(q.vocab == "draft" for q in policies.values()) else "full"


def vocab_needs(policies: dict) -> dict[int, bool]:
    """Whether each exit's measure needs its vocabulary projection (`fit_steps`' `needs_vocab`)."""
    return {n: get_measure(q.measure).needs_vocab for n, q in policies.items()}


# Full decoding's step above the line through the exits' steps by more than this share of it: its
# reads stream from memory (`fit_steps`); less is within the timings' noise.
STREAM_EXCESS = 0.05


def fit_steps(costs: DecodeCosts, measured: dict[str, float], needs_vocab: dict[int, bool]) -> DecodeCosts:
    """`costs` with `layer` and `fixed` fitted through each of `exit_settings`' measured seconds
    per step less what the fit does not own: its heads, checks and the cache regime's extra
    seconds (`predicted_step` with no layer and no fixed cost; `needs_vocab`: each exit's
    measure's); `fit_layer`, falling back on the layer timed alone (`layer_direct`), its intercept
    below zero no further than the layers the cache keeps between steps that overflow it (`cache_held`).

    Where two exits or more give a line of their own, full decoding's step reads more than the
    cache holds in full (`WeightCache.RAMP`[0] of `cache_bytes`: where that model starts calling
    reads cold; `cache_bytes` 0: no regime, no stream) and costs more than the exits' line by
    over STREAM_EXCESS, the line is the exits' and the excess is `stream`: seconds per byte of
    the full step's reads beyond the deepest exit step's (`hot_bytes`), which each step pays for
    its own reads beyond those; where the deeper exits' steps stream too, the line is the
    shallower exits' and `hot_bytes` fitted below the deeper steps' reads (`stream_fits`: the split
    that prices every step best). A step that reads more weights than the cache keeps from one step
    to the next streams them: on an Intel Xeon VM (300 MB of L3 reported, ~128-150 MiB of it
    this VM's) SmolLM2's bf16 steps leaving at exits 8 / 15 / 22 (54-150 MB of layers) ran at
    0.25-0.29 ms a layer and full decoding's (258 MB with the head) at ~0.40, which one line
    through all four priced at 1.40 / 1.18 / 1.22 and 0.89 of their times; the least-recently-used
    `WeightCache` cannot say both (its memory timing, a shallow step right after a full one, reads
    +0.02-0.07 ms a layer: the cache's replacement keeps the layers every step reads). Full
    decoding's own prediction is then its measured time by construction: the check against the
    clock is the exits' steps and runs that mix them. (Without the cache's bound, noise in the
    CPU reference model's two exit steps, fp32, in the 300 MB L3, read as a line of 0.05 ms a
    layer and a full step 0.6 ms above it.)"""
    rest = replace(costs, layer=0.0, fixed=0.0, stream=0.0, hot_bytes=0.0)
    full = (costs.num_layers, measured["full"] - predicted_step(rest, "full", True))
    point = {  # each exit's (layers, seconds less what the line does not own)
        n: (costs.depth[n], measured[f"exit {n}"] - predicted_step(rest, f"exit {n}", vocab))
        for n, vocab in needs_vocab.items()
    }
    exits = list(point.values())
    reads = exit_reads(costs, needs_vocab)
    layers_held = cache_held(costs, reads)
    layer, fixed = fit_layer([full, *exits], costs.layer_direct, layers_held)
    out = replace(rest, layer=layer, fixed=fixed)
    if len({x for x, _ in exits}) < 2 or not costs.reads:
        return out
    read = costs.walk(*setting_step(costs, "full"), True)[1]
    held = WeightCache.RAMP[0] * costs.cache_bytes
    if read <= max(max(reads), held) or not held:
        return out
    fits = stream_fits(costs, rest, measured, needs_vocab, point, reads, read, layers_held)
    return min(fits, key=lambda f: f[0])[1] if fits else out


def stream_fits(
    costs: DecodeCosts,
    rest: DecodeCosts,
    measured: dict[str, float],
    needs_vocab: dict[int, bool],
    point: dict[int, tuple[float, float]],
    reads: list[float],
    full_read: float,
    layers_held: float,
) -> list[tuple[float, DecodeCosts]]:
    """`fit_steps`' streaming fits, each with its relative squared error over the measured steps:
    the exit steps that read least (two at least) on a line in the cache (`fit_layer`), the deeper
    exits' steps and full decoding's each above that line by over STREAM_EXCESS, their excess
    seconds a cost per byte read beyond `hot_bytes` (`stream_line`: from the line's deepest step's
    reads up to the shallowest streaming step's). `point`: each exit's (layers, seconds less what
    the line does not own), `reads` (`exit_reads`) and `full_read` the exits' and full decoding's
    bytes, as `fit_steps` worked them out. With exits 8 / 15 / 22 of SmolLM2 (bf16, 7.1 MB
    a layer) on an Intel Xeon VM reporting 480 MiB of L3, the exit-22 step (156 MB) already
    streamed part of its reads (0.18 ms a layer from 8 to 15, 0.31 from 15 to 22): one line through
    the three exits priced the exit-8 and exit-15 steps at 1.18x / 1.15x their times."""
    vocab = {f"exit {n}": v for n, v in needs_vocab.items()} | {"full": True}
    order = sorted(zip(reads, needs_vocab), key=lambda r: r[0])  # (bytes, exit), fewest first
    fits = []
    for j in range(2, len(order) + 1):
        on = [point[n] for _, n in order[:j]]
        if len({x for x, _ in on}) < 2:
            continue
        line = replace(rest, **dict(zip(("layer", "fixed"), fit_layer(on, costs.layer_direct, layers_held))))
        above = [(r, f"exit {n}") for r, n in order[j:]] + [(full_read, "full")]
        excess = [(r, measured[name] - predicted_step(line, name, vocab[name])) for r, name in above]
        if any(e <= STREAM_EXCESS * measured[name] for (_, e), (_, name) in zip(excess, above)):
            continue
        stream, hot = stream_line(excess, order[j - 1][0])
        fit = replace(line, stream=stream, hot_bytes=hot)
        error = sum((predicted_step(fit, k, vocab[k]) / measured[k] - 1) ** 2 for k in vocab if k in measured)
        fits.append((error, fit))
    return fits


def stream_line(excess: list[tuple[float, float]], hot: float) -> tuple[float, float]:
    """(seconds a byte, bytes held) with each (bytes read, excess seconds) point's excess =
    stream x (bytes - held): one point, held = `hot` (the line's deepest step's reads); more, the
    least-squares line through them, held kept within [`hot`, the fewest bytes among them) (else
    at `hot`, stream through the points' bytes beyond it)."""
    if len(excess) > 1:
        slope, intercept = fit_line(excess)
        if slope > 0 and hot <= -intercept / slope < min(r for r, _ in excess):
            return slope, -intercept / slope
    over = [(r - hot, e) for r, e in excess]
    return sum(x * e for x, e in over) / sum(x * x for x, _ in over), hot


class StepPool:
    """The step times of every timing of `exit_settings` so far, each divided by its host speed
    (`ReferenceStep`: at the speed `costs.reference` was timed at), so that `retime` can fit
    through their medians at the speed it finds now instead of through its own timing alone. One
    timing of the CPU reference model's steps (fp32, best of 5 rounds of 16 steps less the prefill,
    whose own jitter is ~1 ms) read a step leaving at exit 3 anywhere in 0.67-0.84 ms on a host
    whose reference step moved 0.98-1.03x, and priced full decoding at 2.90-3.37 of that step;
    through the medians of the timings so far, 3.11-3.32, settling at 3.18-3.24 from the fourth
    (the same eight timings). A sweep's 0.6 row had read efficiencies 0.873-0.971 at one measured
    speedup (1.81x), its ideal moving 1.87-2.08 with the fixed cost each timing alone fitted. The
    price: a host whose layers and fixed cost slow unequally is followed more slowly (the medians
    move once most timings show it)."""

    def __init__(self, measured: dict[str, float] | None = None) -> None:
        self.rows: list[dict[str, float]] = [dict(measured)] if measured else []

    def add(self, measured: dict[str, float], speed: float) -> dict[str, float]:
        """Pool `measured` (seconds per step at host speed `speed`); returns each setting's median
        over the pool, at that speed."""
        self.rows.append({k: v / speed for k, v in measured.items()})
        return {k: speed * statistics.median(r[k] for r in self.rows if k in r) for k in measured}


def retime(
    engine,
    prompts: list[list[int]],
    costs: DecodeCosts,
    measure: str | None = None,
    steps: int = 16,
    repeats: int = 5,
    exit_vocabulary: str = "auto",
    pool: StepPool | None = None,
) -> DecodeCosts:
    """`costs` as the host runs now: `step_times` taken again with `ReferenceStep` in its rounds,
    every timed piece scaled by that step's median time now over `costs.reference` (its time when
    `costs` were measured) and `layer` and `fixed` fitted again (`fit_steps`); `host["retimed"]`
    the scale. For a sweep's rows minutes apart: the pieces take a minute to time, the steps a few
    seconds, and on a host whose speed moved between two runs of the CPU reference model's sweep
    (a layer 0.074 then 0.130 ms, the fixed cost 0.062 then 0.086) the ideal speedup of one
    threshold read 1.84 in one and 2.39 in the other where the measured speedups were 1.88x and
    1.93x: each row is best priced at the speed it ran at. `pool`: the fit goes through the
    medians of this timing and the pool's earlier ones at this speed (`StepPool`; this one joins it)."""
    ref, settings = ReferenceStep(engine, prompts), exit_settings(engine, measure, exit_vocabulary)
    measured = step_times(engine, prompts, settings, steps, repeats, ref.timed("steps", steps))
    speed = statistics.median(ref.times["steps"]) / costs.reference if costs.reference > 0 else 1.0
    if pool is not None:
        measured = pool.add(measured, speed)
    out = scaled(costs, speed)
    policies = checked_policies(engine, settings, prompts, costs.depth)
    out.leave_vocab = leave_vocab(policies)
    out = fit_steps(out, measured, vocab_needs(policies))
    out.host, out.reference = {**costs.host, "retimed": speed}, costs.reference * speed
    return out


def scaled(costs: DecodeCosts, speed: float) -> DecodeCosts:
    """`costs` with every timed piece `speed` times as long (layer and fixed too: `retime` fits
    them again)."""
    times = {
        k: getattr(costs, k) * speed for k in ("layer", "fixed", "head", "row", "layer_direct", "pend", "pend_pass")
    }
    times["stream"] = costs.stream * speed  # seconds per byte
    times["fill_rows"] = tuple((k, t * speed) for k, t in costs.fill_rows)
    tables = ("probe", "vocab", "project", "draft", "fire_hidden", "probe_exit", "cold")
    tables += ("check_step", "check_step_error")
    return replace(costs, **times, **{k: {n: t * speed for n, t in getattr(costs, k).items()} for k in tables})


# Pending rows per sequence a fill is timed at besides 1 and 1 + extra (`pending_costs`)
FILL_ROWS = (9, 17, 33)


def pending_costs(engine, prompts, policies: dict, steps: int, repeats: int, extra: int, ref) -> tuple:
    """(pend, pend_pass, row, fill_rows) at the host speed of `step_times` (`ReferenceStep`). A fill behind
    exit n (one pending row per sequence in the layers above it, `fill_time`) for each exit; with
    two exits or more, the line through (layers above n, its fill's seconds): its slope is `pend`,
    a layer's share, and its intercept `pend_pass`, what a filling pass pays once (the general
    path's gather, layout and mask; the CPU reference model, bf16: ~30 us a layer behind exit 3 and
    ~42 behind exit 6 priced as per-layer alone, so fills behind exit 6 were priced 25% low). One
    exit, or a line that makes a layer or a pass free (noise): the first exit's seconds per layer,
    no pass term, as before. `row`: each further pending row per layer, 1 + `extra` rows behind
    the first exit against 1. `fill_rows`: a layer's seconds at each of FILL_ROWS pending rows
    behind the first exit (as many as one native layer call takes for the batch), less
    `pend_pass`: where most tokens leave early, rows pile up (the CPU reference at 0.6, 95% of tokens
    at exit 3: fills of ~20 rows) and an fp32 layer's products cost 0.07 / 0.11 / 0.22 / 0.31 / 0.56 ms
    at 1 / 5 / 10 / 20 / 30 rows: the line through 1 and 5 priced a 30-row fill at 0.39."""
    p, timed = engine.passes, ref.timed("fill")
    above = {n: p.num_layers - p.depth(n) for n in p.exits}
    first = min(p.exits)
    ks = [k for k in FILL_ROWS if (k + 1) * len(prompts) <= lean.FOLD_ROWS and k not in (1, 1 + extra)]
    one, more, *piled = fill_time(engine, prompts, policies[first], steps, repeats, (1, 1 + extra, *ks), timed)
    points = [(above[first], one)]
    for n in sorted(p.exits)[1:]:
        if above[n] > 0 and above[n] != above[first]:
            points.append((above[n], fill_time(engine, prompts, policies[n], steps, repeats, (1,), timed)[0]))
    speed = ref.speed("fill")
    row = max(more - one, 0.0) / speed / (extra * above[first])
    slope, intercept = fit_line(points) if len(points) > 1 else (0.0, -1.0)
    if slope <= 0.0 or intercept < 0.0 or intercept > one:
        pend, pend_pass = one / speed / above[first], 0.0
    else:
        pend, pend_pass = slope / speed, intercept / speed
    timed_rows = sorted(zip((1, 1 + extra, *ks), (one, more, *piled)))
    table = tuple((k, max(t / speed - pend_pass, 0.0) / above[first]) for k, t in timed_rows)
    return pend, pend_pass, row, table


def setting_step(costs: DecodeCosts, name: str) -> tuple[list[int], tuple[int, ...]]:
    """One decode step of `exit_settings`' `name`: (each sequence's exit, the exits evaluated)."""
    if name == "full":
        return [costs.num_layers], ()
    n = int(name.split()[1])
    return [n] * costs.batch, (n,)


def predicted_step(costs: DecodeCosts, name: str, needs_vocab: bool) -> float:
    """The model's seconds per decode step for one of `exit_settings` (full decoding evaluates no
    exit: `needs_vocab` does not matter to it)."""
    return costs.steady(*setting_step(costs, name), needs_vocab)

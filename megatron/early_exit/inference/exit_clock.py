"""cost_aware's own clock: whether its decisions pay, measured while decoding (DESIGN.md
section 6, "Batches").

`exit_decision.ExitDecider` prices leaving from timings taken apart (`measure_exit_costs`: a
layer, a check, a recomputed row, the fill pass's own work). Decoding does not reproduce them:
on the CPU reference model (bf16, batch 4) the step that fills the 4 rows left at exit 6 cost
0.65-0.78 ms over a plain one where the probes priced 0.38-0.47 (weights evicted by the
leave/fill alternation, ragged layouts, more rows per kernel call), and the checks' own Python
and the runs of layers they split are priced nowhere. Where leaving nets about nothing such
errors decide the sign: learned at 0.8 decoded at 0.92-0.98x full decoding there.

So what the decisions add up to is timed as they run. Per (policy, pass size) the decode
steps (one new token per sequence) are timed in windows of WINDOW passes, each in one mode:
PAUSED (no exit evaluated: passes as in full decoding, filling whatever is pending), ON (the
decider's verdicts) or FREE (every allowed exit evaluated, every row that fires leaves: `exact`'s
decisions, which the decider's all-or-nothing rule forgoes; they pay where the rows that leave go
on leaving, so their recompute is rare and batched: learned 0.5 at batch 16 decoded at 1.92x
under exact and 1.59x under ON). A window is charged its passes after its first and the first
pass of the window after it: the pass that fills the rows a window left pays for that window's
leaving. Each window next to one of another mode gives a ratio of the two (neighbours: the
span's growth and the host's drift between them small); the mode the medians of the latest RATIOS
say is fastest is kept (PAUSED unless another is faster by MARGIN), and each other mode is tried
again once in (its cost over the preferred one's, less 1) / EXPLORE_BUDGET windows, between
EXPLORE_NEAR and EXPLORE_FAR apart. The first TRUSTED windows run ON (a one-off generation of up
to 64 tokens decides as the costs say), then SCHEDULE (paused, on, free, on) gives the first
ratios.

Until a row has reached the threshold at one of the policy's exits (`ExitDecider.may_fire`: in
any mode, any pass size; an exit evaluated fewer than a few times may yet), FREE is ON with more
checks and nothing leaving, and ON is PAUSED with checks: no FREE window runs (the schedule's is
left out, exploring one waits), and the trusted windows end with the first in which nothing has
fired. On the CPU reference model, max_prob 0.9 (nothing leaves at batch 1 / 4 / 16) decoded 4
runs of 32 tokens at 0.91-0.95x full decoding with all of its 128 passes exploring: 64 trusted ON
and a FREE window that projects every exit onto the vocabulary every pass.

Clocked only where decisions may follow the clock (`exit_decision.costs_from_parameters` false:
one process, not the test suite's `EE_EXIT_COSTS=parameters`) and on a CPU device (a device's
queue would need a synchronisation per pass); never a pass with a forced exit (drafting), a
verify or scoring pass, or any but a decode step, nor a profiled pass or one that measures the costs,
nor a pass of a policy with no exit to evaluate (threshold 1.0: its modes are one). A pass
not clocked runs with exits on.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from dataclasses import dataclass, field

WINDOW = 16  # passes of one (policy, pass size) timed under one mode
PAUSED, ON, FREE = 0, 1, 2  # no exit evaluated; the decider's verdicts; every firing row leaves (`exact`'s decisions)
MODES = (PAUSED, ON, FREE)
# Windows run ON (the decider's costs trusted) before any other: a one-off generation of up to
# TRUSTED * WINDOW tokens decides as the costs say. Then SCHEDULE's windows give each other mode
# ratios against ON; from then the ratios choose.
TRUSTED = 4
SCHEDULE = (PAUSED, ON, FREE, ON)
RATIOS = 6  # the latest ratios of a pair of modes their median is taken of
# PAUSED (full decoding's passes) is preferred unless another mode's passes are faster by more than
# this: where early exit gains a few % at most the windows' noise (~4% for a median of RATIOS)
# would otherwise pick the slower mode about as often (max_prob 0.9, which never fires at batch 1:
# its refresh checks cost ~2%).
MARGIN = 0.02
# A mode not preferred is explored again once in (its seconds per pass over the preferred mode's,
# less 1) / EXPLORE_BUDGET windows, at least EXPLORE_NEAR and at most EXPLORE_FAR apart: exploring
# costs about EXPLORE_BUDGET of the time per mode (a mode twice as slow: 1/EXPLORE_FAR), 1% for the two
# not kept. (At 1% each, learned 0.8 at batch 4 decoded at 0.960x full decoding with the clock where
# paused passes alone read 0.984x and on alone 0.996x: free, 1.40x as dear there, explored every
# 40 windows, on every 8.)
EXPLORE_BUDGET = 0.005
EXPLORE_NEAR, EXPLORE_FAR = 8, 128
TRACKS = 256  # (policy, pass size) keys kept: a server's requests bring policies; the oldest go first


@dataclass
class Track:
    """One (policy, pass size)'s windows."""

    mode: int = ON  # the current window's
    passes: int = 0  # passes of the current window run so far
    seconds: float = 0.0  # charged to the current window
    charged: int = 0  # passes charged to the current window
    closing: tuple | None = None  # (mode, seconds, passes) of the window before, awaiting its last pass
    last: tuple | None = None  # the newest closed window: (mode, seconds per pass)
    # (a, b), a < b -> seconds per pass under b over under a, of neighbouring windows
    ratios: dict = field(default_factory=dict)
    begun: int = 1  # windows begun
    step: int = 0  # the window's place in the trusted windows and SCHEDULE (past them: the ratios choose)
    since: dict = field(default_factory=dict)  # mode -> windows since its last one
    choice: int = ON  # the preferred mode at the last look
    fired: bool = True  # a row may reach the threshold at an exit of the policy (`ExitDecider.may_fire`, latest pass)
    by_mode: list = field(default_factory=lambda: [0] * len(MODES))  # passes run in each mode (reports)

    def relative(self, m: int, base: int) -> float | None:
        """The median of neighbouring windows' seconds per pass under m over under `base`, from
        their own pairs, else through the third mode's; None without such pairs."""
        if m == base:
            return 1.0
        a, b = sorted((m, base))
        pairs = self.ratios.get((a, b))
        if pairs:
            r = statistics.median(pairs)
            return r if m == b else 1.0 / r
        (x,) = set(MODES) - {m, base}
        if self.ratios.get(tuple(sorted((m, x)))) and self.ratios.get(tuple(sorted((x, base)))):
            return self.relative(m, x) * self.relative(x, base)
        return None

    def costs(self) -> dict[int, float]:
        """Each mode's seconds per pass over the preferred one's, where the ratios say."""
        known = {m: self.relative(m, self.choice) for m in MODES}
        return {m: r for m, r in known.items() if r is not None}

    def preferred(self) -> int:
        """The mode whose windows are fastest by the ratios, PAUSED's counted MARGIN faster than
        measured (the last choice on a tie)."""
        costs = self.costs()
        scale = {PAUSED: 1.0 - MARGIN}
        self.choice = min(costs, key=lambda m: (costs[m] * scale.get(m, 1.0), m != self.choice))
        return self.choice

    def ratio(self) -> float | None:
        """ON's seconds per pass over PAUSED's (reports; None before any pair)."""
        return self.relative(ON, PAUSED)

    def next_mode(self) -> int:
        """The mode of the window about to begin."""
        self.begun += 1
        self.step += 1
        if self.step < TRUSTED:
            if self.fired:
                return ON
            self.step = TRUSTED  # nothing fired: the trusted windows end
        # The schedule's windows but a free one that nothing would leave in and a window of the
        # mode just run (no ratio of a pair): where nothing has fired, paused and on alone.
        while self.step - TRUSTED < len(SCHEDULE):
            m = SCHEDULE[self.step - TRUSTED]
            if m != self.mode and (m != FREE or self.fired):
                return m
            self.step += 1
        best, costs, due = self.preferred(), self.costs(), []
        for m in MODES:
            if m != best and (m != FREE or self.fired):
                self.since[m] = self.since.get(m, 0) + 1
                # full decoding's passes are not put off long by a preference for another mode
                # that rests on fewer than RATIOS ratios (one window in which most rows left read
                # on passes at 0.58 of paused ones, and paused windows waited 128 windows where on
                # decoded at 0.94x of them); the other modes are, by what their ratios say (free
                # windows explored every 8 until settled cost max_prob 0.9 at batch 4 / 16 12% of
                # 768 passes at 1.4-2x the time)
                settled = m != PAUSED or len(self.ratios.get((PAUSED, best), ())) >= RATIOS
                overdue = self.since[m] - (explore_every(costs.get(m)) if settled else EXPLORE_NEAR)
                if overdue >= 0:
                    due.append((overdue, m))
        if due:  # the most overdue mode (one a window)
            m = max(due)[1]
            self.since[m] = 0
            return m
        return best

    def close(self, mode: int, per_pass: float) -> None:
        """A window's time known: a ratio where the window before it ran another mode."""
        if self.last is not None and self.last[0] != mode and min(self.last[1], per_pass) > 0:
            (a, ta), (b, tb) = sorted([self.last, (mode, per_pass)])
            self.ratios.setdefault((a, b), deque(maxlen=RATIOS)).append(tb / ta)
        self.last = (mode, per_pass)

    def charge(self, seconds: float) -> None:
        """One pass of the current window took `seconds`."""
        self.by_mode[self.mode] += 1
        if self.closing is not None:  # the first pass of a window pays for the window before
            mode, total, n = self.closing
            self.closing = None
            self.close(mode, (total + seconds) / (n + 1))
        else:
            self.seconds += seconds
            self.charged += 1
        self.passes += 1
        if self.passes == WINDOW:
            self.closing = (self.mode, self.seconds, self.charged)
            self.mode = self.next_mode()
            self.passes, self.seconds, self.charged = 0, 0.0, 0


def explore_every(cost: float | None) -> float:
    """How many windows apart a mode not preferred is explored, from its seconds per pass over the
    preferred mode's (None: not known yet: soon)."""
    if cost is None:
        return EXPLORE_NEAR
    return min(EXPLORE_FAR, max(EXPLORE_NEAR, (cost - 1.0) / EXPLORE_BUDGET))


class ExitClock:
    """Times cost_aware's decode steps per (policy, pass size) and says which mode the next one
    runs in (`start`, `stop`); `clock`: seconds (injected in tests)."""

    def __init__(self, clock=time.perf_counter) -> None:
        self.clock = clock
        self.tracks: dict[tuple, Track] = {}
        self.running: tuple[Track, float] | None = None

    def start(self, key: tuple, fired: bool = True) -> int:
        """A clocked pass of `key` begins: its mode (PAUSED, ON or FREE). `fired`: whether a row
        has reached the threshold at an exit of its policy yet (no FREE window runs until one has;
        read when the window after this pass's is chosen)."""
        track = self.tracks.get(key)
        if track is None:
            if len(self.tracks) >= TRACKS:
                del self.tracks[next(iter(self.tracks))]  # the one made first
            track = self.tracks[key] = Track()
        track.fired = fired
        self.running = (track, self.clock())
        return track.mode

    def track_of(self, key: tuple) -> Track | None:
        """`key`'s track where a pass of it has begun (`start` makes it), else None."""
        return self.tracks.get(key)

    def stop(self) -> None:
        """The clocked pass ended: its time charged to its window."""
        if self.running is not None:
            track, began = self.running
            self.running = None
            track.charge(self.clock() - began)

    def summary(self) -> dict[tuple, tuple]:
        """key -> (share of its passes run in each mode, each mode's seconds per pass over the
        preferred one's where known, windows begun)."""
        out = {}
        for k, t in self.tracks.items():
            out[k] = ([n / max(sum(t.by_mode), 1) for n in t.by_mode], t.costs(), t.begun)
        return out


class HeldTrack(Track):
    """A track whose every pass runs in its one mode: its passes counted, no window timed."""

    def charge(self, seconds: float) -> None:
        self.by_mode[self.mode] += 1


class FixedMode:
    """A clock that runs every clocked pass in one mode and times nothing: what a policy decodes at
    under that mode alone (`benchmarks/decode_speed.py --clock-modes`; set as an engine's
    `ExitDecider.clock`), step by step or in the native loop (`native_loop.Window`) as the clock's
    windows run. Its one track counts the passes, as `passes_by_mode` reads them."""

    def __init__(self, mode: int, clock=time.perf_counter) -> None:
        if mode not in MODES:
            raise ValueError(f"FixedMode: mode {mode!r}: expected one of {MODES} (paused, on, free)")
        self.mode, self.clock = mode, clock
        self.tracks = {"fixed": HeldTrack(mode=mode)}

    def start(self, key: tuple, fired: bool = True) -> int:
        self.tracks["fixed"].fired = fired
        return self.mode

    def track_of(self, key: tuple) -> Track:
        """The one track, whatever the key."""
        return self.tracks["fixed"]

    def stop(self) -> None:
        self.tracks["fixed"].charge(0.0)


def passes_by_mode(engine) -> list[int]:
    """Decode steps `engine`'s clock has run in each mode so far, [paused, on, free] (zeros where
    nothing is clocked): a benchmark's shares of each mode are differences of two readings."""
    decider = getattr(getattr(engine, "passes", None), "exit_decider", None)
    clock = getattr(decider, "clock", None)
    if not clock:
        return [0, 0, 0]
    return [sum(t.by_mode[m] for t in clock.tracks.values()) for m in MODES]


def decode_step(new_tokens: dict, policy, all_rows: bool, scores, branch) -> bool:
    """Whether a pass is one `ExitClock` may time: cost_aware, one new token per sequence, no
    forced exit, not a verify or scoring pass."""
    return (
        policy.mode == "cost_aware"
        and policy.force is None
        and not all_rows
        and scores is None
        and not branch
        and bool(new_tokens)
        and all(len(t) == 1 for t in new_tokens.values())
    )

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
steps (one new token per sequence) are timed in windows of WINDOW passes, each under one mode:
exits on (the decider's verdicts), or paused (no exit evaluated: passes as in full decoding,
filling whatever is pending). A window is charged its passes after its first and the first
pass of the window after it: the pass that fills the rows a window left pays for that
window's leaving. Each window next to one of the other mode gives a ratio (seconds per pass on
over paused: neighbours, so the span's growth and the host's drift between them are small);
the mode the median of the latest RATIOS says is faster is kept, and the other one tried again
every EXPLORE_NEAR-th window where that median is within NEAR of 1, every EXPLORE_FAR-th beyond
(where early exit pays 2x, exploring costs ~1/EXPLORE_FAR of a paused window's extra time;
where it loses, ~1/EXPLORE_FAR of the loss). The first TRUSTED windows run on (the decider's
own costs trusted: a one-off generation of up to 64 tokens is never paused), then one paused
and one on give the first ratio.

Clocked only where decisions may follow the clock (`exit_decision.costs_from_parameters` false:
one process, not the test suite's `EE_EXIT_COSTS=parameters`) and on a CPU device (a device's
queue would need a synchronisation per pass); never a pass with a forced exit (drafting), a
verify or scoring pass, or any but a decode step, nor a profiled pass or one that measures the costs. A pass
not clocked runs with exits on.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import deque
from dataclasses import dataclass, field

WINDOW = 16  # passes of one (policy, pass size) timed under one mode
# Windows run on (the decider's costs trusted) before the first paused one: a one-off generation
# of up to TRUSTED * WINDOW tokens is never paused. Then one paused window and one on; from then
# the ratios choose.
TRUSTED = 4
RATIOS = 6  # the latest on/paused ratios the preference is the median of
NEAR = 0.1  # a median ratio within this of 1: explore more often
EXPLORE_NEAR, EXPLORE_FAR = 8, 32  # every this many windows, one of the mode not preferred
TRACKS = 256  # (policy, pass size) keys kept: a server's requests bring policies; the oldest go first


@dataclass
class Track:
    """One (policy, pass size)'s windows."""

    on: bool = True  # exits on in the current window
    passes: int = 0  # passes of the current window run so far
    seconds: float = 0.0  # charged to the current window
    charged: int = 0  # passes charged to the current window
    closing: tuple | None = None  # (on, seconds, passes) of the window before, awaiting its last pass
    last: tuple | None = None  # the newest closed window: (on, seconds per pass)
    ratios: deque = field(default_factory=lambda: deque(maxlen=RATIOS))  # seconds per pass, on / paused
    begun: int = 1  # windows begun
    since: int = 0  # windows since one of the mode not preferred
    paused_passes: int = 0  # passes run paused (reports)
    all_passes: int = 0

    def ratio(self) -> float | None:
        """The median of the latest on/paused ratios (None before any)."""
        return statistics.median(self.ratios) if self.ratios else None

    def preferred(self) -> bool:
        """Exits on, unless the ratios say the paused windows are faster."""
        r = self.ratio()
        return r is None or r <= 1.0

    def next_mode(self) -> bool:
        """The mode of the window about to begin."""
        self.begun += 1
        if self.begun <= TRUSTED + 2:  # on, ..., on, paused, on
            return self.begun != TRUSTED + 1
        r, preferred = self.ratio(), self.preferred()
        near = r is None or abs(math.log(r)) < math.log1p(NEAR)
        self.since += 1
        if self.since >= (EXPLORE_NEAR if near else EXPLORE_FAR):
            self.since = 0
            return not preferred
        return preferred

    def close(self, on: bool, per_pass: float) -> None:
        """A window's time known: a ratio where the window before it ran the other mode."""
        if self.last is not None and self.last[0] != on:
            on_t, paused_t = (per_pass, self.last[1]) if on else (self.last[1], per_pass)
            if paused_t > 0:
                self.ratios.append(on_t / paused_t)
        self.last = (on, per_pass)

    def charge(self, seconds: float) -> None:
        """One pass of the current window took `seconds`."""
        self.all_passes += 1
        self.paused_passes += not self.on
        if self.closing is not None:  # the first pass of a window pays for the window before
            on, total, n = self.closing
            self.closing = None
            self.close(on, (total + seconds) / (n + 1))
        else:
            self.seconds += seconds
            self.charged += 1
        self.passes += 1
        if self.passes == WINDOW:
            self.closing = (self.on, self.seconds, self.charged)
            self.on = self.next_mode()
            self.passes, self.seconds, self.charged = 0, 0.0, 0


class ExitClock:
    """Times cost_aware's decode steps per (policy, pass size) and says whether the next one
    runs with exits on (`start`, `stop`); `clock`: seconds (injected in tests)."""

    def __init__(self, clock=time.perf_counter) -> None:
        self.clock = clock
        self.tracks: dict[tuple, Track] = {}
        self.running: tuple[Track, float] | None = None

    def start(self, key: tuple) -> bool:
        """A clocked pass of `key` begins: whether its exits are on."""
        track = self.tracks.get(key)
        if track is None:
            if len(self.tracks) >= TRACKS:
                del self.tracks[next(iter(self.tracks))]  # the one made first
            track = self.tracks[key] = Track()
        self.running = (track, self.clock())
        return track.on

    def stop(self) -> None:
        """The clocked pass ended: its time charged to its window."""
        if self.running is not None:
            track, began = self.running
            self.running = None
            track.charge(self.clock() - began)

    def summary(self) -> dict[tuple, tuple]:
        """key -> (share of its passes run paused, median on/paused ratio or None, windows begun)."""
        return {k: (t.paused_passes / max(t.all_passes, 1), t.ratio(), t.begun) for k, t in self.tracks.items()}


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

"""cost_aware's own clock (`exit_clock.py`): decode steps timed in windows with exits on or
paused, the first pass of each window charged to the window before, the faster mode kept and
the other explored; paused passes evaluate no exit. Clocks are injected: nothing here reads
this machine's time."""

import pytest
import torch

from megatron.early_exit.inference import EarlyExitEngine, GenerationSettings, exit_clock
from megatron.early_exit.inference.exit_clock import EXPLORE_FAR, EXPLORE_NEAR, TRUSTED, ExitClock, decode_step
from megatron.early_exit.inference.exit_decision import ExitDecider
from megatron.early_exit.inference.passes import ExitPolicy
from tests.test_exit_policy import COMPUTE_BOUND
from tests.test_inference import make

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread

FIRST = TRUSTED + 2  # windows before the ratios choose: TRUSTED on, one paused, one on
AWARE = ExitPolicy(allowed=(1,), threshold=0.0, mode="cost_aware")


def drive(clock: ExitClock, key, cost) -> list[bool]:
    """Passes of `key` until `cost(on, i)` returns None: each pass's mode (pass i took `cost(on, i)`)."""
    now, modes = [0.0], []
    clock.clock = lambda: now[0]
    while True:
        on = clock.start(key)
        seconds = cost(on, len(modes))
        if seconds is None:
            return modes
        now[0] += seconds
        clock.stop()
        modes.append(on)


@pytest.fixture
def small_windows(monkeypatch):
    monkeypatch.setattr(exit_clock, "WINDOW", 4)


def test_a_window_pays_its_passes_after_the_first_and_the_next_windows_first(small_windows, monkeypatch):
    monkeypatch.setattr(exit_clock, "TRUSTED", 1)  # windows on, paused, on; then the ratios choose
    times = [1, 1, 1, 1] + [5, 2, 2, 2] + [9, 1, 1, 1] + [3]  # windows: on, paused, on; then the 4th's first
    clock = ExitClock(clock=lambda: 0.0)
    modes = drive(clock, "k", lambda on, i: times[i] if i < len(times) else None)
    assert modes == [True] * 4 + [False] * 4 + [True] * 4 + [True]  # on is faster
    track = clock.tracks["k"]
    on0 = (1 + 1 + 1 + 1 + 5) / 5  # the first window has no window before to pay for
    paused1 = (2 + 2 + 2 + 9) / 4  # its first pass (5) filled what window 0 left: window 0's
    on2 = (1 + 1 + 1 + 3) / 4
    assert list(track.ratios) == pytest.approx([on0 / paused1, on2 / paused1])
    assert track.paused_passes == 4 and track.all_passes == 13


@pytest.mark.parametrize("dear", [True, False])
def test_the_slower_mode_is_left_and_the_other_explored(small_windows, dear):
    """On passes dearer (2 vs 1 a pass): TRUSTED windows on, one paused and one on, then paused, on
    again one window in EXPLORE_FAR; cheaper: on, paused one window in EXPLORE_FAR."""
    windows = FIRST + 3 * EXPLORE_FAR
    cost = lambda on, i: (2.0 if on == dear else 1.0) if i < 4 * windows else None  # noqa: E731
    clock = ExitClock()
    modes = drive(clock, "k", cost)[::4]  # one per window
    assert modes[:FIRST] == [True] * TRUSTED + [False, True]
    # the window after the third is chosen before the third is timed: one ratio (on / paused) so far
    later = modes[FIRST:]
    assert later.count(dear) == 3 and later.count(not dear) == len(later) - 3
    assert all(m == (not dear) for m in later[: EXPLORE_FAR - 1])
    # each window also pays the next one's first pass (here of the other mode): the ratios lie nearer 1
    assert (clock.tracks["k"].ratio() > 1.0) == dear


def test_a_close_race_is_explored_more_often(small_windows):
    """Ratios within NEAR of 1 (on 1.05 a pass, paused 1.0): paused kept, on one window in EXPLORE_NEAR."""
    windows = FIRST + 4 * EXPLORE_NEAR
    clock = ExitClock()
    modes = drive(clock, "k", lambda on, i: (1.05 if on else 1.0) if i < 4 * windows else None)[::4]
    assert modes[FIRST:].count(True) == 4


def test_the_preference_follows_a_change_of_costs(small_windows):
    """On dearer for a while, then cheaper: the explored on windows bring the ratios' median below 1."""
    switch = 4 * (FIRST + 2 * EXPLORE_FAR)
    end = switch + 4 * 6 * EXPLORE_FAR
    cost = lambda on, i: None if i >= end else (2.0 if on == (i < switch) else 1.0)  # noqa: E731
    clock = ExitClock()
    modes = drive(clock, "k", cost)
    assert modes[4 * FIRST : switch : 4].count(True) == 2  # paused but for the on windows explored
    assert modes[-4 * 2 * EXPLORE_FAR :: 4].count(False) == 2  # on again, paused but for the windows explored
    assert clock.tracks["k"].ratio() < 1.0


def test_which_passes_are_clocked():
    step = dict(new_tokens={0: [5], 2: [7]}, policy=AWARE, all_rows=False, scores=None, branch=None)
    assert decode_step(**step)
    assert not decode_step(**{**step, "policy": ExitPolicy(allowed=(1,), threshold=0.0)})  # exact
    assert not decode_step(**{**step, "policy": ExitPolicy(allowed=(1,), force=1, mode="cost_aware")})  # a draft
    assert not decode_step(**{**step, "new_tokens": {0: [5, 6], 2: [7]}})  # a prefill or a verify pass
    assert not decode_step(**{**step, "all_rows": True})
    assert not decode_step(**{**step, "branch": {0: (1,)}})
    assert not decode_step(**{**step, "new_tokens": {}})


def test_the_clock_follows_the_costs_source_and_its_switch(monkeypatch):
    passes = EarlyExitEngine(make("llama")).passes
    monkeypatch.setenv("EE_EXIT_COSTS", "parameters")
    assert ExitDecider().clock_for(passes) is None  # the suite's setting: no decision follows the clock
    monkeypatch.setenv("EE_EXIT_COSTS", "measured")
    assert isinstance(ExitDecider().clock_for(passes), ExitClock)  # one process on a CPU
    monkeypatch.setenv("EE_EXIT_CLOCK", "off")
    assert ExitDecider().clock_for(passes) is None
    monkeypatch.setenv("EE_EXIT_CLOCK", "maybe")
    with pytest.raises(ValueError, match="EE_EXIT_CLOCK='maybe'"):
        ExitDecider().clock_for(passes)


@torch.no_grad()
def expected_by_schedule(model, prompt, exit_at) -> list[int]:
    """Greedy tokens where step s's token comes from exit `exit_at[s]` (the final head: num_layers),
    from an uncached model: what a KV-correct engine gives whatever steps left early."""
    ids, out = list(prompt), []
    for n in exit_at:
        o = model(torch.tensor([ids]))
        logits = o.logits if n == model.config.num_layers else o.exit_logits[n]
        out.append(int(logits[0, -1].argmax()))
        ids.append(out[-1])
    return out


def test_paused_windows_evaluate_no_exit_and_decode_as_the_full_model(monkeypatch):
    """Threshold 0 at exit 1 (every check fires; COMPUTE_BOUND: every leaver pays) with a clock on
    which passes with exits on take 3x as long: windows of 2 decode steps, one trusted, run on,
    paused, on, then every step is paused (full depth, filling what the on windows left).
    The tokens equal an uncached model's taking each step's token from the exit the schedule says."""
    monkeypatch.setattr(exit_clock, "WINDOW", 2)
    monkeypatch.setattr(exit_clock, "TRUSTED", 1)
    model = make("llama")
    engine = EarlyExitEngine(model)
    decider = engine.passes.exit_decider = ExitDecider(COMPUTE_BOUND)
    now = [0.0]

    def clock() -> float:  # a pass's time: the advance at its stop, as its mode made it
        now[0] += 1.0 if decider.paused else 3.0
        return now[0]

    decider.clock = ExitClock(clock)
    new, layers = 16, model.config.num_layers
    s = GenerationSettings(
        strategy="early_exit", max_new_tokens=new, ignore_eos=True, early_exit_threshold=0.0, exit_layers=(1,),
        exit_policy="cost_aware",
    )  # fmt: skip
    res = engine.generate([[1, 2, 3, 4, 5]], s)[0]
    # the prefill's token from the final head; decode steps 1-2 on, 3-4 paused, 5-6 on, then paused
    schedule = [layers] + [1, 1, layers, layers, 1, 1] + [layers] * (new - 7)
    assert res.exit_layers == schedule
    assert res.tokens == expected_by_schedule(model, [1, 2, 3, 4, 5], schedule)
    (track,) = decider.clock.tracks.values()
    assert track.ratio() > 1.0 and track.paused_passes == new - 1 - 4


def test_a_one_off_generation_within_the_trusted_windows_is_never_paused():
    """TRUSTED windows run on whatever the clock reads: the first TRUSTED * WINDOW decode steps of a
    policy and pass size decide as the decider's costs say (on passes 10x dearer here)."""
    clock = ExitClock()
    modes = drive(clock, "k", lambda on, i: (10.0 if on else 1.0) if i < TRUSTED * exit_clock.WINDOW + 1 else None)
    assert all(modes[:-1]) and not modes[-1]


def test_the_keys_kept_are_bounded(monkeypatch):
    """A server's requests bring exit policies without end: the oldest (policy, size) goes first."""
    monkeypatch.setattr(exit_clock, "TRACKS", 3)
    clock = ExitClock(clock=lambda: 0.0)
    for key in ["a", "b", "c", "a", "d"]:
        clock.start(key)
        clock.stop()
    assert list(clock.tracks) == ["b", "c", "d"]

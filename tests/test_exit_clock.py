"""cost_aware's own clock (`exit_clock.py`): decode steps timed in windows with exits on or
paused, the first pass of each window charged to the window before, the faster mode kept and
the other explored; paused passes evaluate no exit. Clocks are injected: nothing here reads
this machine's time."""

import pytest
import torch

from megatron.early_exit.inference import EarlyExitEngine, GenerationSettings, exit_clock
from megatron.early_exit.inference.exit_clock import (
    EXPLORE_FAR,
    EXPLORE_NEAR,
    FREE,
    ON,
    PAUSED,
    RATIOS,
    SCHEDULE,
    TRUSTED,
    ExitClock,
    FixedMode,
    decode_step,
    explore_every,
)
from megatron.early_exit.inference.exit_decision import QUIET_EVALUATIONS, ExitDecider
from megatron.early_exit.inference.passes import ExitPolicy
from tests.test_exit_policy import (
    COMPUTE_BOUND,
    MEMORY_BOUND,
    NEW,
    PROMPTS,
    engine_with,
    even_token,  # noqa: F401 (a fixture)
    run,
)
from tests.test_inference import make

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread

FIRST = TRUSTED + len(SCHEDULE)  # windows before the ratios choose
AWARE = ExitPolicy(allowed=(1,), threshold=0.0, mode="cost_aware")


def drive(clock: ExitClock, key, cost, fired=lambda i: True) -> list[int]:
    """Passes of `key` until `cost(mode, i)` returns None: each pass's mode (pass i took `cost(mode, i)`;
    `fired(i)`: whether a row had reached the threshold before pass i)."""
    now, modes = [0.0], []
    clock.clock = lambda: now[0]
    while True:
        mode = clock.start(key, fired(len(modes)))
        seconds = cost(mode, len(modes))
        if seconds is None:
            return modes
        now[0] += seconds
        clock.stop()
        modes.append(mode)


@pytest.fixture
def small_windows(monkeypatch):
    monkeypatch.setattr(exit_clock, "WINDOW", 4)


def by_mode(costs: dict, passes: int):
    """A pass's time from its mode (`costs`), for `passes` passes."""
    return lambda mode, i: costs[mode] if i < passes else None


def test_a_window_pays_its_passes_after_the_first_and_the_next_windows_first(small_windows, monkeypatch):
    monkeypatch.setattr(exit_clock, "TRUSTED", 1)  # windows on, then the schedule: paused, on, free, on
    times = [1, 1, 1, 1] + [5, 2, 2, 2] + [9, 1, 1, 1] + [3]  # windows on, paused, on; then the 4th's first
    clock = ExitClock(clock=lambda: 0.0)
    modes = drive(clock, "k", lambda mode, i: times[i] if i < len(times) else None)
    assert modes == [ON] * 4 + [PAUSED] * 4 + [ON] * 4 + [FREE]
    track = clock.tracks["k"]
    on0 = (1 + 1 + 1 + 1 + 5) / 5  # the first window has no window before to pay for
    paused1 = (2 + 2 + 2 + 9) / 4  # its first pass (5) filled what window 0 left: window 0's
    on2 = (1 + 1 + 1 + 3) / 4
    assert list(track.ratios[(PAUSED, ON)]) == pytest.approx([on0 / paused1, on2 / paused1])
    assert track.ratio() == pytest.approx((on0 + on2) / 2 / paused1)
    assert track.by_mode == [4, 8, 1]


@pytest.mark.parametrize("fastest", [PAUSED, ON, FREE])
def test_the_fastest_mode_is_kept_and_the_others_explored(small_windows, fastest):
    """Passes of the fastest mode take 1, the others 2 and 3: after the trusted windows and the
    schedule the fastest runs nearly always (each other explored every EXPLORE_NEAR windows until
    RATIOS ratios against it, then as its cost says), and each other is still explored now and then."""
    others = [m for m in (PAUSED, ON, FREE) if m != fastest]
    costs = {fastest: 1.0, others[0]: 2.0, others[1]: 3.0}
    windows = FIRST + 3 * EXPLORE_FAR
    clock = ExitClock()
    modes = drive(clock, "k", by_mode(costs, 4 * windows))[::4]  # one per window
    assert modes[:FIRST] == [ON] * TRUSTED + list(SCHEDULE)
    later = modes[FIRST + 1 :]  # the first choice is made before the schedule's last window is timed
    assert later.count(fastest) >= len(later) - 2 * RATIOS - 4 and all(later.count(m) >= 2 for m in others)
    assert clock.tracks["k"].preferred() == fastest


def test_a_close_race_is_explored_more_often_than_a_clear_loss(small_windows):
    """ON within a few % of PAUSED is tried again every EXPLORE_NEAR windows, FREE (1.5x) rarely
    once RATIOS ratios say so (until then every EXPLORE_NEAR windows too)."""
    clock = ExitClock()
    windows = FIRST + (RATIOS + 8) * EXPLORE_NEAR
    modes = drive(clock, "k", by_mode({PAUSED: 1.0, ON: 1.03, FREE: 1.5}, 4 * windows))[::4][FIRST + 1 :]
    assert modes.count(FREE) <= RATIOS + 1
    late = modes[-8 * EXPLORE_NEAR :]
    assert late.count(ON) >= 6 and late.count(FREE) <= 1 and late.count(PAUSED) >= len(late) - 9
    assert explore_every(1.03) == EXPLORE_NEAR and explore_every(3.0) == EXPLORE_FAR and explore_every(None) == 8


def test_the_preference_follows_a_change_of_costs(small_windows):
    """ON dearer than PAUSED for a while, then cheaper: ON's exploring windows bring it back."""
    switch = 4 * (FIRST + 2 * EXPLORE_FAR)
    end = switch + 4 * 6 * EXPLORE_FAR
    before, after = {PAUSED: 1.0, ON: 2.0, FREE: 3.0}, {PAUSED: 2.0, ON: 1.0, FREE: 3.0}
    clock = ExitClock()
    modes = drive(clock, "k", lambda mode, i: None if i >= end else (before if i < switch else after)[mode])
    assert modes[4 * (FIRST + 1) : switch : 4].count(PAUSED) >= 2 * EXPLORE_FAR - 4 - 2 * RATIOS
    assert modes[-4 * 2 * EXPLORE_FAR :: 4].count(ON) >= 2 * EXPLORE_FAR - 4 - RATIOS  # on again
    assert clock.tracks["k"].preferred() == ON


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


def test_each_mode_decides_as_it_says_and_the_tokens_stay_the_models(monkeypatch):
    """Threshold 0 at exit 1 (every check fires; COMPUTE_BOUND: every leaver pays) with a clock on
    which passes take 3x as long unless paused: windows of 2 decode steps, one trusted, run on,
    then paused, on, free, on (batch 1: free leaves as on does), then every step is paused (full
    depth, filling what the other windows left). The tokens equal an uncached model's taking each
    step's token from the exit that schedule says."""
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
    # the prefill's token from the final head; decode steps 1-2 on, 3-4 paused, 5-10 on / free / on, then paused
    schedule = [layers] + [1, 1, layers, layers] + [1] * 6 + [layers] * (new - 11)
    assert res.exit_layers == schedule
    assert res.tokens == expected_by_schedule(model, [1, 2, 3, 4, 5], schedule)
    (track,) = decider.clock.tracks.values()
    assert track.ratio() > 1.0 and track.by_mode == [new - 11 + 2, 6, 2]
    # what the benchmarks read (decode_speed's and the sweep's paused and free shares)
    assert exit_clock.passes_by_mode(engine) == [new - 11 + 2, 6, 2]
    assert exit_clock.passes_by_mode(EarlyExitEngine(model)) == [0, 0, 0]  # parameter costs: no clock
    # threshold 1.0 evaluates no exit in any mode: not timed (no new track, no pass counted)
    engine.generate([[1, 2, 3, 4, 5]], GenerationSettings(**{**s.__dict__, "early_exit_threshold": 1.0}))
    assert len(decider.clock.tracks) == 1 and exit_clock.passes_by_mode(engine) == [new - 11 + 2, 6, 2]


def test_a_one_off_generation_within_the_trusted_windows_is_never_paused():
    """TRUSTED windows run on whatever the clock reads: the first TRUSTED * WINDOW decode steps of a
    policy and pass size decide as the decider's costs say (on passes 10x dearer here)."""
    clock = ExitClock()
    modes = drive(clock, "k", lambda mode, i: (10.0 if mode else 1.0) if i < TRUSTED * exit_clock.WINDOW + 1 else None)
    assert modes == [ON] * TRUSTED * exit_clock.WINDOW + [SCHEDULE[0]]


def test_the_keys_kept_are_bounded(monkeypatch):
    """A server's requests bring exit policies without end: the oldest (policy, size) goes first."""
    monkeypatch.setattr(exit_clock, "TRACKS", 3)
    clock = ExitClock(clock=lambda: 0.0)
    for key in ["a", "b", "c", "a", "d"]:
        clock.start(key)
        clock.stop()
    assert list(clock.tracks) == ["b", "c", "d"]


@pytest.mark.usefixtures("even_token")  # registers the measure "not_fifth"
def test_the_modes_decide_as_exact_cost_aware_and_full_decoding():
    """Batch 4, memory-bound costs, a measure that fires for some rows and not others: ON passes
    let the rows leave all together or not at all (cost_aware's rule), FREE passes let every firing
    row leave (exact's tokens and exits), PAUSED passes evaluate nothing (full decoding)."""
    model = make("llama")
    kw = dict(early_exit_threshold=0.5, measure="not_fifth", exit_layers=(2, 3))

    def run_in(mode: int | None, policy: str = "cost_aware"):
        engine = engine_with(model, MEMORY_BOUND)
        if mode is not None:
            engine.passes.exit_decider.clock = FixedMode(mode)
        return run(engine, PROMPTS, exit_policy=policy, **kw)

    exact, aware = run_in(None, "exact"), run_in(None)
    assert exact != aware  # the measure does split passes: the two rules differ here
    assert run_in(FREE) == exact
    assert run_in(ON) == aware
    full = run(engine_with(model, MEMORY_BOUND), PROMPTS)
    assert run_in(PAUSED) == full and full[1] == [[model.config.num_layers] * NEW] * len(PROMPTS)


def test_full_decodings_passes_are_kept_unless_another_mode_beats_them_by_the_margin(small_windows):
    """ON 1% faster than PAUSED (within MARGIN): PAUSED kept; 5% faster: ON."""
    for on, kept in ((0.99, PAUSED), (0.95, ON)):
        clock = ExitClock()
        drive(clock, "k", by_mode({PAUSED: 1.0, ON: on, FREE: 2.0}, 4 * (FIRST + 2 * EXPLORE_FAR)))
        assert clock.tracks["k"].preferred() == kept


def test_paused_passes_run_as_full_decoding_without_stopping_at_their_exits(monkeypatch):
    """A paused pass (`exit_decision.exits_paused`) is full decoding's pass: its uniform step makes
    and asks no check (none is built for the policy, none counted), its general path checks no exit;
    a pass of the same policy with exits on afterwards still evaluates them (the checks a paused
    pass did not build are built then) and every token leaves at threshold 0."""
    from megatron.early_exit.inference import passes as passes_module

    model = make("llama")
    made, checked = [], []
    real_checks, real_check_exit = passes_module.uniform_checks, passes_module.Passes.check_exit
    monkeypatch.setattr(passes_module, "uniform_checks", lambda *a: made.append(a[2]) or real_checks(*a))
    monkeypatch.setattr(
        passes_module.Passes, "check_exit", lambda *a, **k: checked.append(a[2]) or real_check_exit(*a, **k)
    )
    engine = engine_with(model, MEMORY_BOUND)
    decider = engine.passes.exit_decider
    decider.clock = FixedMode(PAUSED)
    kw = dict(early_exit_threshold=0.0, exit_layers=(2,), exit_policy="cost_aware")
    full = EarlyExitEngine(model).generate(PROMPTS, GenerationSettings(max_new_tokens=NEW, ignore_eos=True))
    paused = run(engine, PROMPTS, **kw)
    assert paused == ([r.tokens for r in full], [r.exit_layers for r in full])  # full decoding's tokens and exits
    assert all(layers == [model.config.num_layers] * NEW for layers in paused[1])
    assert made == [] and checked == [] and not decider.skipped and not decider.seen
    decider.clock = FixedMode(FREE)  # every exit evaluated, every firing row leaves
    tokens, exits = run(engine, PROMPTS, **kw)
    assert made and all(layers[1:] == [2] * (NEW - 1) for layers in exits)


def test_where_nothing_has_fired_no_free_window_runs_and_the_trusted_windows_end(small_windows):
    """Nothing fired: one trusted window, then paused and on alone (the schedule's free window and
    the on window after it left out), and FREE never explored however cheap it would be; once a
    row fires, FREE (unknown) is explored within EXPLORE_NEAR windows and the mode it is kept
    where it is fastest."""
    costs = {PAUSED: 1.0, ON: 1.01, FREE: 0.5}
    quiet = 4 * (1 + 2 + 3 * EXPLORE_FAR)  # passes before the first row fires
    clock = ExitClock()
    modes = drive(clock, "k", by_mode(costs, quiet + 4 * (2 * EXPLORE_FAR)), fired=lambda i: i >= quiet)[::4]
    assert modes[:3] == [ON, PAUSED, ON] and FREE not in modes[: quiet // 4]
    assert modes[3 : quiet // 4].count(PAUSED) >= len(modes[3 : quiet // 4]) - 3 * EXPLORE_FAR // EXPLORE_NEAR - 1
    assert FREE in modes[quiet // 4 : quiet // 4 + EXPLORE_NEAR + 2]
    assert clock.tracks["k"].preferred() == FREE and modes[-EXPLORE_FAR:].count(FREE) >= EXPLORE_FAR - 8


def test_a_row_that_fires_in_the_trusted_windows_keeps_them_and_the_schedule_whole(small_windows):
    """A row fired from the first pass, or within the first window: TRUSTED windows on, then paused,
    on, free, on."""
    modes = drive(ExitClock(), "k", by_mode({PAUSED: 1.0, ON: 1.0, FREE: 1.0}, 4 * FIRST))[::4]
    assert modes == [ON] * TRUSTED + list(SCHEDULE)
    late = drive(ExitClock(), "k", by_mode({PAUSED: 1.0, ON: 1.0, FREE: 1.0}, 4 * FIRST), fired=lambda i: i >= 2)
    assert late[::4][: TRUSTED + len(SCHEDULE)] == [ON] * TRUSTED + list(SCHEDULE)  # fired within the first window


def test_the_decider_says_an_exit_may_fire_until_it_is_evaluated_without_firing_or_once_one_fired():
    """`ExitDecider.may_fire`: per (exit, measure, threshold) of the policy, from `record`'s counts in
    any mode and pass size: an exit evaluated fewer than QUIET_EVALUATIONS times may fire (not known:
    a free window would evaluate it); evaluated so without a row firing, it does not; once a row of
    it fired, it does. Another threshold's or measure's firing is not this policy's."""
    passes = EarlyExitEngine(make("llama")).passes
    decider = ExitDecider()
    policy = ExitPolicy(allowed=(1, 2), threshold=0.5, mode="cost_aware")
    assert decider.may_fire(passes, policy)  # nothing evaluated yet
    for _ in range(QUIET_EVALUATIONS):
        decider.record(2, policy, candidates=4, fired=0, paid=False)
    assert decider.may_fire(passes, policy)  # exit 1 not evaluated enough yet
    for _ in range(QUIET_EVALUATIONS - 1):
        decider.record(1, policy, candidates=4, fired=0, paid=False)
    assert decider.may_fire(passes, policy)
    decider.record(1, policy, candidates=4, fired=0, paid=False)
    assert not decider.may_fire(passes, policy)  # both quiet
    decider.record(2, ExitPolicy(allowed=(2,), threshold=0.6, mode="cost_aware"), candidates=4, fired=1, paid=False)
    decider.record(2, ExitPolicy(allowed=(2,), threshold=0.5, measure="learned", mode="cost_aware"), 4, 1, False)
    assert not decider.may_fire(passes, policy)
    decider.record(2, policy, candidates=4, fired=1, paid=False)  # fired, though leaving did not pay
    assert decider.may_fire(passes, policy)
    one = ExitPolicy(allowed=(1,), threshold=0.5, mode="cost_aware")
    assert not decider.may_fire(passes, one)  # exit 1 evaluated, never fired


def test_one_lucky_window_does_not_put_off_exploring_for_long(small_windows):
    """ON's windows in the trusted phase and the schedule run at a quarter of PAUSED's cost (rows that
    happened to leave), then at 1.1x: the first ratios prefer ON by far, but PAUSED, short of
    RATIOS ratios, is explored every EXPLORE_NEAR windows (not once in EXPLORE_FAR) and wins back
    within a few explorations."""
    costs = lambda mode, i: None if i >= 4 * (FIRST + 8 * EXPLORE_NEAR) else {  # noqa: E731
        PAUSED: 1.0, ON: 0.25 if i < 4 * FIRST else 1.1, FREE: 2.0
    }[mode]  # fmt: skip
    clock = ExitClock()
    modes = drive(clock, "k", costs)[::4]
    assert clock.tracks["k"].preferred() == PAUSED
    assert modes[-2 * EXPLORE_NEAR :].count(PAUSED) >= 2 * EXPLORE_NEAR - 3


def test_a_fixed_mode_clock_holds_its_mode_and_counts_its_passes():
    """`FixedMode` (decode_speed's --clock-modes): every pass in its mode, counted as `passes_by_mode`
    reads them; a mode that is none of the three is refused."""
    clock = FixedMode(FREE)
    for _ in range(3):
        assert clock.start(("policy", 4), fired=False) == FREE
        clock.stop()
    assert [t.by_mode for t in clock.tracks.values()] == [[0, 0, 3]]
    with pytest.raises(ValueError, match="FixedMode: mode 3"):
        FixedMode(3)

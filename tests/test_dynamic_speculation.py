"""Dynamic self-speculation (`draft_exit_layer` / `num_draft_tokens` "auto"): lossless against
full greedy decoding in fp32 at batch 1 and 4, on a model whose exit equals its final head
(drafts always agree: the controller must draft long) and on one whose exits are random
(drafts almost never agree: it must fall back to plain steps); and the controller alone on
synthetic acceptance: it picks what the formula says and follows a change of acceptance.
"""

import math
from dataclasses import replace

import pytest
import torch

from megatron.early_exit.config import ModelConfig
from megatron.early_exit.inference import EarlyExitEngine, GenerationSettings, generate, native
from megatron.early_exit.inference.strategies.draft_control import (
    EXCESS_DECAY,
    LOOP_DECAY,
    LOOP_PLAIN_EVERY,
    LOOP_PRIOR,
    MAX_BACKOFF,
    MAX_DRAFT,
    MAX_PLAIN_RUN,
    OBSERVE_COST,
    OBSERVE_NEAR,
    OBSERVE_WINDOW,
    UNIT_EARLY,
    UNIT_RUN,
    UNIT_SETTLE,
    WARM_EXPLORE_SHARE,
    DraftController,
    DraftCosts,
    LoopClock,
    Plan,
    expected_tokens,
)
from megatron.early_exit.model import EarlyExitGPT
from tests.test_inference import naive_greedy
from tests.test_native_drafts import keeps

PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15], [3]]
NEW = 40

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def build(good: bool) -> EarlyExitGPT:
    """6 layers, exits at 1 and 3. good: layers 2..6 add nothing (output projections zeroed)
    and exit 1 is a copy of the final norm on the tied head, so its logits are the final
    head's. bad: untied exits with large random projections (they disagree ~63/64 of the time)."""
    cfg = ModelConfig(
        num_layers=6, hidden_size=32, num_attention_heads=4, vocab_size=64, max_position_embeddings=128,
        normalization="RMSNorm", swiglu=True, position_embedding_type="rope", add_bias_linear=False,
        exit_layer_nums=[1, 3], use_exit_norm=True, untie_exit_output_weights=not good,
    )  # fmt: skip
    model = EarlyExitGPT(cfg)
    model.init_weights(5)
    with torch.no_grad():
        if good:
            for i in range(1, 6):
                layer = model.decoder.layers[str(i)]
                layer.self_attention.linear_proj.weight.zero_()
                layer.mlp.linear_fc2.weight.zero_()
            model.exits["1"].norm.load_state_dict(model.decoder.final_layernorm.state_dict())
        else:
            gen = torch.Generator().manual_seed(0)
            for n in ("1", "3"):
                w = model.exits[n].output_layer.weight
                w.copy_(torch.randn(w.shape, generator=gen) * 3.0)
    return model.eval()


@pytest.fixture(scope="module", params=["good", "bad"])
def case(request):
    model = build(request.param == "good")
    return request.param, model, [naive_greedy(model, p, NEW) for p in PROMPTS]


def test_defaults_are_auto():
    s = GenerationSettings()
    assert (s.draft_exit_layer, s.num_draft_tokens) == ("auto", "auto")


@pytest.mark.parametrize("batch", [1, 4])
def test_auto_equals_full_greedy_and_adapts(case, batch):
    kind, model, ref = case
    res = generate(model, None, PROMPTS[:batch], strategy="self_speculative", max_new_tokens=NEW, ignore_eos=True)
    assert [r.tokens for r in res] == ref[:batch]
    for r in res:
        st = r.stats
        assert sum(st["draft_lengths"].values()) == sum(st["draft_exits"].values()) + st["draft_lengths"].get(0, 0)
        if kind == "good":
            assert st["acceptance_rate"] > 0.95
            # at most one plain round: exit 3's cold try, read on the way where one drafted token
            # would not pay at the prior's estimate
            assert st["draft_lengths"].get(0, 0) <= 1
            assert st["draft_exits"].get(1, 0) > st["draft_exits"].get(3, 0)  # the cheaper exit wins
            assert st["drafted"] / sum(st["draft_exits"].values()) > 2.5  # long drafts (they grow with the evidence)
            assert len(r.tokens) / sum(st["draft_lengths"].values()) > 3  # > 3 tokens per verify pass
        else:
            assert st["acceptance_rate"] < 0.2
            assert st["plain_share"] > 0.75  # falls back to plain full steps


def test_fixed_settings_keep_their_exit_and_length(case):
    _, model, ref = case
    res = generate(
        model, None, PROMPTS, strategy="self_speculative", max_new_tokens=NEW, ignore_eos=True,
        draft_exit_layer=3, num_draft_tokens=2,
    )  # fmt: skip
    assert [r.tokens for r in res] == ref
    for r in res:
        assert set(r.stats["draft_exits"]) == {3} and set(r.stats["draft_lengths"]) <= {0, 1, 2}
        assert r.stats["plain_share"] < 0.1  # only the last round of a sequence may have no room to draft


def test_auto_length_with_a_fixed_exit_and_exit_layers(case):
    kind, model, ref = case
    for kw in (dict(draft_exit_layer=3), dict(exit_layers=(3,))):
        res = generate(model, None, PROMPTS[:2], strategy="self_speculative", max_new_tokens=NEW, ignore_eos=True, **kw)
        assert [r.tokens for r in res] == ref[:2]
        assert all(set(r.stats["draft_exits"]) <= {3} for r in res)


def test_bad_draft_settings_are_named():
    model = build(True)
    for kw, name in (
        (dict(num_draft_tokens="many"), "num_draft_tokens"),
        (dict(num_draft_tokens=0), "num_draft_tokens"),
        (dict(draft_exit_layer="deep"), "draft_exit_layer"),
        (dict(draft_exit_layer=6), "draft_exit_layer"),
        (dict(exit_layers=(6,)), "exit_layers"),
    ):
        with pytest.raises(ValueError, match=name):
            generate(model, None, PROMPTS[:1], strategy="self_speculative", max_new_tokens=4, **kw)


def test_engine_controller_persists_and_takes_measured_costs():
    from megatron.early_exit.inference.cost_model import DecodeCosts
    from megatron.early_exit.inference.strategies.self_speculative import controller_for

    engine = EarlyExitEngine(build(False))
    s = GenerationSettings("self_speculative", NEW, ignore_eos=True)
    engine.generate(PROMPTS[:1], s)
    ctl = controller_for(engine)
    assert ctl.acceptance(1) < 0.3 and ctl.acceptance(3) < 0.5  # learned, and kept for the next call
    before = (ctl.stats[1].rejected, ctl.stats[1].idle)
    engine.generate(PROMPTS[:1], s)
    assert controller_for(engine) is ctl
    assert (ctl.stats[1].rejected, ctl.stats[1].idle) != before  # it went on counting (and learning)
    # A measured cost model replaces the parameter count: layer 1, fixed 2, head 3 (full step 2 + 6 + 3 = 11).
    engine.decode_costs = DecodeCosts(
        6, {1: 1, 3: 3}, layer=1.0, fixed=2.0, head=3.0, vocab={1: 3.0, 3: 3.0}, row=0.1, pend=0.2
    )  # fmt: skip
    measured = controller_for(engine)
    assert measured is ctl and ctl.stats[1].rejected > 0  # new costs, the acceptance learned so far kept
    assert measured.costs.draft[1] == pytest.approx((2 + 1 + 3) / 11)
    assert measured.costs.row[3] == pytest.approx((3 * 0.1 + 0.1 * 3) / 11)
    assert measured.costs.base[3] == pytest.approx(1 + 3 * 0.2 / 11)  # 3 layers above exit 3 on the pending path
    engine.decode_costs = replace(engine.decode_costs, pend_pass=0.5)  # and what a filling pass pays once
    assert controller_for(engine).costs.base[3] == pytest.approx(1 + (3 * 0.2 + 0.5) / 11)
    engine.decode_costs = replace(engine.decode_costs, pend_pass=0.0)
    # Weights from memory (`cost_model.WeightCache`): rounds alternate shallow and full-depth steps, so
    # layers and head are priced streamed: a layer 1.5, the head 4 (full step 2 + 9 + 4 = 15).
    engine.decode_costs = replace(
        engine.decode_costs, cold={"layer": 0.5, "head": 1.0}, reads={"layer": ("l", 1.0), "head": ("h", 1.0)}
    )
    assert controller_for(engine).costs.draft[1] == pytest.approx((2 + 1.5 + 3) / 15)


# ----- the controller alone ------------------------------------------------------------------

COSTS = DraftCosts(draft={2: 0.2, 6: 0.6}, row={2: 0.02, 6: 0.01})


def best_by_formula(a: dict[int, float]) -> tuple[int | None, int]:
    best, plan = 1.0, (None, 0)
    for n in COSTS.draft:
        for g in range(1, MAX_DRAFT + 1):
            rate = expected_tokens(a[n], g) / COSTS.round_time(n, g)
            if rate > best + 1e-9:
                best, plan = rate, (n, g)
    return plan


def feed(ctl: DraftController, n: int, g: int, a: float, rounds: int = 1) -> None:
    """`rounds` verify rounds of exit n whose agreeing prefix is the expected one for acceptance a."""
    ok = min(g, round(a * g))
    for _ in range(rounds):
        ctl.update(n, [([0.9] * g, ok)])


def learn(ctl: DraftController, plan: Plan, a: dict[int, float]) -> None:
    """What a round of `plan` teaches the controller where exit n's drafts agree at a[n]: its drafts
    (`feed`), and the exit it reads on the way (`Plan.observe`), one draft's worth."""
    if plan.exit is not None:
        feed(ctl, plan.exit, plan.length, a[plan.exit])
    if plan.observe is not None:
        feed(ctl, plan.observe, 1, a[plan.observe])


def tried(plans: list, n: int) -> list[int]:
    """The rounds that tried exit n: an exploratory draft, or a plain round reading its token."""
    return [i for i, p in enumerate(plans) if (p.exit == n and p.explore) or (p.exit is None and p.observe == n)]


def test_expected_tokens_and_round_time():
    assert expected_tokens(0.5, 0) == 1.0
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)
    assert expected_tokens(1.0, 4) == 5.0
    assert COSTS.round_time(2, 0) == 1.0
    assert COSTS.round_time(2, 3) == pytest.approx(3 * 0.2 + 1.0 + 3 * 0.02)


def test_controller_picks_what_the_formula_says():
    ctl = DraftController(COSTS, explore_share=1e-9)  # exploration far apart
    for st in ctl.stats.values():
        st.idle = 0
    ctl.stats[2].accepted, ctl.stats[2].rejected = 80.0, 20.0  # a ~0.8 at the shallow exit
    ctl.stats[6].accepted, ctl.stats[6].rejected = 98.0, 2.0  # ~0.97 at the deep one
    a = {n: ctl.acceptance(n) for n in COSTS.draft}
    plan = ctl.plan([2, 6], list(range(1, MAX_DRAFT + 1)))
    assert (plan.exit, plan.length) == best_by_formula(a)
    assert plan.exit == 2 and 3 <= plan.length <= MAX_DRAFT
    assert plan.rate == pytest.approx(expected_tokens(a[2], plan.length) / COSTS.round_time(2, plan.length))
    ctl.stats[2].accepted, ctl.stats[2].rejected = 5.0, 95.0  # shallow exit now bad: the deep one
    plan = ctl.plan([2, 6], list(range(1, MAX_DRAFT + 1)))
    assert plan.exit == 6 and (plan.exit, plan.length) == best_by_formula({n: ctl.acceptance(n) for n in COSTS.draft})
    ctl.stats[6].accepted, ctl.stats[6].rejected = 20.0, 80.0  # both bad: a plain step
    assert ctl.plan([2, 6], list(range(1, MAX_DRAFT + 1))).exit is None


def test_controller_falls_back_explores_and_recovers():
    ctl = DraftController(COSTS, explore_share=0.01)
    every = ctl.interval(2, 1)  # rounds between exploratory drafts
    assert every == 22  # ceil((0.2 + 0.02) / 0.01)
    lengths = list(range(1, MAX_DRAFT + 1))
    trace = []
    for phase_a in (0.9, 0.0, 0.9):
        picks = []
        for _ in range(200):
            plan = ctl.plan([2], lengths)
            if plan.exit is not None:
                feed(ctl, 2, plan.length, phase_a)
            picks.append(plan.length)
        trace.append(picks)
    good, bad, again = trace
    assert sum(g >= 4 for g in good[20:]) > 170  # drafts long while acceptance is high
    assert sum(g == 0 for g in bad[50:]) > 140  # then falls back to plain steps
    # but for exploratory tries, each failed one doubling the interval up to MAX_BACKOFF times
    assert 150 // (MAX_BACKOFF * every + 1) <= sum(g > 0 for g in bad[50:]) <= 150 // (MAX_BACKOFF * every) + 1
    assert sum(g >= 4 for g in again[100:]) > 90  # and finds the exit again when it recovers


def test_failed_exploration_backs_off_and_an_accepted_draft_resets_it():
    """Each exploratory try that accepts nothing doubles the exit's interval, up to MAX_BACKOFF;
    a rejected round the controller chose (not a try) leaves it; an accepted draft resets it. A
    bad exit's try on a plain round reads its token on the way (no draft: one drafted token would
    not pay at its estimate), and backs off alike."""
    ctl = DraftController(COSTS, explore_share=0.01)
    ctl.stats[2].rejected = 20.0  # a bad exit: it is only tried
    every = ctl.interval(2, 1)
    seen, plans = [], []
    for _ in range(20 * every):
        plan = ctl.plan([2], [1])
        plans.append(plan)
        assert plan.exit is None  # never a draft
        if plan.observe == 2:
            learn(ctl, plan, {2: 0.0})
            seen.append(ctl.interval(2, 1) // every)
    assert seen[:4] == [2, MAX_BACKOFF, MAX_BACKOFF, MAX_BACKOFF]
    assert tried(plans, 2)[:3] == [0, 2 * every + 1, 2 * every + 1 + MAX_BACKOFF * every + 1]  # tried at once cold
    ctl.update(2, [([0.9], 0)])  # a chosen round rejected: no change
    assert ctl.interval(2, 1) == MAX_BACKOFF * every
    ctl.update(2, [([0.9, 0.9], 1), ([0.9], 0)])  # one sequence's draft accepted
    assert ctl.interval(2, 1) == every


def test_controller_decides_with_measured_round_costs():
    """Costs as `draft_costs` measures them (a round's base besides its drafts): the CPU
    reference model's case, acceptance 0.82 from exit 6. A draft priced at 0.65 of a step and a
    full step's verify: 1 draft, 1.07 tokens per step (2: 1.04); at the clock's 0.40 with a verify
    of 1.05 steps, 2 drafts give (1 + .82 + .82^2) / (2 * 0.45 + 1.05) = 1.28 (1: 1.22, 3: 1.27)."""
    lengths = list(range(1, MAX_DRAFT + 1))

    def planned(costs: DraftCosts) -> tuple:
        ctl = DraftController(costs, explore_share=1e-9, margin=0.0)  # the choice by estimates
        ctl.stats[6].accepted, ctl.stats[6].rejected, ctl.stats[6].idle = 83.0, 17.0, 0
        ctl.stats[3].accepted, ctl.stats[3].rejected, ctl.stats[3].idle = 10.0, 90.0, 0
        plan = ctl.plan([3, 6], lengths)
        return plan.exit, plan.length, plan.rate

    assert planned(DraftCosts({3: 0.4, 6: 0.65}, {3: 0.07, 6: 0.05}))[:2] == (6, 1)
    exit_, length, rate = planned(DraftCosts({3: 0.3, 6: 0.40}, {3: 0.07, 6: 0.05}, base={3: 1.05, 6: 1.05}))
    a = 84.0 / 102.0  # the Beta(1, 1) prior's posterior mean
    assert (exit_, length) == (6, 2)
    assert rate == pytest.approx(expected_tokens(a, 2) / (2 * 0.45 + 1.05))
    # A verify pass that costs more than a step by itself (base 1.6) moves the best length up to 3.
    assert planned(DraftCosts({3: 0.3, 6: 0.40}, {3: 0.07, 6: 0.05}, base={3: 1.6, 6: 1.6}))[:2] == (6, 3)


def test_measured_draft_costs_come_from_timed_rounds(monkeypatch):
    """`measure_draft_costs` fits the rounds' ratios to a plain round; the controller takes them on
    first use where costs may come from the clock, once per batch-size bucket."""
    from megatron.early_exit.inference.strategies import self_speculative as ss
    from megatron.early_exit.inference.strategies.draft_costs import costs_of, measure_draft_costs

    t = {f"{k} {n}/{g}": v for n in (1, 3) for k, g, v in
         (("draft", 1, 0.5), ("draft", 4, 1.7), ("round", 1, 1.6), ("round", 4, 3.4))}  # fmt: skip
    c = costs_of(t, [1, 3])
    assert (c.draft[3], c.row[3], c.base[3]) == pytest.approx((0.4, 0.2, 1.0))
    t.update({"round 3/1": 1.4, "round 3/4": 3.2})  # a fitted base of 0.8: below a plain step, noise
    c = costs_of(t, [1, 3])
    assert (c.draft[3], c.row[3], c.base[3]) == pytest.approx((0.4, (0.4 + 4 * 2.2) / 17 - 0.4, 1.0))
    t.update({"round 3/1": 1.8, "round 3/4": 3.6})  # base 1.2 at exit 3, 1.0 at exit 1: one base, 1.1
    c = costs_of(t, [1, 3])
    assert c.base == pytest.approx({1: 1.1, 3: 1.1})
    assert c.row[3] == pytest.approx((0.7 + 4 * 2.5) / 17 - 0.4)
    assert c.row[1] == pytest.approx((0.5 + 4 * 2.3) / 17 - 0.4)
    assert c.alt == c.alt_base == {}  # no alternative rounds timed
    t.update({"alt 3/1": 1.8 + 0.15, "alt 3/4": 3.6 + 0.3, "alt 1/1": 1.6, "alt 1/4": 3.4})
    c = costs_of(t, [1, 3])  # what g alternatives add: 0.1 + 0.05 g at exit 3; nothing (not below 0) at exit 1
    assert (c.alt[3], c.alt_base[3], c.alt[1], c.alt_base[1]) == pytest.approx((0.05, 0.1, 0.0, 0.0))
    t.update({f"loop {n}/{g}": v for n in (1, 3) for g, v in ((1, 1.6), (4, 3.1))})  # as the native loop runs them
    c = costs_of(t, [1, 3])  # they price the rounds (base 1.1, slope 0.5); alternatives stay on run_plan's rounds
    assert (c.base[3], c.row[3], c.row[1], c.draft[3]) == pytest.approx((1.1, 0.1, 0.1, 0.4))
    assert (c.alt[3], c.alt_base[3]) == pytest.approx((0.05, 0.1))
    engine = EarlyExitEngine(build(True))
    costs, ratios = measure_draft_costs(engine, 2, 9, repeats=1)
    assert set(ratios) == {f"{k} {n}/{g}" for k in ("round", "draft", "alt") for n in (1, 3) for g in (1, 4)}
    assert all(v > 0 for v in ratios.values()) and set(costs.base) == set(costs.alt) == set(costs.alt_base) == {1, 3}
    calls = []
    monkeypatch.setattr(ss, "measure_draft_costs", lambda e, b, n, lookup=False: calls.append((b, n)) or (c, {}))
    monkeypatch.setenv("EE_EXIT_COSTS", "measured")
    res = engine.generate(PROMPTS[:3], GenerationSettings("self_speculative", 8, ignore_eos=True))
    assert calls[0] == (4, 7)  # 3 sequences: the bucket of 4, the longest prompt
    assert {b for b, _ in calls} <= {1, 2, 4} and ss.controller_for(engine, 4).costs is c
    assert [r.tokens for r in res] == [naive_greedy(engine.model, p, 8) for p in PROMPTS[:3]]


def test_a_timed_verify_row_is_never_below_the_weight_count_models(monkeypatch):
    """Timed draft costs whose fit put a verify row below what the weight-count model gives it (a
    row at ROW_SHARE of reading the layers above the exit and the head; at 0.00 on a noisy host) take
    that model's row (`self_speculative.rows_at_least`); a row timed above it is kept, as are the
    drafts and the base; costs from weight counts alone are not touched."""
    from megatron.early_exit.inference.strategies import self_speculative as ss

    engine = EarlyExitEngine(build(True))
    floor = ss.weight_count_costs(engine)
    timed = DraftCosts({1: 0.2, 3: 0.4}, {1: 0.0, 3: floor.row[3] + 0.3}, {1: 1.3, 3: 1.3})
    monkeypatch.setattr(ss, "measure_draft_costs", lambda e, b, n, lookup=False: (timed, {}))
    monkeypatch.setenv("EE_EXIT_COSTS", "measured")
    got = ss.draft_costs_for(engine, 1, 8)
    assert 0.0 < floor.row[1] and got.row == {1: floor.row[1], 3: floor.row[3] + 0.3}
    assert got.draft == {1: 0.2, 3: 0.4} and got.base == {1: 1.3, 3: 1.3}
    monkeypatch.setenv("EE_EXIT_COSTS", "parameters")
    assert ss.draft_costs_for(engine, 1, 8).row == floor.row


def test_early_stop_learns_from_confidence():
    """Per max-probability bin the controller learns how often a draft is accepted (prior: the
    exit's acceptance); a sequence drafts on while P(its drafts so far are accepted) * a_n, the
    chance that one more adds a token, pays for the draft at the plan's rate."""
    ctl = DraftController(COSTS)
    plan = ctl.plan([2], [4])
    plan.explore = False
    a = ctl.acceptance(2)
    assert ctl.draft_ok(2, 0.3) == pytest.approx(a)  # no draft seen in the bin: the prior alone
    for _ in range(30):  # confident drafts agree, unsure ones do not
        ctl.update(2, [([0.95, 0.95, 0.1], 2)])
    a = ctl.acceptance(2)
    assert ctl.draft_ok(2, 0.95) > 0.95 and ctl.draft_ok(2, 0.1) < 0.05
    acc, rej = ctl.stats[2].bins[0]
    assert ctl.draft_ok(2, 0.1) == pytest.approx((acc + a) / (acc + rej + 1))
    threshold = plan.rate * (COSTS.draft[2] + COSTS.row[2])
    for confs in ([0.95], [0.95, 0.95], [0.1], [0.95, 0.1], [0.95] * 40):
        gain = a * math.prod(ctl.draft_ok(2, c) for c in confs)
        assert ctl.keep_drafting(plan, confs) == (gain >= threshold)
    assert ctl.keep_drafting(plan, [0.95, 0.95]) and not ctl.keep_drafting(plan, [0.95, 0.1])
    assert DraftController(COSTS, stop_early=False).keep_drafting(plan, [0.1])


def test_the_early_stops_numbers_decide_as_keep_drafting():
    """The numbers a native loop stops drafts by (`stop_numbers`, `native.EarlyStop`: no call back
    into Python after each draft) make `keep_drafting`'s decision for every run of confidences
    (bins learned unevenly, the loop clock's factor in the bar); none where every draft is kept."""
    ctl = DraftController(COSTS)
    ctl.use_loop_clock()
    ctl.loop.excess[(1, 2)] = (1.3, 1.0)  # rounds from exit 2 dearer in the loop: the bar carries it
    for _ in range(20):
        ctl.update(2, [([0.95, 0.7, 0.45, 0.1], 3), ([0.05, 0.99], 0)])
    plan = Plan(2, 4, ctl.rate(2, 4), limit=8)
    stop = native.EarlyStop(*ctl.stop_numbers(plan))
    assert stop.bar == pytest.approx(plan.rate * 1.3 * (COSTS.draft[2] + COSTS.row[2]))
    gen = torch.Generator().manual_seed(0)
    decided = []
    for _ in range(400):
        confs = [float(c) for c in torch.rand(int(torch.randint(1, 9, (1,), generator=gen)), generator=gen)]
        confs = [float(torch.tensor(c, dtype=torch.float32)) for c in confs + [1.0, 0.125, 0.0][: len(confs) % 4]]
        decided.append(ctl.keep_drafting(plan, confs))
        assert keeps(stop, confs) == decided[-1], confs
    assert 0 < sum(decided) < len(decided)  # both decisions made
    assert ctl.stop_numbers(replace(plan, explore=True, limit=None)) is None  # a try capped at its length
    assert DraftController(COSTS, stop_early=False).stop_numbers(plan) is None
    with pytest.raises(ValueError, match="alternatives"):
        ctl.stop_numbers(replace(plan, alternatives=True))


def test_early_stop_plans_drafts_up_to_the_longest_length():
    """With the early stop on, a chosen plan at batch 1 caps its drafts at the longest length
    allowed (the stop ends them), and so does a try on a round that would be plain (its stop
    weighing each further draft at a plain round's rate at least); without it, in a batch, or a
    try beside a drafting plan, at its own length (a try capped so drafts it whole)."""
    ctl = DraftController(COSTS, agreement={2: 0.8, 6: 0.9})
    plan = ctl.plan([2, 6], list(range(1, 6)))
    assert not plan.explore and plan.exit is not None and plan.length < 5 and plan.cap == 5
    fixed = DraftController(COSTS, stop_early=False, agreement={2: 0.8, 6: 0.9}).plan([2, 6], list(range(1, 6)))
    assert (fixed.exit, fixed.length) == (plan.exit, plan.length) and fixed.cap == fixed.length
    batched = DraftController(COSTS, agreement={2: 0.8, 6: 0.9}).plan([2, 6], list(range(1, 6)), batch=4)
    assert (batched.exit, batched.length) == (plan.exit, plan.length) and batched.cap == batched.length
    cold_ctl = DraftController(COSTS)
    cold = cold_ctl.plan([2], [3, 4])  # a cold try whose drafts pay at the prior's 0.5, on a plain round
    assert cold.explore and cold.length == 3 and cold.cap == 4 and cold.rate >= 1.0
    assert cold_ctl.keep_drafting(cold, [0.9]) == cold_ctl.keep_drafting(replace(cold, explore=False), [0.9])
    assert not cold_ctl.keep_drafting(cold, [0.01] * 3)  # its stop ends unsure drafts
    capped = replace(cold, limit=None)  # as a try beside a drafting plan: its length, whole
    assert cold_ctl.keep_drafting(capped, [0.01] * 2)
    in_batch = DraftController(COSTS).plan([2], [3, 4], batch=4)
    assert in_batch.explore and in_batch.length == in_batch.cap == 3


def test_costs_from_config_price_a_smollm2_shape():
    from megatron.early_exit.inference.strategies.draft_control import FIXED_LAYERS, costs_from_config

    cfg = ModelConfig(
        num_layers=30, hidden_size=576, ffn_hidden_size=1536, num_attention_heads=9, num_query_groups=3,
        vocab_size=49152, max_position_embeddings=2048, swiglu=True, normalization="RMSNorm",
        position_embedding_type="rope", exit_layer_nums=[8, 22], use_exit_mlp=True, use_exit_norm=True,
    )  # fmt: skip
    layer = 576 * (9 + 6) * 64 + 9 * 64 * 576 + 3 * 576 * 1536  # qkv + proj + swiglu MLP
    head = 49152 * 576 / layer  # ~8 layers: the DESIGN's measured fact
    assert 7.5 < head < 8.5
    costs = costs_from_config(cfg, {8: 8, 22: 22})
    full = FIXED_LAYERS + 30 + head
    assert costs.draft[8] == pytest.approx((FIXED_LAYERS + 8 + 3 * 576 * 1536 / layer + head) / full)
    assert costs.draft[8] < costs.draft[22] < 1.0
    assert costs.row[22] < costs.row[8]  # fewer layers above the deeper exit
    # Agreement like the tuned SmolLM2's (31-48%) never pays with these costs: plain decoding.
    ctl = DraftController(costs)
    for n in (8, 22):
        ctl.stats[n].accepted, ctl.stats[n].rejected, ctl.stats[n].idle = 480.0, 520.0, 0
    assert ctl.plan([8, 22], list(range(1, MAX_DRAFT + 1))).exit is None
    # A draft vocabulary of 4096 tokens: a draft's projection reads 1/12 of the head's weights,
    # and at 48% agreement a draft from exit 8 now pays (what the calibration record's buys).
    small = costs_from_config(cfg, {8: 8, 22: 22}, draft_vocab=4096)
    assert small.draft[8] == pytest.approx((FIXED_LAYERS + 8 + 3 * 576 * 1536 / layer + head / 12) / full)
    assert small.row == costs.row
    ctl.costs = small
    assert ctl.plan([8, 22], list(range(1, MAX_DRAFT + 1))).exit == 8


def test_ee_sweep_writes_a_self_speculative_row(tmp_path):
    import csv
    import json

    from tests.test_ee_sweep import main, sweep_inputs

    row = {"abstract": "We study early exit in language models.", "challenge": "a", "approach": "b", "outcome": "c"}
    ck, data = sweep_inputs(tmp_path, [row])
    out = tmp_path / "out"
    main(["--load", ck, "--data", data, "--output", str(out), "--thresholds", "1.0",
          "--max-new-tokens", "6", "--batch-size", "1", "--cost-steps", "2", "--self-speculative",
          "--draft-alternatives", "both"])  # fmt: skip
    with open(out / "self_speculative.csv") as f:
        spec, off = list(csv.DictReader(f))
    with open(out / "sweep.csv") as f:
        (full,) = list(csv.DictReader(f))
    assert spec["setting"] == "self_speculative auto, alternatives" and spec["identical_to_full"] == "True"
    assert off["setting"] == "self_speculative auto" and off["identical_to_full"] == "True"
    assert off["alternatives_kept"] == "0" and int(spec["alternatives_kept"]) >= 0
    assert spec["rougeL_reference"] == full["rougeL_reference"]  # lossless: the full model's text
    assert 0.0 <= float(spec["acceptance_rate"]) <= 1.0 and 0.0 <= float(spec["plain_share"]) <= 1.0
    assert set(json.loads(spec["draft_exits"])) <= {"1"}
    assert all(len(v) == 5 for v in json.loads(spec["draft_costs"]).values())  # draft, row, base, alt row, alt base
    # the rounds priced (batch 1, no alternatives): the oracle's least cost is at most the run's
    # (lossless, fp32: `test_speculative_cost`), and each whole-call figure is its decoding's with
    # full decoding's prefill kept, so it lies between 1 and it
    assert spec["ideal_speedup"] == "" and float(off["ideal_decode_speedup"]) > 0
    assert float(off["oracle_ideal_decode_speedup"]) >= float(off["ideal_decode_speedup"])
    for name in ("ideal", "oracle_ideal"):
        whole, decode = float(off[f"{name}_speedup"]), float(off[f"{name}_decode_speedup"])
        assert min(1.0, decode) - 1e-3 <= whole <= max(1.0, decode) + 1e-3
    assert float(off["efficiency"]) == pytest.approx(float(off["speedup"]) / float(off["ideal_speedup"]), rel=0.01)


def test_api_early_exit_object_takes_auto():
    from pydantic import ValidationError

    from megatron.early_exit.inference.server.errors import from_validation
    from megatron.early_exit.inference.server.schemas import EarlyExitOptions

    ee = EarlyExitOptions(mode="self_speculative")
    assert (ee.draft_exit_layer, ee.num_draft_tokens) == ("auto", "auto")
    ee = EarlyExitOptions.model_validate({"num_draft_tokens": 3, "draft_exit_layer": None})
    assert (ee.draft_exit_layer, ee.num_draft_tokens) == (None, 3)
    for body, field in (
        ({"num_draft_tokens": "many"}, "num_draft_tokens"),
        ({"draft_exit_layer": 0}, "draft_exit_layer"),
    ):
        with pytest.raises(ValidationError) as e:
            EarlyExitOptions.model_validate(body)
        err = from_validation(e.value)
        assert err.status == 422 and err.param == field, (err.status, err.param)


# ----- warm start from the checkpoint's calibration record -------------------------------------


def run_plans(ctl: DraftController, a: dict[int, float], rounds: int) -> list:
    """`rounds` plans over exits 2 and 6, each verify round fed the expected prefix for a[exit]."""
    plans = []
    for _ in range(rounds):
        plan = ctl.plan([2, 6], list(range(1, MAX_DRAFT + 1)))
        learn(ctl, plan, a)
        plans.append(plan)
    return plans


def test_warm_start_drafts_from_round_one_and_skips_bad_exits():
    a = {2: 0.9, 6: 0.2}  # the shallow exit pays (rate ~3.3 at g = 8), the deep one never does
    cold = run_plans(DraftController(COSTS), a, 200)
    # tries each first: exit 6 reads its token on a plain round (one drafted token would not pay at the
    # prior's 0.5: 1.5 / 1.61 steps), exit 2 drafts it (1.5 / 1.22)
    assert [(p.exit, p.length, p.explore, p.observe) for p in cold[:2]] == [(None, 0, False, 6), (2, 1, True, None)]
    warm_ctl = DraftController(COSTS, agreement=a)
    assert warm_ctl.acceptance(2) == pytest.approx((4 * 0.9 + 1) / 6)  # WARM_DRAFTS = 4 drafts + the Beta(1, 1) prior
    first = warm_ctl.plan([2, 6], list(range(1, MAX_DRAFT + 1)))
    assert (first.exit, first.explore) == (2, False) and first.length >= 3  # drafts long from round one
    assert (first.exit, first.length) == best_by_formula({n: warm_ctl.acceptance(n) for n in COSTS.draft})
    warm = run_plans(DraftController(COSTS, agreement=a), a, 200)
    deep = [i for i, p in enumerate(warm) if p.exit == 6]
    every = warm_ctl.interval(6, 2)  # ceil(2 * (0.6 + 0.01) / WARM_EXPLORE_SHARE 0.02) = 61 rounds
    assert every == 61 and all(warm[i].explore and warm[i].length == 1 for i in deep)
    assert deep == [every, every + 2 * every + 1]  # never at the start; each failed try doubles the interval
    cold_deep = [i for i, p in enumerate(cold) if p.exit == 6]
    # The cold start tries it at once (on the way); then intervals ceil(2 * 0.61 * 2 / 0.05) = 49, then 4x:
    # 98 (+ 1 each), where exit 2 drafts: those tries draft (a deeper exit's token is not read on the way)
    assert tried(cold, 6) == [0, 49 + 1, 49 + 1 + 98 + 1] and cold_deep == [49 + 1, 49 + 1 + 98 + 1]
    assert sum(p.length for p in warm if p.exit == 2) > sum(p.length for p in cold if p.exit == 2)


def test_a_try_is_priced_as_the_round_it_costs():
    """Exploration's interval prices a try at its round less the plain round it replaces: the
    draft and its row, the verify pass's fixed part over a plain step (base - 1), and what the loop
    clock says such rounds cost over their prediction (factor), so that tries cost explore_share of
    decoding time as the loop runs them; never less than the draft and its row."""
    costs = DraftCosts(draft={2: 0.125}, row={2: 0.0625}, base={2: 1.25})  # binary fractions: exact sums
    ctl = DraftController(costs, explore_share=0.0625)
    assert ctl.interval(2, 1) == (0.125 + 0.0625 + 0.25) / 0.0625 == 7
    ctl.use_loop_clock()
    ctl.loop.excess[(1, 2)] = (1.5, 1.0)  # its rounds took 1.5x their prediction in the loop
    assert ctl.factor(2) == 1.5 and ctl.interval(2, 1) == math.ceil((1.5 * 1.4375 - 1.0) / 0.0625) == 19
    ctl.loop.excess[(1, 2)] = (0.5, 1.0)  # cheaper than predicted: the draft and its row at least
    assert ctl.interval(2, 1) == 0.1875 / 0.0625 == 3
    ctl.stats[2].backoff = 4
    assert ctl.interval(2, 2) == 2 * 0.1875 * 4 / 0.0625 == 24


def test_best_plan_prices_as_rate_does():
    """`best_plan` reads each exit's acceptance and loop factor once: its rates are `rate`'s, bit for
    bit, so its plans are those `rate` would rank (with a loop clock's factors, at several exits)."""
    ctl = DraftController(COSTS, margin=0.0)
    ctl.use_loop_clock()
    ctl.loop.excess[(1, 2)], ctl.loop.excess[(1, 6)] = (5.5, 4.0), (3.0, 4.0)
    ctl.stats[2].accepted, ctl.stats[2].rejected, ctl.stats[6].accepted = 7.0, 3.0, 9.0
    lengths = list(range(1, MAX_DRAFT + 1))
    best, _, top = ctl.best_plan([2, 6], lengths, None)
    assert top == {n: max(ctl.rate(n, g) for g in lengths) for n in (2, 6)}
    assert best.rate == max(top.values()) and best.rate == ctl.rate(best.exit, best.length)


def test_a_batchs_rounds_find_their_controller_once_per_batch_bucket(monkeypatch, case):
    """A batch's rounds work out the controller, its exits and draft lengths once per batch bucket
    (`SelfSpeculative.planning`, `Batch.memo`), not each round (a batch shrinks through smaller
    buckets as its sequences stop); the tokens stay full greedy decoding's (fp32)."""
    from megatron.early_exit.inference.strategies import self_speculative as ss

    _, model, expected = case
    asked, find = [], ss.controller_for
    monkeypatch.setattr(
        ss, "controller_for", lambda engine, batch=1, *a, **k: asked.append(batch) or find(engine, batch, *a, **k)
    )
    engine = EarlyExitEngine(model)
    s = GenerationSettings("self_speculative", NEW, ignore_eos=True)
    for prompts, want in ((PROMPTS[:1], expected[:1]), (PROMPTS, expected)):
        asked.clear()
        results = engine.generate(prompts, s)
        assert [r.tokens for r in results] == want
        rounds = max(sum(r.stats["draft_lengths"].values()) for r in results)
        assert len(asked) == len(set(asked)) < rounds and asked[0] == ss.batch_bucket(len(prompts))


def test_warm_start_with_low_agreement_decodes_plainly_within_the_budget():
    a = {2: 0.05, 6: 0.05}
    ctl = DraftController(COSTS, agreement=a)
    every = ctl.interval(2, 2)
    plans = run_plans(ctl, a, 300)
    assert all(p.exit is None for p in plans)  # no draft, not even a try: one token would not pay
    # exit 2 read on plain rounds: while its own counts are thin and it is near paying (the cold start's
    # observing), then at its tries: when due, ceil(2 * 0.22 / 0.02) = 22 rounds in, then at intervals
    # each failed try doubles up to MAX_BACKOFF (+ 1 each); exit 6 at its own (61, then 2 x 61 + 1 later)
    assert every == math.ceil(2 * (0.2 + 0.02) / WARM_EXPLORE_SHARE) == 22
    assert tried(plans, 2) == [*range(8), 22, 22 + 2 * 22 + 1, 67 + 88 + 1, 156 + 88 + 1]
    assert tried(plans, 6) == [61, 61 + 2 * 61 + 1]
    assert ctl.interval(2, 2) == MAX_BACKOFF * every  # its failed tries stretched the interval
    with pytest.raises(ValueError, match="agreement of exit 2"):
        DraftController(COSTS, agreement={2: 1.5})


@pytest.mark.parametrize("batch", [1, 4])
def test_warm_start_equals_full_greedy_in_fp32(case, batch):
    """With the calibration record's agreement on the model, self-speculation still equals
    full greedy decoding exactly (fp32, `naive_greedy`), and it changes the drafts: the good
    model drafts from exit 1 only (exit 3 is not tried), the bad one decodes plainly where a
    cold start tries each exit at once (exit 1's token drafted, exit 3's read on the way)."""
    kind, model, ref = case
    settings = GenerationSettings("self_speculative", NEW, ignore_eos=True)
    used = {}
    for warm in (False, True):
        model.calibrated_thresholds = {"thresholds": {1: 1.0, 3: 1.0}}  # a record without agreement: cold
        if warm:
            share = 1.0 if kind == "good" else 0.0
            model.calibrated_thresholds["agreement"] = {1: share, 3: share}
        res = EarlyExitEngine(model).generate(PROMPTS[:batch], settings)
        assert [r.tokens for r in res] == ref[:batch]
        used[warm] = [r.stats["draft_exits"] for r in res]
    del model.calibrated_thresholds
    # measured (every slot alike): good cold {1: 6} at batch 1 (exit 3's cold try read on a plain round:
    # one drafted token would not pay at the prior's estimate; {1: 5, 3: 1} at 4, where its try came on a
    # round drafting from exit 1), warm {1: 5}; bad cold {1: 1} (exit 1's cold try drafts, paying at the
    # prior's estimate; exit 3's, and exit 1's later ones, once it is known bad, read on plain rounds), warm {}
    for cold, warm in zip(used[False], used[True]):
        assert 3 not in warm if kind == "good" else cold == {1: 1} and warm == {}
        assert sum(warm.values()) < sum(cold.values())  # good: fewer, longer rounds; bad: no tries


def test_warm_prior_outlasts_a_run_of_rejections():
    """The record's drafts stay in the prior while observed counts decay: after a run of
    rejections a warm exit's acceptance is the counts plus that prior, above a cold one's."""
    warm, cold = DraftController(COSTS, agreement={2: 0.9}), DraftController(COSTS)
    for ctl in (warm, cold):
        for _ in range(60):
            ctl.update(2, [([0.5], 0)])
    rejected = sum(0.93**k for k in range(60))  # one decay per observed draft
    assert warm.stats[2].rejected == pytest.approx(rejected) == cold.stats[2].rejected
    assert warm.acceptance(2) == pytest.approx((1 + 3.6) / (rejected + 6))  # Beta(1, 1) + 4 drafts at 0.9
    assert cold.acceptance(2) == pytest.approx(1 / (rejected + 2))
    assert cold.acceptance(2) < warm.acceptance(2)


def test_thresholds_file_with_and_without_agreement_loads(tmp_path):
    """A record written before agreement was recorded still loads (cold start: every exit tried
    at once); one with it gives the controller its warm counts, keyed by exit layer."""
    import json

    from megatron.early_exit import load_checkpoint
    from megatron.early_exit.checkpointing import THRESHOLDS_FILE, save_checkpoint
    from megatron.early_exit.inference.strategies.draft_control import WARM_DRAFTS
    from megatron.early_exit.inference.strategies.self_speculative import controller_for

    save_checkpoint(str(tmp_path), 0, build(True), None)
    record = {"exits": [1, 3], "thresholds": {"1": 0.8, "3": 0.9}, "measure": "max_prob", "delta": 0.1}
    file = tmp_path / "iter_0000000" / THRESHOLDS_FILE
    controllers = []
    for agreement in (None, {"1": 0.75, "3": 0.5}):
        file.write_text(json.dumps(record if agreement is None else {**record, "agreement": agreement}))
        model, _ = load_checkpoint(str(tmp_path))
        assert model.calibrated_thresholds["thresholds"] == {1: 0.8, 3: 0.9}
        controllers.append(controller_for(EarlyExitEngine(model)))
    old, new = controllers
    assert model.calibrated_thresholds["agreement"] == {1: 0.75, 3: 0.5}
    assert all(old.stats[n].idle == old.interval(n, 2) and old.stats[n].accepted == 0.0 for n in (1, 3))
    assert new.priors[1] == (1 + 0.75 * WARM_DRAFTS, 1 + 0.25 * WARM_DRAFTS) and new.stats[1].accepted == 0.0
    assert new.stats[3].idle == 0  # no try at the start: the record stands in for it


@pytest.mark.parametrize("batch", [1, 4])
def test_drafts_from_a_draft_vocabulary_stay_lossless_and_project_onto_it_alone(case, batch):
    """With a draft vocabulary (the calibration record's), a draft's logits are the exit's own on
    those tokens and -inf elsewhere, and self-speculation still equals full greedy decoding (fp32).
    The good model's drafts are the final head's tokens: those outside the vocabulary are now
    rejected, so acceptance falls by about the share of such tokens, and only that far."""
    from megatron.early_exit.inference import ExitPolicy

    kind, model, ref = case
    seen = sorted({t for r in ref[:batch] for t in r})
    vocab = sorted(set(range(64)) - set(seen[: max(len(seen) // 2, 1)]))  # without half of what full decoding emits
    settings = GenerationSettings("self_speculative", NEW, ignore_eos=True, draft_exit_layer=1, num_draft_tokens=2)
    stats = {}
    for drafts in (None, vocab):
        model.calibrated_thresholds = {"thresholds": {1: 1.0, 3: 1.0}}
        if drafts is not None:
            model.calibrated_thresholds["draft_vocabulary"] = {"tokens": drafts}
        engine = EarlyExitEngine(model)
        assert (engine.passes.draft_vocab is None) == (drafts is None)
        res = engine.generate(PROMPTS[:batch], settings)
        assert [r.tokens for r in res] == ref[:batch]
        stats[drafts is None] = sum(r.stats["accepted"] for r in res), sum(r.stats["drafted"] for r in res)
    del model.calibrated_thresholds
    if kind == "good":  # every draft agreed; now only those inside the vocabulary can
        assert stats[True][0] == stats[True][1] and stats[False][0] < stats[False][1]
    # a draft step's logits: the exit's own values on the vocabulary's tokens, -inf elsewhere
    state = engine.new_state(batch, 16)
    engine.prefill(state, {b: PROMPTS[b] for b in range(batch)})
    hidden = {}
    head = model.exits["1"]
    hook = head.norm.register_forward_hook(lambda m, i, o: hidden.setdefault("h", o))
    try:
        out = engine.decode_one_token(state, {b: 5 for b in range(batch)}, ExitPolicy(force=1))
    finally:
        hook.remove()
    with torch.no_grad():
        full = head.project(hidden["h"], model.tied_output_weight(), model.head_ops)[:, 0]  # (A, V)
    ids = torch.tensor(vocab)
    for a, b in enumerate(sorted(out.logits)):
        got = out.logits[b]
        assert torch.isinf(got).sum() == got.numel() - len(vocab) and (got[ids] > float("-inf")).all()
        torch.testing.assert_close(got[ids], full[a, ids])  # the same product on fewer rows (fp32)
        assert int(got.argmax()) == vocab[int(full[a, ids].argmax())]


def test_a_draft_vocabulary_outside_the_model_is_named_and_one_can_turn_it_off():
    model = build(True)
    model.calibrated_thresholds = {"thresholds": {1: 1.0}, "draft_vocabulary": {"tokens": [3, 64]}}
    with pytest.raises(ValueError, match=r"draft_vocabulary: token ids must lie in 0\.\.63"):
        EarlyExitEngine(model)
    assert EarlyExitEngine(model, draft_vocabulary=False).passes.draft_vocab is None


def test_a_corrupt_draft_vocabulary_in_the_record_is_named(tmp_path):
    import json

    from megatron.early_exit import load_checkpoint
    from megatron.early_exit.checkpointing import THRESHOLDS_FILE, save_checkpoint

    save_checkpoint(str(tmp_path), 0, build(True), None)
    file = tmp_path / "iter_0000000" / THRESHOLDS_FILE
    record = {"thresholds": {"1": 0.8}}
    for bad in ({"tokens": []}, {"tokens": [1, "2"]}, {"tokens": [-1]}, {"size": 3}, [1, 2]):
        file.write_text(json.dumps({**record, "draft_vocabulary": bad}))
        with pytest.raises(ValueError, match=f"--load: corrupt {file}"):
            load_checkpoint(str(tmp_path))
    file.write_text(json.dumps({**record, "draft_vocabulary": {"tokens": [9, 2, 9], "coverage": 0.99}}))
    model, _ = load_checkpoint(str(tmp_path))
    assert model.calibrated_thresholds["draft_vocabulary"] == {"tokens": [2, 9], "coverage": 0.99}
    assert EarlyExitEngine(model).passes.draft_vocab.tolist() == [2, 9]


def test_a_plain_round_near_paying_observes_its_exit_and_learns_from_it():
    """A plain plan whose best exit comes within OBSERVE_NEAR of paying, and was chosen within
    OBSERVE_WINDOW rounds or has fewer than OBSERVE_EVIDENCE drafts of its own observed (a cold
    start), reads that exit (one far from paying, or not chosen lately: none); each
    observation teaches the controller as a one-draft round would, so after a run of rejections
    the exit drafts again as soon as its tokens agree, not after its exploration interval. Round
    costs as timed on the CPU reference model's exit 3."""
    costs = DraftCosts(draft={2: 0.3}, row={2: 0.05}, base={2: 1.15})
    ctl = DraftController(costs, agreement={2: 0.76}, margin=0.0)
    lengths = list(range(1, MAX_DRAFT + 1))
    assert ctl.plan([2], lengths).exit == 2  # the calibration record's agreement pays: chosen
    for _ in range(5):  # a hard stretch: exit 2's drafts rejected
        ctl.update(2, [([0.5], 0)])
    plan = ctl.plan([2], lengths)
    near = max(ctl.rate(2, g) for g in lengths)
    assert plan.exit is None and OBSERVE_NEAR <= near < 1.0 and plan.observe == 2
    assert ctl.interval(2, 1) == 25  # exploration alone: ceil((0.3 + 0.05 + 0.15) / WARM_EXPLORE_SHARE 0.02) rounds
    observed = 0
    while plan.exit is None and observed < 10:  # the text gets easy again: each observed token agrees
        ctl.update(2, [([0.9], 1)])
        observed += 1
        plan = ctl.plan([2], lengths)
    assert (plan.exit, plan.explore, observed) == (2, False, 2)
    hopeless = DraftController(costs, agreement={2: 0.05}, margin=0.0)
    plan = hopeless.plan([2], lengths)
    assert plan.exit is None and plan.observe is None  # no check paid for an exit far from paying
    never = DraftController(costs, agreement={2: 0.49}, margin=0.0)  # near paying from the start, never chosen
    plan = never.plan([2], lengths)
    assert plan.exit is None and plan.observe == 2  # a cold start: observed while its own drafts are few
    seen = 0
    while never.thin(2):  # one draft agreeing in three: near paying, never paying
        never.update(2, [([0.5], int(seen % 3 == 0))])
        seen += 1
    assert seen == 8  # decayed counts (0.93 a draft) reach OBSERVE_EVIDENCE 6 after 8 observed drafts
    plan = never.plan([2], lengths)
    assert plan.exit is None and max(never.rate(2, g) for g in lengths) >= OBSERVE_NEAR
    assert plan.observe is None  # now left to exploration, as an exit no plan chose lately
    for _ in range(5):
        ctl.update(2, [([0.5], 0)])  # exit 2 of the first controller, stalled again
    plans = [ctl.plan([2], lengths) for _ in range(OBSERVE_WINDOW + 6)]  # k-th plan: chosen k rounds ago
    plain = [(k, p.observe) for k, p in enumerate(plans, 1) if p.exit is None]
    assert {o for k, o in plain if k <= OBSERVE_WINDOW} == {2} and any(k > OBSERVE_WINDOW for k, _ in plain)
    assert all(o is None for k, o in plain if k > OBSERVE_WINDOW)  # chosen too long ago: left to exploration


def reading_rounds(ctl: DraftController, oks: list[int], runs: bool) -> list[tuple]:
    """Rounds of one sequence under `ctl` over exit 2, the k-th draft or reading agreeing where
    oks[k]: each round planned (`plan`), or, with `runs`, a reading plan's later rounds run as
    `SelfSpeculative.reading_run` runs them (each step's reading learned, then `reads_on` asked
    whether the run goes on, up to `Plan.run` steps). Each round's (exit, exit read), and how many
    rounds were planned."""
    lengths, kinds, k, planned = list(range(1, MAX_DRAFT + 1)), [], 0, 0
    while k < len(oks):
        plan, planned = ctl.plan([2], lengths), planned + 1
        n = plan.exit if plan.exit is not None else plan.observe
        kinds.append((plan.exit, plan.observe))
        if n is not None:
            ctl.update(n, [([0.5], oks[k])])
        k, steps = k + 1, 1
        while runs and plan.exit is None and plan.observe is not None and k < len(oks) and steps < plan.run:
            if not ctl.reads_on(plan.observe):
                break
            kinds.append((None, plan.observe))
            ctl.update(plan.observe, [([0.5], oks[k])])
            k, steps = k + 1, steps + 1
    return kinds, planned


def test_a_reading_run_decides_as_its_rounds_would_one_by_one():
    """A plain plan reading an exit near paying runs its rounds at once (`Plan.run`, one sequence),
    `reads_on` after each step saying whether the next round's plan would read it again: the same
    rounds, the same exits read and drafted, the same counts and idle rounds as planning each round
    (an exploration try, a plan that pays, or the exit drifting out of reach ends the run)."""
    costs = DraftCosts(draft={2: 0.3}, row={2: 0.05}, base={2: 1.15})
    gen = torch.Generator().manual_seed(3)
    oks = [int(u < 0.45) for u in torch.rand(400, generator=gen).tolist()]  # exit 2 hovering near paying
    one, runs = DraftController(costs, agreement={2: 0.76}), DraftController(costs, agreement={2: 0.76})
    (by_round, planned), (by_run, planned_runs) = reading_rounds(one, oks, False), reading_rounds(runs, oks, True)
    assert by_run == by_round and planned == len(oks)
    reading = sum(1 for e, o in by_round if e is None and o == 2)
    drafting = sum(1 for e, _ in by_round if e == 2)
    assert reading > 80 and drafting > 20  # both kinds of round
    assert planned_runs < planned - reading // 2  # most readings ran in runs
    st1, st2 = one.stats[2], runs.stats[2]
    assert (st2.accepted, st2.rejected, st2.idle, st2.chosen_ago, st2.backoff) == (
        st1.accepted, st1.rejected, st1.idle, st1.chosen_ago, st1.backoff
    )  # fmt: skip
    assert DraftController(costs, agreement={2: 0.76}).plan([2], list(range(1, 9)), batch=2).run == 1  # one sequence


@pytest.mark.skipif(not native.available(), reason="no native kernel here (no C compiler)")
def test_reading_runs_stay_lossless_and_read_every_step(case, monkeypatch):
    """Every round a plain one reading exit 1 (forced), the run going on while `reads_on` says so
    (forced on): the tokens are full greedy decoding's, several steps run in one native call, and
    every step's reading teaches the controller one draft's worth: exit 1 of the good model is the
    final head (every reading agrees), the bad model's random exit almost never agrees."""
    from megatron.early_exit.inference.strategies import draft_control

    kind, model, ref = case
    forced = lambda self, exits, lengths, batch=1, alternatives=False: Plan(None, 0, 1.0, observe=1, run=MAX_PLAIN_RUN)  # noqa: E731
    monkeypatch.setattr(draft_control.DraftController, "plan", forced)
    monkeypatch.setattr(draft_control.DraftController, "reads_on", lambda self, n: True)
    seen, calls = [], []
    update, decode = draft_control.DraftController.update, native.decode

    def recorded(self, n, rounds):
        seen.extend(ok for _, ok in rounds if n == 1)
        return update(self, n, rounds)

    monkeypatch.setattr(draft_control.DraftController, "update", recorded)
    monkeypatch.setattr(native, "decode", lambda *a, **k: calls.append(1) or decode(*a, **k))
    engine = EarlyExitEngine(model, linear_kernel="native")
    res = engine.generate(PROMPTS[:1], GenerationSettings("self_speculative", NEW, ignore_eos=True))
    assert res[0].tokens == ref[0]
    assert res[0].stats["draft_lengths"] == {0: NEW - 1}  # the first token is the prefill's
    assert len(seen) == NEW - 1 and len(calls) == math.ceil((NEW - 1) / MAX_PLAIN_RUN)
    assert all(seen) if kind == "good" else sum(seen) < 0.2 * len(seen)


@pytest.mark.parametrize("batch", [1, 4])
def test_observing_a_plain_step_reads_the_draft_and_keeps_full_decodings_token(case, batch):
    """`ExitPolicy(observe=(n,))`: the step's tokens, exits and logits are full decoding's, and
    each sequence's guess is exit n's greedy token and max-probability, those a draft from n at
    the same position has; a plain round of self-speculation feeds them to the controller."""
    from megatron.early_exit.inference import ExitPolicy
    from megatron.early_exit.inference.strategies.self_speculative import observations

    _, model, _ = case
    engine = EarlyExitEngine(model)
    outs = {}
    for name, policy in (
        ("plain", ExitPolicy()),
        ("observe", ExitPolicy(observe=(1,))),
        ("draft", ExitPolicy(force=1)),
    ):
        state = engine.new_state(batch, 16)
        engine.prefill(state, {b: PROMPTS[b] for b in range(batch)})
        outs[name] = engine.decode_one_token(state, {b: 5 for b in range(batch)}, policy)
    plain, seen, draft = outs["plain"], outs["observe"], outs["draft"]
    assert seen.exit_layer == plain.exit_layer == dict.fromkeys(range(batch), 6) and not plain.guesses
    assert all(torch.equal(seen.logits[b], plain.logits[b]) for b in range(batch))
    for b in range(batch):
        n, token, conf = seen.guesses[b]
        assert (n, token) == (1, int(draft.logits[b].argmax())) and conf == pytest.approx(draft.confidence[b])
    for b in range(batch):  # what the strategy's plain round passes on: as the final head's token
        seen.all_logits[b] = seen.logits[b][None]
    agree = [int(seen.guesses[b][1] == int(plain.logits[b].argmax())) for b in range(batch)]
    assert observations(seen, 1) == [([seen.guesses[b][2]], agree[b]) for b in range(batch)]
    assert observations(seen, 3) == []


def test_a_deeper_plan_reads_a_shallower_exit_near_its_rate_and_unsticks():
    """After a run of rejections leaves the shallow exit below the deep one, plans from the deep
    exit read the shallow one on their first draft step while its best plan comes within
    OBSERVE_NEAR of theirs (not a hopeless one, and not a deeper one); its agreeing tokens bring
    the plans back to it in a few rounds, where exploration alone takes its interval. Costs as
    timed on the CPU reference model (exits 3 and 6: here 2 and 6)."""
    costs = DraftCosts(draft={2: 0.27, 6: 0.49}, row={2: 0.01, 6: 0.01}, base={2: 1.13, 6: 1.13})
    ctl = DraftController(costs, agreement={2: 0.76, 6: 0.88}, margin=0.0)
    lengths = list(range(1, MAX_DRAFT + 1))
    plan = ctl.plan([2, 6], lengths)
    assert plan.exit == 2 and plan.observe is None  # the cheap exit pays most: nothing shallower to read
    for _ in range(4):  # a hard stretch for exit 2
        ctl.update(2, [([0.3, 0.3], 0)])
    plan = ctl.plan([2, 6], lengths)
    near = max(ctl.rate(2, g) for g in lengths)
    assert plan.exit == 6 and OBSERVE_NEAR * plan.rate <= near < plan.rate and plan.observe == 2
    assert ctl.interval(2, 2) >= 28  # exploration alone: ~2 x 0.28 / WARM_EXPLORE_SHARE 0.02 rounds
    rounds = 0
    while plan.exit == 6 and rounds < 10:  # the text gets easy again: exit 2's token read agrees
        ctl.update(2, [([0.9], 1)])
        ctl.update(6, [([0.9, 0.9, 0.9], 2)])  # exit 6's round goes on as before
        rounds += 1
        plan = ctl.plan([2, 6], lengths)
    assert (plan.exit, plan.explore) == (2, False) and rounds <= 4
    hopeless = DraftController(costs, agreement={2: 0.05, 6: 0.88}, margin=0.0)
    plan = hopeless.plan([2, 6], lengths)
    assert plan.exit == 6 and plan.observe is None  # no check paid for an exit far from paying


@pytest.mark.parametrize("batch", [1, 4])
def test_a_round_reading_a_shallower_exit_stays_lossless_and_teaches_the_controller(case, batch, monkeypatch):
    """Rounds that draft from exit 3 and read exit 1 on the way (every plan forced so): the
    tokens are full greedy decoding's, and the controller learns exit 1's agreement from them,
    one observation per sequence and round: exit 1 of the good model is the final head (every
    observation agrees), the bad model's random exits almost never agree."""
    from megatron.early_exit.inference.strategies import draft_control
    from megatron.early_exit.inference.strategies.draft_control import Plan

    kind, model, ref = case
    forced = lambda self, exits, lengths, batch=1, alternatives=False: Plan(3, 2, 1.2, observe=1)  # noqa: E731
    monkeypatch.setattr(draft_control.DraftController, "plan", forced)
    seen = []
    update = draft_control.DraftController.update

    def recorded(self, n, rounds):
        if n == 1:
            seen.append(rounds)
        return update(self, n, rounds)

    monkeypatch.setattr(draft_control.DraftController, "update", recorded)
    res = generate(model, None, PROMPTS[:batch], strategy="self_speculative", max_new_tokens=NEW, ignore_eos=True)
    assert [r.tokens for r in res] == ref[:batch]
    assert all(set(r.stats["draft_exits"]) == {3} for r in res)
    observed = [ok for rounds in seen for confs, ok in rounds]
    assert all(len(confs) == 1 for rounds in seen for confs, _ in rounds)
    # one per sequence and round: on the first draft step, or on the plain step of a round with
    # no room to draft (a sequence's last)
    rounds = sum(r.stats["draft_exits"][3] + r.stats["draft_lengths"].get(0, 0) for r in res)
    assert len(observed) == rounds and len(observed) > sum(r.stats["draft_lengths"].get(0, 0) for r in res)
    if kind == "good":
        assert all(observed)
    else:
        assert sum(observed) < 0.2 * len(observed)


# ----- the loop's own clock ------------------------------------------------------------------


def test_the_loop_clock_prices_drafting_rounds_against_plain_ones():
    """`LoopClock`: drafting rounds' wall time in plain rounds over the time their costs give the
    tokens they kept (predicted units x worth), decayed sums that start from LOOP_PRIOR units at
    1.0 (decaying too); nothing before a plain round is timed (no unit), and each batch bucket on
    its own. Rounds that keep more tokens than expected of their drafts lower it."""
    clock = LoopClock()
    clock.record(1, 2, 1.5, 3.0)  # no plain round yet: no unit, nothing learned
    assert clock.factor(1, 2) == 1.0
    clock.record(1, None, 1.0, 2.0)  # a plain round: 2 s
    clock.record(1, 2, 1.5, 3.6)  # predicted 1.5 plain rounds (3.0 s), took 3.6 s: 1.2x
    d = EXCESS_DECAY
    assert clock.factor(1, 2) == pytest.approx((d * LOOP_PRIOR + 1.8) / (d * LOOP_PRIOR + 1.5))
    assert clock.factor(1, 6) == 1.0 and clock.factor(4, 2) == 1.0  # other exits, other buckets
    for _ in range(400):
        clock.record(1, 2, 1.5, 3.6)
    assert clock.factor(1, 2) == pytest.approx(1.2, abs=1e-3)  # the prior fades: the loop's own ratio
    for _ in range(400):  # as dear, but keeping 1.5x the tokens expected of their drafts, then 0.5x
        clock.record(1, 2, 1.5, 3.6, worth=1.5)
    assert clock.factor(1, 2) == pytest.approx(0.8, abs=1e-3)
    for _ in range(200):  # rounds alternating 0.5x and 1.5x: a ratio of sums, 1.2 (a mean of ratios: 1.6)
        clock.record(1, 2, 1.5, 3.6, worth=0.5)
        clock.record(1, 2, 1.5, 3.6, worth=1.5)
    assert clock.factor(1, 2) == pytest.approx(1.2, rel=0.03)
    clock.record(1, None, 1.0, 4.0)  # plain rounds slow down: the unit follows them, the mean of its first
    assert clock.plain[1] == pytest.approx(3.0)
    for _ in range(8):
        clock.record(1, None, 1.0, 4.0)
    assert clock.plain[1] == pytest.approx((2.0 + 9 * 4.0) / 10)  # ten records: their mean
    clock.record(1, None, 1.0, 8.0)  # from then on a decayed mean
    assert clock.plain[1] == pytest.approx(LOOP_DECAY * 3.8 + (1 - LOOP_DECAY) * 8.0)


def test_an_exit_no_round_drafts_from_forgets_its_loop_factor():
    """`LoopClock.forget`: a round that does not draft from an exit decays that exit's factor toward its
    prior (1.0) at EXCESS_DECAY a round; the exit a round drafts from is not touched by it
    (`DraftController.timed` forgets the planned exits other than the one that drafted, a plain run
    once per step). One unlucky first round had put exit 2's factor at 1.25 and kept it there for good."""
    clock = LoopClock()
    clock.record(1, None, 1.0, 1.0)
    clock.record(1, 2, 2.0, 3.0, worth=0.25)  # kept a quarter of what was expected: its factor jumps
    stuck = clock.factor(1, 2)
    assert stuck > 1.2
    clock.forget(1, [2])
    d = EXCESS_DECAY
    total, weight = d * LOOP_PRIOR + 3.0, d * LOOP_PRIOR + 0.5
    assert clock.factor(1, 2) == pytest.approx((d * total + (1 - d) * LOOP_PRIOR) / (d * weight + (1 - d) * LOOP_PRIOR))
    clock.forget(1, [2], 200)  # many rounds without it: back near 1
    assert 1.0 < clock.factor(1, 2) < 1.0 + 0.05 * (stuck - 1.0)
    clock.forget(1, [6])  # an exit never timed has nothing to forget
    assert (1, 6) not in clock.excess
    # through the controller: rounds drafting from exit 6 (costs as timed) forget exit 2, not exit 6
    ctl = DraftController(COSTS, margin=0.0)
    ctl.use_loop_clock()
    ctl.loop.record(1, None, 1.0, 1.0)
    ctl.loop.record(1, 2, 2.0, 3.0, worth=0.25)
    for _ in range(200):
        plan = ctl.plan([2, 6], [4], 1)
        plan.exit, plan.drafted, plan.kept, plan.expected = 6, 4, 2.0, 2.0
        ctl.timed(plan, COSTS.round_time(6, 4))  # as its costs say
    assert ctl.factor(2) < 1.0 + 0.05 * (stuck - 1.0) and ctl.factor(6) == pytest.approx(1.0, abs=1e-6)


def test_rounds_dearer_in_the_loop_turn_a_marginal_exit_plain_and_leave_the_early_stop_alone():
    """An exit that pays by its timed costs (a = 0.3 at draft 0.25, base 1.0: 1.3 / 1.26 = 1.03)
    but whose rounds take 1.15x what those costs say in the loop does not (0.90): the plan is a
    plain round. A plan that still pays has its rate divided by the factor, and the early stop
    and the alternatives weigh their costs at rate x factor: they decide as without the clock."""
    costs = DraftCosts(draft={2: 0.25}, row={2: 0.01}, base={2: 1.0})
    ctl = DraftController(costs, explore_share=1e-9, margin=0.0)
    ctl.stats[2].accepted, ctl.stats[2].rejected, ctl.stats[2].idle = 29.0, 69.0, 0  # a = 0.3
    assert ctl.plan([2], [1]).exit == 2  # by the timed costs: drafts
    ctl.use_loop_clock()
    ctl.timed(Plan(None, 0, 1.0), 0.010)  # a plain round: 10 ms
    for _ in range(300):  # drafting rounds of one draft: predicted 1.26 plain rounds, take 1.15x that
        ctl.timed(Plan(2, 1, 1.0, drafted=1), 0.010 * costs.round_time(2, 1) * 1.15)
    assert ctl.plan([2], [1]) == Plan(
        None, 0, 1.0, run=UNIT_RUN
    )  # LOOP_PLAIN_EVERY drafting rounds since: its unit is due
    ctl.timed(Plan(None, 0, 1.0), 0.010)
    ctl.stats[2].idle = 0
    assert ctl.factor(2) == pytest.approx(1.15, abs=1e-3)
    assert ctl.plan([2], [1]).exit is None  # 1.3 / (1.26 * 1.15) < 1
    ctl.stats[2].accepted, ctl.stats[2].rejected = 89.0, 9.0  # a = 0.9: pays even so
    plan = ctl.plan([2], list(range(1, MAX_DRAFT + 1)))
    assert plan.exit == 2
    assert ctl.factor(2) == pytest.approx(1.15, abs=1e-3)
    timed_rate = expected_tokens(0.9, plan.length) / costs.round_time(2, plan.length)
    assert plan.rate == pytest.approx(timed_rate / ctl.factor(2))
    plain = DraftController(costs, explore_share=1e-9, margin=0.0)
    plain.stats[2] = ctl.stats[2]
    twin = plain.plan([2], list(range(1, MAX_DRAFT + 1)))
    for confs in ([0.9], [0.9, 0.5], [0.9, 0.5, 0.2], [0.3] * 5):
        assert ctl.keep_drafting(plan, confs) == plain.keep_drafting(twin, confs)
    assert ctl.worth_verifying(plan, [0.9, 0.4]) == plain.worth_verifying(twin, [0.9, 0.4])
    # A round that drafted nothing (the plan's drafts had no room) is timed as a plain round.
    ctl.timed(Plan(2, 1, 1.0, drafted=0), 0.020)
    assert ctl.loop.plain[1] == pytest.approx((0.010 + 0.010 + 0.020) / 3)  # the mean of the bucket's first units


def test_the_loop_clock_times_plain_rounds_that_read_no_exit_and_asks_for_one_when_due():
    """A plain round reading an exit on the way costs its check besides: not the unit (a batch-16
    cold start's observing rounds, 1.7-1.9x a plain one, made drafting rounds read 0.6 of their
    predicted time), but what reading costs. A drafting round that read a shallower exit is its
    exit's round (that is how the plan ran). A bucket without a unit, or with LOOP_PLAIN_EVERY
    drafting rounds timed since its last plain one (UNIT_EARLY while it has fewer than UNIT_SETTLE
    units), gets plain rounds reading no exit, its tries waiting: an exit that always pays is still
    checked against the loop's own plain rounds."""
    costs = DraftCosts(draft={2: 0.2}, row={2: 0.01}, base={2: 1.0})
    ctl = DraftController(costs, explore_share=1e-9, margin=0.0)
    ctl.stats[2].accepted, ctl.stats[2].rejected, ctl.stats[2].idle = 90.0, 10.0, 0  # a = 0.9: it pays
    assert ctl.plan([2], [1, 2]).exit == 2  # no loop clock: drafts from the first round
    ctl.use_loop_clock()
    first = ctl.plan([2], [1, 2])
    assert first == Plan(None, 0, 1.0, run=UNIT_RUN)  # no unit yet at this bucket: a plain round, no exit read
    ctl.timed(Plan(None, 0, 1.0, observe=2), 0.030)  # an observing plain round: not the unit
    assert ctl.loop.plain == {} and ctl.loop.observing == {1: 0.030} and ctl.plan([2], [1, 2]).exit is None
    ctl.timed(first, 0.010)
    ctl.timed(Plan(2, 1, 1.0, drafted=1, observe=1), 0.010 * costs.round_time(2, 1) * 1.5)  # read on the way: 1.5x
    t = costs.round_time(2, 1)
    d = EXCESS_DECAY
    assert ctl.loop.excess[(1, 2)] == pytest.approx((d * LOOP_PRIOR + 1.5 * t, d * LOOP_PRIOR + t))
    ctl.loop.excess.clear()
    drafted = 1  # the round that read exit 1 on the way
    for k in range(1, UNIT_SETTLE + 1):  # the bucket's first units every UNIT_EARLY drafting rounds, then rarer
        for i in range((UNIT_EARLY if k < UNIT_SETTLE else LOOP_PLAIN_EVERY) - drafted):
            plan = ctl.plan([2], [1, 2])
            assert plan.exit == 2, (k, i)
            ctl.timed(replace(plan, drafted=plan.length), 0.010 * costs.round_time(2, plan.length))
        drafted = 0
        assert ctl.plan([2], [1, 2]) == Plan(None, 0, 1.0, run=UNIT_RUN)  # due again
        if k < UNIT_SETTLE:
            ctl.timed(Plan(None, 0, 1.0, run=UNIT_RUN), 0.010)
    assert ctl.loop.units == {1: UNIT_SETTLE}
    assert ctl.factor(2) == pytest.approx(1.0) and ctl.plan(([2]), [1, 2], batch=4) == Plan(None, 0, 1.0, run=UNIT_RUN)
    ctl.bucket = 1
    ctl.timed(Plan(None, 0, 1.0), 0.010)
    assert ctl.plan([2], [1, 2]).exit == 2


@pytest.mark.parametrize("batch", [1, 4])
def test_a_plain_round_keeps_what_a_verified_round_drafting_nothing_keeps(case, batch, monkeypatch):
    """`SelfSpeculative.plain_round` (a plan drafting nothing, reading no exit) against the round
    through drafting and verifying (`verified_round`) with the same plan: the same tokens, exit
    layers, confidences, finish reasons and counts, lossless against full greedy decoding."""
    from megatron.early_exit.inference.strategies.self_speculative import SelfSpeculative

    kind, model, ref = case
    s = GenerationSettings("self_speculative", NEW, ignore_eos=True, draft_exit_layer=1, num_draft_tokens=1)
    monkeypatch.setattr(SelfSpeculative, "plan", lambda self, engine, b, running: (Plan(None, 0, 1.0), None))
    fast = EarlyExitEngine(model).generate(PROMPTS[:batch], s)
    monkeypatch.setattr(SelfSpeculative, "plain_round", lambda self, engine, state, running, b: self.verified_round(
        engine, state, running, b, Plan(None, 0, 1.0), None))  # fmt: skip
    slow = EarlyExitEngine(model).generate(PROMPTS[:batch], s)
    assert [r.tokens for r in fast] == [r.tokens for r in slow] == ref[:batch]
    for a, b in zip(fast, slow):
        assert (a.exit_layers, a.confidences, a.finish_reason) == (b.exit_layers, b.confidences, b.finish_reason)
        timing = ("elapsed_s", "prefill_s", "tokens_per_sec", "decode_tokens_per_sec")
        kept = [{k: v for k, v in r.stats.items() if k not in timing} for r in (a, b)]
        assert kept[0] == kept[1] and a.stats["draft_lengths"] == {0: NEW - 1}  # the first token: the prefill's


def test_a_plain_round_reads_an_exit_near_paying_only_where_that_is_cheap():
    """The loop clock times plain rounds that read an exit apart (`LoopClock.observe_cost`): in a
    batch, where that adds more than OBSERVE_COST of a round, a plain round near paying reads none
    (for one sequence it always does); a try still does (it is rare, and how an exit comes back)."""
    costs = DraftCosts(draft={2: 0.25}, row={2: 0.01}, base={2: 1.0})
    ctl = DraftController(costs, explore_share=1e-9, margin=0.0)
    ctl.stats[2].accepted, ctl.stats[2].rejected, ctl.stats[2].idle = 25.0, 75.0, 0  # a = 0.25: rate 0.99, near
    ctl.stats[2].chosen_ago = 0  # and chosen lately
    assert ctl.plan([2], [1]).observe == 2  # no loop clock: the exit near paying is read
    ctl.use_loop_clock()
    ctl.timed(ctl.plan([2], [1]), 0.010)  # its unit
    plan = ctl.plan([2], [1])
    assert plan.observe == 2 and ctl.loop.observe_cost(1) is None
    ctl.timed(plan, 0.0105)  # reading it cost 5%: read again
    assert ctl.loop.observe_cost(1) == pytest.approx(0.05) and ctl.plan([2], [1]).observe == 2
    for _ in range(30):
        ctl.timed(Plan(None, 0, 1.0, observe=2), 0.013)  # 30%: still read for one sequence
    assert ctl.loop.observe_cost(1) > 0.2 and ctl.plan([2], [1]).observe == 2
    assert ctl.plan([2], [1], batch=4) == Plan(None, 0, 1.0, run=UNIT_RUN)  # in a batch of 4: its unit first
    ctl.timed(Plan(None, 0, 1.0), 0.010)
    read = 0
    while (plan := ctl.plan([2], [1], batch=4)).observe == 2:  # read until it is timed past OBSERVE_COST
        ctl.timed(plan, 0.013)
        read += 1
        assert read < 50
    assert plan == Plan(None, 0, 1.0) and read == 1 and ctl.loop.observe_cost(4) > OBSERVE_COST
    ctl.stats[2].idle = ctl.interval(2, 1)  # a try is due: it still reads the exit
    assert ctl.plan([2], [1]).observe == 2


def test_the_margin_weighs_a_plan_against_the_plain_round_it_would_replace():
    """A plan that pays at its estimate but not less the margin gives way to a plain round; where
    that round would read the exit on the way and the loop clock timed such rounds dearer than plain
    ones, the plan is weighed against that round's rate, 1 / (1 + its cost): it drafts where it pays
    that much less the margin (a plain round that reads an exit no longer wins on a price it does
    not have); where reading costs nothing, or nothing is read, as before."""
    costs = DraftCosts(draft={2: 0.1}, row={2: 0.05}, base={2: 1.15})
    ctl = DraftController(costs, explore_share=1e-9)
    st = ctl.stats[2]
    st.accepted, st.rejected, st.idle, st.chosen_ago = 4.0, 6.0, 0, 0  # a = 0.42 from 12 drafts' counts
    lengths = list(range(1, MAX_DRAFT + 1))
    assert ctl.rate(2, 2) == pytest.approx(1.097, abs=1e-3)  # its best plan, 2 drafts, pays at its estimate
    assert ctl.rate(2, 2, low=True) == pytest.approx(0.937, abs=1e-3)  # ... and not less the margin
    assert ctl.plan([2], lengths) == Plan(None, 0, 1.0, observe=2, run=MAX_PLAIN_RUN)  # not sure: plain, reading exit 2
    ctl.use_loop_clock()
    ctl.timed(ctl.plan([2], lengths), 0.010)  # the unit: a plain round reading nothing
    plan = ctl.plan([2], lengths)
    assert (plan.exit, plan.observe) == (None, 2) and ctl.plain_rate(True) == 1.0  # reading not timed yet
    ctl.timed(plan, 0.0101)  # reading costs 1%: the margin holds against ~1
    assert ctl.plan([2], lengths).exit is None
    for _ in range(40):
        ctl.timed(Plan(None, 0, 1.0, observe=2), 0.0125)  # such rounds take 1.25 units
    assert ctl.plain_rate(True) == pytest.approx(1 / 1.25, rel=0.02) and ctl.plain_rate(False) == 1.0
    plan = ctl.plan([2], lengths)
    assert plan.exit == 2 and not plan.explore  # sure against 0.8: it drafts
    ctl.stats[2].accepted, ctl.stats[2].rejected = 1.0, 9.0  # a = 0.17: far from paying, nothing read
    assert max(ctl.rate(2, g) for g in lengths) < OBSERVE_NEAR and ctl.plan([2], lengths) == Plan(None, 0, 1.0)


def test_the_engine_controller_times_its_rounds_only_where_its_costs_are_timed(monkeypatch):
    """Decisions must not depend on the clock where the costs come from the parameters (the test
    suite, several processes) or from a measured cost model: no loop clock there; with timed
    costs the engine's controller has one and every round of a decode is timed into it, but a decode
    state's first round from each exit (it makes the plans the later rounds reuse)."""
    from megatron.early_exit.inference.strategies import self_speculative as ss

    engine = EarlyExitEngine(build(True))
    s = GenerationSettings("self_speculative", 12, ignore_eos=True)
    engine.generate(PROMPTS[:1], s)
    assert ss.controller_for(engine).loop is None  # EE_EXIT_COSTS=parameters (conftest)
    monkeypatch.setenv("EE_EXIT_COSTS", "measured")
    timed = DraftCosts(draft={1: 0.3, 3: 0.6}, row={1: 0.02, 3: 0.02}, base={1: 1.05, 3: 1.05})
    monkeypatch.setattr(ss, "measure_draft_costs", lambda engine, batch, context, lookup=False: (timed, {}))
    other = EarlyExitEngine(build(True))
    rounds = []
    real = DraftController.timed

    def record_round(self, plan, seconds):
        rounds.append((plan.exit, self.bucket, seconds))
        real(self, plan, seconds)

    monkeypatch.setattr(DraftController, "timed", record_round)
    (r,) = other.generate(PROMPTS[:1], s)
    ctl = ss.controller_for(other)
    assert ctl.loop is not None and ctl.costs is timed
    firsts = len(r.stats["draft_exits"])  # each exit drafted from: its first round not timed
    assert firsts and len(rounds) == sum(r.stats["draft_lengths"].values()) - firsts > 0
    assert all(b == 1 and t > 0 for _, b, t in rounds)


@pytest.mark.skipif(not native.available(), reason="no native kernel here (no C compiler)")
def test_the_loop_clocks_unit_is_a_plain_runs_share(monkeypatch):
    """The loop clock's unit is what decoding that drafts nothing costs a token: where it is due,
    the plain plan runs UNIT_RUN plain rounds at once (one native call, though exits are due a
    try) and the unit is their mean, not a lone plain round's time (its Python besides)."""
    from megatron.early_exit.inference.strategies import self_speculative as ss

    monkeypatch.setenv("EE_EXIT_COSTS", "measured")
    timed = DraftCosts(draft={1: 0.3, 3: 0.6}, row={1: 0.02, 3: 0.02}, base={1: 1.05, 3: 1.05})
    monkeypatch.setattr(ss, "measure_draft_costs", lambda engine, batch, context, lookup=False: (timed, {}))
    engine = EarlyExitEngine(build(True), linear_kernel="native")
    rounds, calls = [], []
    real, decode = DraftController.timed, native.decode

    def record_round(self, plan, seconds):
        rounds.append((plan.exit, plan.observe, plan.steps, seconds))
        real(self, plan, seconds)

    monkeypatch.setattr(DraftController, "timed", record_round)
    monkeypatch.setattr(native, "decode", lambda *a, **k: calls.append(1) or decode(*a, **k))
    (r,) = engine.generate(PROMPTS[:1], GenerationSettings("self_speculative", 12, ignore_eos=True))
    ctl = ss.controller_for(engine)
    assert rounds[0][:3] == (None, None, UNIT_RUN) and calls  # the first round: the unit, run at once
    assert ctl.loop.plain[1] == pytest.approx(rounds[0][3] / UNIT_RUN, rel=1e-9)
    assert r.stats["draft_lengths"][0] >= UNIT_RUN and r.tokens[: UNIT_RUN + 1] == naive_greedy(
        engine.model, PROMPTS[0], UNIT_RUN + 1
    )  # fmt: skip


# ----- the margin: a plan drafts only where it pays at its estimate less its uncertainty ------------


def test_a_plan_drafts_only_where_it_pays_at_its_estimate_less_the_margin():
    """Break-even of one draft from exit 2 at these costs: a = 0.37. At a mean of ~0.4 from the ~14
    drafts that decayed counts hold, the estimate's standard deviation is ~0.12: the plan pays at the
    mean, not at the bound, so the round is plain; 40% over ~1,300 drafts' worth of slowly decaying
    counts (deviation 0.014) drafts, and so does the controller without a margin."""
    costs = DraftCosts({2: 0.3}, {2: 0.02}, {2: 1.05})
    pattern = [1, 0, 1, 0, 0] * 4  # 40% accepted
    made = {}
    for name, kw, rounds in (("margin", {}, 1), ("none", {"margin": 0.0}, 1), ("many", {"decay": 0.9995}, 100)):
        ctl = DraftController(costs, explore_share=1e-9, **kw)
        ctl.stats[2].idle = 0
        for ok in pattern * rounds:
            ctl.update(2, [([0.5], ok)])
        made[name] = (ctl, ctl.plan([2], [1]))
    ctl, plan = made["margin"]
    a = ctl.acceptance(2)
    assert 0.37 < a < 0.5 and ctl.rate(2, 1) > 1.0 > ctl.rate(2, 1, low=True)
    count = ctl.stats[2].accepted + ctl.stats[2].rejected + 2.0  # with the Beta(1, 1) prior
    assert ctl.rate(2, 1, low=True) == pytest.approx(
        expected_tokens(a - (a * (1 - a) / (count + 1)) ** 0.5, 1) / costs.round_time(2, 1)
    )
    assert plan.exit is None
    assert made["none"][1].exit == 2
    ctl, plan = made["many"]
    assert abs(ctl.acceptance(2) - 0.4) < 0.01 and plan.exit == 2


def test_the_margin_leaves_a_paying_exit_drafting():
    """Exit 2 at ~0.8 from decayed counts: it pays at its bound too, and plans as without a margin."""
    ctl, bare = DraftController(COSTS, explore_share=1e-9), DraftController(COSTS, explore_share=1e-9, margin=0.0)
    for c in (ctl, bare):
        for st in c.stats.values():
            st.idle = 0
        feed(c, 2, 5, 0.8, rounds=30)
        feed(c, 6, 5, 0.2, rounds=30)
    lengths = list(range(1, MAX_DRAFT + 1))
    plan, plain = ctl.plan([2, 6], lengths), bare.plan([2, 6], lengths)
    assert (plan.exit, plan.length, plan.rate) == (plain.exit, plain.length, plain.rate) and plan.exit == 2


def test_a_rounds_worth_is_its_kept_tokens_over_what_its_drafts_were_expected_to_keep():
    """`DraftController.worth`: per sequence, the drafts agreed plus the final head's token, against
    `expected_tokens` at the exit's acceptance for as many drafts (read before `update` learns from
    the round); the context's drafts (priced per bin) are not weighed. A timed round's worth scales
    the time its costs give it (`LoopClock.record`)."""
    costs = DraftCosts(draft={2: 0.25}, row={2: 0.01}, base={2: 1.0})
    ctl = DraftController(costs, explore_share=1e-9, margin=0.0)
    ctl.stats[2].accepted, ctl.stats[2].rejected = 59.0, 39.0  # a = 0.6 with the Beta(1, 1) prior
    a = ctl.acceptance(2)
    assert a == pytest.approx(0.6)
    kept, expected = ctl.worth(2, [([0.9, 0.8, 0.7], 3), ([0.2], 0)])
    assert kept == pytest.approx((4 + 1) / 2)
    assert expected == pytest.approx((expected_tokens(a, 3) + expected_tokens(a, 1)) / 2)
    from megatron.early_exit.inference.lookup import LOOKUP

    assert ctl.worth(LOOKUP, [([0.9], 1)]) == (0.0, 0.0) and ctl.worth(2, []) == (0.0, 0.0)
    ctl.use_loop_clock()
    ctl.timed(Plan(None, 0, 1.0), 0.010)
    plan = Plan(2, 3, 1.0, drafted=3, kept=kept, expected=expected)
    ctl.timed(plan, 0.010 * costs.round_time(2, 3))  # as its costs say, keeping kept / expected as much
    t = costs.round_time(2, 3)
    d = EXCESS_DECAY
    assert ctl.factor(2) == pytest.approx((d * LOOP_PRIOR + t) / (d * LOOP_PRIOR + t * kept / expected))

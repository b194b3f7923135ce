"""The cost model of self-speculative decoding (`strategies/draft_costs`): a run's rounds priced
by their draft costs (`rounds_units`), and the least those costs allow where each round knows its
drafts' fate (`oracle_units`, `forced_units`), by hand and against real runs: a run is one of the
plans the oracle weighs, so it never costs less."""

import pytest
import torch

from megatron.early_exit.inference import generate
from megatron.early_exit.inference.calibration import forced_steps
from megatron.early_exit.inference.settings import GenerationResult
from megatron.early_exit.inference.strategies.draft_control import MAX_DRAFT, DraftCosts
from megatron.early_exit.inference.strategies.draft_costs import (
    forced_units,
    oracle_units,
    rounds_units,
    with_prefill,
)
from tests.test_dynamic_speculation import NEW, PROMPTS, build

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread

T, F = True, False
COSTS = DraftCosts(draft={3: 0.1, 5: 0.3}, row={3: 0.05, 5: 0.02}, base={3: 1.2, 5: 1.2})


def test_oracle_units_by_hand():
    # exit 3 agrees at steps 0-2 and not at 3-4: three drafts, all kept, and the final head's
    # token after them (4 tokens for 0.3 + 1.2 + 0.15), then one plain step for the last
    assert oracle_units({3: [T, T, T, F, F]}, COSTS, MAX_DRAFT) == pytest.approx(1.65 + 1.0)
    # at most two drafts: two kept and the final head's token (1.5), then plain steps 3 and 4
    assert oracle_units({3: [T, T, T, F, F]}, COSTS, 2) == pytest.approx(1.5 + 2.0)
    # no exit ever agrees: every step plain
    assert oracle_units({3: [F] * 4, 5: [F] * 4}, COSTS, MAX_DRAFT) == pytest.approx(4.0)
    # the end: one draft and the final head's token make both steps (2 tokens for 1.35); a
    # second draft would only cost more
    assert oracle_units({3: [T, T]}, COSTS, MAX_DRAFT) == pytest.approx(1.35)
    # a deeper exit where the shallow one stops agreeing: exit 3 at steps 0-1 (3 tokens, 1.5),
    # then exit 5 over steps 3-6 (drafts 3-5 and the final head's 6: 0.9 + 1.2 + 0.06)
    agree = {3: [T, T, F, F, F, F, F], 5: [T, T, F, T, T, T, F]}
    assert oracle_units(agree, COSTS, MAX_DRAFT) == pytest.approx(1.5 + 2.16)
    # ... cheaper than all plain (7.0) or exit 5 alone (two drafts 1.84, then three 2.16)
    assert oracle_units(agree, COSTS, MAX_DRAFT) < min(7.0, 1.84 + 2.16)


def test_rounds_units_by_hand():
    r = GenerationResult([1], tokens=[0] * 13)
    r.stats = {"draft_lengths": {0: 3, 2: 1, 4: 2}, "draft_rounds": {3: {2: 1, 4: 1}, 5: {4: 1}}}
    plain = GenerationResult([1], tokens=[0] * 4)
    plain.stats = {"draft_lengths": {0: 3}, "draft_rounds": {}}
    want = 3 + (0.2 + 1.2 + 0.1) + (0.4 + 1.2 + 0.2) + (1.2 + 1.2 + 0.08) + 3
    assert rounds_units([r, plain], COSTS) == pytest.approx(want)


def test_with_prefill():
    # a third of the call is prefill; decoding 2x faster: 1 / (1/3 + 2/3 / 2) = 1.5
    assert with_prefill(2.0, 1 / 3) == pytest.approx(1.5)
    assert with_prefill(3.0, 0.0) == pytest.approx(3.0)


@pytest.mark.parametrize("good", [True, False])
def test_a_run_never_costs_less_than_the_oracle(good):
    """Lossless rounds (fp32, batch 1) along full decoding's tokens: each round's kept drafts are a
    run of agreeing steps and its rejected ones only add cost, so the oracle's least cost is at
    most the run's at the same costs; the run's telemetry per (exit, length) adds up."""
    model = build(good)
    costs = DraftCosts(draft={1: 0.2, 3: 0.5}, row={1: 0.1, 3: 0.05}, base={1: 1.1, 3: 1.1})
    s = dict(strategy="self_speculative", max_new_tokens=NEW, ignore_eos=True)
    res = [generate(model, None, [p], **s)[0] for p in PROMPTS]
    full = [generate(model, None, [p], max_new_tokens=NEW, ignore_eos=True)[0].tokens for p in PROMPTS]
    assert [r.tokens for r in res] == full
    for r in res:
        st = r.stats
        assert {n: sum(per.values()) for n, per in st["draft_rounds"].items()} == st["draft_exits"]
        lengths = {g: 0 for g in st["draft_lengths"] if g}
        for per in st["draft_rounds"].values():
            for g, k in per.items():
                lengths[g] += k
        assert lengths == {g: k for g, k in st["draft_lengths"].items() if g}
    steps = forced_steps(model, PROMPTS, full, "max_prob")
    assert steps.exits == [1, 3] and len(steps.target) == len(PROMPTS) * (NEW - 1)
    assert torch.equal(steps.target, torch.tensor([t for f in full for t in f[1:]]))
    oracle = forced_units(steps, [len(f) for f in full], [1, 3], costs, MAX_DRAFT)
    run = rounds_units(res, costs)
    assert oracle <= run + 1e-9
    if good:  # exit 1 always agrees: rounds of MAX_DRAFT drafts and the final head's token, the rest one round
        rounds, left = divmod(NEW - 1, MAX_DRAFT + 1)
        per_seq = rounds * (MAX_DRAFT * (0.2 + 0.1) + 1.1) + ((left - 1) * 0.3 + 1.1 if left else 0.0)
        assert oracle == pytest.approx(len(PROMPTS) * per_seq)
        assert run < 1.15 * oracle  # the controller's long drafts come close (68.8 against 62.8)
    else:  # the random exits agree at ~1 step in 64: nearly every step plain
        assert 0.95 * len(PROMPTS) * (NEW - 1) < oracle <= len(PROMPTS) * (NEW - 1)

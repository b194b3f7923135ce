"""Leaving tokens chosen from the draft vocabulary (`GenerationSettings.exit_vocabulary`): the
exit's logits on those tokens, -inf elsewhere, the same exits and K/V as choosing from the whole
vocabulary; what "auto" resolves to; the decider and the cost model pricing the smaller
projection; the calibration counting a final-head token outside the vocabulary as a disagreement."""

from __future__ import annotations

import pytest
import torch

from megatron.early_exit.inference import EarlyExitEngine, ExitPolicy, GenerationSettings, calibration
from megatron.early_exit.inference.cost_model import DecodeCosts
from megatron.early_exit.inference.exit_decision import ExitCosts, ExitDecider
from megatron.early_exit.inference.passes import Rows
from tests.test_fast_path import filled_kv
from tests.test_lean import PROMPTS, make

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread

NORM_EXITS: dict = {}  # exits that are their RMSNorm alone (the native head call where it is built)
MLP_EXITS = dict(use_exit_mlp=True, exit_confidence_input="backbone")  # SmolLM2's demo exits


def vocabulary_without_half_of(model, prompts) -> list[int]:
    """Token ids without half of those full decoding emits from these prompts (so that some
    leaving tokens would lie outside)."""
    res = EarlyExitEngine(model).generate(prompts, GenerationSettings("full", 8, ignore_eos=True))
    seen = sorted({t for r in res for t in r.tokens})
    return sorted(set(range(model.config.vocab_size)) - set(seen[::2]))


@torch.no_grad()
@pytest.mark.parametrize("over", [NORM_EXITS, MLP_EXITS], ids=["norm exits", "mlp exits"])
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("mode", ["exact", "cost_aware"])
def test_leaving_tokens_come_from_the_draft_vocabulary_with_the_same_exits_and_kv(over, batch, mode):
    """Both vocabularies fed the same tokens step by step: the same rows leave at the same exits
    (the probes decide without a projection) and the K/V are equal; a leaving row's logits are the
    exit's own on the vocabulary's tokens (fp32: the same product on fewer rows) and -inf
    elsewhere, its token the best of those; rows through every layer have the same logits."""
    model, prompts = make(**over), PROMPTS[batch]
    vocab = vocabulary_without_half_of(model, prompts)
    ids = torch.tensor(vocab)
    engines = {v: EarlyExitEngine(model) for v in ("full", "draft")}
    states, outs = {}, {}
    for v, engine in engines.items():
        engine.use_draft_vocabulary(vocab)
        states[v] = engine.new_state(batch, max(map(len, prompts)) + 16)
        outs[v] = engine.prefill(states[v], dict(enumerate(prompts)))
    left = outside = 0
    for step in range(10):
        tokens = {b: int(outs["full"].logits[b].argmax()) for b in range(batch)}
        threshold = (0.5, 0.3)[step % 2]
        for v, engine in engines.items():
            policy = ExitPolicy((1, 2, 3), threshold, "learned", mode=mode, vocab=v)
            outs[v] = engine.decode_one_token(states[v], tokens, policy)
        full, draft = outs["full"], outs["draft"]
        assert draft.exit_layer == full.exit_layer
        for b, layer in full.exit_layer.items():
            if layer == model.config.num_layers:
                assert torch.equal(draft.logits[b], full.logits[b])
                continue
            left += 1
            got, want = draft.logits[b], full.logits[b]
            assert torch.isinf(got).sum() == got.numel() - len(vocab) and (got[ids] > float("-inf")).all()
            torch.testing.assert_close(got[ids], want[ids])
            assert int(got.argmax()) == vocab[int(want[ids].argmax())]
            assert draft.argmax.get(b, int(got.argmax())) == int(got.argmax())  # a native call's own argmax
            outside += int(want.argmax()) not in vocab
    assert left > 0 and outside > 0  # rows left early, and some would have chosen a token outside
    for a, b in zip(filled_kv(states["draft"]), filled_kv(states["full"])):
        assert torch.equal(a, b)


@pytest.mark.parametrize("over", [NORM_EXITS, MLP_EXITS], ids=["norm exits", "mlp exits"])
def test_generation_chooses_early_tokens_from_the_vocabulary_and_covering_it_changes_nothing(over):
    model, prompts = make(**over), PROMPTS[4]
    vocab = vocabulary_without_half_of(model, prompts)
    s = dict(strategy="early_exit", max_new_tokens=12, ignore_eos=True, early_exit_threshold=0.4, exit_policy="exact")
    engine = EarlyExitEngine(model)
    engine.use_draft_vocabulary(vocab)
    res = engine.generate(prompts, GenerationSettings(**s, exit_vocabulary="draft"))
    early = [t for r in res for t, e in zip(r.tokens, r.exit_layers) if e < model.config.num_layers]
    assert early and all(t in vocab for t in early)
    # a vocabulary of every token: the same tokens and exits as the whole vocabulary
    engine.use_draft_vocabulary(list(range(model.config.vocab_size)))
    every = engine.generate(prompts, GenerationSettings(**s, exit_vocabulary="draft"))
    whole = engine.generate(prompts, GenerationSettings(**s, exit_vocabulary="full"))
    assert [(r.tokens, r.exit_layers) for r in every] == [(r.tokens, r.exit_layers) for r in whole]
    assert any(e < model.config.num_layers for r in whole for e in r.exit_layers)
    # threshold 1.0: full decoding whatever the vocabulary
    engine.use_draft_vocabulary(vocab)
    full = engine.generate(prompts, GenerationSettings("full", 12, ignore_eos=True))
    never = engine.generate(prompts, GenerationSettings(**{**s, "early_exit_threshold": 1.0}))
    assert [r.tokens for r in never] == [r.tokens for r in full]


def test_auto_is_the_draft_vocabulary_for_greedy_probe_decisions_only_and_bad_asks_are_named():
    model, prompts = make(), PROMPTS[1]
    engine = EarlyExitEngine(model)

    def vocab_of(**kw) -> str:
        return engine.check(GenerationSettings("early_exit", **kw), prompts).vocab

    assert vocab_of() == "full"  # no draft vocabulary
    with pytest.raises(ValueError, match="exit_vocabulary draft: this engine has no draft vocabulary"):
        vocab_of(exit_vocabulary="draft")
    engine.use_draft_vocabulary([1, 2, 3])
    assert vocab_of() == "draft" and vocab_of(measure="learned") == "draft"
    assert vocab_of(exit_vocabulary="full") == "full"
    assert vocab_of(measure="max_prob") == "full"  # its check projects onto the whole vocabulary anyway
    assert vocab_of(temperature=0.7) == "full" and vocab_of(return_logprobs=True) == "full"
    assert engine.check(GenerationSettings("full"), prompts).vocab == "full"
    with pytest.raises(ValueError, match="exit_vocabulary draft: the measure max_prob projects onto the whole"):
        vocab_of(exit_vocabulary="draft", measure="max_prob")
    with pytest.raises(ValueError, match="exit_vocabulary draft: greedy decoding without log-probabilities only"):
        vocab_of(exit_vocabulary="draft", temperature=0.7)
    with pytest.raises(ValueError, match="exit_vocabulary must be one of auto, draft, full, got 'some'"):
        vocab_of(exit_vocabulary="some")


def test_the_decider_prices_a_leaver_at_the_draft_projection():
    """One row leaving at exit 1 of 4 (batch 2, so the pass goes on): the saving is three layers'
    rows less the recompute, less the leaver's projection: the whole head's (1.0) or the draft
    vocabulary's (0.05) where the policy chooses from it; untimed (None), the whole head's."""
    engine = EarlyExitEngine(make())
    costs = ExitCosts(1.0, 0.5, 0.1, 1.0, vocab=0.3, probe=0.01, draft=0.05)
    decider = ExitDecider()
    decider.costs = costs
    rows = Rows([0, 1], [4, 4], [1, 1], torch.zeros(2, 1, 64))
    full = decider.net_saving(engine.passes, 1, rows, [0], "learned", vocab="full")
    draft = decider.net_saving(engine.passes, 1, rows, [0], "learned", vocab="draft")
    assert full == pytest.approx(3 * (0.5 - 0.1) - 1.0) and draft == pytest.approx(3 * (0.5 - 0.1) - 0.05)
    assert costs.leavers(3, "draft") == 0.05 and costs.leavers(3, "full") == 1.0  # rows beyond the first: 0 here
    decider.costs = ExitCosts(1.0, 0.5, 0.1, 1.0, vocab=0.3, probe=0.01)
    assert decider.net_saving(engine.passes, 1, rows, [0], "learned", vocab="draft") == pytest.approx(full)
    # parameter counts: the draft rows' weights; timed: where the engine has a draft vocabulary
    engine.use_draft_vocabulary(list(range(12)))
    assert ExitCosts.from_parameters(engine.passes).draft == 12 * 64
    from megatron.early_exit.inference.exit_decision import time_exit_costs

    timed = time_exit_costs(engine.passes, batch=2, repeats=1)
    assert timed.draft is not None and timed.draft > 0
    engine.use_draft_vocabulary(None)
    assert ExitCosts.from_parameters(engine.passes).draft is None
    assert time_exit_costs(engine.passes, batch=2, repeats=1).draft is None


def test_the_cost_model_prices_leavers_at_the_draft_projection_where_the_runs_use_it():
    c = DecodeCosts(4, {1: 1, 2: 2}, layer=1.0, fixed=0.5, head=2.0, probe={1: 0.1, 2: 0.1},
                    vocab={1: 2.5, 2: 2.5}, project={1: 2.0, 2: 2.0}, draft={1: 0.2})  # fmt: skip
    assert c.step([1], (1,), False) == pytest.approx(0.5 + 1.0 + 0.1 + 2.0)  # the whole projection
    c.leave_vocab = "draft"
    assert c.step([1], (1,), False) == pytest.approx(0.5 + 1.0 + 0.1 + 0.2)
    assert c.step([2], (1, 2), False) == pytest.approx(0.5 + 2.0 + 0.1 + 0.1 + 2.0)  # exit 2's draft not timed
    assert c.step([2], (1, 2), True) == pytest.approx(0.5 + 2.0 + 2.5 + 2.5)  # a vocabulary check: unchanged
    assert ExitCosts.from_cost_model(c).draft == 0.2


def test_a_final_token_outside_the_vocabulary_counts_as_a_disagreement():
    agree = torch.tensor([[[True, True], [True, False], [False, True]]])  # (C=1, L=3, E=2)
    final = torch.tensor([[4, 7, 9]])
    scores = calibration.ExitScores([1, 2], torch.rand(1, 3, 2), agree, final)
    inside = calibration.within_vocabulary(scores, [4, 9, 11])
    assert inside.agree.tolist() == [[[True, True], [False, False], [False, True]]]
    assert torch.equal(inside.confidence, scores.confidence) and torch.equal(inside.final, final)
    assert calibration.exit_agreement(inside) == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3)}
    with pytest.raises(ValueError, match="within_vocabulary needs the final head's tokens"):
        calibration.within_vocabulary(calibration.ExitScores([1, 2], scores.confidence, agree), [4])


def test_the_cost_model_times_the_draft_projection_and_says_which_vocabulary_its_runs_used():
    """`measure_costs` on an engine with a draft vocabulary times each exit's projection onto it
    (`draft`) beside the whole one; its timed runs choose leaving tokens as asked (`leave_vocab`:
    "draft" under auto, "full" when told), and `retime` keeps what it is told."""
    from megatron.early_exit.inference import cost_model as cm
    from tests.test_cost_model import tiny

    engine, prompts = EarlyExitEngine(tiny(probes=True)), [[1, 2, 3], [4, 5, 6]]
    costs, _ = cm.measure_costs(engine, prompts, steps=2, repeats=1)
    assert costs.draft == {} and costs.leave_vocab == "full"  # no draft vocabulary: nothing to time
    engine.use_draft_vocabulary(list(range(8)))
    costs, _ = cm.measure_costs(engine, prompts, steps=2, repeats=1)
    assert set(costs.draft) == set(costs.project) == {1, 2} and all(t > 0 for t in costs.draft.values())
    assert costs.leave_vocab == "draft" and costs.leaver_piece(1) == "draft/1"
    assert costs.reads["draft/1"][1] == 8 * engine.config.hidden_size * 4  # fp32 rows
    whole, _ = cm.measure_costs(engine, prompts, steps=2, repeats=1, exit_vocabulary="full")
    assert whole.leave_vocab == "full" and whole.leaver_piece(1) == "project/1"
    assert cm.retime(engine, prompts, costs, steps=2, repeats=1, exit_vocabulary="full").leave_vocab == "full"
    assert cm.retime(engine, prompts, whole, steps=2, repeats=1).leave_vocab == "draft"

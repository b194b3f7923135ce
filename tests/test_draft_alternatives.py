"""Alternative drafts in self-speculation (`draft_alternatives`): each draft's second choice goes
to the verify pass as a row of its own (`kv_cache.RowIndex`, `row_positions`), and where the first
rejected draft's alternative is the final head's token, that row's token is kept too.

Checked: the branched layout's positions and mask, number for number; a verify pass with
alternatives gives the chain's rows the logits a pass without them gives, and each alternative's
row the logits of a full forward over its own context (no cache); keeping one moves its K/V into
place, where they equal a fresh prefill's; decoding stays lossless against full greedy (fp32,
batch 1 and 4, fixed and "auto" plans) on a model whose exits often have the final head's token
second; the controller verifies the alternatives worth their row and learns how often they catch.
"""

import numpy as np
import pytest
import torch

from megatron.early_exit.config import ModelConfig
from megatron.early_exit.inference import EarlyExitEngine, GenerationSettings, generate
from megatron.early_exit.inference.kv_cache import KVCache, RowIndex
from megatron.early_exit.inference.passes import ExitPolicy
from megatron.early_exit.inference.settings import GenerationResult, check_values
from megatron.early_exit.inference.strategies import STRATEGIES, get_strategy
from megatron.early_exit.inference.strategies.base import Batch
from megatron.early_exit.inference.strategies.draft_control import DraftController, DraftCosts, Plan
from megatron.early_exit.model import EarlyExitGPT
from tests.test_inference import naive_greedy

PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15], [3]]
NEW = 40

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def build(noise: float = 1.0) -> EarlyExitGPT:
    """6 layers, exits at 1 and 3, untied: each exit's projection is the final head's plus noise,
    so that its greedy token is often the final head's second choice."""
    cfg = ModelConfig(
        num_layers=6, hidden_size=32, num_attention_heads=4, num_query_groups=2, vocab_size=64,
        max_position_embeddings=128, normalization="RMSNorm", swiglu=True, position_embedding_type="rope",
        add_bias_linear=False, exit_layer_nums=[1, 3], use_exit_norm=True, untie_exit_output_weights=True,
        untie_embeddings_and_output_weights=True,  # a tied head echoes the input token: text of one token
    )  # fmt: skip
    model = EarlyExitGPT(cfg)
    model.init_weights(11)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for i in range(1, 6):  # deeper layers change little: exits near the final head
            layer = model.decoder.layers[str(i)]
            layer.self_attention.linear_proj.weight.mul_(0.2)
            layer.mlp.linear_fc2.weight.mul_(0.2)
        head = model.output_weight()
        for n in ("1", "3"):
            w = model.exits[n].output_layer.weight
            w.copy_(head + noise * head.std() * torch.randn(w.shape, generator=gen))
            model.exits[n].norm.load_state_dict(model.decoder.final_layernorm.state_dict())
    return model.eval()


@pytest.fixture(scope="module")
def model_and_ref():
    model = build()
    return model, [naive_greedy(model, p, NEW) for p in PROMPTS]


def test_branched_layout_positions_and_mask():
    cache = KVCache(1, 3, 16, 1, 4, torch.float32, torch.device("cpu"))
    # one sequence: chain rows at 5..8 (the verify's drafted rows and newest draft), then
    # alternatives for the chain's positions 6 and 8 (3 and 1 before the chain's end, 9)
    idx = RowIndex([1], [5], [6], cache, torch.device("cpu"), [(3, 1)])
    assert idx.block == (slice(1, 2), 5, 11)
    assert idx.positions.tolist() == [[5, 6, 7, 8, 6, 8]]
    mask = idx.attn_mask[0, 0]
    want = np.zeros((6, 11), dtype=bool)
    for r in range(4):  # the chain: causal by index
        want[r, : 6 + r] = True
    want[4, :6] = True  # position 6: keys 0..5, and itself at index 9
    want[4, 9] = True
    want[5, :8] = True  # position 8: keys 0..7, and itself at index 10
    want[5, 10] = True
    assert np.array_equal(mask.numpy(), want)
    assert np.all(idx.filled_end == 11)  # every layer filled to the last alternative's index
    # two sequences, padded: the second has no alternative (plain causal rows)
    idx = RowIndex([0, 2], [3, 7], [3, 2], cache, torch.device("cpu"), [(1,), ()])
    assert idx.block is None
    assert idx.positions.tolist() == [[3, 4, 4], [7, 8, 0]]
    assert idx.write_pos.tolist() == [[3, 4, 5], [7, 8, 16]]  # padding writes to the scratch slot
    m = idx.attn_mask[:, 0]
    assert m[0, 2].nonzero().flatten().tolist() == [0, 1, 2, 3, 5]
    assert m[1, 1].nonzero().flatten().tolist() == list(range(9))
    assert m[1, 2].nonzero().flatten().tolist() == [0]  # a padding row attends to one key


def drafted_state(engine, prompt, drafts):
    """A state after prefilling `prompt` and feeding its last token and drafts[:-1] at exit 1
    (as draft steps do): the verify pass's input."""
    state = engine.new_state(1, len(prompt) + 2 * len(drafts) + 4)
    engine.prefill(state, {0: prompt[:-1]})
    for t in [prompt[-1], *drafts[:-1]]:
        engine.decode_one_token(state, {0: t}, ExitPolicy(force=1))
    return state


@torch.no_grad()
def test_a_verify_pass_with_alternatives_gives_each_row_its_own_logits():
    model = build()
    engine = EarlyExitEngine(model)
    prompt, drafts, alts = [4, 9, 2, 33, 7], [12, 40, 5], {0: 21, 2: 60}
    plain = engine.verify(drafted_state(engine, prompt, drafts), {0: [drafts[-1]]})
    state = drafted_state(engine, prompt, drafts)
    out = engine.verify(state, {0: [drafts[-1], *alts.values()]}, branch={0: (3, 1)})
    logits = out.all_logits[0]
    assert logits.shape[0] == 4 + 2
    # fp32: the chain's rows go through the same products with one or two more rows beside them
    torch.testing.assert_close(logits[:4], plain.all_logits[0], rtol=1e-5, atol=1e-5)
    for row, (j, a) in zip(logits[4:], alts.items()):  # alternative j: prompt, drafts before it, itself
        ref = model(torch.tensor([prompt + drafts[:j] + [a]])).logits[0, -1]
        torch.testing.assert_close(row, ref, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_a_kept_alternative_moves_its_kv_into_place():
    model = build()
    engine = EarlyExitEngine(model)
    prompt, drafts, alts = [4, 9, 2, 33, 7], [12, 40, 5], {1: 21}
    state = drafted_state(engine, prompt, drafts)
    start = len(prompt) - 1  # the round's first fed position
    engine.verify(state, {0: [drafts[-1], *alts.values()]}, branch={0: (2,)})
    # keep the first draft and the alternative at the second: K/V from index start + 4 to start + 2
    state.cache.move(0, start + len(drafts) + 1, start + 2)
    state.reset(0, start + 3)
    kept = prompt + [drafts[0], alts[1]]
    fresh = engine.new_state(1, 16)
    engine.prefill(fresh, {0: kept})
    n = len(kept)
    assert (state.cache.filled[:, 0] == n).all()
    torch.testing.assert_close(state.cache.k[:, 0, :, :n], fresh.cache.k[:, 0, :, :n], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state.cache.v[:, 0, :, :n], fresh.cache.v[:, 0, :, :n], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("plan", ["fixed", "auto"])
def test_self_speculation_with_alternatives_equals_full_greedy(model_and_ref, batch, plan):
    model, ref = model_and_ref
    kw = dict(num_draft_tokens=3, draft_exit_layer=1) if plan == "fixed" else {}
    res = generate(
        model, None, PROMPTS[:batch], strategy="self_speculative", max_new_tokens=NEW, ignore_eos=True,
        draft_alternatives=True, **kw,
    )  # fmt: skip
    assert [r.tokens for r in res] == ref[:batch]
    if plan == "fixed":  # every draft's alternative is verified: some are kept on this model
        assert sum(r.stats["alternatives_kept"] for r in res) > 0
    off = generate(
        model, None, PROMPTS[:batch], strategy="self_speculative", max_new_tokens=NEW, ignore_eos=True,
        draft_alternatives=False, **kw,
    )  # fmt: skip
    assert [r.tokens for r in off] == ref[:batch]
    assert all(r.stats["alternatives_kept"] == 0 for r in off)


def test_alternatives_keep_fewer_rounds(model_and_ref):
    model, ref = model_and_ref
    s = dict(strategy="self_speculative", max_new_tokens=NEW, ignore_eos=True, num_draft_tokens=3, draft_exit_layer=1)
    on = generate(model, None, PROMPTS[:1], draft_alternatives=True, **s)[0]
    off = generate(model, None, PROMPTS[:1], draft_alternatives=False, **s)[0]
    rounds = lambda r: sum(r.stats["draft_lengths"].values())  # noqa: E731
    assert on.tokens == off.tokens == ref[0]
    # each kept alternative adds a token to its round: at least that many rounds fewer (minus
    # the last round's, which may be cut by max_new_tokens)
    assert rounds(on) <= rounds(off) - on.stats["alternatives_kept"] + 1


@torch.no_grad()
def test_no_room_for_alternatives_verifies_without_them(model_and_ref):
    """A state with no room past the last position (a server's fixed capacity) verifies the
    drafts alone and stays lossless."""
    model, ref = model_and_ref
    engine = EarlyExitEngine(model)
    prompt = PROMPTS[0]
    state = engine.new_state(1, len(prompt) + NEW + 1)  # no extra room
    s = GenerationSettings(
        "self_speculative", max_new_tokens=NEW, ignore_eos=True, num_draft_tokens=3, draft_exit_layer=1,
        draft_alternatives=True,
    )  # fmt: skip
    strategy = get_strategy("self_speculative")
    results = {0: GenerationResult(list(prompt))}
    batch = Batch(s, strategy.policy(engine, s, engine.allowed_exits(s)), results, {0: [0, 0]})
    out = engine.prefill(state, {0: prompt})
    running = engine.acceptance.accept(out, results, s, None)
    while running:
        running = strategy.round(engine, state, running, batch)
    assert results[0].tokens == ref[0]


def test_the_controller_verifies_the_alternatives_worth_their_row():
    costs = DraftCosts({1: 0.2}, {1: 0.02}, alt={1: 0.03}, alt_base={1: 0.0})
    ctl = DraftController(costs, stop_early=True)
    for _ in range(40):  # sure drafts are accepted, unsure ones are not
        ctl.update(1, [([0.95, 0.95, 0.05], 2)])
    plan = Plan(1, 3, 1.5, alternatives=True)
    # the unsure draft after two sure ones: worth a row; the sure ones: not
    assert ctl.worth_verifying(plan, [0.95, 0.95, 0.05]) == [2]
    assert ctl.worth_verifying(plan, [0.05, 0.95]) == [0]
    # a pass with any alternative costing more than they bring: none
    ctl.costs = DraftCosts({1: 0.2}, {1: 0.02}, alt={1: 0.03}, alt_base={1: 1.0})
    assert ctl.worth_verifying(plan, [0.95, 0.95, 0.05]) == []
    # learning how often they catch: Beta(1, 1) prior, decayed counts
    assert ctl.caught_share(1) == 0.5
    ctl.update_alternatives(1, [1, 1, 1, 0])
    assert ctl.caught_share(1) == pytest.approx((3 + 1) / (4 + 2))


def test_plans_are_chosen_without_alternatives_and_carry_the_request():
    costs = DraftCosts({1: 0.2}, {1: 0.02}, base={1: 1.1}, alt={1: 0.03}, alt_base={1: 0.1})
    assert costs.alt_row(1) == 0.03
    assert DraftCosts({1: 0.2}, {1: 0.02}).alt_row(1) == pytest.approx(2 * 0.02)  # ALT_ROWS drafted rows
    on = DraftController(costs, agreement={1: 0.8}).plan([1], [1, 2, 3], alternatives=True)
    off = DraftController(costs, agreement={1: 0.8}).plan([1], [1, 2, 3])
    assert on.exit == 1 and (on.exit, on.length, on.rate) == (off.exit, off.length, off.rate)
    assert on.alternatives and not off.alternatives
    # a bad exit decodes plainly with or without them
    bad = DraftController(costs, agreement={1: 0.05}).plan([1], [1, 2, 3], alternatives=True)
    assert bad.exit is None and not bad.alternatives


def test_draft_alternatives_are_off_by_default_and_must_be_a_bool():
    assert GenerationSettings().draft_alternatives is False
    with pytest.raises(ValueError, match="draft_alternatives"):
        check_values(GenerationSettings("self_speculative", draft_alternatives="yes"), STRATEGIES)
    check_values(GenerationSettings("self_speculative", draft_alternatives=False), STRATEGIES)

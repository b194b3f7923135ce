"""The uniform decode fast path (`Passes.run_uniform`) against the exact path, backbone-reading
confidence probes, and the optional compiled layer steps.

The exact path (`Passes.fast = False`) is the general one every pass took before: it gathers
rows, builds a causal mask per layout and writes K/V with indexed writes. The fast path must
give the same tokens, the same exit decisions and the same K/V cache contents, including
across steps where an early-exited token's pending state is recomputed by the exact path.
"""

import itertools
import os

import numpy as np
import pytest
import torch

from megatron.early_exit.config import ModelConfig
from megatron.early_exit.inference import EarlyExitEngine, ExitPolicy, GenerationSettings, lean
from megatron.early_exit.model import EarlyExitGPT

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread

BASE = dict(
    num_layers=4, hidden_size=32, num_attention_heads=4, vocab_size=64, max_position_embeddings=64,
    normalization="RMSNorm", swiglu=True, position_embedding_type="rope", add_bias_linear=False,
)  # fmt: skip
FAMILIES = {
    # GQA (2 groups of 2 heads), norm+MLP exits with probes on the exit's hidden state
    "llama_exit_probe": dict(
        num_query_groups=2,
        exit_layer_nums=[1, 2, 3],
        use_exit_norm=True,
        use_exit_mlp=True,
        use_exit_confidence_head=True,
    ),
    # probes reading the backbone through their own norm
    "llama_backbone_probe": dict(
        num_query_groups=2,
        exit_layer_nums=[1, 2, 3],
        use_exit_norm=True,
        use_exit_mlp=True,
        use_exit_confidence_head=True,
        exit_confidence_input="backbone",
    ),
    # exits before their layer with their own transformer block (own KV cache), MHA
    "pre_exit_block": dict(
        num_query_groups=4,
        exit_layer_nums=[1, 3],
        pre_exit=True,
        use_exit_block=True,
        use_exit_norm=True,
        use_exit_confidence_head=True,
        exit_confidence_input="backbone",
    ),
    # GPT-2 style: learned positions, LayerNorm, GELU, biases, no probes (max_prob)
    "gpt2": dict(
        normalization="LayerNorm",
        swiglu=False,
        position_embedding_type="learned_absolute",
        add_bias_linear=True,
        exit_layer_nums=[1, 2, 3],
        use_exit_norm=True,
        use_exit_mlp=True,
    ),
}
PROMPTS = {1: [[5, 9, 2, 7]], 4: [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15], [3]]}
STEPS = 12


def make(family: str, seed: int = 5) -> EarlyExitGPT:
    model = EarlyExitGPT(ModelConfig(**{**BASE, **FAMILIES[family]}))
    model.init_weights(seed)
    return model.eval()


@torch.no_grad()
def decode(model, prompts, policies: list[ExitPolicy], fast: bool, steps: int = STEPS):
    """Greedy decoding through the engine's step functions, step j under policies[j % len];
    returns (tokens and exit layers per step, the state, how many passes took the fast path)."""
    engine = EarlyExitEngine(model)
    engine.passes.fast = fast
    calls = {"uniform": 0}
    uniform = engine.passes.run_uniform

    def counted(*a, **k):
        calls["uniform"] += 1
        return uniform(*a, **k)

    engine.passes.run_uniform = counted
    trace, state = greedy_steps(engine, prompts, policies, steps)
    return trace, state, calls["uniform"]


def greedy_steps(engine, prompts, policies: list[ExitPolicy], steps: int, logits: bool = False):
    """Prefill, then `steps` greedy decode steps, step j under policies[j % len]: (per step the
    tokens fed and the exit layers, and with `logits` each sequence's logits; the state)."""
    state = engine.new_state(len(prompts), max(map(len, prompts)) + steps + 2)
    out = engine.prefill(state, dict(enumerate(prompts)))
    trace = []
    for j in range(steps):
        tokens = {b: int(out.logits[b].argmax()) for b in range(len(prompts))}
        out = engine.decode_one_token(state, tokens, policies[j % len(policies)])
        seen = {b: out.logits[b].clone() for b in out.logits}
        trace.append((tokens, dict(out.exit_layer), seen) if logits else (tokens, dict(out.exit_layer)))
    return trace, state


def filled_kv(state):
    """K/V at every filled (layer, sequence, position), in a fixed order, and the fill counts."""
    ks, vs = [], []
    for cache in [state.cache] + ([state.exit_cache] if state.exit_cache is not None else []):
        for layer in range(cache.filled.shape[0]):
            for b in range(cache.filled.shape[1]):
                f = int(cache.filled[layer, b])
                ks.append(cache.k[layer, b, :, :f].flatten())
                vs.append(cache.v[layer, b, :, :f].flatten())
    return torch.cat(ks), torch.cat(vs)


def pending_recomputed(trace, num_layers) -> bool:
    """Some sequence had a token leave early and a later token go deeper (its pending row is
    then recomputed in that later pass)."""
    seen_exit = set()
    for _, exits in trace:
        for b, layer in exits.items():
            if b in seen_exit and layer == num_layers:
                return True
            if layer < num_layers:
                seen_exit.add(b)
    return False


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("batch", [1, 4])
def test_fast_path_matches_exact_path_tokens_and_kv(family, batch):
    model = make(family)
    measure = "learned" if model.config.use_exit_confidence_head else "max_prob"
    prompts = PROMPTS[batch]
    mixed = 0
    # Thresholds from "always exit" to "never" (the middle ones split the batch's sequences
    # between exits), each alone and alternating with full-depth steps, which recompute the
    # pending rows of the tokens that left, between fast steps.
    for threshold, alternate in itertools.product((0.0, 0.05, 0.3, 0.5, 0.55, 0.6, 1.0), (False, True)):
        policy = ExitPolicy(allowed=tuple(model.config.exit_layer_nums), threshold=threshold, measure=measure)
        policies = [policy, ExitPolicy()] if alternate else [policy]
        exact, s_exact, n_exact = decode(model, prompts, policies, fast=False)
        fast, s_fast, n_fast = decode(model, prompts, policies, fast=True)
        assert n_exact == 0 and n_fast > 0
        assert fast == exact, f"threshold {threshold}: tokens or exits differ"
        assert s_fast.fed == s_exact.fed
        assert (s_fast.cache.filled == s_exact.cache.filled).all()
        if s_exact.exit_cache is not None:
            assert (s_fast.exit_cache.filled == s_exact.exit_cache.filled).all()
        k_fast, v_fast = filled_kv(s_fast)
        k_exact, v_exact = filled_kv(s_exact)
        # Same inputs, same weights; only SDPA's reduction (a sliced key set without a mask vs
        # the masked one) may differ, at fp32 round-off.
        torch.testing.assert_close(k_fast, k_exact, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(v_fast, v_exact, rtol=1e-5, atol=1e-6)
        mixed += pending_recomputed(exact, model.config.num_layers)
    assert mixed, "no run made a token leave early and a later one go deeper"


def test_fast_path_full_decoding_equals_generate_without_it():
    model = make("llama_exit_probe")
    s = GenerationSettings(max_new_tokens=8)
    engine = EarlyExitEngine(model)
    fast = engine.generate(PROMPTS[4], s)
    engine.passes.fast = False
    exact = engine.generate(PROMPTS[4], s)
    assert [r.tokens for r in fast] == [r.tokens for r in exact]


@torch.no_grad()
def test_backbone_probe_fires_on_the_rows_of_the_probe_computed_by_hand(monkeypatch):
    model = make("llama_backbone_probe", seed=7)
    n, threshold = 2, 0.5
    head = model.exits[str(n)]
    engine = EarlyExitEngine(model, packed_weights=False)
    prompts = PROMPTS[4]
    state = engine.new_state(len(prompts), 32)
    out = engine.prefill(state, dict(enumerate(prompts)))
    seen = {}
    model.decoder.layers[str(n - 1)].register_forward_hook(lambda m, a, y: seen.__setitem__("x", y.clone()))
    hidden_rows = []
    real_hidden = head.hidden
    head.hidden = lambda h, *a: (hidden_rows.append(h.shape[0]), real_hidden(h, *a))[1]
    real_lean = lean.ExitMLP.__call__  # the exit's MLP as lean passes run it (`Passes.exit_input`)
    counted = lambda m, x, k: (hidden_rows.append(x.shape[0]), real_lean(m, x, k))[1]  # noqa: E731
    monkeypatch.setattr(lean.ExitMLP, "__call__", counted)
    policy = ExitPolicy(allowed=(n,), threshold=threshold, measure="learned")
    fired_total = stayed_total = 0
    for _ in range(6):
        tokens = {b: int(out.logits[b].argmax()) for b in range(len(prompts))}
        hidden_rows.clear()
        out = engine.decode_one_token(state, tokens, policy)
        if seen["x"].shape[1] != 1:
            continue  # a step that recomputed pending rows: the newest row is not alone
        backbone = seen["x"]  # (A, 1, h): the rows exit 2 reads, in slot order
        by_hand = torch.sigmoid(head.confidence(head.confidence_norm(backbone)))[:, 0, 0]  # (A,)
        expect = {b for b in range(len(prompts)) if by_hand[b] >= threshold}
        fired = {b for b, layer in out.exit_layer.items() if layer == n}
        assert fired == expect
        for b in fired:
            assert out.confidence[b] == pytest.approx(float(by_hand[b]), abs=1e-6)
            logits = head.project(real_hidden(backbone[b : b + 1]), model.tied_output_weight())[0, 0]
            assert int(out.logits[b].argmax()) == int(logits.argmax())
        # The exit's MLP ran once, on exactly the rows that left (none if nobody did).
        assert hidden_rows == ([len(fired)] if fired else [])
        fired_total += len(fired)
        stayed_total += len(prompts) - len(fired)
    assert fired_total and stayed_total  # both outcomes were exercised


def test_compile_failure_falls_back_to_eager_with_one_warning(monkeypatch):
    model = make("llama_exit_probe")
    s = GenerationSettings(max_new_tokens=6)
    expected = [r.tokens for r in EarlyExitEngine(model).generate(PROMPTS[4], s)]

    def broken(*args):  # what a compiled function does where inductor cannot build its kernels
        raise RuntimeError("no C++ compiler\nsecond line")

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: broken)  # (importing dynamo costs seconds)
    engine = EarlyExitEngine(model, compile=True)
    assert engine.passes.compiled is broken and not engine.packed_weights
    message = r"torch.compile failed \(RuntimeError: no C\+\+ compiler\); decoding eagerly"
    with pytest.warns(UserWarning, match=message) as w:
        got = [r.tokens for r in engine.generate(PROMPTS[4], s)]
    assert len(w) == 1 and engine.passes.compiled is None
    assert got == expected


@pytest.mark.skipif(
    os.environ.get("EE_TEST_COMPILE") != "1",
    reason="torch.compile (inductor) on the 2-core development CPU, under load, did not finish a tiny "
    "model's first decode in 15 minutes; set EE_TEST_COMPILE=1 to run this on a machine with time for it",
)
def test_compiled_layers_give_the_same_greedy_tokens_without_recompiling_every_step():
    from torch._dynamo.utils import counters

    model = make("llama_exit_probe")
    s = GenerationSettings(max_new_tokens=12)
    eager = EarlyExitEngine(model, packed_weights=False)
    engine = EarlyExitEngine(model, compile=True)
    for prompts in (PROMPTS[4], PROMPTS[1]):  # ragged lengths (masked), then one sequence (no mask)
        assert [r.tokens for r in engine.generate(prompts, s)] == [r.tokens for r in eager.generate(prompts, s)]
    assert engine.passes.compiled is not None  # it did not fall back
    graphs = counters["stats"]["unique_graphs"]
    engine.generate(PROMPTS[4], GenerationSettings(max_new_tokens=24))  # longer: new positions and lengths
    assert counters["stats"]["unique_graphs"] == graphs  # no graph per step, layer or length


@torch.no_grad()
def test_a_step_after_an_early_exit_runs_uniformly_up_to_the_pending_layer():
    model = make("llama_exit_probe")
    engine = EarlyExitEngine(model)
    p, prompts = engine.passes, PROMPTS[4]
    state = engine.new_state(len(prompts), 32)
    out = engine.prefill(state, dict(enumerate(prompts)))
    tokens = lambda out: {b: [int(out.logits[b].argmax())] for b in range(len(prompts))}  # noqa: E731
    assert p.uniform_layers(state, tokens(out)) == model.config.num_layers  # nothing pending anywhere
    assert p.uniform_layers(state, {0: [1, 2], 1: [3]}) == 0  # two rows for one sequence: not a decode step
    # Sequence 2 leaves at exit 2 (depth 2): its newest position lacks K/V at layers 2 and 3.
    out = engine.decode_one_token(state, {b: t[0] for b, t in tokens(out).items()}, ExitPolicy(allowed=(2,), force=2))
    assert set(out.exit_layer.values()) == {2}
    assert p.uniform_layers(state, tokens(out)) == 2
    assert p.uniform_layers(state, {b: t for b, t in tokens(out).items() if b != 2}) == 2  # everyone exited there
    # The next full step: uniform through layers 0-1, the pending rows filled from layer 2 on.
    calls = []
    uniform = p.run_uniform
    p.run_uniform = lambda *a, **k: (calls.append(a[3]), uniform(*a, **k))[1]
    out = engine.decode_one_token(state, {b: t[0] for b, t in tokens(out).items()}, ExitPolicy())
    assert calls == [2] and set(out.exit_layer.values()) == {model.config.num_layers}
    assert (state.cache.filled == np.asarray(state.fed)[None, :]).all()  # every layer caught up
    assert p.uniform_layers(state, tokens(out)) == model.config.num_layers


@torch.no_grad()
def verify_rounds(model, prompts, fast: bool, exit_layer: int, drafts: int, rounds: int = 5):
    """Greedy self-speculative rounds through the step functions (fixed draft exit and length),
    the drafts kept whatever the verify says and the final head's tokens fed next: per round the
    drafts, each verified row's final logits and tokens; the state; how many passes started uniformly."""
    engine = EarlyExitEngine(model)
    engine.passes.fast = fast
    calls = []
    uniform = engine.passes.run_uniform
    engine.passes.run_uniform = lambda *a, **k: (calls.append(a[3]), uniform(*a, **k))[1]
    state = engine.new_state(len(prompts), max(map(len, prompts)) + rounds * (drafts + 1) + 2)
    out = engine.prefill(state, dict(enumerate(prompts)))
    last = {b: int(out.logits[b].argmax()) for b in range(len(prompts))}
    trace = []
    for _ in range(rounds):
        drafted = {b: [] for b in last}
        for _ in range(drafts):
            out = engine.decode_one_token(state, last, ExitPolicy(force=exit_layer))
            last = {b: int(out.logits[b].argmax()) for b in out.logits}
            for b, t in last.items():
                drafted[b].append(t)
        out = engine.verify(state, {b: [t] for b, t in last.items()})
        trace.append((drafted, {b: out.all_logits[b].clone() for b in out.all_logits}))
        last = {b: int(out.all_logits[b][-1].argmax()) for b in out.all_logits}
    return trace, state, calls


@pytest.mark.parametrize("family", ["llama_exit_probe", "pre_exit_block", "gpt2"])
@pytest.mark.parametrize("batch", [1, 4])
def test_verify_pass_runs_uniformly_up_to_the_draft_exit_and_matches_the_exact_path(family, batch):
    # A verify pass feeds the newest draft alone; the drafted rows have K/V up to the draft
    # exit's depth. It now takes the uniform path there (the drafted rows join after), and must
    # give the exact path's logits for every verified row, and its K/V.
    model = make(family)
    exit_layer = max(model.config.exit_layer_nums)  # the deepest: a prefix of 2-3 layers
    depth = exit_layer - 1 if model.config.pre_exit else exit_layer
    exact, s_exact, c_exact = verify_rounds(model, PROMPTS[batch], fast=False, exit_layer=exit_layer, drafts=2)
    fast, s_fast, c_fast = verify_rounds(model, PROMPTS[batch], fast=True, exit_layer=exit_layer, drafts=2)
    assert c_exact == [] and depth in c_fast  # the verify passes' uniform prefix: the draft exit's depth
    for (d_fast, l_fast), (d_exact, l_exact) in zip(fast, exact, strict=True):
        assert d_fast == d_exact
        assert l_fast.keys() == l_exact.keys()
        for b in l_fast:
            assert l_fast[b].shape == (3, model.config.vocab_size)  # the fed draft and the two before it
            # fp32; the two paths order a few sums differently (masked vs unmasked attention)
            torch.testing.assert_close(l_fast[b], l_exact[b], rtol=1e-5, atol=1e-5)
    assert (s_fast.cache.filled == s_exact.cache.filled).all() and s_fast.fed == s_exact.fed
    for got, want in zip(filled_kv(s_fast), filled_kv(s_exact), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_block_of_rows_is_written_and_read_by_slicing_as_the_padded_layout_would():
    # RowIndex of contiguous slots with the same positions (a verify pass, a one-sequence fill):
    # the causal mask, positions and K/V writes must be those of the general (padded) layout.
    from megatron.early_exit.inference.kv_cache import KVCache, RowIndex

    def index(cache, seqs, lo, n, block):
        idx = RowIndex(seqs, lo, n, cache, torch.device("cpu"))
        assert (idx.block is not None) == block
        return idx

    cache = KVCache(1, 3, 16, 2, 4, torch.float32, torch.device("cpu"))
    block = index(cache, [1, 2], [5, 5], [3, 3], True)
    assert block.positions.tolist() == [[5, 6, 7], [5, 6, 7]] and block.span == 8
    want = torch.tensor([[j <= 5 + i for j in range(8)] for i in range(3)])  # key j for the row at 5 + i
    assert torch.equal(block.attn_mask, want.expand(2, 1, 3, 8))
    padded = index(cache, [1, 2], [5, 5], [3, 2], False)  # one row short: the padded layout
    assert torch.equal(padded.attn_mask[0], want[None])
    index(cache, [0, 2], [5, 5], [3, 3], False)  # slots not contiguous
    index(cache, [1, 2], [4, 5], [3, 3], False)  # positions differ
    k, v = torch.randn(2, 2, 3, 4), torch.randn(2, 2, 3, 4)  # (A, ng, R, hd)
    keys, values = cache.layer(0, block).update(k, v)
    assert keys.shape == (2, 2, 8, 4) and keys.data_ptr() == cache.k[0, 1].data_ptr()  # a view: no copy
    assert torch.equal(cache.k[0, 1:3, :, 5:8], k) and torch.equal(cache.v[0, 1:3, :, 5:8], v)
    assert torch.equal(keys[:, :, 5:], k) and torch.equal(values, cache.v[0, 1:3, :, :8])
    general = KVCache(1, 3, 16, 2, 4, torch.float32, torch.device("cpu"))
    index(general, [1, 2], [5, 5], [3, 2], False)
    general.layer(0, RowIndex([1], [5], [3], general, torch.device("cpu"))).update(k[:1], v[:1])
    assert torch.equal(general.k[0, 1], cache.k[0, 1])  # a one-sequence block writes what the slices do


@pytest.mark.parametrize(
    "scaling", [None, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}]
)
def test_rotary_tables_give_the_modules_angles_bit_for_bit(scaling):
    # Passes read the rotary angles from tables the module made once (`Passes.rotary_tables`):
    # at every position, in the uniform step's slice layout and the general pass's indexed one,
    # after the tables grow past their first 256 positions, with the attention scaling yarn
    # multiplies in: the module's own numbers.
    model = EarlyExitGPT(ModelConfig(**{**BASE, **FAMILIES["llama_exit_probe"], "rope_scaling": scaling}))
    model.init_weights(3)
    passes = EarlyExitEngine(model.eval()).passes
    positions = torch.tensor([[0, 1, 2, 255], [7, 31, 63, 64]])
    cos, sin, signed = passes.rotary_at(positions, top=256, signed=True)
    ref_cos, ref_sin = model.rotary(positions)
    assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin) and passes.rope_tables[0].shape[0] == 256
    half = cos.shape[-1] // 2
    assert torch.equal(signed[..., :half], -ref_sin[..., :half]) and torch.equal(
        signed[..., half:], ref_sin[..., half:]
    )
    far = torch.tensor([[256, 300, 1000]])
    cos, sin, none = passes.rotary_at(far, top=1001)
    assert none is None and passes.rope_tables[0].shape[0] == 1024  # made again, larger
    assert torch.equal(cos, model.rotary(far)[0]) and torch.equal(sin, model.rotary(far)[1])
    views = passes.rotary_tables(1001)[3]  # what a uniform step at one position slices
    assert torch.equal(views[0][300:301][:, :, 0], model.rotary(torch.tensor([[300]]))[0][0])


def test_uniform_steps_embed_by_lookup_unless_a_hook_watches_the_embedding():
    model = make("llama_exit_probe")
    ref, s_ref, _ = decode(model, PROMPTS[4], [ExitPolicy()], fast=False, steps=4)
    got, s_got, n = decode(model, PROMPTS[4], [ExitPolicy()], fast=True, steps=4)
    assert n == 4 and got == ref and torch.equal(filled_kv(s_got)[0], filled_kv(s_ref)[0])
    seen = []
    handle = model.embedding.word_embeddings.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    try:
        hooked, _, _ = decode(model, PROMPTS[4], [ExitPolicy()], fast=True, steps=4)
    finally:
        handle.remove()
    assert hooked == ref and seen[0] == (4, 7, 32) and seen[1:] == [(4, 1, 32)] * 4  # the prefill, then each step

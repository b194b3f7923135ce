"""Lean layers (`inference/lean.py`) against the modules, in decode steps and general passes.

`LeanLayer` promises the modules' arithmetic in their order, only fewer operations around it,
so decoding with it must give bit-identical logits, exit decisions and K/V (no tolerance), in
fp32 and bf16, with every sequence at one position (the slice views of `kv_cache.SliceView`)
and at ragged positions (the masked `DecodeView`), in prefills, and across steps where
early-exited rows are recomputed (general passes: `LeanLayer.rows`). Layers it does not
support run the modules.
"""

import pytest
import torch

from megatron.early_exit.config import ModelConfig
from megatron.early_exit.inference import EarlyExitEngine, ExitPolicy, kernels, lean, native
from megatron.early_exit.model import EarlyExitGPT
from megatron.early_exit.model.attention import group_rows_attention
from tests.test_fast_path import greedy_steps

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread

LLAMA = dict(
    num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2, vocab_size=96,
    max_position_embeddings=64, normalization="RMSNorm", swiglu=True, position_embedding_type="rope",
    add_bias_linear=False, exit_layer_nums=[1, 2, 3], use_exit_norm=True, use_exit_confidence_head=True,
)  # fmt: skip
PROMPTS = {
    1: [[5, 9, 2, 7]],
    2: [[5, 9, 2, 7], [8, 1, 6, 3]],  # every sequence at one position: the steps' sliced layouts
    4: [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15], [3]],
}


def make(dtype=torch.float32, **over) -> EarlyExitGPT:
    model = EarlyExitGPT(ModelConfig(**{**LLAMA, **over}))
    model.init_weights(11)
    return model.to(dtype).eval()


@torch.no_grad()
def decode(model, prompts, policies, use_lean: bool, steps: int = 10, packed: bool = True):
    """Greedy steps through the engine's step functions; (logits and exits per step, state, lean layer calls)."""
    engine = EarlyExitEngine(model, packed_weights=packed)
    engine.passes.lean = use_lean
    calls = [0, 0, 0]  # uniform steps' lean calls, general passes' lean calls, calls given an exit check's rows

    class Counted:  # a LeanLayer that counts its calls
        def __init__(self, layer):
            self.layer, self.hooked, self.eps_in = layer, layer.hooked, layer.eps_in

        def __call__(self, *a):
            calls[0] += 1
            calls[2] += len(a) > 6 and a[6] is not None
            return self.layer(*a)

        def rows(self, *a, **k):
            calls[1] += 1
            return self.layer.rows(*a, **k)

        def native_arithmetic(self, *a):
            return self.layer.native_arithmetic(*a)

    for i in range(model.config.num_layers):
        layer = engine.passes.lean_layer(i)
        if layer is not None:
            engine.passes.lean_layers[i] = Counted(layer)
    trace, state = greedy_steps(engine, prompts, policies, steps, logits=True)
    return trace, state, calls


def assert_same_steps(ref, got, s_ref, s_got) -> None:
    """Two `greedy_steps` traces with logits: the same tokens fed, exits and logits bit for bit
    (the same operations: no tolerance), and the same fill counts in their states."""
    for (t_ref, e_ref, l_ref), (t_got, e_got, l_got) in zip(ref, got, strict=True):
        assert t_got == t_ref and e_got == e_ref
        assert l_got.keys() == l_ref.keys()
        for b in l_ref:
            assert torch.equal(l_got[b], l_ref[b])
    assert (s_got.cache.filled == s_ref.cache.filled).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 2, 4])
@pytest.mark.parametrize("native_probe", [False, True])
@pytest.mark.parametrize("exit_mlp", [False, True], ids=["norm_exits", "mlp_exits"])
def test_lean_layers_give_the_modules_numbers_bit_for_bit(dtype, batch, native_probe, exit_mlp, monkeypatch):
    if not native_probe:  # the checks' probes made without `native.Probe`: the torch check, rows shared
        monkeypatch.setattr(native, "available", lambda dtype=torch.float32: False)
    elif not native.available():
        pytest.skip("no native kernel here (no C compiler)")
    # MLP exits (SmolLM2's): a leaving row's exit MLP runs as `lean.ExitMLP` where lean layers are on
    model = make(dtype, use_exit_mlp=exit_mlp)
    prompts = PROMPTS[batch]
    # Exits that split the batch alternate with full-depth steps (pending rows recomputed) and
    # with checks that hardly fire (their rows taken by the next layer's norm).
    learned = dict(allowed=(1, 2, 3), measure="learned")
    policies = [ExitPolicy(threshold=0.5, **learned), ExitPolicy(), ExitPolicy(threshold=0.999, **learned)]
    mlp_calls, real_mlp = [0, 0], lean.ExitMLP.__call__

    def counted(mlp, x, linear):
        mlp_calls[use_lean] += 1
        return real_mlp(mlp, x, linear)

    monkeypatch.setattr(lean.ExitMLP, "__call__", counted)
    use_lean = False
    ref, s_ref, n_ref = decode(model, prompts, policies, use_lean=False)
    use_lean = True
    got, s_got, n_got = decode(model, prompts, policies, use_lean=True)
    assert mlp_calls[False] == 0 and (mlp_calls[True] > 0) == exit_mlp
    # Lean on uniform steps and on general passes; in steps where no row left at an exit, the
    # next layer's input norm took the rows the exit's torch check had made (`lean.scaled_rows`;
    # the native check makes none: the layer folds its own norm; nor does a probe that reads an
    # MLP exit's output).
    assert n_ref == [0, 0, 0] and min(n_got[:2]) > 0 and (n_got[2] == 0) == (native_probe or exit_mlp)
    assert_same_steps(ref, got, s_ref, s_got)
    assert torch.equal(s_got.cache.k, s_ref.cache.k) and torch.equal(s_got.cache.v, s_ref.cache.v)
    assert len({e for _, exits, _ in ref for e in exits.values()}) > 1  # some tokens left early


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("groups", [1, 3])
def test_prefills_of_every_short_length_match_the_modules(dtype, groups):
    # Head dim 64, 3 query heads in one group: SDPA rounds a group's heads taken as its rows
    # differently from `enable_gqa` at some short lengths, so the general pass must make the
    # modules' own call at each length. One head per group: the general pass hands SDPA its
    # queries as a strided view of the QKV product, the modules a tensor of their own.
    model = make(dtype, hidden_size=192, num_attention_heads=3, num_query_groups=groups)
    for n in range(1, 7):
        prompt = [(7 * j + 3) % 96 for j in range(n)]
        got = {}
        for use_lean in (False, True):
            engine = EarlyExitEngine(model, lean=use_lean)
            state = engine.new_state(1, 8)
            got[use_lean] = (engine.prefill(state, {0: prompt}).logits[0], state.cache.k.clone())
        assert torch.equal(got[True][0], got[False][0]) and torch.equal(got[True][1], got[False][1]), n


@torch.no_grad()
@pytest.mark.skipif(not native.available(), reason="no native kernel here (no C compiler)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("natively", [False, True], ids=["sdpa", "native"])
def test_a_prompt_attends_and_rotates_natively_where_that_measured_faster(dtype, natively, monkeypatch):
    """A prompt of more than ATTEND_ROWS tokens whose layers run op by op attends (and rotates, and
    makes its norms and SwiGLU) natively where `kernels.prompt_attention` says so, else through the
    modules' SDPA (and torch's operations): the modules' K/V bit for bit then (the logits within the
    round-off of the head's folded norm), within round-off when native."""
    # decode steps' products native, a prompt's on `F.linear`: its layers op by op (as on oneDNN)
    monkeypatch.setattr(kernels, "kernel_for", lambda weight, rows: "native" if rows <= 16 else "plain")
    asked = []
    monkeypatch.setattr(kernels, "prompt_attention", lambda *a: asked.append(a) or natively)
    calls = []  # (what, rows) of each native attention (rows per sequence) and rotation (rows in all)
    attend, rope = native.attend, native.rope_
    monkeypatch.setattr(native, "attend", lambda q, *a: calls.append(("attend", q.shape[1])) or attend(q, *a))
    monkeypatch.setattr(native, "rope_", lambda qkv, *a: calls.append(("rope", qkv.shape[0])) or rope(qkv, *a))
    ready = native.prepared_rows
    monkeypatch.setattr(native, "prepared_rows", lambda x, *a: calls.append(("ready", x.shape[0])) or ready(x, *a))
    model = make(dtype)
    prompt = [(7 * j + 3) % 96 for j in range(40)]
    got = {}
    for use_lean in (False, True):
        engine = EarlyExitEngine(model, lean=use_lean)
        state = engine.new_state(1, 48)
        logits = engine.prefill(state, {0: prompt}).logits[0]
        got[use_lean] = (logits.float(), state.cache.k[:, :, :, :40].float(), state.cache.v[:, :, :, :40].float())
    layers = model.config.num_layers
    assert asked == [(dtype, 2, 2, 16, 40)] * layers  # groups, heads per group, head dim, rows
    # natively: the input norm's rows made ready, rotated, attended; the MLP's norm and SwiGLU made ready
    native_layer = [("ready", 40), ("rope", 40), ("attend", 40), ("ready", 40), ("ready", 40)]
    # the last layer: every row's K/V, then the newest row alone attends and goes on (`lean.newest_only`),
    # its products at one row native (norm and SwiGLU folded into them)
    last_layer = [("ready", 40), ("rope", 40), ("attend", 1)]
    assert calls == (native_layer * (layers - 1) + last_layer if natively else [])
    for i, (lean_out, modules) in enumerate(zip(got[True], got[False], strict=True)):
        if not natively and i > 0:  # every layer's K/V: the modules' operations, bit for bit
            assert torch.equal(lean_out, modules)
        elif not natively:
            # the logits: the final norm folded into the head's native call (`Passes.native_vocab`),
            # its mean summed in the kernel's order, within round-off of torch's (bit for bit on the
            # AMD EPYC, 1.2e-7 apart on an Intel Xeon with AMX, stop 78)
            torch.testing.assert_close(lean_out, modules, rtol=1e-5, atol=1e-6)
        elif dtype == torch.float32:  # the scores and values summed in another order: round-off
            torch.testing.assert_close(lean_out, modules, rtol=1e-5, atol=1e-5)
        else:  # a rotated key or an attention output one bf16 rounding apart (2^-8), carried through
            torch.testing.assert_close(lean_out, modules, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_layers_with_plain_products_and_multi_head_attention(dtype):
    # One query head per group: plain multi-head attention; in bf16 on the CPU each decode
    # step's single query row goes through `group_rows_attention` twice over, in both paths.
    model = make(dtype, num_query_groups=4)
    policies = [ExitPolicy()]
    ref, s_ref, _ = decode(model, PROMPTS[4], policies, use_lean=False, packed=False)
    got, s_got, n = decode(model, PROMPTS[4], policies, use_lean=True, packed=False)
    assert min(n[:2]) > 0
    assert [t for t, _, _ in got] == [t for t, _, _ in ref]
    assert all(torch.equal(g[2][b], r[2][b]) for g, r in zip(got, ref) for b in r[2])
    assert torch.equal(s_got.cache.k, s_ref.cache.k)


@pytest.mark.parametrize(
    "over",
    [
        dict(normalization="LayerNorm", swiglu=False, position_embedding_type="learned_absolute", add_bias_linear=True),
        dict(qk_layernorm=True),
        dict(add_qkv_bias=True),
    ],
    ids=["gpt2", "qk_norm", "qkv_bias"],
)
def test_layers_lean_does_not_support_run_the_modules(over):
    model = make(**over)
    engine = EarlyExitEngine(model)
    assert all(engine.passes.lean_layer(i) is None for i in range(model.config.num_layers))
    assert not lean.supports(model.decoder.layers["0"])
    _, _, n = decode(model, PROMPTS[4], [ExitPolicy()], use_lean=True, steps=3)
    assert n == [0, 0, 0]


def test_a_forward_hook_sees_its_module_called_on_uniform_steps():
    model = make()
    seen = []
    handle = model.decoder.layers["2"].mlp.register_forward_hook(lambda m, a, y: seen.append(y.shape))
    _, _, n = decode(model, PROMPTS[1], [ExitPolicy()], use_lean=True, steps=3)
    assert len(seen) == 1 + 3 and n == [3 * 3, 3, 0]  # prefill and each step; the other three layers lean
    handle.remove()
    seen.clear()
    _, _, n = decode(model, PROMPTS[1], [ExitPolicy()], use_lean=True, steps=3)
    assert seen == [] and n == [3 * 4, 4, 0]


def test_signed_sine_turns_a_roll_into_rotate_half():
    torch.manual_seed(0)
    x, angle = torch.randn(3, 2, 8), torch.randn(3, 1, 4)
    sin = torch.cat((angle, angle), -1).sin()
    rotate_half = torch.cat((-x[..., 4:], x[..., :4]), -1)
    assert torch.equal(x.roll(4, -1) * lean.signed_sine(sin), rotate_half * sin)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("keys", [1, 37, 300])
def test_group_rows_attention_attends_each_row_on_its_own(dtype, keys):
    # A single query row in bf16 goes in twice (SDPA's faster CPU path): what it relies on is
    # that SDPA attends each query row on its own, so the row's result does not depend on the
    # row beside it; checked against a call with another row beside it (fp32 keeps one row,
    # whose kernel differs from the two-row one by round-off), and against fp32 attention of
    # the same inputs (bf16 keeps 8 mantissa bits: 2^-7 relative).
    g = torch.Generator().manual_seed(keys)
    q, other = (torch.randn(2, 3, 1, 64, generator=g).to(dtype) for _ in range(2))
    k, v = (torch.randn(2, 3, keys, 64, generator=g).to(dtype) for _ in range(2))
    mask = torch.ones(2, 1, 1, keys, dtype=torch.bool)
    mask[1, ..., : keys // 2] = False  # the second sequence is shorter (left positions masked)
    got = group_rows_attention(q, k, v, mask)
    beside = torch.nn.functional.scaled_dot_product_attention(torch.cat([q, other], 2), k, v, attn_mask=mask)
    assert got.shape == (2, 3, 1, 64)
    assert torch.equal(got, beside[:, :, :1]) or dtype == torch.float32
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
    torch.testing.assert_close(got.float(), ref, rtol=0, atol=2e-2 if dtype == torch.bfloat16 else 1e-6)


@pytest.mark.skipif(not native.available(), reason="no native kernel here (no C compiler)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_last_layer_of_a_prompt_or_a_fill_runs_on_its_newest_rows_alone(dtype, monkeypatch):
    """The last layer of a pass whose outputs are its newest rows' (a prefill, a step that fills
    early-exited rows) writes every row's K/V, then runs attention, projection and MLP on each
    sequence's newest row alone (`lean.newest_only`): with every product on the native kernel and
    attention native (a row's numbers do not depend on the rows beside it), the same tokens, exits,
    logits and K/V bit for bit as the pass that runs every row through it."""
    from megatron.early_exit.inference.passes import Passes
    from tests.test_fast_path import filled_kv, pending_recomputed

    monkeypatch.setattr(kernels, "kernel_for", lambda weight, rows: "native")
    monkeypatch.setattr(kernels, "prompt_attention", lambda *a: True)
    # passes of several rows layer by layer (as where a prompt's products are oneDNN's), not one native call
    monkeypatch.setattr(lean, "FOLD_ROWS", 1)
    model = make(dtype)
    last = model.config.num_layers - 1
    policies = [ExitPolicy(allowed=(1, 2, 3), threshold=0.0), ExitPolicy()]  # leave, then fill
    advance, runs = Passes.advance, {}

    def counted(rows, calls):  # each general pass's rows at the last layer, and whether the newest alone go on
        return lambda x, *a, **k: calls.append((x.shape[1], k.get("newest") is not None)) or rows(x, *a, **k)

    for trim in (True, False):
        monkeypatch.setattr(
            Passes, "advance", lambda self, *a, newest=False, trim=trim: advance(self, *a, newest=newest and trim)
        )
        engine, calls = EarlyExitEngine(model), []
        layer = engine.passes.lean_layer(last)
        layer.rows = counted(layer.rows, calls)
        trace, state = greedy_steps(engine, PROMPTS[4], policies, 8, logits=True)
        runs[trim] = (trace, state, filled_kv(state), calls)
    (trace, state, kv, calls), (ref, ref_state, ref_kv, ref_calls) = runs[True], runs[False]
    assert pending_recomputed([(t, e) for t, e, _ in trace], model.config.num_layers)
    assert_same_steps(ref, trace, ref_state, state)
    assert all(torch.equal(a, b) for a, b in zip(kv, ref_kv, strict=True))
    # the prompts' pass (7 rows for the longest) and the fills (2 rows) took the newest rows alone
    assert calls[0] == (7, True) and any(r > 1 and on for r, on in calls[1:])
    assert not any(on for _, on in ref_calls)

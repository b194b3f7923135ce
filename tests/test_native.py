"""The native decode kernel (`inference/native.py`, `native_linear.c`): built once per machine,
it computes `F.linear` for fp32 and bf16 weights of any shape and any number of rows, its
panel copy follows the weight, and where it cannot be built decoding uses torch's kernels.

Tolerances: fp32 sums in another order than torch's (round-off ~1e-6 relative at these sizes;
1e-5 leaves room). bf16 sums in fp32 and rounds the output once, as torch's bf16 products do, so
it is compared with the fp32 product of the same bf16 inputs within one bf16 rounding (2^-8
relative) of the output.
"""

import ctypes
import math
import os
import subprocess
import warnings

import pytest
import torch
import torch.nn.functional as F

from megatron.early_exit.inference import EarlyExitEngine, GenerationSettings, kernels, native

needs_native = pytest.mark.skipif(not native.available(), reason="no native kernel here (no C compiler)")


@pytest.fixture
def rebuild(monkeypatch, tmp_path):
    """A fresh library lookup with its own cache directory; the process's library restored after."""
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path))
    native.library.cache_clear()
    yield tmp_path
    native.library.cache_clear()


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_features,in_features", [(1, 1), (17, 3), (33, 577), (48, 32), (200, 130)])
@pytest.mark.parametrize("rows", [1, 2, 4, 5, 9])
def test_it_computes_f_linear_for_every_shape_and_number_of_rows(dtype, out_features, in_features, rows):
    g = torch.Generator().manual_seed(out_features * 131 + in_features * 7 + rows)
    w = torch.randn(out_features, in_features, generator=g).to(dtype)
    b = torch.randn(out_features, generator=g).to(dtype)
    x = torch.randn(2, rows, in_features, generator=g).to(dtype)
    packed = native.pack(w)
    assert packed.numel() == -(-out_features // native.PANEL) * native.PANEL * in_features
    for bias in (None, b):
        got = native.linear(x, packed, out_features, bias)
        want = F.linear(x.double(), w.double(), None if bias is None else bias.double())
        assert got.shape == (2, rows, out_features) and got.dtype == dtype
        if dtype == torch.float32:
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * in_features**0.5)
        else:
            torch.testing.assert_close(got.double(), want, rtol=2**-8, atol=1e-3)
            # and it rounds like torch's own bf16 product, to within one bf16 step at most
            torch.testing.assert_close(got.float(), F.linear(x, w, bias).float(), rtol=2**-7, atol=1e-2)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# 320: bf16 on Intel's tiles where this CPU has them; 320 and 100: bf16 rows paired by the prologue
# itself, row by row, past 16 rows (K % 4 == 0), 100 with a last part of 4 columns; 333 by `pairs`
@pytest.mark.parametrize("in_features", [333, 320, 100])
def test_a_rows_result_does_not_depend_on_the_rows_beside_it(dtype, in_features):
    """Bit for bit: a verify pass's rows equal the one-row decode steps' products, whatever the
    number of rows (the kernel sums every row in one order), and whatever the threads."""
    g = torch.Generator().manual_seed(3)
    w, x = torch.randn(70, in_features, generator=g).to(dtype), torch.randn(19, in_features, generator=g).to(dtype)
    packed, b = native.pack(w), torch.randn(70, generator=g).to(dtype)
    alone = torch.cat([native.linear(x[i : i + 1], packed, 70) for i in range(19)])
    # past 16 rows (bf16, K % 4 == 0) groups of 4 rows x 3 panels (`group`): 17-19 leave 1-3 rows; 70
    # outputs' 5 panels are a group and 2 left on one thread, 2 and a group on two (1 left: the test below);
    # else blocks of 8 rows, a last 1 joining the block before (`last_block`: 9 one sweep, 10-12 8 + 2-4, 17 8 + 9)
    for n in (2, 3, 4, 5, 8, 9, 10, 11, 12, 16, 17, 18, 19):
        assert torch.equal(native.linear(x[:n], packed, 70), alone[:n]), n
    with_bias = torch.cat([native.linear(x[i : i + 1], packed, 70, b) for i in range(19)])
    assert torch.equal(native.linear(x, packed, 70, b), with_bias)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(native.linear(x, packed, 70), alone)
    finally:
        torch.set_num_threads(before)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [64, 100])  # 100: each row's last 4 columns past its whole panels
def test_folded_operations_of_many_rows_split_over_threads_give_each_rows_numbers(dtype, k):
    """From two blocks of rows (`PROLOGUE_ROWS`, `last_block`: a prompt's, a fill's, a batch's) the rows'
    norm or SwiGLU before the product are made on every thread, a block apart: bit for bit the one-row
    calls' numbers, at one thread and at several (bf16 past 16 rows: written as the rows' pairs for groups
    of rows and panels, 48 outputs' 3 panels one group on one thread, 1 and 2 left on two)."""
    g = torch.Generator().manual_seed(5)
    w, gain = torch.randn(48, k, generator=g).to(dtype), (1 + 0.1 * torch.randn(k, generator=g)).to(dtype)
    x, gates = torch.randn(40, k, generator=g).to(dtype), torch.randn(40, 2 * k, generator=g).to(dtype)
    res, packed = torch.randn(40, 48, generator=g).to(dtype), native.pack(w)
    calls = {
        "norm": lambda a, b: native.linear(x[a:b], packed, 48, norm=(gain, 1e-5)),
        "swiglu": lambda a, b: native.linear(gates[a:b], packed, 48, swiglu=True, residual=res[a:b]),
    }
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for name, call in calls.items():
                alone = torch.cat([call(i, i + 1) for i in range(40)])
                assert torch.equal(call(0, 40), alone), (name, threads)
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(not native.amx(), reason="no AMX tiles here (or the kernel refused them)")
@pytest.mark.parametrize("out_features,in_features", [(70, 320), (16, 32), (200, 1024)])
def test_bf16_products_on_the_tiles_and_on_the_sweep_agree(out_features, in_features):
    """Where the CPU has AMX, bf16 products whose inner size is a multiple of 32 take the tiles:
    F.linear within one bf16 rounding, and the vdpbf16ps sweep over the same panels (`amx(False)`:
    the path of a kernel that refuses the tiles) within bf16 round-off of them; each its own rows
    independent of the rows beside them (40 rows: two blocks of 16 against each weight, then 8)."""
    g = torch.Generator().manual_seed(out_features + in_features)
    w = torch.randn(out_features, in_features, generator=g).bfloat16()
    x, b = torch.randn(40, in_features, generator=g).bfloat16(), torch.randn(out_features, generator=g).bfloat16()
    packed = native.pack(w)
    try:
        tiles = native.linear(x, packed, out_features, b)
        assert native.amx(False) is False
        sweep = native.linear(x, packed, out_features, b)
        assert torch.equal(torch.cat([native.linear(x[i : i + 1], packed, out_features, b) for i in range(40)]), sweep)
    finally:
        assert native.amx(True) is True
    want = F.linear(x.double(), w.double(), b.double())
    torch.testing.assert_close(tiles.double(), want, rtol=2**-8, atol=1e-3)
    torch.testing.assert_close(tiles.float(), sweep.float(), rtol=2**-7, atol=1e-2)
    assert torch.equal(torch.cat([native.linear(x[i : i + 1], packed, out_features, b) for i in range(40)]), tiles)


@needs_native
def test_a_non_contiguous_input_and_the_copy_made_again_when_the_weight_changes():
    w = torch.randn(40, 24)
    x = torch.randn(24, 3).t()  # (3, 24), not contiguous
    with kernels.forced_kernel("native"), torch.no_grad():
        torch.testing.assert_close(kernels.linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)
        w.mul_(2.0)  # in place: the panel copy must follow
        torch.testing.assert_close(kernels.linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)


@needs_native
def test_bf16_products_without_the_cpus_bf16_dot_product_too(rebuild, monkeypatch):
    """Where the CPU has a bf16 pair dot product (AVX512_BF16) bf16 products use it; built
    without it (`-mno-avx512bf16`: as on a CPU that lacks it), the kernel widens each column and
    sums even and odd columns apart by FMAs. Either way: F.linear
    within one bf16 rounding, each row's result the same whatever rows beside it, the two builds'
    results within bf16 round-off of each other."""
    g = torch.Generator().manual_seed(5)
    shapes = [(17, 3), (33, 577), (48, 32), (200, 130)]
    ws = [torch.randn(m, k, generator=g).bfloat16() for m, k in shapes]
    xs = [torch.randn(11, k, generator=g).bfloat16() for _, k in shapes]
    with_dp = [native.linear(x, native.pack(w), w.shape[0]) for w, x in zip(ws, xs)]
    native.library.cache_clear()
    monkeypatch.setattr(native, "FLAGS", (*native.FLAGS, "-mno-avx512bf16"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a compiler without the flag warns, and the test is skipped
        built = native.library()
    if built is None:
        pytest.skip("this compiler has no -mno-avx512bf16 (not an x86 compiler)")
    assert len(list(rebuild.glob("native_linear-*.so"))) == 2  # its own build
    for w, x, other in zip(ws, xs, with_dp):
        packed = native.pack(w)
        got = native.linear(x, packed, w.shape[0])
        torch.testing.assert_close(got.double(), F.linear(x.double(), w.double()), rtol=2**-8, atol=1e-3)
        torch.testing.assert_close(got.float(), other.float(), rtol=2**-7, atol=1e-2)
        alone = torch.cat([native.linear(x[i : i + 1], packed, w.shape[0]) for i in range(11)])
        for n in (2, 5, 9, 11):
            assert torch.equal(native.linear(x[:n], packed, w.shape[0]), alone[:n]), n


@needs_native
def test_a_build_without_software_prefetch_gives_the_same_products(rebuild, monkeypatch):
    """`EE_NATIVE_CFLAGS=-DPREFETCH=0` builds a library of its own whose sweeps ask for nothing
    ahead (the hardware's prefetchers alone): the same sums in the same order, so the same
    products bit for bit, fp32 and bf16, one row and several (bf16 on the tiles where there are)."""
    g = torch.Generator().manual_seed(6)
    shapes = [(17, 3), (33, 577), (48, 32), (200, 130), (1536, 576)]
    cases = [(torch.randn(m, k, generator=g).to(dt), torch.randn(n, k, generator=g).to(dt)) for m, k in shapes
             for dt in (torch.float32, torch.bfloat16) for n in (1, 3, 20)]  # fmt: skip
    before = [native.linear(x, native.pack(w), w.shape[0]) for w, x in cases]
    native.library.cache_clear()
    monkeypatch.setenv(native.CFLAGS_ENV, "-DPREFETCH=0")
    assert native.library() is not None and len(list(rebuild.glob("native_linear-*.so"))) == 2
    assert native.built_prefetch() == 0  # on or off, the sweeps ask for nothing ahead
    for (w, x), want in zip(cases, before, strict=True):
        assert torch.equal(native.linear(x, native.pack(w), w.shape[0]), want), (tuple(w.shape), x.shape[0], w.dtype)


@needs_native
def test_the_prefetch_set_at_run_time_gives_the_same_products():
    """`native.prefetch` turns the sweeps' prefetch off and on per dtype: the same products bit for
    bit, fp32 and bf16, one row and several."""
    g = torch.Generator().manual_seed(7)
    cases = [(torch.randn(m, k, generator=g).to(dt), torch.randn(n, k, generator=g).to(dt))
             for m, k in [(33, 577), (200, 130), (1536, 576)] for dt in native.DTYPES for n in (1, 3, 20)]  # fmt: skip
    packed = [native.pack(w) for w, _ in cases]
    assert native.built_prefetch() == 4096 and native.prefetch(torch.float32) and native.prefetch(torch.bfloat16)
    before = [native.linear(x, p, w.shape[0]) for (w, x), p in zip(cases, packed)]
    try:
        assert native.prefetch(torch.float32, False) is False and native.prefetch(torch.bfloat16) is True
        for off in ([torch.float32], [torch.float32, torch.bfloat16], [torch.bfloat16]):
            for dt in native.DTYPES:
                native.prefetch(dt, dt not in off)
            for (w, x), p, want in zip(cases, packed, before, strict=True):
                assert torch.equal(native.linear(x, p, w.shape[0]), want), (off, tuple(w.shape), x.shape[0], w.dtype)
    finally:
        for dt in native.DTYPES:
            native.prefetch(dt, True)


@needs_native
def test_a_prefetch_set_in_the_environment_is_applied_when_the_library_loads(monkeypatch):
    """`EE_NATIVE_PREFETCH` sets both dtypes' prefetch as the library loads (the same file loads as
    the same library, whose setting each load resets); a bad value names the variable."""
    try:
        monkeypatch.setenv(native.PREFETCH_ENV, "0")
        native.library.cache_clear()
        assert native.prefetch(torch.float32) is native.prefetch(torch.bfloat16) is False
        assert native.built_prefetch() == 4096
        monkeypatch.setenv(native.PREFETCH_ENV, "on")
        native.library.cache_clear()
        with pytest.raises(ValueError, match="EE_NATIVE_PREFETCH='on'"):
            native.library()
        monkeypatch.delenv(native.PREFETCH_ENV)
        native.library.cache_clear()
        assert native.prefetch(torch.float32) is native.prefetch(torch.bfloat16) is True  # reset
    finally:
        native.library.cache_clear()


@needs_native
def test_the_library_is_built_once_and_reused(rebuild, monkeypatch):
    assert native.library() is not None
    built = list(rebuild.glob("native_linear-*.so"))
    assert len(built) == 1 and not list(rebuild.glob("*.so.*")) and len(list(rebuild.iterdir())) == 1
    native.library.cache_clear()

    def no_compiler(*a, **kw):
        raise AssertionError("compiled again")

    monkeypatch.setattr(subprocess, "run", no_compiler)
    assert native.library() is not None  # loaded from the cache


def test_without_a_compiler_it_is_absent_and_decoding_uses_torch(rebuild, monkeypatch):
    monkeypatch.setenv("CC", "no-such-cc-anywhere")
    with pytest.warns(UserWarning, match="native kernel: no C compiler \\('no-such-cc-anywhere' not found\\)"):
        assert native.library() is None
    assert not native.available(torch.float32) and "native" not in kernels.candidates(1)
    assert kernels.reference(torch.float32) == "plain"
    w, x = torch.randn(20, 8), torch.randn(1, 8)
    with kernels.forced_kernel("native"), torch.no_grad():  # forced where absent: plain
        assert kernels.linear_func(w, 1) is kernels._FUNCS["plain"]
        torch.testing.assert_close(kernels.linear(x, w), F.linear(x, w))


def test_a_compiler_that_fails_says_so_in_one_line(rebuild, monkeypatch):
    monkeypatch.setenv("CC", "false")  # exists, exits 1
    with pytest.warns(UserWarning, match="native kernel unavailable \\(false failed"):
        assert native.library() is None
    assert not list(rebuild.glob("*.so"))  # nothing half-built left behind


def test_switched_off_by_the_environment(rebuild, monkeypatch):
    monkeypatch.setenv(native.ENV, "0")
    assert native.library() is None and not native.available()


def test_it_never_packs_what_it_cannot_multiply():
    with pytest.raises(ValueError, match="native kernel: cannot pack a \\(4, 4\\) torch.float16 weight"):
        native.pack(torch.zeros(4, 4, dtype=torch.float16))
    assert not native.available(torch.float16) and "native" not in kernels.candidates(1, torch.float16)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 3, 11])  # rows: one, one block of them, several blocks (`xblock`)
def test_the_layer_operations_folded_into_the_call_equal_them_one_by_one(dtype, n):
    """norm / SwiGLU before the product and the residual after it (`LeanKernels.folded`): fp32
    within round-off of torch's operations; bf16 within one rounding of the output (the norm's
    mean and the sigmoid's exp may round a last bit differently from torch's)."""
    from megatron.early_exit.inference.lean import rms_norm

    g = torch.Generator().manual_seed(5 + n)
    k, m = 99, 40  # K past a multiple of 16: the vectorised prologue's partial last block
    w = torch.randn(m, k, generator=g).to(dtype)
    gain = (1 + 0.1 * torch.randn(k, generator=g)).to(dtype)
    x, h = torch.randn(n, k, generator=g).to(dtype), torch.randn(n, 2 * k, generator=g).to(dtype)
    res = torch.randn(n, m, generator=g).to(dtype)
    packed = native.pack(w)
    cases = [
        (native.linear(x, packed, m, norm=(gain, 1e-5)), F.linear(rms_norm(x, gain, 1e-5), w)),
        (native.linear(x, packed, m, residual=res), res + F.linear(x, w)),
        (native.linear(h, packed, m, swiglu=True, residual=res), res + F.linear(F.silu(h[:, :k]) * h[:, k:], w)),
    ]
    for got, want in cases:
        assert got.dtype == dtype and got.shape == want.shape
        if dtype == torch.float32:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        else:
            torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=2**-7)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_folded_silu_holds_over_every_gate(dtype):
    """SwiGLU folded (`exp16`, the kernel's own exponential): gates from -95 to 95 (past both
    ends of fp32's exp) against `F.silu(gate) * up`: fp32 within 2 ulps (2.5e-7 relative) or
    1e-35 absolute (gates below -87, where the kernel's e^-gate stops at e^87: silu times up ~1e-36 against
    torch's denormal); bf16 equal, or one rounding apart."""
    k = 64
    packed = native.pack(torch.eye(k).to(dtype))  # the product copies the SwiGLU's rows out
    gate = torch.linspace(-95, 95, 40 * k).view(40, k)
    up = 1 + torch.rand(40, k, generator=torch.Generator().manual_seed(1))
    x = torch.cat([gate, up], 1).to(dtype)
    got = native.linear(x, packed, k, swiglu=True).float()
    want = (F.silu(x[:, :k]) * x[:, k:]).float()
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=2.5e-7, atol=1e-35)
    else:
        torch.testing.assert_close(got, want, rtol=2**-8, atol=1e-35)
    assert (got[gate > 30] == want[gate > 30]).all()  # silu(g) = g there: exact


@needs_native
@pytest.mark.parametrize("good", [True, False])
def test_decoding_on_the_native_kernel_equals_full_greedy_and_self_speculation_stays_lossless(good, monkeypatch):
    """fp32, folded lean layers: full decoding and self-speculative decoding (verify passes of
    several rows, natively, against one-row drafts and steps, each layer's in one call) give the
    tokens of the modules' greedy loop."""
    from megatron.early_exit.inference import lean, passes
    from tests.test_dynamic_speculation import NEW, PROMPTS, build
    from tests.test_inference import naive_greedy

    monkeypatch.setattr(passes.Passes, "native_loop", False)  # the steps one by one (the loop: test_native_loop.py)
    calls, general = [], []  # native calls (attention, whole layers); rows per sequence of general passes run natively
    real_attend, real_step, real_rows = native.attend, native.layer_step, lean.LeanLayer.rows
    real_layers = native.layers_step
    monkeypatch.setattr(native, "attend", lambda *a: calls.append("attend") or real_attend(*a))
    monkeypatch.setattr(native, "layer_step", lambda *a: calls.append("layer") or real_step(*a))
    # several layers in one call (`Passes.decode_layers`): one "layer" each
    monkeypatch.setattr(
        native, "layers_step", lambda x, layers, *a: calls.extend(["layer"] * len(layers)) or real_layers(x, layers, *a)
    )

    def rows(self, x, *a):
        before = len(calls)
        out = real_rows(self, x, *a)
        if len(calls) > before:
            general.append(x.shape[1])
        return out

    monkeypatch.setattr(lean.LeanLayer, "rows", rows)
    real_advance = passes.Passes.advance_layers

    def advance_layers(self, state, lo, hi, r, memo):  # a general pass's run of layers in one call
        done = real_advance(self, state, lo, hi, r, memo)
        if done:
            general.extend([r.x.shape[1]] * (hi - lo))
        return done

    monkeypatch.setattr(passes.Passes, "advance_layers", advance_layers)
    heads = []  # rows of each final head run in one call (`native.head` without a draft vocabulary)
    real_head = native.head
    monkeypatch.setattr(
        native, "head", lambda x, *a: (heads.append(x.shape[0]) if len(a) == 3 else None) or real_head(x, *a)
    )
    model = build(good)
    want = [naive_greedy(model, p, NEW) for p in PROMPTS]
    verified = {}
    for strategy in ("full", "self_speculative"):
        calls.clear(), general.clear(), heads.clear()
        got = EarlyExitEngine(model, linear_kernel="native").generate(
            PROMPTS, GenerationSettings(strategy=strategy, max_new_tokens=NEW, ignore_eos=True)
        )
        assert [r.tokens for r in got] == want, strategy
        assert calls.count("layer") > len(general), strategy  # decode steps: every layer in a native call
        verified[strategy] = sum(1 < r <= lean.ATTEND_ROWS for r in general)  # the prompts', verify passes
        assert heads and (strategy == "full" or max(heads) > len(PROMPTS)), strategy  # verify passes' heads
    assert verified["self_speculative"] > verified["full"] > 0


@needs_native
@pytest.mark.parametrize("good", [True, False])
def test_bf16_self_speculation_on_the_native_kernel_equals_bf16_full_decoding(good):
    """bf16 on the native kernel (the tiles where the CPU has AMX): a verify pass's rows go through
    the same per-row operations as the decode steps' (each layer in one call, one summation order per
    row whatever the rows beside it: `test_bf16_products_on_the_tiles_and_on_the_sweep_agree` catches
    a kernel that sums one row otherwise), so greedy self-speculation gives full greedy decoding's
    bf16 tokens, at batch 4 (verify passes of several sequences' drafts) and at batch 1."""
    from tests.test_dynamic_speculation import NEW, PROMPTS, build

    engine = EarlyExitEngine(build(good).to(torch.bfloat16), linear_kernel="native")
    for prompts in (PROMPTS, PROMPTS[:1]):
        full, spec = (
            engine.generate(prompts, GenerationSettings(strategy=s, max_new_tokens=NEW, ignore_eos=True))
            for s in ("full", "self_speculative")
        )
        assert [r.tokens for r in spec] == [r.tokens for r in full]
        if good:  # exit 1 is the final head here: drafts are made and kept
            assert sum(r.stats["drafted"] for r in spec) > 0 and sum(r.stats["accepted"] for r in spec) > 0


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "a,g,per,span,hd", [(1, 3, 3, 40, 64), (2, 2, 1, 7, 8), (3, 1, 4, 130, 20), (1, 2, 2, 45, 128)]
)
def test_decode_attention_equals_sdpa_on_the_caches_views(dtype, a, g, per, span, hd):
    """`native.attend` against `group_rows_attention` (SDPA) on strided K/V views of a longer
    cache, with and without a padding mask: fp32 within round-off (1e-6), bf16 within one
    rounding of the output (2^-8 relative: outputs are below 4, so 2^-6 absolute)."""
    from megatron.early_exit.model.attention import group_rows_attention

    gen = torch.Generator().manual_seed(a * 100 + span)
    kc, vc = (torch.randn(a + 1, g, span + 9, hd, generator=gen).to(dtype) for _ in range(2))
    keys, values = kc[:a, :, :span], vc[:a, :, :span]  # views, as `DecodeView.update` returns them
    q = torch.randn(a, g, per + 2, hd, generator=gen).to(dtype)[:, :, :per]  # a view of the QKV product
    mask = torch.rand(a, 1, 1, span, generator=gen) > 0.3
    mask[..., -1] = True  # the newest position is always attended
    for m in (None, mask):
        assert native.attends(q, keys, values, m)
        got, want = native.attend(q, keys, values, m), group_rows_attention(q, keys, values, m)
        assert got.shape == want.shape and got.dtype == dtype
        tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=2**-8, atol=2**-6)
        torch.testing.assert_close(got.float(), want.float(), **tol)
    assert not native.attends(q, keys, values, mask.float())  # an additive mask: SDPA's path


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "a,r,g,per,lo,hd",
    [(1, 5, 3, 3, 40, 64), (2, 3, 2, 1, 7, 8), (3, 2, 1, 4, 100, 20), (2, 37, 2, 2, 0, 64), (1, 8, 6, 1, 300, 64)],
)
def test_a_verify_passes_attention_equals_sdpa_and_its_rows_the_decode_steps(dtype, a, r, g, per, lo, hd):
    """`native.attend` over R positions per sequence (a verify pass: `LeanLayer.rows`; a prompt,
    lo 0), each its own causal row of the mask, against SDPA with `enable_gqa` as the general pass
    calls it (tolerances as above), and each position's result bit for bit the one-position call's
    over the keys up to it (a verify pass's rows equal the decode steps': bf16 heads of 64 attend
    in blocks of positions, `attend_rows`, whose rows end in every place of a block of keys)."""
    gen = torch.Generator().manual_seed(a * 100 + lo)
    span = lo + r
    kc, vc = (torch.randn(a + 1, g, span + 9, hd, generator=gen).to(dtype) for _ in range(2))
    keys, values = kc[:a, :, :span], vc[:a, :, :span]
    q = torch.randn(a, r, g, per + 2, hd, generator=gen).to(dtype)[..., :per, :]  # (A, R, g, per, hd) view
    mask = torch.ones(r, span, dtype=torch.bool).tril(lo).expand(a, 1, r, span)  # key j <= lo + i
    assert native.attends(q, keys, values, mask)
    got = native.attend(q, keys, values, mask)
    sdpa_q = q.reshape(a, r, g * per, hd).transpose(1, 2)  # (A, heads, R, hd)
    want = F.scaled_dot_product_attention(sdpa_q, keys, values, attn_mask=mask, enable_gqa=per > 1)
    assert got.shape == q.shape and got.dtype == dtype
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=2**-8, atol=2**-6)
    torch.testing.assert_close(got.reshape(a, r, g * per, hd).float(), want.transpose(1, 2).float(), **tol)
    for i in range(r):  # position lo + i alone over keys 0..lo + i, as its decode step attends
        n = lo + i + 1
        alone = native.attend(q[:, i], keys[:, :, :n], values[:, :, :n], None)
        assert torch.equal(got[:, i], alone), i


@needs_native
@pytest.mark.parametrize("a,r,g,per,lo", [(1, 161, 6, 1, 0), (2, 70, 2, 2, 33), (3, 64, 1, 3, 5)])
def test_a_prompts_bf16_heads_attend_as_sdpa_does(a, r, g, per, lo):
    """From 64 rows a sequence (a prompt's), bf16 heads of 64 attend through `attend_prompt` (both
    products by vdpbf16ps, the softmax's weights rounded to bf16 as SDPA's flash kernel rounds
    them): against SDPA within one output rounding (2^-7 at these magnitudes), and nearly always
    the same bits (mean difference far below a rounding), causal rows with a hole in one
    sequence's mask, query heads sharing a group, sequences in other slots, odd spans."""
    gen = torch.Generator().manual_seed(a * 100 + lo)
    span, hd = lo + r, 64
    kc, vc = (torch.randn(a + 1, g, span + 9, hd, generator=gen).to(torch.bfloat16) for _ in range(2))
    keys, values = kc[1:], vc[1:]  # sequences from slot 1 (views with a batch stride)
    q = torch.randn(a, r, g, per + 2, hd, generator=gen).to(torch.bfloat16)[..., :per, :]
    mask = torch.ones(r, span + 9, dtype=torch.bool).tril(lo)[:, :span].expand(a, 1, r, span).clone()
    if a > 1:
        mask[1, 0, :, 3] = False  # a key no row of sequence 1 attends
    got = native.attend(q, keys[:, :, :span], values[:, :, :span], mask).reshape(a, r, g * per, hd).float()
    sdpa_q = q.reshape(a, r, g * per, hd).transpose(1, 2)
    want = F.scaled_dot_product_attention(sdpa_q, keys[:, :, :span], values[:, :, :span], attn_mask=mask,
                                          enable_gqa=per > 1).transpose(1, 2).float()  # fmt: skip
    torch.testing.assert_close(got, want, rtol=2**-7, atol=2**-7)
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    if "avx512_bf16" in flags:  # the kernel built with vdpbf16ps (-march=native): SDPA's rounding of the weights
        assert (got - want).abs().mean() < 1e-4  # the decode steps' kernel (fp32 weights) reads ~2e-4


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tables", ["per_row", "shared"])
def test_rotary_positions_in_place_equal_the_lean_layers_operations(dtype, tables):
    """`native.rope_` against `LeanLayer.rotated_qkv`'s torch operations: the query heads and
    the key of each group rotated, the value untouched; fp32 within round-off (one fused
    multiply-add), bf16 within one output rounding."""
    from megatron.early_exit.inference.lean import signed_sine

    gen = torch.Generator().manual_seed(7)
    n, g, per, hd = 5, 3, 2, 16
    qkv = torch.randn(n, g, per + 2, hd, generator=gen).to(dtype)
    angles = torch.rand(n if tables == "per_row" else 1, 1, 1, hd // 2, generator=gen) * 6
    cos, sin = torch.cat((angles.cos(),) * 2, -1), torch.cat((angles.sin(),) * 2, -1)
    ss = signed_sine(sin)
    qk = qkv[:, :, : per + 1].float()
    want = (qk * cos + qk.roll(hd // 2, -1) * ss).to(dtype)
    got = qkv.clone()
    assert native.rope_(got, cos, ss, per + 1) is got
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=2**-8, atol=2**-8)
    torch.testing.assert_close(got[:, :, : per + 1].float(), want.float(), **tol)
    assert torch.equal(got[:, :, per + 1], qkv[:, :, per + 1])  # values are not rotated
    assert native.rope_(got[:, :, :3], cos, ss, per + 1) is None  # not contiguous: left to torch


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# linear probe; MLP probes: one 16-column vector and a tail; two groups of 4 vectors, a group of 2 (its last padded)
@pytest.mark.parametrize("hidden", [0, 24, 152])
# a width with a tail past the 16-lane blocks and the four quarters of k (pairs past them, an odd last k); one without
@pytest.mark.parametrize("h,rows", [(37, 1), (576, 3)])
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])  # the probe's own weights (a bf16 model's)
def test_a_probes_check_in_one_call_equals_the_torch_check(dtype, hidden, h, rows, wdtype):
    """`native.Probe` (made by `fused_check._fold` for an RMSNorm probe) against
    `FoldedProbe.scores_of_scaled(lean.scaled_rows(x))`, the check it replaces: fp32 arithmetic
    in both, another summation order (norm and products), and for a bf16 MLP probe (whose first
    weight the native check keeps in bf16, the norm's gain on the row: (s g) w against s (w g)),
    another order of the gain's product, so within 1e-5 relative of the logit's scale; a probe
    that does not fold to RMSNorm gets none."""
    from megatron.early_exit.inference.fused_check import _fold
    from megatron.early_exit.inference.lean import scaled_rows

    g = torch.Generator().manual_seed(h + hidden)
    k = max(hidden, 1)
    w, b, gain = 0.2 * torch.randn(k, h, generator=g), torch.randn(k, generator=g), 0.5 + torch.rand(h, generator=g)
    out = (torch.randn(1, k, generator=g), torch.randn(1, generator=g)) if hidden else ()
    w, b, gain, out = w.to(wdtype), b.to(wdtype), gain.to(wdtype), tuple(t.to(wdtype) for t in out)
    folded = _fold(w, "rms", 1e-5, b, gain, None, *out)
    assert isinstance(folded.native, native.Probe) and folded.native.hidden == hidden
    # the first weight read as the module holds it where that halves its bytes (bf16, MLP probe)
    kept = wdtype == torch.bfloat16 and hidden > 0
    assert folded.native.tensors[0].dtype == (torch.bfloat16 if kept else torch.float32)
    assert (folded.native.ref.gain is not None) == kept
    x = (3 * torch.randn(rows, 1, h, generator=g)).to(dtype)
    assert folded.native.takes(x) and not folded.native.takes(x[..., :-1]) and not folded.native.takes(x.half())
    want = folded.scores_of_scaled(scaled_rows(x.view(rows, h), 1e-5))
    got = folded.native(x)
    assert isinstance(got, list) and len(got) == rows
    scale = max(abs(v) for v in want) + 1.0
    assert max(abs(a - c) for a, c in zip(got, want)) < 1e-5 * scale, (got, want)
    # the full logit: the shift (the last bias) added back equals the probe's own fused logit
    full = folded.logit(x.view(rows, h)).tolist()
    assert max(abs(a + folded.shift - c) for a, c in zip(got, full)) < 1e-5 * scale
    assert _fold(w, "layer", 1e-5, b, gain, torch.zeros(h), *out).native is None
    # an MLP probe's hidden sums split over the threads in blocks of 16 columns: the same numbers
    threads = torch.get_num_threads()
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            assert folded.native(x) == got
    finally:
        torch.set_num_threads(threads)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [0, 16])  # linear probe, MLP probe
def test_the_next_exits_check_runs_in_the_layers_own_call(dtype, k, monkeypatch):
    """Where a uniform decode step's layer runs in one native call and the next exit's learned
    check will be evaluated, the layer runs the probe on its output in that call (`ee_layer`,
    `Passes.decode_layer`) and the check takes those scores: the same numbers as the probe's own
    call on the layer's output (the same C function on the same rows), so tokens, exit layers and
    confidences equal decoding without it exactly, at batch 1 and 4, exact and cost_aware,
    with tokens leaving at both exits and at the final head."""
    from megatron.early_exit.inference import passes
    from tests.test_fused_probe_check import _probe_model
    from tests.test_inference import PROMPTS

    model = _probe_model(True, k, "backbone").to(dtype)
    monkeypatch.setattr(passes.Passes, "native_loop", False)  # the steps one by one (the loop: test_native_loop.py)
    in_layer = []
    real_step, real_probe = native.layer_step, passes.layer_probe
    monkeypatch.setattr(native, "layer_step", lambda x, *a: in_layer.append(len(a) == 7) or real_step(x, *a))
    real_layers = native.layers_step  # a run of layers with the checks on the way (`Passes.decode_layers`)
    monkeypatch.setattr(
        native, "layers_step", lambda x, *a: in_layer.append(len(a) > 5 and bool(a[5])) or real_layers(x, *a)
    )

    wanted = set()  # the exits whose probes went into a layer's call

    def recorded(checks, exits, a):
        probe = real_probe(checks, exits, a)
        if probe is not None:
            wanted.update(exits)
        return probe

    real_way = passes.Passes.on_the_way

    def on_the_way(self, checks, exits, *a):  # a check evaluated in a native run of layers
        made = real_way(self, checks, exits, *a)
        if made is not None and made[1]:
            wanted.update(exits)
        return made

    real_riding = passes.Passes.riding_probes

    def riding(self, state, policy, by_depth, *a):  # every exit's check on one run's way (exact)
        plan = real_riding(self, state, policy, by_depth, *a)
        wanted.update(n for d in plan or () for n in by_depth[d])
        return plan

    def run(prompts, policy: str, on: bool):
        monkeypatch.setattr(passes, "layer_probe", recorded if on else lambda *a: None)
        # off: no check on the way either (a run of layers stops at each check's exit)
        monkeypatch.setattr(passes.Passes, "on_the_way", on_the_way if on else lambda *a: None)
        monkeypatch.setattr(passes.Passes, "riding_probes", riding if on else lambda *a: None)
        engine = EarlyExitEngine(model, linear_kernel="native")
        s = GenerationSettings("early_exit", max_new_tokens=8, early_exit_threshold=0.5, measure="learned",
                               exit_policy=policy, ignore_eos=True)  # fmt: skip
        with torch.no_grad():
            return [(r.tokens, r.exit_layers, r.confidences) for r in engine.generate(prompts, s)]

    exits = set()
    for prompts in ([PROMPTS[0]], PROMPTS):
        for policy in ("exact", "cost_aware"):
            in_layer.clear()
            got = run(prompts, policy, True)
            assert any(in_layer)
            in_layer.clear()
            if policy == "exact":  # cost_aware's choices follow its timed costs: two engines may differ
                assert run(prompts, policy, False) == got and not any(in_layer)
            exits |= {e for _, layers, _ in got for e in layers}
    assert exits >= {1, 3} and wanted == {1, 2}  # leaving early and not; both exits' checks in a layer


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("groups", [4, 2])  # multi-head, grouped-query
def test_a_layers_decode_step_in_one_call_gives_the_lean_layers_numbers_bit_for_bit(dtype, groups, monkeypatch):
    """`native.layer_step` (`ee_layer`: the lean layer's decode step on the native kernel in one
    call) against the same lean layers call by call (`LeanLayer.native_step` off): the same
    operations in the same order, so logits and K/V equal bit for bit, at batch 1 and 4 (slots at
    one position: slice views; at different positions: a mask), with exits leaving and pending
    rows recomputed by general passes in between (their rows in one call too), and a verify pass
    of 3 rows per sequence after them."""
    from megatron.early_exit.config import ModelConfig
    from megatron.early_exit.inference import ExitPolicy, lean
    from megatron.early_exit.model import EarlyExitGPT
    from tests.test_fast_path import filled_kv, greedy_steps
    from tests.test_lean import assert_same_steps

    cfg = ModelConfig(
        num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=groups, ffn_hidden_size=96,
        vocab_size=80, max_position_embeddings=128, normalization="RMSNorm", swiglu=True,
        position_embedding_type="rope", add_bias_linear=False, exit_layer_nums=[1, 2], use_exit_norm=True,
    )  # fmt: skip
    model = EarlyExitGPT(cfg)
    model.init_weights(3)
    model = model.to(dtype).eval()
    calls, fused = [], [True]
    real, real_step = native.layer_step, lean.LeanLayer.native_step
    monkeypatch.setattr(native, "layer_step", lambda x, *a: calls.append(x.shape[0]) or real(x, *a))
    monkeypatch.setattr(lean.LeanLayer, "native_step", lambda *a: real_step(*a) if fused[0] else None)
    policies = [
        ExitPolicy(threshold=0.0, allowed=(1, 2)),
        ExitPolicy(),
        ExitPolicy(),
    ]  # every token leaves at exit 1, then none
    for prompts in ([[5, 6, 7]], [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15], [3]], [[4, 9]] * 4):
        runs = {}
        for fused[0] in (True, False):
            calls.clear()
            engine = EarlyExitEngine(model, linear_kernel="native")
            with torch.no_grad():
                trace, state = greedy_steps(engine, prompts, policies, 8, True)
                # a verify pass: 3 rows per sequence through every layer, each with its mask row
                out = engine.verify(state, {b: [3, 4, 5] for b in range(len(prompts))})
            runs[fused[0]] = (trace, state, len(calls), out.all_logits)
        (ref, s_ref, n_ref, v_ref), (got, s_got, n_got, v_got) = runs[False], runs[True]
        assert n_ref == 0 and n_got > 0
        assert_same_steps(ref, got, s_ref, s_got)
        assert v_got.keys() == v_ref.keys() and all(torch.equal(v_got[b], v_ref[b]) for b in v_ref)
        assert any(e < cfg.num_layers for _, exits, _ in ref for e in exits.values())  # some tokens left early
        for a, b in zip(filled_kv(s_got), filled_kv(s_ref)):
            assert torch.equal(a, b)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("groups", [2, 1])
@pytest.mark.parametrize("slots", [[1] * 5, [1] * 4 + [2], [1, 2] * 2 + [1]])
def test_a_layers_rows_in_one_call_are_each_rows_own_step_bit_for_bit(dtype, groups, slots):
    """`native.layer_step` over several rows (a verify pass's or a fill's: rows of one sequence at
    consecutive positions attend as that sequence's positions, its heads' keys read once for two
    rows, `attend_rows`; rows of several sequences each its own) gives each row, and each row's
    K/V, what the row's own one-row call gives after the rows before it, bit for bit: heads of 64
    (the bf16 kernel's blocked case), grouped or not."""
    from megatron.early_exit.config import ModelConfig
    from megatron.early_exit.model import EarlyExitGPT

    cfg = ModelConfig(
        num_layers=2, hidden_size=256, num_attention_heads=4, num_query_groups=groups, ffn_hidden_size=160,
        vocab_size=64, max_position_embeddings=128, normalization="RMSNorm", swiglu=True,
        position_embedding_type="rope", add_bias_linear=False,
    )  # fmt: skip
    model = EarlyExitGPT(cfg)
    model.init_weights(5)
    engine = EarlyExitEngine(model.to(dtype).eval(), linear_kernel="native")
    fast = engine.passes.lean_for(1)
    weights, eps = fast.native_parts()
    shape = (fast.groups, fast.per, fast.head_dim, fast.ffn)
    assert fast.head_dim == 64
    cos, _, neg = engine.passes.rotary_tables(64)[:3]
    gen = torch.Generator().manual_seed(len(slots) + groups)
    cache = [torch.randn(3, groups, 64, 64, generator=gen).to(dtype) for _ in range(2)]
    x = torch.randn(len(slots), cfg.hidden_size, generator=gen).to(dtype)
    start = {1: 30, 2: 11}  # each sequence's rows at its next positions
    pos = [start[b] + slots[:i].count(b) for i, b in enumerate(slots)]

    def step(rows: list[int], k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        at = torch.tensor([pos[i] for i in rows], dtype=torch.int64)
        kv = (k, v, torch.tensor([slots[i] for i in rows], dtype=torch.int64), at, max(at.tolist()) + 1, None)
        with torch.no_grad():
            return native.layer_step(x[rows], weights, shape, eps, cos[at], neg[at], kv)

    k1, v1 = (c.clone() for c in cache)
    together = step(list(range(len(slots))), k1, v1)
    k2, v2 = (c.clone() for c in cache)
    alone = torch.cat([step([i], k2, v2) for i in range(len(slots))])
    assert torch.equal(together, alone)
    assert torch.equal(k1, k2) and torch.equal(v1, v2)
    assert not torch.equal(k1, cache[0])  # the rows' keys written


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_norm", [True, False])
@pytest.mark.parametrize("rows", [1, 3])
def test_a_drafts_head_in_one_call_equals_its_torch_operations(dtype, with_norm, rows):
    """`native.head` with a draft vocabulary (`ee_head`) against what `Passes.draft_logits` and the max-probability
    measure make from the same product (`native.linear`, the norm folded in): the product and the
    -inf row bit for bit, the argmax equal (ties: the first, as torch's), the max-probability
    within round-off of log-softmax / max / exp (another summation order: 1e-6 relative)."""
    from megatron.early_exit.inference.confidence import max_prob

    g = torch.Generator().manual_seed(rows + 2 * with_norm)
    vocab, h = 300, 40
    weight = torch.randn(vocab, h, generator=g).to(dtype)
    ids = torch.tensor(sorted(torch.randperm(vocab, generator=g)[:37].tolist()))
    x = (3 * torch.randn(rows, h, generator=g)).to(dtype)
    norm = (0.5 + torch.rand(h, generator=g)).to(dtype), 1e-5
    norm = norm if with_norm else None
    if rows > 1:
        x[-1] = 0.0  # every logit ties: the first id wins
    sub = weight.index_select(0, ids)
    full, part, tokens, conf = native.head(x, native.pack(sub), len(ids), norm, ids, vocab)
    want = native.linear(x, native.pack(sub), len(ids), norm=norm).float()  # the product's own rounding
    assert torch.equal(part, want)
    ref = torch.full((rows, vocab), float("-inf")).index_copy_(1, ids, want)
    assert torch.equal(full, ref)
    assert tokens == ref.argmax(-1).tolist()
    assert conf == pytest.approx(max_prob(want).tolist(), rel=1e-6)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 4])
def test_a_vocabulary_head_in_one_call_reads_the_first_rows_and_equals_its_torch_operations(dtype, rows):
    """`native.head` without a draft vocabulary: the norm and the product onto the first `vocab`
    rows of a padded weight (the padding never read into a token), bit for bit the product's
    first columns; the argmax equal (ties: the first); the max-probability within round-off."""
    from megatron.early_exit.inference.confidence import max_prob

    g = torch.Generator().manual_seed(rows)
    padded, vocab, h = 208, 197, 48  # the last panel part padding
    weight = torch.randn(padded, h, generator=g).to(dtype)
    weight[vocab:] = 100.0  # padding rows that would win every argmax if they were read
    x = (2 * torch.randn(rows, h, generator=g)).to(dtype)
    norm = (0.5 + torch.rand(h, generator=g)).to(dtype), 1e-6
    packed = native.pack(weight)
    logits, part, tokens, conf = native.head(x, packed, vocab, norm)
    want = native.linear(x, packed, padded, norm=norm)[:, :vocab].float()
    assert logits is part and torch.equal(part, want)
    assert tokens == want.argmax(-1).tolist()
    assert conf == pytest.approx(max_prob(want).tolist(), rel=1e-6)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3])
def test_an_exits_projection_in_one_call_equals_the_torch_projection_bit_for_bit(dtype, rows, monkeypatch):
    """`Passes.exit_logits` (an exit's hidden state onto the vocabulary: what a firing check or a
    max-probability check projects) in one native call against the same engine's torch path: the
    same product on the same kernel, cast the same way, so equal bit for bit."""
    from megatron.early_exit.inference import passes
    from tests.test_fused_probe_check import _probe_model

    model = _probe_model(True, 16, "backbone").to(dtype)
    engine = EarlyExitEngine(model, linear_kernel="native")
    p, head = engine.passes, model.exits["1"]
    hidden = torch.randn(rows, 1, model.config.hidden_size, generator=torch.Generator().manual_seed(rows)).to(dtype)
    real, made = passes.Passes.native_vocab, []
    with torch.no_grad(), engine.packed:
        p.lean_kernels.reset()
        monkeypatch.setattr(passes.Passes, "native_vocab", lambda *a: made.append(real(*a)) or made[-1])
        got = p.exit_logits(head, hidden)
        monkeypatch.setattr(passes.Passes, "native_vocab", lambda *a: None)
        want = p.exit_logits(head, hidden)
    assert made and made[0] is not None and got.dtype == want.dtype == torch.float32
    assert got.shape == want.shape == (rows, p.vocab) and torch.equal(got, want)


@needs_native
@pytest.mark.parametrize("batch", [1, 3])
def test_the_final_and_exit_heads_in_one_call_decode_as_the_torch_heads(batch, monkeypatch):
    """The final head and a firing exit's head (an exit that is its RMSNorm alone) in one native
    call each (`Passes.native_vocab`: norm, projection, argmax and max-probability) against the
    same engine with them off: the same tokens and exit layers, confidences within 1e-5 (the
    folded norm's mean within round-off, fp32), the logits within 1e-5, and the greedy token
    handed on (`StepOutput.argmax`) each row's argmax; both heads ran in one call."""
    from megatron.early_exit.inference import passes
    from tests.test_fused_probe_check import _probe_model
    from tests.test_inference import PROMPTS

    model = _probe_model(True, 16, "backbone")
    real, made = passes.Passes.native_vocab, []

    def run(on: bool):
        def native_vocab(self, x, weight, norm, temperature=1.0):
            got = real(self, x, weight, norm, temperature) if on else None
            made.append(got is not None)
            return got

        monkeypatch.setattr(passes.Passes, "native_vocab", native_vocab)
        engine = EarlyExitEngine(model, linear_kernel="native")
        s = GenerationSettings("early_exit", max_new_tokens=8, early_exit_threshold=0.5, measure="learned",
                               exit_policy="exact", ignore_eos=True)  # fmt: skip
        with torch.no_grad():
            return engine.generate(PROMPTS[:batch], s)

    ref = run(False)
    made.clear()
    got = run(True)
    assert made and all(made)
    for r, g in zip(ref, got, strict=True):
        assert g.tokens == r.tokens and g.exit_layers == r.exit_layers
        assert g.confidences == pytest.approx(r.confidences, rel=1e-5)
    assert {e for r in got for e in r.exit_layers} >= {1, 3}  # exits fired, and the final head ran

    def step(on: bool):
        monkeypatch.setattr(passes.Passes, "native_vocab", real if on else lambda *a, **k: None)
        engine = EarlyExitEngine(model, linear_kernel="native")
        state = engine.new_state(batch, 16)
        with torch.no_grad(), engine.packed:
            engine.prefill(state, {b: PROMPTS[b] for b in range(batch)})
            return engine.decode_one_token(state, dict.fromkeys(range(batch), 5), passes.ExitPolicy())

    out, plain = step(True), step(False)
    assert out.argmax == {b: int(v.argmax()) for b, v in out.logits.items()} and len(out.argmax) == batch
    assert not plain.argmax and out.logits.keys() == plain.logits.keys()
    for b, v in plain.logits.items():
        torch.testing.assert_close(out.logits[b], v, rtol=1e-5, atol=1e-5)


@needs_native
@pytest.mark.parametrize("one_call", [True, False])
def test_a_draft_steps_exit_norm_goes_into_the_native_draft_projection(one_call, monkeypatch):
    """A self-speculative draft step (`DraftCheck`, a norm-only exit, a draft vocabulary) on the
    native kernel: the exit's RMSNorm, the draft projection, the argmax and the max-probability in
    one call (`Passes.native_draft`; `one_call` off: the norm folded into the projection's call and
    the rest in torch), no exit hidden state made; its logits and confidences against the modules'
    general path (fp32: the folded norm's mean within round-off, 1e-5), the same exits, -inf
    outside the draft vocabulary, and the greedy token it hands the draft loop (`out.argmax`)
    the logits' argmax."""
    from megatron.early_exit.inference import ExitPolicy, passes
    from tests.test_lean import PROMPTS, make

    model = make(torch.float32)
    with torch.no_grad():  # gains away from 1
        for name, w in model.named_parameters():
            if "norm" in name:
                w.copy_(torch.rand(w.shape, generator=torch.Generator().manual_seed(len(name))) + 0.5)
    vocab = torch.tensor([0, 3, 4, 9, 17, 30, 31, 50, 64, 77, 95])
    folded = []
    real = passes.Passes.draft_logits
    monkeypatch.setattr(
        passes.Passes,
        "draft_logits",
        lambda self, *a, **k: folded.append(k.get("norm") is not None) or real(self, *a, **k),
    )

    @torch.no_grad()
    def run(general: bool):
        engine = EarlyExitEngine(model, linear_kernel="native")
        engine.passes.draft_vocab = vocab
        if general:
            engine.passes.lean, engine.passes.profile = False, True  # modules, `check_exit`
        prompts = PROMPTS[4]
        state = engine.new_state(len(prompts), max(map(len, prompts)) + 8)
        out = engine.prefill(state, dict(enumerate(prompts)))
        trace = []
        for _ in range(6):
            tokens = {b: int(out.logits[b].argmax()) for b in range(len(prompts))}
            out = engine.decode_one_token(state, tokens, ExitPolicy(force=2))
            logits = {b: v.clone() for b, v in out.logits.items()}
            trace.append((dict(out.exit_layer), dict(out.confidence), logits, dict(out.argmax)))
        return trace

    ref = run(general=True)
    folded.clear()
    real_draft, native_calls = passes.Passes.native_draft, []

    def native_draft(self, *a):
        made = real_draft(self, *a) if one_call else None
        native_calls.append(made is not None)
        return made

    monkeypatch.setattr(passes.Passes, "native_draft", native_draft)
    got = run(general=False)
    if one_call:
        assert native_calls and all(native_calls) and not folded
    else:
        assert folded and all(folded)
    for (e_ref, c_ref, l_ref, _), (e_got, c_got, l_got, top) in zip(ref, got, strict=True):
        assert e_got == e_ref and set(e_got.values()) == {2}
        assert top == ({b: int(v.argmax()) for b, v in l_got.items()} if one_call else {})
        assert c_got == pytest.approx(c_ref, rel=1e-5)
        for b in l_ref:
            inside = torch.isfinite(l_ref[b])
            assert torch.equal(inside, torch.isfinite(l_got[b])) and int(inside.sum()) == len(vocab)
            torch.testing.assert_close(l_got[b][inside], l_ref[b][inside], rtol=1e-5, atol=1e-5)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_layers_between_exits_run_in_one_call_with_the_same_numbers(dtype, monkeypatch):
    """A uniform decode step runs its layers in one native call (`ee_layers`,
    `Passes.decode_layers`) up to the next stop: an exit whose check is due (cost_aware), a block
    exit's input to record, the end; exact checks run in the call on the way (`on_the_way`), which
    stops only after a layer where a row reaches its exit's threshold. The same C functions on
    the same rows as one call a layer, so every step's logits, K/V and fill counts are bit for bit
    those of one call a layer, and early exit's tokens, exit layers and confidences too (batch 1
    and 3, full decoding and both policies, tokens leaving at both exits and at the final head)."""
    from megatron.early_exit.inference import lean
    from megatron.early_exit.inference.passes import ExitPolicy
    from tests.test_inference import PROMPTS

    model = _seven_layers(dtype)
    spans = []  # layers per native call of several
    real = native.layers_step

    def counted(x, layers, *a):
        spans.append(len(layers))
        return real(x, layers, *a)

    def steps(one_call_a_layer: bool, prompts, policy):
        if one_call_a_layer:
            monkeypatch.setattr(lean, "native_run", lambda *a, **k: None)
        else:
            monkeypatch.undo()
            monkeypatch.setattr(native, "layers_step", counted)
        engine = EarlyExitEngine(model, linear_kernel="native")
        state = engine.new_state(len(prompts), 40)
        engine.prefill(state, dict(enumerate(prompts)))
        trace = []
        with torch.no_grad():
            for t in range(6):
                out = engine.decode_one_token(state, dict.fromkeys(range(len(prompts)), 7 + t), policy)
                logits = {b: x.clone() for b, x in out.logits.items()}
                trace.append((logits, dict(out.exit_layer), dict(out.confidence)))
        return trace, state

    learned = dict(allowed=(3, 6), threshold=0.5, measure="learned")
    policies = (ExitPolicy(), ExitPolicy(**learned, mode="exact"), ExitPolicy(**learned, mode="cost_aware"))
    for prompts in ([PROMPTS[0]], PROMPTS[:3]):
        for policy in policies:
            spans.clear()
            got, s_got = steps(False, prompts, policy)
            # all 7 layers in one call where no check stops the run; under exact, the run stops
            # after layer 3 or 6 where a row reaches the threshold; cost_aware stops at due checks
            assert spans and max(spans) == 7 or policy.mode == "cost_aware"
            assert min(spans) < 7 or not policy.allowed
            want, s_want = steps(True, prompts, policy)
            for (l_got, e_got, c_got), (l_want, e_want, c_want) in zip(got, want, strict=True):
                assert e_got == e_want and c_got == c_want and l_got.keys() == l_want.keys()
                for b in l_got:
                    assert torch.equal(l_got[b], l_want[b])
            assert torch.equal(s_got.cache.k, s_want.cache.k) and torch.equal(s_got.cache.v, s_want.cache.v)
            assert (s_got.cache.filled == s_want.cache.filled).all()
    # early exit through generate: the same tokens, exits and confidences, leaving at 3, 6 and the end
    s = GenerationSettings("early_exit", max_new_tokens=10, early_exit_threshold=0.5, measure="learned",
                           exit_policy="exact", ignore_eos=True)  # fmt: skip
    results = {}
    for one in (False, True):
        monkeypatch.undo()
        if one:
            monkeypatch.setattr(lean, "native_run", lambda *a, **k: None)
        with torch.no_grad():
            got = EarlyExitEngine(model, linear_kernel="native").generate(PROMPTS[:3], s)
        results[one] = [(r.tokens, r.exit_layers, r.confidences) for r in got]
    assert results[False] == results[True]
    assert {e for _, layers, _ in results[False] for e in layers} >= {3, 6, 7}


@needs_native
def test_a_runs_probe_arrays_are_made_once_and_refuse_a_probe_off_the_run():
    """`LayerRun.probe_arrays` numbers the probes from `first` (a depth, as `Passes.decode_layers`
    keys them), hands the same ctypes arrays back while the probes, bounds and numbering stay, makes
    new ones where a bound moves, and gives None (nothing made: the run is not taken) for a probe
    on no layer of the run or one reading rows of another width; `layers_step` then does nothing."""
    h, hd = 32, 8
    k = v = torch.zeros(1, 2, 4, hd)
    weights = tuple(torch.zeros(4) for _ in range(6))
    run = native.LayerRun([(weights, (1e-5, 1e-5), k, v)] * 3)
    a, b = (native.Probe(torch.randn(h), 1e-5, None, None) for _ in range(2))
    made = run.probe_arrays({2: (a, 0.5), 4: (b, math.inf)}, first=2, width=h)
    checked, bounds = made
    assert [checked[i] for i in range(3)] == [ctypes.addressof(a.ref), None, ctypes.addressof(b.ref)]
    assert list(bounds) == [0.5, 0.0, math.inf]
    again = run.probe_arrays({2: (a, 0.5), 4: (b, math.inf)}, first=2, width=h)
    assert again[0] is checked and again[1] is bounds
    moved = run.probe_arrays({2: (a, 0.25), 4: (b, math.inf)}, first=2, width=h)
    assert moved[0] is not checked and list(moved[1]) == [0.25, 0.0, math.inf]
    assert run.probe_arrays({5: (a, 0.5)}, first=2, width=h) is None  # past the run's last layer
    assert run.probe_arrays({1: (a, 0.5)}, first=2, width=h) is None  # before its first
    assert run.probe_arrays({3: (a, 0.5)}, first=2, width=h + 1) is None  # rows of another width
    x, angles = torch.randn(1, h + 1), torch.zeros(1, hd)
    rows_kv = (torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long), 1, None)
    assert native.layers_step(x, run, (2, 1, hd, 4), angles, angles, rows_kv, {3: (a, 0.5)}, 2) is None


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden", [16, 152])  # one block of 16 columns; 4 + 4 + 1 + a padded one
def test_a_probe_in_the_layers_last_region_gives_its_own_calls_scores(dtype, hidden):
    """An MLP probe after a layer runs inside the layer's last product's parallel region (`linear`
    in native_linear.c: a barrier, then each thread its share of the probe's blocks): its scores
    equal the probe's own call on the layer's output (`native.Probe`, `ee_probe`) bit for bit, on
    1, 2 and 3 threads (each hidden sum's arithmetic is the same whichever thread makes it)."""
    model = _seven_layers(dtype, hidden)
    engine = EarlyExitEngine(model, linear_kernel="native")
    p, threads = engine.passes, torch.get_num_threads()
    state = engine.new_state(1, 16)
    try:
        with torch.no_grad(), engine.packed:
            engine.prefill(state, {0: [5, 9, 2, 7]})
            index, rotary = p.uniform_layout(state, [0], [4])
            probe = p.folded_probe(state, p.exit_head(state, 6)).native
            assert probe.hidden == hidden and p.layer_run(state, 0, 6) is not None
            x = torch.randn(1, 1, model.config.hidden_size, generator=torch.Generator().manual_seed(1)).to(dtype)
            for t in (1, 2, 3):
                torch.set_num_threads(t)
                p.scaled = p.layer_scores = None
                y, reached = p.decode_layers(state, 0, 6, x, rotary, index, {6: (probe, math.inf)})
                assert reached == 6 and p.layer_scores is not None and p.layer_scores[1] is y
                assert p.layer_scores[2] == probe(y)
    finally:
        torch.set_num_threads(threads)


@needs_native
def test_a_run_of_layers_sees_its_probes_change_even_in_the_same_dict():
    """`layers_step` reuses the arrays of the step before where the probes equal its (compared,
    not hashed): a bound moved in the same dict object, or in a dict of its own, is a new set, so
    the run stops where a row reaches the new bound, and goes through where none can."""
    model = _seven_layers(torch.float32)
    engine = EarlyExitEngine(model, linear_kernel="native")
    p = engine.passes
    state = engine.new_state(1, 16)
    with torch.no_grad(), engine.packed:  # the products on the native kernel: the layers in one call
        engine.prefill(state, {0: [5, 9, 2, 7]})
        index, rotary = p.uniform_layout(state, [0], [4])
        assert p.layer_run(state, 0, 7) is not None
        probe = p.folded_probe(state, p.exit_head(state, 3)).native
        x = torch.randn(1, 1, model.config.hidden_size, generator=torch.Generator().manual_seed(0))

        def reached(probes):
            p.scaled = None
            return p.decode_layers(state, 0, 7, x, rotary, index, probes)[1]

        probes = {3: (probe, math.inf)}
        assert reached(probes) == 7 and reached(probes) == 7
        probes[3] = (probe, -math.inf)  # the same dict, moved in place: every row reaches it
        assert reached(probes) == 3
        assert reached({3: (probe, math.inf)}) == 7 and reached({3: (probe, -math.inf)}) == 3


@needs_native
@pytest.mark.parametrize("batch", [1, 3])
def test_an_exact_step_whose_exits_all_ride_the_run_equals_walking_its_stops(batch, monkeypatch):
    """`Passes.riding_probes`: an exact uniform step whose exits' checks all ride the run of layers
    runs them in one `decode_layers` call from the start, without walking its stops
    (`on_the_way`): the same logits, exits, confidences, K/V and fill counts as the walk, bit for
    bit, with rows leaving at both exits and at the final head; a max_prob check (no native probe)
    walks."""
    from megatron.early_exit.inference import passes
    from megatron.early_exit.inference.passes import ExitPolicy
    from tests.test_inference import PROMPTS

    model = _seven_layers(torch.float32)
    rode, real = [], passes.Passes.riding_probes

    def counted(self, *a):
        plan = real(self, *a)
        rode.append(plan is not None)
        return plan

    def steps(ride: bool, policy):
        monkeypatch.setattr(passes.Passes, "riding_probes", counted if ride else lambda *a: None)
        engine = EarlyExitEngine(model, linear_kernel="native")
        prompts = PROMPTS[:batch]
        state = engine.new_state(len(prompts), 40)
        trace = []
        with torch.no_grad():
            engine.prefill(state, dict(enumerate(prompts)))
            for t in range(8):
                out = engine.decode_one_token(state, dict.fromkeys(range(len(prompts)), 7 + t), policy)
                trace.append(
                    ({b: x.clone() for b, x in out.logits.items()}, dict(out.exit_layer), dict(out.confidence))
                )
        return trace, state

    learned = ExitPolicy(allowed=(3, 6), threshold=0.5, measure="learned", mode="exact")
    got, s_got = steps(True, learned)
    assert any(rode)  # (a step with pending rows runs its uniform part to the first pending layer: walked)
    want, s_want = steps(False, learned)
    for (l_got, e_got, c_got), (l_want, e_want, c_want) in zip(got, want, strict=True):
        assert e_got == e_want and c_got == c_want and l_got.keys() == l_want.keys()
        assert all(torch.equal(l_got[b], l_want[b]) for b in l_got)
    assert torch.equal(s_got.cache.k, s_want.cache.k) and torch.equal(s_got.cache.v, s_want.cache.v)
    assert (s_got.cache.filled == s_want.cache.filled).all()
    assert {e for _, exits, _ in got for e in exits.values()} >= {3, 6, 7}
    rode.clear()
    steps(True, ExitPolicy(allowed=(3, 6), threshold=0.9, measure="max_prob", mode="exact"))
    assert rode and not any(rode)


@needs_native
def test_a_run_kept_for_a_decode_state_follows_hooks_and_kernels_set_in_its_middle(monkeypatch):
    """A run of layers' native arguments are worked out once per decode state (`Passes.native_run`,
    `lean.NativeRun`); what may change between its steps is still asked every step: a forward hook
    set in the middle of a decode sees its module called (its layer runs the modules, the others
    one call each, no run), and a kernel forced in the middle takes the products off the
    native kernel. Every step's logits equal a fresh engine's over the same tokens."""
    from megatron.early_exit.inference.passes import ExitPolicy
    from tests.test_inference import PROMPTS

    model = _seven_layers(torch.float32)
    spans, real = [], native.layers_step
    monkeypatch.setattr(native, "layers_step", lambda x, layers, *a: spans.append(len(layers)) or real(x, layers, *a))
    engine, ref = EarlyExitEngine(model, linear_kernel="native"), EarlyExitEngine(model, linear_kernel="native")
    state, ref_state = engine.new_state(1, 40), ref.new_state(1, 40)
    engine.prefill(state, {0: PROMPTS[0]})
    ref.prefill(ref_state, {0: PROMPTS[0]})
    seen, runs = [], []
    with torch.no_grad():
        for t in range(5):
            mlp = model.decoder.layers["3"].mlp
            handle = mlp.register_forward_hook(lambda *a, t=t: seen.append(t)) if t == 2 else None
            if t == 3:
                monkeypatch.setattr(engine.packed.kernel, "name", "plain")  # forced from now on
            spans.clear()
            got = engine.decode_one_token(state, {0: 7 + t}, ExitPolicy()).logits[0]
            runs.append(list(spans))
            if handle is not None:
                handle.remove()
            want = ref.decode_one_token(ref_state, {0: 7 + t}, ExitPolicy()).logits[0]
            # the plain kernel's products differ from the native one's by fp32 round-off
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert seen == [2] and runs == [[7], [7], [], [], []]


def _seven_layers(dtype, probe_hidden: int = 16):
    """A 7-layer Llama-style model, exits 3 and 6 (norm-only, MLP probes on the backbone, scaled so
    that they fire for some tokens only), in `dtype`."""
    from megatron.early_exit.config import ModelConfig
    from megatron.early_exit.model import EarlyExitGPT

    cfg = ModelConfig(num_layers=7, hidden_size=32, num_attention_heads=4, num_query_groups=2, vocab_size=128,
                      max_position_embeddings=64, ffn_hidden_size=48, normalization="RMSNorm", swiglu=True,
                      position_embedding_type="rope", add_bias_linear=False, exit_layer_nums=[3, 6],
                      use_exit_norm=True, use_exit_confidence_head=True, exit_confidence_hidden_size=probe_hidden,
                      exit_confidence_input="backbone")  # fmt: skip
    model = EarlyExitGPT(cfg)
    model.init_weights(seed=7)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # probes that fire for some tokens only
        for name, p in model.exits.named_parameters():
            if "confidence" in name or "norm" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.5)
    return model.to(dtype).eval()


@needs_native
@pytest.mark.parametrize("same_length", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_general_pass_runs_its_layers_over_the_same_rows_in_one_call(dtype, same_length, monkeypatch):
    """A general pass (`Passes.run`'s per-layer loop: pending rows, verify passes) runs the layers
    over which its rows stay the same (no exit, no pending row joining: `run_end`) in one native
    call (`advance_layers`): full-depth steps that fill the pending rows of tokens that left at
    exit 3, and a verify pass of three rows per sequence, give the logits, K/V and fill counts
    of one call a layer bit for bit. Prompts of one length put every sequence's rows at the same
    positions (one block: the layout's angles are a slice of the tables shared by the sequences);
    their runs too are one call each (they were refused, and ran layer by layer, before)."""
    from megatron.early_exit.inference import passes
    from megatron.early_exit.inference.passes import ExitPolicy
    from tests.test_inference import PROMPTS

    model, ran = _seven_layers(dtype), []
    real = passes.Passes.advance_layers

    def counted(self, state, lo, hi, rows, memo):
        done = real(self, state, lo, hi, rows, memo)
        ran.append((hi - lo, rows.x.shape[1]) if done else None)
        return done

    def trace(one_call_a_layer: bool):
        monkeypatch.setattr(passes.Passes, "advance_layers", (lambda *a: False) if one_call_a_layer else counted)
        engine = EarlyExitEngine(model, linear_kernel="native")
        prompts = [p[: min(map(len, PROMPTS[:3]))] if same_length else p for p in PROMPTS[:3]]
        state, leave = engine.new_state(len(prompts), 40), ExitPolicy(allowed=(3,), threshold=0.0, mode="exact")
        engine.prefill(state, dict(enumerate(prompts)))
        ran.clear()  # the decode steps' and the verify's runs (a prefill of padded prompts can be too many rows)
        got = []
        with torch.no_grad():
            for t, policy in enumerate((leave, leave, ExitPolicy(), leave, ExitPolicy())):
                out = engine.decode_one_token(state, dict.fromkeys(range(len(prompts)), 9 + t), policy)
                got.append({b: x.clone() for b, x in out.logits.items()})
            out = engine.verify(state, {b: [20, 21, 22] for b in range(len(prompts))})
            got.append({b: x.clone() for b, x in out.all_logits.items()})
        return got, state

    got, s_got = trace(False)
    assert any(r is not None and r[0] > 1 and r[1] > 1 for r in ran)  # several rows through several layers
    assert None not in ran  # every run of layers in one call
    want, s_want = trace(True)
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys() and all(torch.equal(g[b], w[b]) for b in g)
    assert torch.equal(s_got.cache.k, s_want.cache.k) and torch.equal(s_got.cache.v, s_want.cache.v)
    assert (s_got.cache.filled == s_want.cache.filled).all()


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [64, 99])  # 99: a last part of 3 columns
def test_rows_made_ready_for_another_kernel_are_the_native_products_own(dtype, k):
    """`native.prepared_rows` (a prompt's norm or SwiGLU before a product on oneDNN): the rows the
    native product makes for itself, so a product of them on the native kernel equals the folded
    call bit for bit; against torch's operations, fp32 within round-off and bf16 within one rounding
    (the norm's mean and the sigmoid's exp may round a last bit differently), at 1 and 2 threads
    (rows split between them from PROLOGUE_ROWS)."""
    from megatron.early_exit.inference.lean import rms_norm

    g = torch.Generator().manual_seed(11)
    w = torch.randn(40, k, generator=g).to(dtype)
    gain = (1 + 0.1 * torch.randn(k, generator=g)).to(dtype)
    x, h = torch.randn(37, k, generator=g).to(dtype), torch.randn(37, 2 * k, generator=g).to(dtype)
    packed = native.pack(w)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            normed, gated = native.prepared_rows(x, norm=(gain, 1e-5)), native.prepared_rows(h, swiglu=True)
            assert normed.dtype == gated.dtype == dtype and normed.shape == gated.shape == (37, k)
            assert torch.equal(native.linear(normed, packed, 40), native.linear(x, packed, 40, norm=(gain, 1e-5)))
            assert torch.equal(native.linear(gated, packed, 40), native.linear(h, packed, 40, swiglu=True))
            for got, want in ((normed, rms_norm(x, gain, 1e-5)), (gated, F.silu(h[:, :k]) * h[:, k:])):
                if dtype == torch.float32:
                    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
                else:
                    torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=2**-7)
    finally:
        torch.set_num_threads(before)
    assert native.prepared_rows(x.to(torch.float16)) is None  # a dtype it does not take
    assert native.prepared_rows(x, norm=(gain.float() if dtype == torch.bfloat16 else gain.double(), 1e-5)) is None


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 37), (160, 384)])  # 111: a last part of 15; 61,440: split over threads
def test_a_residual_added_natively_is_torchs_sum_bit_for_bit(dtype, shape):
    """`native.add_(y, a)` (a prompt's residual added to a product made on oneDNN) makes y = a + y
    in place with torch's bits: bf16 widened, summed in fp32, rounded once, subnormal sums (bf16
    values of 2^-130 and below), infinities and NaN included, at 1 and 2 threads; tensors it does
    not take are left alone (None)."""
    g = torch.Generator().manual_seed(shape[0])
    a, y = torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype)
    a.view(-1)[:4] = torch.tensor([1.5 * 2.0**-130, float("inf"), float("nan"), -3.0 * 2.0**-131]).to(dtype)
    y.view(-1)[:4] = torch.tensor([2.0**-131, 1.0, 2.0, 2.0**-133]).to(dtype)
    want = a + y
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            got = y.clone()
            assert native.add_(got, a) is got
            assert torch.equal(got.view(-1)[4:], want.view(-1)[4:]) and torch.isnan(got.view(-1)[2])
            assert torch.equal(got.view(-1)[[0, 1, 3]], want.view(-1)[[0, 1, 3]])
            if dtype == torch.bfloat16:
                assert got.view(-1)[0].item() == want.view(-1)[0].item() != 0  # a subnormal sum, kept
    finally:
        torch.set_num_threads(before)
    other = torch.float32 if dtype == torch.bfloat16 else torch.bfloat16
    assert native.add_(y.clone(), a.to(other)) is None and native.add_(y.clone(), a[:1]) is None
    assert native.add_(y.t(), a.t()) is None  # not contiguous
    assert native.add_(y.clone().requires_grad_(), a) is None  # autograd would not see it


@needs_native
@pytest.mark.parametrize("k", [64, 99])
def test_bf16_rows_with_subnormal_values_round_as_torch_does(k):
    """bf16 rows are rounded by the CPU's conversion where it has one (vcvtneps2bf16), which reads
    an fp32 subnormal as zero; a row where one appeared is made again with the integer rounding, so
    the norm and SwiGLU keep torch's subnormal results. Inputs of powers of two (times 1.5 or 1.25)
    make every step exact but the last rounding: torch's results bit for bit, in the subnormal
    lanes too, beside rows with none (made once), at 1 and 2 threads."""
    from megatron.early_exit.inference.lean import rms_norm

    rows = 12
    x = torch.full((rows, k), 1.5 * 2.0**-122)  # scaled by 2^-7 below: 1.5 * 2^-129, an fp32 subnormal
    x[:, 1::2] = -1.25 * 2.0**-122
    x[:, 0] = 2.0**10  # the row's mean square 2^20 / k (k = 64: 2^14, its rsqrt 2^-7)
    x[::3] = torch.randn(4, k, generator=torch.Generator().manual_seed(5))  # rows with no subnormal
    x = x.to(torch.bfloat16)
    gain = torch.ones(k, dtype=torch.bfloat16)
    gate = torch.full((rows, k), 1.5 * 2.0**-60)  # silu: the gate / 2, exactly
    up = torch.full((rows, k), 1.25 * 2.0**-70)  # silu * up = 1.875 * 2^-131: 7.5 steps of bf16's 2^-133
    h = torch.cat([gate, up], 1).to(torch.bfloat16)
    h[1::4] = torch.randn(3, 2 * k, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            normed, gated = native.prepared_rows(x, norm=(gain, 1e-6)), native.prepared_rows(h, swiglu=True)
            want_gated = F.silu(h[:, :k]) * h[:, k:]
            assert want_gated[0, 0].item() == 2.0**-130  # 7.5 steps rounded to even: 8
            assert torch.equal(gated, want_gated)
            if k == 64:  # the mean square a power of two: every step exact but the last
                want = rms_norm(x, gain, 1e-6)
                assert want[1, 1].item() == -1.25 * 2.0**-129 and want[1, 2].item() == 1.5 * 2.0**-129
                assert torch.equal(normed, want)
            else:  # the subnormal lanes as the integer rounding makes them, not zero
                assert (normed[1, 1:] != 0).all()
    finally:
        torch.set_num_threads(before)

"""The CPU kernel selector (`inference/kernels.py`): it picks the measured-faster kernel, caches
the choice per (shape, dtype, rows bucket, threads), and every kernel decodes the same tokens.

Tolerances: the kernels sum in different orders, so fp32 results differ by round-off
(~1e-6 relative on these sizes; 1e-5 leaves room); greedy tokens must be identical.
"""

import copy
import time

import pytest
import torch
import torch.nn.functional as F

from megatron.early_exit.inference import EarlyExitEngine, GenerationSettings, kernels, lean, native
from tests.test_packed import tiny


@pytest.fixture(autouse=True)
def fresh_choices(monkeypatch):
    monkeypatch.delenv(kernels.ENV, raising=False)
    # the native kernel's prefetch set, not timed: its choice has tests of its own (`test_prefetch_*`)
    monkeypatch.setenv(native.PREFETCH_ENV, "1")
    monkeypatch.setattr(kernels, "_FUSED", set())  # no shape a layer's product from another test
    kernels.clear_choices()
    yield
    kernels.clear_choices()


def fake_clock_kernels(costs: dict[str, float]):
    """Kernels that advance a fake clock by their cost per call: timing without a real machine."""
    now = [0.0]

    def make(cost):
        def run(_w):
            now[0] += cost

        return run

    return {k: make(c) for k, c in costs.items()}, lambda: now[0]


def test_pick_chooses_the_faster_of_two_fakes_in_either_order():
    weights = [torch.zeros(2, 2)] * 3
    funcs, clock = fake_clock_kernels({"slow": 2.0, "fast": 1.0})
    assert kernels.pick(funcs, weights, clock=clock) == "fast"
    funcs, clock = fake_clock_kernels({"fast": 1.0, "slow": 2.0})
    assert kernels.pick(funcs, weights, clock=clock) == "fast"


def test_pick_keeps_the_reference_unless_another_is_clearly_faster():
    weights = [torch.zeros(2, 2)]
    funcs, clock = fake_clock_kernels({"plain": 1.0, "copy": 0.97})  # 3% faster: within the margin
    assert kernels.pick(funcs, weights, clock=clock, margin=0.05) == "plain"
    funcs, clock = fake_clock_kernels({"plain": 1.0, "copy": 0.9})
    assert kernels.pick(funcs, weights, clock=clock, margin=0.05) == "copy"


def test_pick_runs_each_kernel_on_every_weight_each_round_and_ignores_the_warm_up():
    seen = []
    now = [0.0]

    def first(w):
        seen.append(w)
        now[0] += 5.0 if len(seen) <= 2 else 1.0  # slow only while warming up

    def second(_w):
        now[0] += 2.0

    weights = [torch.zeros(1), torch.ones(1)]
    assert kernels.pick({"a": first, "b": second}, weights, rounds=2, clock=lambda: now[0]) == "a"
    assert len(seen) == 2 * 3  # 2 weights x (warm-up + 2 rounds)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5, 40])
def test_every_kernel_computes_f_linear(dtype, rows):
    g = torch.Generator().manual_seed(rows)
    w, b = torch.randn(48, 32, generator=g).to(dtype), torch.randn(48, generator=g).to(dtype)
    x = torch.randn(1, rows, 32, generator=g).to(dtype)
    ref = F.linear(x.float(), w.float(), b.float())
    tol = 1e-5 if dtype == torch.float32 else 3e-2  # bf16: rounding of the output (8 mantissa bits)
    for name in kernels.candidates(rows, dtype):
        with kernels.forced_kernel(name), torch.no_grad():
            out = kernels.linear(x, w, b)
        assert out.shape == (1, rows, 48) and out.dtype == dtype, name
        torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol, msg=name)


def test_a_dtype_onednn_cannot_pack_here_takes_the_other_kernels(monkeypatch):
    """oneDNN's bf16 packing raises on CPUs without AVX-512 or AVX-NE-CONVERT (an AMD EPYC with AVX2
    alone): there bf16 neither measures nor defaults to `packed`, and a forced `packed` runs `plain`
    (the native kernel switched off: it would be the reference)."""
    packs_here = kernels.packs(torch.bfloat16)  # this CPU's own answer, tried on a real weight
    w = torch.randn(48, 32).bfloat16()
    if kernels.packing_available() and not packs_here:
        with pytest.raises(RuntimeError):
            torch.ops.mkldnn._reorder_linear_weight(w)
    monkeypatch.setattr(kernels, "packs", lambda dtype: dtype == torch.float32 and kernels.packing_available())
    monkeypatch.setattr(native, "library", lambda: None)
    assert kernels.reference(torch.bfloat16) == "plain" and "packed" not in kernels.candidates(1, torch.bfloat16)
    assert ("packed" in kernels.candidates(1)) is kernels.packing_available()  # fp32 still packs
    x = torch.randn(3, 32).bfloat16()
    with kernels.forced_kernel("packed"), torch.no_grad():
        assert kernels.linear_func(w, 3) is kernels._FUNCS["plain"]
        torch.testing.assert_close(kernels.linear(x, w), F.linear(x, w))
    seen = []
    monkeypatch.setattr(kernels, "pick", lambda funcs, weights, **kw: seen.append(list(funcs)) or next(iter(funcs)))
    monkeypatch.setattr(kernels, "_CHOICE", {})
    with torch.no_grad():
        kernels.linear(x, w)
    assert seen == [["plain", "transposed"]]


def test_choice_is_measured_once_per_shape_dtype_rows_bucket_and_threads(monkeypatch):
    calls = []
    monkeypatch.setattr(kernels, "pick", lambda funcs, weights, **kw: calls.append(sorted(funcs)) or "transposed")
    w = torch.randn(24, 16)
    kernels.register([w])
    with torch.no_grad():
        for rows in (1, 1, 3, 8, 12, 40, 64, 100, 200):
            x = torch.randn(rows, 16)
            torch.testing.assert_close(kernels.linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)
    # buckets: 1 row (mv allowed), 2-4 rows, 5-8, 9-16, 17-64, more: six measurements, not nine
    assert len(calls) == 6 and "mv" in calls[0] and all("mv" not in c for c in calls[1:])
    assert kernels.kernel_for(w, 1) == "transposed"
    kernels.kernel_for(w.to(torch.bfloat16), 1)  # another dtype: measured again
    assert len(calls) == 7


@pytest.mark.parametrize("built", [True, False])
def test_the_reference_kernel_is_native_else_plain_in_fp32_and_packed_in_bf16(monkeypatch, built):
    """`pick` keeps its first kernel unless another clearly beats it: the native kernel where it
    was built (fp32, bf16); without it plain (no weight copy) in fp32 and oneDNN's packed layout
    in bf16 (where it decoded faster on both CPUs measured)."""
    if built and not native.available():
        pytest.skip("no native kernel here (no C compiler)")
    if not built:
        monkeypatch.setattr(native, "library", lambda: None)
    firsts = []
    monkeypatch.setattr(kernels, "pick", lambda funcs, weights, **kw: firsts.append(next(iter(funcs))) or "plain")
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16):
            kernels.linear(torch.randn(1, 16).to(dtype), torch.randn(24, 16).to(dtype))
    if built:
        assert firsts == ["native", "native"]
    else:
        assert firsts == ["plain", "packed" if kernels.packs(torch.bfloat16) else "plain"]
    assert kernels.reference(torch.float16) == ("packed" if kernels.packs(torch.float16) else "plain")


def test_against_packed_another_kernel_needs_the_wider_margin(monkeypatch):
    monkeypatch.setattr(native, "library", lambda: None)  # packed is the bf16 reference without it
    seen = []
    monkeypatch.setattr(kernels, "pick", lambda funcs, weights, **kw: seen.append(kw.get("margin")) or "packed")
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            with torch.no_grad():
                kernels.linear(torch.randn(1, 16).bfloat16(), torch.randn(24 + threads, 16).bfloat16())
    finally:
        torch.set_num_threads(before)
    if kernels.packs(torch.bfloat16):
        assert seen == [kernels.SIXTEEN_BIT_MARGIN, max(kernels.MANY_THREAD_MARGIN, kernels.SIXTEEN_BIT_MARGIN)]


def test_against_native_a_layers_products_need_the_wider_margin_up_to_256_rows(monkeypatch):
    """Where all four of a layer's products are native its step runs in one native call, so
    another kernel must beat native on their shapes by FUSED_MARGIN (up to 256 rows, `lean.FOLD_ROWS`:
    beyond, the layer runs its operations whatever the kernels); other shapes keep MARGIN (pick's default)."""
    if not native.available():
        pytest.skip("no native kernel here (no C compiler)")
    layer = lean.LeanLayer(tiny().decoder.layers["0"])  # marks its products' shapes
    assert {tuple(w.shape) for w in layer.products} == {(128, 64), (64, 64), (256, 64), (64, 128)}
    seen = []

    def pick(funcs, weights, **kw):
        seen.append((next(iter(funcs)), kw.get("margin")))
        return "native"

    monkeypatch.setattr(kernels, "pick", pick)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with torch.no_grad():
            for w in (layer.fc1, torch.randn(40, 64)):
                for rows in (1, 5, 40, 100, 300):
                    kernels.linear(torch.randn(rows, 64), w)
    finally:
        torch.set_num_threads(before)
    fused = kernels.FUSED_MARGIN
    # fp32: the sweep's products at 65-256 rows are not weighed as one call (`fused_at`); from 65
    # rows (measured at 128 and 512) oneDNN's packed kernel is the reference where it packs fp32
    many = "packed" if kernels.packs(torch.float32) else "native"
    assert seen == [("native", fused)] * 3 + [(many, None)] * 2 + [("native", None)] * 3 + [(many, None)] * 2
    assert lean.FOLD_ROWS == 256  # the bucket of 65-256 rows is the fused layers' last
    seen.clear()
    layer = lean.LeanLayer(tiny().to(torch.bfloat16).decoder.layers["0"])
    try:
        torch.set_num_threads(1)
        with torch.no_grad():
            for rows in (40, 100, 300):
                kernels.linear(torch.randn(rows, 64).to(torch.bfloat16), layer.fc1)
    finally:
        torch.set_num_threads(before)
    packs = kernels.packs(torch.bfloat16)
    wide = kernels.SIXTEEN_BIT_MARGIN if packs else None  # against packed from 65 rows where it packs bf16
    # 65-256 rows weigh the one call where bf16 takes the tiles or vdpbf16ps in groups of rows and panels
    one_call = native.amx() or native.grouped()
    assert [m for _, m in seen] == [fused, fused if one_call else wide, wide]
    many = "packed" if packs else "native"
    assert [r for r, _ in seen] == ["native", "native" if one_call else many, many]


@pytest.mark.usefixtures("one_thread")  # one thread: pick's margin without the many-thread widening
def test_a_heads_weight_needs_the_wider_margin_where_its_head_runs_in_one_call(monkeypatch):
    """A vocabulary head runs in one native call on the native kernel (`native.head`; a round's drafts
    through the layers below their exit too, `native.drafts`): its weight's kernel is chosen as a
    layer's products' are (`LeanKernels.head_func`), where an ordinary product keeps MARGIN. Measured
    at MARGIN, the CPU reference model's fp32 draft rows took `F.linear` and every draft stepped
    through Python."""
    if not native.available():
        pytest.skip("no native kernel here (no C compiler)")
    seen = []

    def pick(funcs, weights, **kw):
        seen.append((tuple(weights[0].shape), kw.get("margin")))
        return "native"

    monkeypatch.setattr(kernels, "pick", pick)
    with torch.no_grad():
        heads = lean.LeanKernels(packed=True)
        for w in (torch.randn(40, 64), torch.randn(24, 64)):  # a head's rows, a draft vocabulary's
            assert kernels.is_native(heads.head_func(w, 1))
        kernels.linear(torch.randn(1, 64), torch.randn(30, 64))  # another product
        assert lean.LeanKernels(packed=False).head_func(torch.randn(50, 64), 1) is F.linear  # nothing measured
    assert seen == [((40, 64), kernels.FUSED_MARGIN), ((24, 64), kernels.FUSED_MARGIN), ((30, 64), None)]


def test_more_threads_time_more_rounds_at_a_wider_margin(monkeypatch):
    """Wall-clock timing (> 1 thread) is noisier than one thread's CPU time: more alternations,
    and a kernel must beat plain by more to replace it."""
    seen = []
    monkeypatch.setattr(kernels, "pick", lambda funcs, weights, **kw: seen.append(kw) or "plain")
    monkeypatch.setattr(kernels, "_CHOICE", {})
    w = torch.randn(24, 16)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            with torch.no_grad():
                kernels.linear(torch.randn(1, 16), w)
    finally:
        torch.set_num_threads(before)
    assert seen[0] == {"clock": time.process_time}
    assert seen[1] == {"clock": time.perf_counter, "rounds": 3 * kernels.ROUNDS, "margin": 2 * kernels.MARGIN}


def test_unchosen_copies_are_dropped(monkeypatch):
    def run_all_then_plain(funcs, weights, **kw):
        for f in funcs.values():
            for w in weights:
                f(w)
        return "plain"

    monkeypatch.setattr(kernels, "pick", run_all_then_plain)
    w = torch.randn(24, 16)
    kernels.register([w])
    with torch.no_grad():
        kernels.linear(torch.randn(1, 16), w)
    assert not kernels._DERIVED.kinds(w)  # packed and transposed copies were made, then freed


def test_forcing_a_bad_kernel_names_the_culprit(monkeypatch):
    with pytest.raises(ValueError, match="linear_kernel: unknown kernel 'fast'"):
        EarlyExitEngine(tiny(), linear_kernel="fast")
    monkeypatch.setenv(kernels.ENV, "gemv")
    with pytest.raises(ValueError, match="EE_LINEAR_KERNEL: unknown kernel 'gemv'"):
        EarlyExitEngine(tiny()).generate([[1, 2]], GenerationSettings(max_new_tokens=1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forced_kernels_and_auto_decode_the_tokens_of_plain_f_linear(dtype, monkeypatch):
    model = tiny().to(dtype)
    prompts = [[1, 2, 3, 4], [5, 6], [7, 8, 9, 10, 11, 12]]
    settings = GenerationSettings(max_new_tokens=8, ignore_eos=True, return_logprobs=True)
    ref = EarlyExitEngine(copy.deepcopy(model), packed_weights=False).generate(prompts, settings)
    single = EarlyExitEngine(copy.deepcopy(model), packed_weights=False).generate(prompts[:1], settings)
    tol = 1e-5 if dtype == torch.float32 else 5e-2  # fp32 round-off; bf16 output rounding
    for name in ("auto", *kernels.candidates(1)):
        engine = EarlyExitEngine(model, linear_kernel=name)
        for got, want in ((engine.generate(prompts, settings), ref), (engine.generate(prompts[:1], settings), single)):
            assert [r.tokens for r in got] == [r.tokens for r in want], name
            for p, q in zip(got, want):
                torch.testing.assert_close(torch.tensor(p.logprobs), torch.tensor(q.logprobs), rtol=tol, atol=tol)
    monkeypatch.setenv(kernels.ENV, "plain")  # the environment forces where the engine says auto
    assert [r.tokens for r in EarlyExitEngine(model).generate(prompts, settings)] == [r.tokens for r in ref]


def test_pick_drops_a_kernel_far_slower_than_the_reference_on_its_first_call():
    # bf16 `plain` on a CPU without bf16 kernels: a reference loop hundreds of times slower,
    # which would otherwise be timed over every weight and round.
    calls = {"native": 0, "fallback": 0, "fair": 0}
    now = [0.0]

    def make(name, cost):
        def run(_w):
            calls[name] += 1
            now[0] += cost

        return run

    funcs = {"native": make("native", 1.0), "fallback": make("fallback", 100.0), "fair": make("fair", 3.0)}
    weights = [torch.zeros(1)] * 4
    assert kernels.pick(funcs, weights, rounds=2, clock=lambda: now[0]) == "native"
    # The slow one ran once; the others warmed up on every weight and ran every round.
    assert calls == {"native": 4 * 3, "fallback": 1, "fair": 4 * 3}
    # A reference slower than all the rest is never dropped, and a faster one replaces it.
    calls.update(dict.fromkeys(calls, 0))
    funcs = {"fallback": make("fallback", 100.0), "native": make("native", 1.0)}
    assert kernels.pick(funcs, weights, rounds=2, clock=lambda: now[0]) == "native"
    assert calls["fallback"] == 4 * 3


@pytest.mark.skipif(not native.available(), reason="no native kernel here (no C compiler)")
def test_a_prompts_attention_is_measured_once_per_layout_and_rows_bucket(monkeypatch):
    """SDPA (the reference) against `native.attend` on a causal prompt of the bucket's measured
    rows: the answer kept per (dtype, heads, rows bucket, threads), forgotten with the choices."""
    calls = []

    def fake_pick(funcs, weights, **kw):
        rows = {f: funcs[f](None).shape for f in funcs}  # both compute the same prompt's attention
        calls.append((list(funcs), rows, kw))
        return "native" if len(calls) % 2 else "sdpa"

    monkeypatch.setattr(kernels, "pick", fake_pick)
    answers = [kernels.prompt_attention(torch.float32, 2, 3, 16, r) for r in (20, 64, 30, 65, 200, 300)]
    # 17-64 rows measured at 32 (native), 65-256 at 128 (SDPA), more at 512 (native)
    assert answers == [True, True, True, False, False, True] and len(calls) == 3
    assert [c[0] for c in calls] == [["sdpa", "native"]] * 3
    assert calls[0][1] == {"sdpa": (1, 6, 32, 16), "native": (1, 32, 2, 3, 16)}
    assert calls[2][1]["native"] == (1, 512, 2, 3, 16)
    assert kernels.measured_count() == 3
    kernels.prompt_attention(torch.bfloat16, 2, 3, 16, 20)  # another dtype: measured again
    kernels.prompt_attention(torch.float32, 4, 1, 16, 20)  # another layout too
    assert len(calls) == 5
    kernels.clear_choices()
    assert kernels.measured_count() == 0
    kernels.prompt_attention(torch.float32, 2, 3, 16, 20)
    assert len(calls) == 6
    monkeypatch.setattr(native, "available", lambda dtype=torch.float32: False)
    assert not kernels.prompt_attention(torch.float32, 2, 3, 16, 40) and len(calls) == 6  # nothing to measure


@pytest.mark.skipif(not native.available(), reason="no native kernel here (no C compiler)")
def test_the_attention_measured_for_a_prompt_is_sdpas_within_round_off(monkeypatch):
    """The two functions the measurement times compute the same attention: timing them compares like with like."""
    seen = {}

    def record(funcs, weights, **kw):
        seen.update({name: f(None) for name, f in funcs.items()})
        return "sdpa"

    monkeypatch.setattr(kernels, "pick", record)
    kernels.prompt_attention(torch.float32, 2, 3, 16, 40)
    sdpa = seen["sdpa"].transpose(1, 2).reshape(seen["native"].shape)
    # fp32: the native kernel sums scores and values in another order (round-off, ~1e-7 here)
    torch.testing.assert_close(seen["native"], sdpa, rtol=1e-5, atol=1e-5)


def restore_prefetch():
    for dtype in native.DTYPES:
        native.prefetch(dtype, True)


@pytest.mark.skipif(not native.available(), reason="no native kernel here (no C compiler)")
def test_prefetch_is_timed_once_per_dtype_before_its_first_kernel_choice(monkeypatch):
    """The native kernel's prefetch is chosen by timing one row against every registered weight of
    the dtype with it and without (`pick` at PREFETCH_MARGIN), before the dtype's first kernel
    choice, once; the other dtype keeps it on until its own choice."""
    monkeypatch.delenv(native.PREFETCH_ENV)
    calls, swept = [], []

    def fake_pick(funcs, weights, **kw):
        calls.append((sorted(funcs), kw.get("margin")))
        if "ahead" not in funcs:
            return "plain"
        for f in funcs.values():  # each way runs the real sweeps, at its own setting
            f(weights[0])
            swept.append(native.prefetch(torch.float32))
        swept_shapes = {(tuple(w.shape), w.dtype) for w in weights[0]}  # other tests' live models' too
        assert {((24, 16), torch.float32), ((40, 24), torch.float32)} <= swept_shapes
        assert {dt for _, dt in swept_shapes} == {torch.float32}
        return "none"

    monkeypatch.setattr(kernels, "pick", fake_pick)
    ws = [torch.randn(24, 16), torch.randn(40, 24), torch.randn(24, 16).to(torch.bfloat16)]
    kernels.register(ws)
    try:
        with torch.no_grad():
            kernels.kernel_for(ws[0], 1)
            kernels.kernel_for(ws[1], 3)
        assert calls[0] == (["ahead", "none"], kernels.PREFETCH_MARGIN) and len(calls) == 3
        assert swept == [True, False] and native.built_prefetch() == 4096  # native_linear.c's PREFETCH
        assert native.prefetch(torch.float32) is kernels.prefetch_choice(torch.float32) is False
        assert native.prefetch(torch.bfloat16) is True  # not chosen yet
        assert not kernels._DERIVED.kinds(ws[2])  # the bf16 weight was not swept
    finally:
        restore_prefetch()


def fake_clock_pick(real_pick, none_cost: float):
    """`pick` through its real body on a fake clock: each sweep costs 1.0, `none_cost` without prefetch."""
    now = [0.0]

    def charge(name, f):
        def run(ws):
            f(ws)
            now[0] += none_cost if name == "none" else 1.0

        return run

    def timed(funcs, weights, **kw):
        return real_pick({k: charge(k, f) for k, f in funcs.items()}, weights, **(kw | {"clock": lambda: now[0]}))

    return timed


@pytest.mark.skipif(not native.available(), reason="no native kernel here (no C compiler)")
def test_prefetch_stays_on_unless_none_is_clearly_faster(monkeypatch):
    """Through the real `pick` on a fake clock: none 2% faster keeps the prefetch (the margin is
    3%), 10% faster turns it off."""
    monkeypatch.delenv(native.PREFETCH_ENV)
    w = torch.randn(24, 16)  # kept alive: the registry holds weak references
    kernels.register([w])
    real_pick = kernels.pick
    try:
        for none_cost, want in ((0.98, True), (0.9, False)):
            monkeypatch.setattr(kernels, "pick", fake_clock_pick(real_pick, none_cost))
            kernels.clear_choices()
            assert kernels.prefetch_choice(torch.float32) is want is native.prefetch(torch.float32)
    finally:
        restore_prefetch()


def test_a_set_prefetch_is_not_timed_and_a_bad_one_names_the_variable(monkeypatch):
    monkeypatch.setattr(kernels, "pick", lambda *a, **kw: pytest.fail("timed"))
    w = torch.randn(24, 16)
    kernels.register([w])
    try:
        monkeypatch.setenv(native.PREFETCH_ENV, "0")
        assert kernels.prefetch_choice(torch.float32) is False is native.prefetch(torch.float32)
        kernels.clear_choices()
        monkeypatch.setenv(native.PREFETCH_ENV, "4096")
        with pytest.raises(ValueError, match="EE_NATIVE_PREFETCH='4096'"):
            kernels.prefetch_choice(torch.float32)
    finally:
        restore_prefetch()

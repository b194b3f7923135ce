"""Which CPU kernel each decode-time matrix product uses, chosen by measuring on this machine.

The fastest kernel for `x @ W.T` at decode sizes depends on the CPU, the dtype and the number of
rows: on an AMD EPYC (avx512_bf16) oneDNN's prepacked weights streamed 20-32 GB/s where
`F.linear` streamed 8-13; on an Intel Xeon (AMX) the packed fp32 kernel was slower than
`F.linear` for one row, while in bf16 it was faster, and `torch.mv` beat both on the bf16
vocabulary head. No kernel is right everywhere, so none is assumed: the first product of
each (weight shape, dtype, rows bucket, threads) times every applicable kernel on the model's
own weights of that shape (each weight of the group once per round, so that the weights
stream from memory as in decoding, not from cache), alternating, best of `ROUNDS` (CPU time
with one thread; with more, wall time over `MANY_THREAD_ROUNDS` at a wider margin), and keeps
the fastest for the rest of the process. Another kernel must beat the dtype's reference by the
margin: `native` where it was built, else `plain` in fp32 and `packed` in bf16 and fp16 by a
wider one (`reference`).

Kernels (all compute `F.linear(x, W, b)`; fp32 results differ by summation-order round-off):
  plain       `F.linear` (MKL / the default BLAS);
  packed      oneDNN on a copy of W reordered once into its blocked layout;
  mv          `torch.mv` / `torch.addmv` (one row only);
  transposed  `torch.matmul(x, Wt)` on a contiguous copy of W.T;
  native      our own product (`native.py`) on a copy of W in 16-row panels: fp32 and bf16, where
              a C compiler built it on this machine.
`packed`, `transposed` and `native` keep one extra copy of the weight, made lazily and remade when the
weight changes; copies of kernels that were not chosen are dropped after the choice. `packed`
applies to a dtype only where oneDNN packs it on this CPU (`packs`): its bf16 path needs AVX-512
(BW, VL, DQ) or AVX-NE-CONVERT and raises without them (an AMD EPYC with AVX2 alone), so there
bf16 products measure, and default to, the other kernels.

`EE_LINEAR_KERNEL=<kernel>` (or `EarlyExitEngine(linear_kernel=...)`) forces one kernel for
every shape (a one-row-only kernel falls back to `plain` for more rows, as do `packed` and
`native` for a dtype they cannot multiply here); `auto` (the default) measures.
"""

from __future__ import annotations

import functools
import os
import time
import weakref
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from megatron.early_exit.derived import DerivedCopies
from megatron.early_exit.inference import native

KERNELS = ("plain", "packed", "mv", "transposed", "native")
ENV = "EE_LINEAR_KERNEL"
ROUNDS = 3
MARGIN = 0.05  # another kernel must beat `plain` by 5% (timings on a shared machine vary more)
MANY_THREAD_ROUNDS, MANY_THREAD_MARGIN = 3 * ROUNDS, 2 * MARGIN  # wall-clock timing (> 1 thread)
SCREEN = 4.0  # a kernel 4x slower than the reference on its first call is not timed further (`pick`)
# Against `packed` in bf16 / fp16 (`reference`): timed alone, it is understated by up to ~15%
# against how it decodes (SmolLM2 bf16 on the Intel Xeon: the measured mixes at 0.89x all-packed).
SIXTEEN_BIT_MARGIN = 0.25
# Against `native` on a layer's products (`fuse`) up to 256 rows (`lean.FOLD_ROWS`): where all four of a layer's
# products are native, its whole decode step (or a verify pass's rows) runs in one native call
# (`lean.LeanLayer.native_step`); one product on another kernel sends the layer through its
# operations one by one. In bf16 on the CPU reference model at 5 rows, a verify pass of 4 drafts
# cost 2.6 plain steps where (2048, 384) and (8064, 384) took `packed` on a few percent measured
# alone, 1.7 with every product native (`benchmarks/self_spec_overhead.py`): the layer's own
# operations cost more than a product's few percent save. On an Intel Xeon (Emerald Rapids, 300 MB
# of L3) at 0.25, SmolLM2 fp32 at one row sent (960, 576) and (576, 1536) to `plain` (each shape's
# 30 weights, timed alone, sit in the L3, where the step's 538 MB stream from memory): the model
# decoded at 34.8 tok/s against 48.6 with every product native (each layer's own operations cost
# ~220 us a layer, 40% of its products' time). Another kernel must now halve native's time.
FUSED_MARGIN = 0.5
# Rows of x (all leading dimensions) -> (bucket, rows the bucket is measured with).
# 2-4 rows apart from 5-16: a self-speculative verify pass is a few rows, where the native
# kernel is fastest (bf16, CPU reference: 0.46-0.72x `F.linear` at 3 rows) while at 8 rows packed
# often is; measured at 8 only, the verify passes took packed and cost 1.6 plain steps in bf16.
# 5-8 rows apart from 9-16 likewise: a verify pass of 4 drafts is 5 rows, where the native kernel
# ties oneDNN's on bf16 (384, 1024) (31.7 / 31.1 us) and loses at 8 (42.7 / 32.9), and one product
# on another kernel keeps the whole layer from running in one call (`lean.LeanLayer.native_step`).
# 17-64 rows apart from more: on AMX (bf16 tiles) the native kernel took 0.48-0.63x `F.linear`'s time
# at 32 rows (a verify pass of several sequences, a short prompt), and 1.13-1.86x at 512 (a long
# prompt: its loop reads every panel again for each 32 rows): measured at 32 alone, prompts took it.
# 65-256 rows (measured at 128) apart from more (at 512): a prompt of up to 256 tokens runs each
# layer in one native call where its four products are native (`lean.FOLD_ROWS`), so the wider
# margin (`fuse`) holds there too where bf16 products take the tiles or vdpbf16ps in groups of rows
# and panels (`fused_at`); longer prompts run the layer's operations one by one.
_BUCKETS = ((1, 1), (4, 3), (8, 5), (16, 12), (64, 32), (256, 128))
# Rows (measured) past which a product whose layer does not run in one native call there
# (`fused_at`) takes oneDNN's packed kernel as the reference (`reference`): a prompt's layers then
# run op by op, and a mix of kernels across a layer's four products, as noise in the timing made
# it (the native reference kept for one shape by its 10% margin, another's going to packed), was
# the slowest of the settings: the CPU reference model's prefill of 40 abstracts (AMD EPYC, 2
# threads) with every 65-256-row product packed 0.976 / 0.977x the time of the process's own mix
# in bf16 (two processes), 0.987x in fp32 where every one had stayed native; all native 0.971 /
# 1.016x / 1.002x, the mix's own noise (scratch `choice_ab.py`, 80 alternating prompt runs each).
PROMPT_REFERENCE_ROWS = 64
_MANY_ROWS = (None, 512)

# The packed and transposed copies of weights (`derived.py`: remade when a weight changes,
# dropped when it dies; packed copies are opaque oneDNN tensors, kept outside the modules).
_DERIVED = DerivedCopies()
# (shape, dtype) -> {id(weight): weakref}: the weights a choice is measured on.
_GROUPS: dict[tuple, dict[int, weakref.ref]] = {}
# (shape, dtype) of a layer's products, whose layer runs in one native call where all are native.
_FUSED: set[tuple] = set()
# (shape, dtype, bucket, threads) -> kernel name.
_CHOICE: dict[tuple, str] = {}
# (dtype, groups, query heads per group, head dim, rows bucket, threads) -> whether a prompt's
# attention runs natively (`prompt_attention`).
_ATTENTION: dict[tuple, bool] = {}
_forced: list[str] = []  # stack of engine-level overrides (innermost last)
# dtype -> whether the native kernel's sweeps prefetch (`prefetch_choice`)
_PREFETCH: dict[torch.dtype, bool] = {}
PREFETCH_MARGIN = 0.03  # no prefetch must beat the library's by 3% (`prefetch_choice`)


@functools.cache
def packing_available() -> bool:
    """Whether this torch build has the oneDNN ops of the `packed` kernel."""
    ops = getattr(torch.ops, "mkldnn", None)
    try:
        return (
            torch.backends.mkldnn.is_available()
            and hasattr(ops, "_reorder_linear_weight")
            and hasattr(ops, "_linear_pointwise")
        )
    except (AttributeError, RuntimeError):
        return False


@functools.cache
def packs(dtype: torch.dtype) -> bool:
    """Whether oneDNN packs and multiplies weights of `dtype` on this CPU (tried once on an 8 x 8
    weight: its bf16 path raises on CPUs without AVX-512 or AVX-NE-CONVERT)."""
    if not packing_available():
        return False
    try:
        w = torch.ops.mkldnn._reorder_linear_weight(torch.ones(8, 8, dtype=dtype))
        torch.ops.mkldnn._linear_pointwise(torch.ones(1, 8, dtype=dtype), w, None, "none", [], "")
    except RuntimeError:
        return False
    return True


def check_kernel(name: str, what: str = "linear_kernel") -> str:
    """`name` if it is 'auto' or a known kernel; ValueError naming `what` otherwise."""
    if name != "auto" and name not in KERNELS:
        raise ValueError(f"{what}: unknown kernel {name!r}; choose auto or one of {', '.join(KERNELS)}")
    if name == "packed" and not packing_available():
        raise ValueError(f"{what}: 'packed' needs oneDNN, which this torch build lacks")
    return name


def applies(name: str, dtype: torch.dtype, rows: int) -> bool:
    """Whether kernel `name` multiplies `rows` rows of `dtype` on this build and CPU."""
    if name == "mv":
        return rows == 1
    if name == "packed":
        return packs(dtype)
    if name == "native":
        return native.available(dtype)
    return True


def _derived(weight: torch.Tensor, kind: str) -> torch.Tensor:
    """The cached `kind` copy of `weight` ("packed", "transposed" or "native")."""
    return _DERIVED.get(weight, kind, _MAKE[kind])


_MAKE: dict[str, Callable] = {
    "packed": lambda w: torch.ops.mkldnn._reorder_linear_weight(w),
    "transposed": lambda w: w.t().contiguous(),
    "native": native.pack,
}


def _plain(x, weight, bias):
    return F.linear(x, weight, bias)


def _packed(x, weight, bias):
    return torch.ops.mkldnn._linear_pointwise(x, _derived(weight, "packed"), bias, "none", [], "")


def _mv(x, weight, bias):
    v = x.reshape(-1)  # (in,): one row
    y = torch.mv(weight, v) if bias is None else torch.addmv(bias, weight, v)
    return y.view(*x.shape[:-1], weight.shape[0])


def _transposed(x, weight, bias):
    y = torch.matmul(x, _derived(weight, "transposed"))  # (..., in) @ (in, out)
    return y if bias is None else y.add_(bias)


def _native(x, weight, bias, **fold):
    return native.linear(x, _derived(weight, "native"), weight.shape[0], bias, **fold)


def native_copy(weight: torch.Tensor) -> torch.Tensor:
    """`weight`'s panels for the native kernel (`native.pack`), made once and remade when it changes."""
    return _derived(weight, "native")


def is_native(func: Callable) -> bool:
    """Whether `func` (from `linear_func`) is the native kernel."""
    return func is _native


def native_folded(func: Callable, x: torch.Tensor, weight: torch.Tensor, **fold) -> torch.Tensor | None:
    """Where `func` (from `linear_func`) is the native kernel: its product of x and `weight`
    with the operations `fold` names folded into the call (`native.linear`: norm, swiglu,
    residual); None for any other kernel (the caller runs the operations itself)."""
    return _native(x, weight, None, **fold) if func is _native else None


_FUNCS: dict[str, Callable] = {
    "plain": _plain,
    "packed": _packed,
    "mv": _mv,
    "transposed": _transposed,
    "native": _native,
}


def _bucket(rows: int) -> tuple[int | None, int]:
    for top, measured in _BUCKETS:
        if rows <= top:
            return top, measured
    return _MANY_ROWS


def bucket_top(rows: int) -> int:
    """The most rows that share `rows`' kernel choice (its bucket's top; `rows` past the last)."""
    top = _bucket(rows)[0]
    return rows if top is None else top


def reference(dtype: torch.dtype, rows: int = 1, fused: bool = False) -> str:
    """The kernel another must clearly beat to be chosen for `dtype` at `rows` rows (measured),
    `fused`: where a layer's products weigh its one native call (`fused_at`). Past
    PROMPT_REFERENCE_ROWS rows where not fused (a prompt's layers op by op): `packed` where
    oneDNN packs `dtype`, its GEMM unless another clearly beats it. Else `native` wherever it was
    built (fp32 and bf16): on the AMD EPYC (Zen 5) SmolLM2 decoded at 1.13x all-`packed` in fp32
    and 1.12x in bf16 with its products alone, 1.23x and 1.47x with the layer's operations it
    takes over (`lean.py`; `benchmarks/smollm2_decode.py --kernels auto packed`), and other
    kernels still replace it on a clear gain (more rows, other CPUs). Without it: `plain` (no
    weight copy), except in 16-bit float dtypes where oneDNN packs them on this CPU (`packs`):
    `packed`, which another must beat by
    `SIXTEEN_BIT_MARGIN`. Timed alone, one shape at a time, bf16 `plain` and `packed` came within
    a few percent of each other on the Intel Xeon (60-66 us for 960x576 at one row, 2 threads)
    and runs picked different mixes, while in decoding, where every product follows other work,
    all-`packed` SmolLM2 ran 38.2 tokens/s against 32.2 all-`plain` and 33.9 and 34.3 for two
    measured mixes; on the AMD EPYC packed bf16 streamed 20-32 GB/s against `F.linear`'s 8-13.
    Not assumed outright: on an earlier Xeon host all-`packed` bf16 decoded at 0.88x all-`plain`."""
    if rows > PROMPT_REFERENCE_ROWS and not fused and applies("packed", dtype, rows):
        return "packed"
    if native.available(dtype):
        return "native"
    if dtype in (torch.bfloat16, torch.float16) and packs(dtype):
        return "packed"
    return "plain"


def candidates(rows: int, dtype: torch.dtype = torch.float32) -> list[str]:
    """The kernels that apply to `rows` rows of `dtype` on this build and CPU."""
    return [k for k in KERNELS if applies(k, dtype, rows)]


def register(weights: Iterable[torch.Tensor]) -> None:
    """Make `weights` the group a choice for their shape is measured on (a model's Linears)."""
    for w in weights:
        group = _GROUPS.setdefault((tuple(w.shape), w.dtype), {})
        if id(w) not in group:
            group[id(w)] = weakref.ref(w)
            weakref.finalize(w, group.pop, id(w), None)


def fuse(weights: Iterable[torch.Tensor]) -> None:
    """Mark `weights` as a layer's products (`lean.LeanLayer`), which run in one native call
    where all of them are native, or a vocabulary head's weight (`lean.LeanKernels.head_func`), whose
    head runs in one: up to `lean.FOLD_ROWS` rows, another kernel must beat `native` on their
    shapes by `FUSED_MARGIN`, not `MARGIN`."""
    _FUSED.update((tuple(w.shape), w.dtype) for w in weights)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` with the kernel chosen for this shape, dtype, rows and threads.
    The caller checks that a fast kernel applies (CPU, no autograd, one dtype)."""
    return linear_func(weight, x.numel() // x.shape[-1])(x, weight, bias)


def linear_func(weight: torch.Tensor, rows: int) -> Callable:
    """The function (x, weight, bias) of the kernel chosen for `weight` against `rows` rows
    (`lean.LeanKernels` looks it up once per decode step)."""
    name = kernel_for(weight, rows)
    if not applies(name, weight.dtype, rows):
        name = "plain"  # a forced kernel that does not apply here
    return _FUNCS[name]


def selection() -> tuple:
    """What `kernel_for`'s answer depends on besides the weight and the rows: the kernel forced
    (innermost), `EE_LINEAR_KERNEL` and the threads (a choice, once measured, stays)."""
    return _forced[-1] if _forced else None, os.environ.get(ENV, "auto"), torch.get_num_threads()


def kernel_for(weight: torch.Tensor, rows: int) -> str:
    """The kernel for `weight` against `rows` rows: forced, cached, or measured now."""
    if _forced and _forced[-1] != "auto":
        return _forced[-1]  # checked when forced
    env = os.environ.get(ENV, "auto")
    if env != "auto":
        return check_kernel(env, ENV)
    bucket, measured_rows = _bucket(rows)
    key = (tuple(weight.shape), weight.dtype, bucket, torch.get_num_threads())
    name = _CHOICE.get(key)
    if name is None:
        prefetch_choice(weight.dtype)
        name = _CHOICE[key] = _measure(weight, measured_rows, fused=fused_at(weight, bucket) and key[:2] in _FUSED)
        _drop_unchosen(key[:2])
    return name


def fused_at(weight: torch.Tensor, bucket: int | None) -> bool:
    """Whether a layer's products of `weight`'s dtype at the row bucket `bucket` weigh the one-call
    layer (`FUSED_MARGIN`): up to 64 rows everywhere, 65-256 (a prompt) only where bf16 products take
    Intel's tiles (`native.amx`) or vdpbf16ps in groups of rows and panels (`native.grouped`: a CPU
    with AVX512-BF16). Elsewhere the native kernel's sweep costs a product a multiply-add per row and
    weight, and kept within the wide margin it slowed SmolLM2's fp32 prefill of ~200-token prompts
    1.18x against its operations one by one on oneDNN / MKL. On the AMD EPYC (avx512_bf16, no AMX)
    the vdpbf16ps sweep of one panel against 8 rows took 1.13-1.32x oneDNN's time on the reference
    models' products at 128-166 rows (stop 71), and weighed as one call there, a 166-token prefill of
    the CPU reference model took 26.5-28.6 ms in one process and 37.1-37.9 in others where one
    shape's choice fell to oneDNN and the layers ran op by op on native products. Grouped (4 rows x
    3 panels, stop 85), a prompt's layers in one call each took 0.896x the time of their operations
    one by one on oneDNN's packed kernel (the CPU reference model's bf16 prefill of 40 abstracts,
    80 alternating prompt runs each, scratch `choice_ab.py`), SmolLM2's 0.891x (16 abstracts)."""
    if bucket is None:
        return False
    return bucket <= 64 or (weight.dtype == torch.bfloat16 and (native.amx() or native.grouped()))


def _measure(weight: torch.Tensor, rows: int, fused: bool = False) -> str:
    group = [w for w in (r() for r in _GROUPS.get((tuple(weight.shape), weight.dtype), {}).values()) if w is not None]
    weights = group if any(w is weight for w in group) else [weight]
    x = torch.randn(rows, weight.shape[1], generator=torch.Generator().manual_seed(0)).to(weight.dtype)
    ref = reference(weight.dtype, rows, fused)
    names = [ref] + [k for k in candidates(rows, weight.dtype) if k != ref]
    funcs = {k: (lambda f: lambda w: f(x, w, None))(_FUNCS[k]) for k in names}
    # One thread: CPU time, robust to a shared machine. More: wall time (CPU time would count
    # every thread's share and so favour kernels that do not parallelise), which other processes
    # disturb: three times the rounds and twice the margin, so that a kernel replaces `plain` only
    # on a clear gain seen over many alternations (3 rounds at 5% picked a kernel that decoded
    # SmolLM2 at 0.98x of plain's speed at 2 threads on the Intel Xeon).
    # `packed` in 16-bit dtypes, and `native` on a layer's products: a wider margin
    sixteen = ref == "packed" and weight.dtype in (torch.bfloat16, torch.float16)
    wide = SIXTEEN_BIT_MARGIN if sixteen else FUSED_MARGIN if ref == "native" and fused else None
    return _timed_pick(funcs, weights, wide)


def prefetch_choice(dtype: torch.dtype) -> bool:
    """Whether the native kernel's products of `dtype` prefetch their weights (`native.prefetch`),
    chosen once per process before its first kernel choice for `dtype`: one row against every
    registered weight of the dtype in turn (a decode step's reads, from memory where they overflow
    the cache), with the prefetch and without, alternated as `pick` times kernels; without only
    where that is faster by PREFETCH_MARGIN. What pays differs by machine and dtype: on an Intel
    Xeon (Emerald Rapids) and an AVX2 AMD EPYC the prefetch made bf16 sweeps 1.2-1.5x faster, while
    on an Intel Xeon reporting 480 MiB of L3 SmolLM2 decoded 1.70x `transformers` in fp32 without it
    against 1.61-1.63x with it. `EE_NATIVE_PREFETCH` (1 / 0) sets it instead (`native.prefetch_env`);
    without the library, or where it was built without prefetch, nothing is timed."""
    if dtype in _PREFETCH:
        return _PREFETCH[dtype]
    forced = native.prefetch_env()
    on = forced if forced is not None else native.built_prefetch() > 0
    if native.available(dtype):
        if forced is None and on:
            on = _time_prefetch(dtype)
        native.prefetch(dtype, on)
    _PREFETCH[dtype] = on
    return on


def _time_prefetch(dtype: torch.dtype) -> bool:
    """`prefetch_choice`'s timing: whether one row against every registered weight of `dtype` is
    swept faster with the prefetch (so unless without wins by PREFETCH_MARGIN). The weights'
    native copies are dropped afterwards for the shapes no choice has kept them for yet."""
    groups = [key for key in _GROUPS if key[1] == dtype]
    weights = [w for key in groups for w in (r() for r in _GROUPS[key].values()) if w is not None]
    if not weights:
        return True
    gen = torch.Generator().manual_seed(0)
    xs = {k: torch.randn(1, k, generator=gen).to(dtype) for k in sorted({w.shape[1] for w in weights})}

    def sweep_all(on: bool) -> Callable[[list], None]:
        def run(ws: list) -> None:
            native.prefetch(dtype, on)
            for w in ws:
                _native(xs[w.shape[1]], w, None)

        return run

    multi = torch.get_num_threads() > 1
    with torch.no_grad():
        chosen = pick(
            {"ahead": sweep_all(True), "none": sweep_all(False)},
            [weights],
            rounds=MANY_THREAD_ROUNDS if multi else ROUNDS,
            clock=time.perf_counter if multi else time.process_time,
            margin=PREFETCH_MARGIN,
        )
    for key in groups:
        _drop_unchosen(key)
    return chosen == "ahead"


def _timed_pick(funcs: dict, weights: Sequence, wide: float | None = None) -> str:
    """`pick` as this process's threads time it: one thread CPU time at the default margin (or
    `wide`), more wall time over MANY_THREAD_ROUNDS at MANY_THREAD_MARGIN (or `wide` if wider)."""
    with torch.no_grad():
        if torch.get_num_threads() == 1:
            return pick(funcs, weights, clock=time.process_time, **({"margin": wide} if wide else {}))
        margin = max(MANY_THREAD_MARGIN, wide) if wide else MANY_THREAD_MARGIN
        return pick(funcs, weights, clock=time.perf_counter, rounds=MANY_THREAD_ROUNDS, margin=margin)


def pick(
    funcs: dict[str, Callable[[torch.Tensor], object]],
    weights: Sequence[torch.Tensor],
    rounds: int = ROUNDS,
    clock: Callable[[], float] = time.perf_counter,
    margin: float = MARGIN,
) -> str:
    """The name of the fastest of `funcs` (each run once per weight per round, best round
    counts, kernels alternated so that each sees the same machine load). The first (the
    reference: `reference(dtype)`) stays unless another is faster by more than `margin` (a share
    of its time): switching kernels (and, from `plain`, copying the weights) takes a clear gain,
    not noise.
    One unmeasured round first warms each up (and makes its weight copies); a kernel whose first
    call there takes over `SCREEN` times the reference's first call (its weight copy included) is
    dropped at once: bf16 `plain` at 32 rows on a CPU without bf16 kernels (a reference loop,
    hundreds of times slower) cost SmolLM2 81 s of warm-up, timed over every weight and round."""
    first, kept = next(iter(funcs)), {}
    for name, f in funcs.items():
        for i, w in enumerate(weights):
            start = clock()
            f(w)
            if i == 0 and name == first:
                bound = SCREEN * (clock() - start)  # the reference's first call, times SCREEN
            elif i == 0 and clock() - start > bound:
                break
        else:
            kept[name] = f
    funcs = kept
    best = dict.fromkeys(funcs, float("inf"))
    for _ in range(rounds):
        for name, f in funcs.items():
            start = clock()
            for w in weights:
                f(w)
            best[name] = min(best[name], clock() - start)
    fastest = min(funcs, key=lambda k: best[k])
    return fastest if best[fastest] < (1 - margin) * best[first] else first


def _drop_unchosen(shape_dtype: tuple) -> None:
    """Free the weight copies of kernels no bucket of this (shape, dtype) chose."""
    keep = {k for key, k in _CHOICE.items() if key[:2] == shape_dtype}
    for r in _GROUPS.get(shape_dtype, {}).values():
        w = r()
        if w is not None:
            _DERIVED.drop(w, [k for k in _DERIVED.kinds(w) if k not in keep])


class forced_kernel:
    """Within the block, every product uses `name` ('auto': measure, or the env var's choice)."""

    def __init__(self, name: str) -> None:
        self.name = check_kernel(name)

    def __enter__(self) -> forced_kernel:
        _forced.append(self.name)
        return self

    def __exit__(self, *exc) -> None:
        _forced.pop()


def forget(weights: Iterable[torch.Tensor]) -> None:
    """Drop the weight copies of `weights` (their choices stay: they are per shape)."""
    for w in weights:
        _DERIVED.drop(w)


def choices() -> dict[tuple, str]:
    """The measured choices so far: (shape, dtype, rows bucket (None: more), threads) -> kernel."""
    return dict(_CHOICE)


def measured_count() -> int:
    """How many choices have been measured so far (a round that measured one took its timing's time too)."""
    return len(_CHOICE) + len(_ATTENTION)


def clear_choices() -> None:
    """Forget every measured choice (tests; or after the machine's load changed a lot)."""
    _CHOICE.clear()
    _ATTENTION.clear()
    _PREFETCH.clear()


def prompt_attention(dtype: torch.dtype, groups: int, per: int, hd: int, rows: int) -> bool:
    """Whether a general pass of `rows` rows per sequence past `lean.ATTEND_ROWS` (a prompt) attends
    natively (`native.attend`) rather than through SDPA: measured once per dtype, head layout, rows
    bucket and threads on a causal prompt of the bucket's measured rows, SDPA the reference that
    `native` must beat by the margin. On the AMD EPYC (2 threads, causal, fresh cache) `native`
    took 0.60-0.66x SDPA's time in bf16 and 0.64-0.88x in fp32 from 64 to 1024 rows, for 6 heads
    of 64 and for SmolLM2's 3 groups of 3 (SDPA's blocked kernel for CPUs skips no work on a
    boolean mask and sums its blocks at ~70 GFLOP/s there); the 12-layer CPU reference model's
    prefill of 166-token prompts went 31.7 -> 28.7 ms in bf16, SmolLM2's of ~200 tokens 187 ->
    169 ms. Not assumed: on the Intel Xeon (AMX) SmolLM2's fp32 prefill of ~200-token prompts ran
    1.08x slower attending natively (commit 0ee5199). False where the native kernel is
    not built for `dtype`. The caller checks that native arithmetic is allowed (the products'
    kernel is not forced to another)."""
    if not native.available(dtype):
        return False
    bucket, measured_rows = _bucket(rows)
    key = (dtype, groups, per, hd, bucket, torch.get_num_threads())
    choice = _ATTENTION.get(key)
    if choice is None:
        choice = _ATTENTION[key] = _measure_attention(dtype, groups, per, hd, measured_rows)
    return choice


def _measure_attention(dtype: torch.dtype, groups: int, per: int, hd: int, rows: int) -> bool:
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, rows, groups, per, hd, generator=gen).to(dtype)
    keys, values = (torch.randn(1, groups, rows, hd, generator=gen).to(dtype) for _ in range(2))
    mask = torch.ones(rows, rows, dtype=torch.bool).tril()[None, None]
    heads = q.reshape(1, rows, groups * per, hd).transpose(1, 2)
    funcs = {
        "sdpa": lambda _: F.scaled_dot_product_attention(heads, keys, values, attn_mask=mask, enable_gqa=per > 1),
        "native": lambda _: native.attend(q, keys, values, mask),
    }
    return _timed_pick(funcs, (None,)) == "native"

"""The `native` decode kernel: a one-to-few-row matrix product of our own (`native_linear.c`).

oneDNN's packed kernel and `torch.mv` stream a decode step's weights at 56% of this machine's read
bandwidth (fp32) and 41% (bf16) in SmolLM2's decode steps; a product whose weight is read once
from a copy laid out for the purpose (panels of 16 output rows, k-major: one contiguous stream per
thread, 16 outputs per vector register; bf16 columns taken in pairs by the CPU's bf16 pair dot
product where it has one) reads them faster (`benchmarks/smollm2_decode.py` prints both).
On a CPU with Intel's matrix tiles (AMX), bf16 products take them (`amx`): the same one stream of
weights at one row, and each further row nearly free where the sweep's vdpbf16ps paid one
instruction per row and pair of columns (a self-speculative verify pass, a batch's rows).
The C source is compiled once per machine on first use with the system's C compiler
(`CC`, else `cc`) and `-O3 -march=native`, into a cache keyed by the source, the flags and the
CPU (a library built for one CPU never loads on another), and loaded with ctypes: no PyTorch
headers, about a second. Its threads are the OpenMP runtime torch already loaded (the library
links the same `libgomp.so.1` soname, which the loader does not load twice): a second runtime
beside torch's would put four threads on two cores.

The same library holds what a decode step does around the products: the norm, SwiGLU and
residual folded into a product's call (`linear`), attention over the KV cache (`attend`), rotary
positions (`rope_`), a learned exit's check (`Probe`), and a whole layer's decode step in one call
(`layer_step`), each with the roundings of the torch operations it replaces.

Where there is no compiler, compilation fails, the loaded library would bring a second OpenMP
runtime, or `EE_NATIVE=0`, the kernel does not exist (`available()` is False, one warning line
says why) and decoding uses the others. fp32 and bf16 weights (`DTYPES`), CPU only.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from megatron.early_exit.inference import huge_pages

SOURCE = Path(__file__).with_name("native_linear.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-lm")
CFLAGS_ENV = "EE_NATIVE_CFLAGS"  # more compiler flags, e.g. "-DPREFETCH=2048" (a library of its own)
DTYPES = (torch.float32, torch.bfloat16)
PANEL = 16  # output rows per panel (native_linear.c)
ENV = "EE_NATIVE"  # "0": never build or use the native kernel
CACHE_ENV = "EE_NATIVE_CACHE"  # where built libraries are kept
PREFETCH_ENV = "EE_NATIVE_PREFETCH"  # 1 / 0: the sweeps' prefetch on / off (`prefetch`); unset: timed


def cache_dir() -> Path:
    """`EE_NATIVE_CACHE`, else `$XDG_CACHE_HOME/megatron-early-exit`, else ~/.cache/megatron-early-exit."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "megatron-early-exit"


def _cpu_key() -> str:
    """What -march=native depends on: the CPU's model and feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        wanted = [ln for ln in lines if ln.split(":")[0].strip() in ("model name", "flags", "Features")]
        return "\n".join(sorted(set(wanted)))
    except OSError:
        return platform.processor() + platform.machine()


def flags() -> tuple[str, ...]:
    """The compiler flags: FLAGS and `EE_NATIVE_CFLAGS`' (split at spaces; `native_linear.c`'s
    macros, such as PREFETCH: the bytes ahead of a sweep it asks for, 0 for none)."""
    return FLAGS + tuple(os.environ.get(CFLAGS_ENV, "").split())


def _build(compiler: str) -> Path:
    key = hashlib.sha256("\n".join([SOURCE.read_text(), compiler, *flags(), _cpu_key()]).encode()).hexdigest()[:16]
    out = cache_dir() / f"native_linear-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Built beside its final name and renamed: processes started together (torchrun) never load
    # a half-written library.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        done = subprocess.run([compiler, *flags(), str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _omp_runtimes() -> set[str]:
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return set()
    return {ln.split()[-1] for ln in maps if "libgomp" in ln or "libiomp" in ln}


KEEP = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_float)  # `drafts`' keep(s, j, conf)
# `decode`'s keep(s, step, token, exit layer, max-probability, probe score)
DECODE_KEEP = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_float, ctypes.c_float
)

# `decode`'s decide(exit index, phase, info, firing count, firing indices): whether the exit is
# evaluated (phase 0) or its firing rows leave (phase 1); `ee_decode` says what info holds
DECODE_DECIDE = ctypes.CFUNCTYPE(
    ctypes.c_int,
    ctypes.c_int64,
    ctypes.c_int64,
    ctypes.POINTER(ctypes.c_int64),
    ctypes.c_int64,
    ctypes.POINTER(ctypes.c_int64),
)
NO_DECIDE = ctypes.cast(None, DECODE_DECIDE)  # NULL: the exact policy's decisions
# `spec_rounds`' keep(j, token, exit layer, max-probability) and next(round, drafted, agreed, ended)
SPEC_KEEP = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_float)
SPEC_NEXT = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64)


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded native library, or None (with one warning line saying why) where it cannot be had."""
    if os.environ.get(ENV, "1") == "0":
        return None
    compiler = os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        warnings.warn(f"native kernel: no C compiler ({compiler!r} not found); using torch's kernels", stacklevel=2)
        return None
    before = _omp_runtimes()
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        warnings.warn(f"native kernel unavailable ({e}); using torch's kernels", stacklevel=2)
        return None
    if len(_omp_runtimes()) > max(1, len(before)):
        warnings.warn("native kernel: it loaded an OpenMP runtime besides torch's; using torch's kernels", stacklevel=2)
        return None
    vp, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.ee_pack.argtypes = [vp, vp, i64, i64, i32, i32]
    lib.ee_pack.restype = None
    lib.ee_linear.argtypes = [vp, vp, vp, vp, i64, i64, i64, i32, i32, i32, vp, ctypes.c_float, vp]
    lib.ee_linear.restype = i32
    lib.ee_attend.argtypes = [vp, vp, vp, vp, vp] + [i64] * 12 + [i32, i32]
    lib.ee_attend.restype = i32
    lib.ee_rope.argtypes = [vp] + [i64] * 5 + [vp, vp, i64, i32]
    lib.ee_rope.restype = None
    lib.ee_layer.argtypes = [vp, vp, i64, i32, i32] + [i64] * 5 + [vp, ctypes.c_float, vp, vp, vp, ctypes.c_float]
    lib.ee_layer.argtypes += [vp, vp, vp, vp, i64, vp, vp, i64, i64, i64, vp, vp, i64, vp]
    lib.ee_layer.argtypes += [vp, vp]  # the next exit's probe (`Probe.ref`) and its scores
    lib.ee_layer.restype = i32
    lib.ee_layers.argtypes = [i64, vp, vp, vp, vp, i64, i32, i32] + [i64] * 5 + [vp, vp, i64, i64, i64, i64]
    lib.ee_layers.argtypes += [vp, vp, i64, vp, vp, vp, vp, vp]
    lib.ee_layers.restype = i32
    lib.ee_probe.argtypes = [vp, i32, i64, i64, vp, vp, i32]
    lib.ee_head.argtypes = [vp, vp, i64, i64, i64, i32, i32, vp, ctypes.c_float, vp, i64, vp, vp, vp, vp]
    lib.ee_head.restype = i32
    lib.ee_probe.restype = i32
    lib.ee_drafts.argtypes = [i64, i64, vp, vp, i64, vp, vp, i32, i32] + [i64] * 5 + [vp, vp] + [i64] * 3
    lib.ee_drafts.argtypes += [vp, vp, vp, vp, vp, i64, vp, vp, ctypes.c_float, KEEP, vp, i64, i32, vp, vp, vp]
    lib.ee_drafts.restype = i32
    lib.ee_decode.argtypes = [i64, vp, vp, vp, vp, i64, vp, vp, i64, vp, i64, vp, vp, i32, i32] + [i64] * 5
    lib.ee_decode.argtypes += [vp, vp, i64, i64, i64, i64, vp, vp, i64, vp, ctypes.c_float, DECODE_KEEP]
    lib.ee_decode.argtypes += [DECODE_DECIDE, vp, vp, vp, vp]
    lib.ee_decode.restype = i32
    lib.ee_verify.argtypes = [i64, vp, vp, vp, vp, i64, i64, vp, i64, vp, vp, i32, i32] + [i64] * 5
    lib.ee_verify.argtypes += [vp, vp, i64, i64, i64, vp, i64, vp, ctypes.c_float, vp, vp, vp]
    lib.ee_verify.restype = i32
    f32 = ctypes.c_float
    lib.ee_spec_rounds.argtypes = [i64, vp, vp, vp, i64, i64, vp, vp, i64, vp, vp, vp, i64, vp, vp, f32, i64]
    lib.ee_spec_rounds.argtypes += [i64, vp, vp, vp, i64, vp, f32, i32, i32] + [i64] * 5 + [vp, vp] + [i64] * 6
    lib.ee_spec_rounds.argtypes += [vp, i64, SPEC_KEEP, SPEC_NEXT, vp, vp, vp]
    lib.ee_spec_rounds.restype = i32
    lib.ee_rows.argtypes = [vp, i32, i32, vp, ctypes.c_float, vp, i64, i64, i32]
    lib.ee_rows.restype = None
    lib.ee_add.argtypes = [vp, vp, i64, i32, i32]
    lib.ee_add.restype = None
    lib.ee_amx.argtypes = [i32]
    lib.ee_amx.restype = i32
    _prefetch_setup(lib)
    return lib


def _prefetch_setup(lib: ctypes.CDLL) -> None:
    """`library`'s prefetch entry points declared, and its setting reset (the same file loaded
    again is the same library) to `EE_NATIVE_PREFETCH`'s, else on."""
    if not hasattr(lib, "ee_prefetch"):  # an older source's library (`benchmarks/native_ab.py`)
        return
    lib.ee_prefetch.argtypes = [ctypes.c_int, ctypes.c_int]
    lib.ee_prefetch.restype = ctypes.c_int
    lib.ee_prefetch_built.argtypes = []
    lib.ee_prefetch_built.restype = ctypes.c_int64
    forced = prefetch_env()
    for dtype in DTYPES:
        lib.ee_prefetch(int(dtype == torch.bfloat16), int(forced is not False))


def amx(want: bool | None = None) -> bool:
    """Whether bf16 products run on Intel's matrix tiles (AMX): where the CPU has them, the library
    was built for them and the kernel lets this process use them. `want` False turns them off for
    this process (bf16 products then take the vdpbf16ps sweep: other sums, the same panels), True
    back on."""
    lib = library()
    return lib is not None and bool(lib.ee_amx(-1 if want is None else int(want)))


def grouped() -> bool:
    """Whether this library's bf16 products of a prompt's rows run in groups of rows and panels on
    vdpbf16ps (`native_linear.c`'s `group`: a CPU with AVX512-BF16)."""
    lib = library()  # ee_grouped() -> int, ctypes' default; absent from an older source's (`native_ab.py`)
    return lib is not None and hasattr(lib, "ee_grouped") and bool(lib.ee_grouped())


def prefetch_env() -> bool | None:
    """`EE_NATIVE_PREFETCH`: '1' on, '0' off, None where unset or 'auto' (`kernels.prefetch_choice`
    times it); ValueError naming it otherwise."""
    text = os.environ.get(PREFETCH_ENV, "auto").strip()
    if text in ("", "auto"):
        return None
    if text not in ("0", "1"):
        raise ValueError(f"{PREFETCH_ENV}={text!r}: expected 1 (prefetch), 0 (none) or auto (timed)")
    return text == "1"


def built_prefetch() -> int:
    """The bytes ahead of a sweep the library asks for where its prefetch is on (its PREFETCH; 0:
    built without it, no library, or an older source's)."""
    lib = library()
    return 0 if lib is None or not hasattr(lib, "ee_prefetch") else int(lib.ee_prefetch_built())


def prefetch(dtype: torch.dtype, on: bool | None = None) -> bool:
    """Whether the native kernel's sweeps of `dtype` ask the CPU for weights `built_prefetch()`
    bytes ahead (else the hardware's prefetchers alone; on until set; bf16's covers the AMX tile
    loop too); `on` sets it for this process. False without the library. The products' numbers
    are the same either way: only their speed moves (`kernels.prefetch_choice` times it)."""
    lib = library()
    if lib is None or not hasattr(lib, "ee_prefetch"):  # none, or an older source's (`native_ab.py`)
        return False
    return bool(lib.ee_prefetch(int(dtype == torch.bfloat16), -1 if on is None else int(bool(on))))


def prepared_rows(x: torch.Tensor, norm: tuple[torch.Tensor, float] | None = None, swiglu: bool = False):
    """The rows x (N, in) made ready for a product as `linear` makes them for its own (norm=(gain,
    eps): `lean.rms_norm(x, gain, eps)`; swiglu: `F.silu(gate) * up` of x = [gate | up], (N, in / 2)),
    with those operations' roundings (the norm's mean and the sigmoid's exp within round-off of
    torch's), in one call: for a product on another kernel (`lean.LeanKernels.folded`). None where
    the native kernel does not take x (its dtype, device, a gain of another dtype)."""
    if library() is None or x.dtype not in DTYPES or x.device.type != "cpu" or x.dim() != 2:
        return None
    if norm is not None and (norm[0].dtype != x.dtype or norm[0].numel() != x.shape[1]):
        return None
    x = x.contiguous()
    k = x.shape[1] // 2 if swiglu else x.shape[1]
    out = torch.empty(x.shape[0], k, dtype=x.dtype)
    gain = None if norm is None else norm[0].contiguous()
    kind = 1 if norm is not None else 2 if swiglu else 0
    library().ee_rows(
        x.data_ptr(),
        int(x.dtype == torch.bfloat16),
        kind,
        None if gain is None else gain.data_ptr(),
        0.0 if norm is None else float(norm[1]),
        out.data_ptr(),
        x.shape[0],
        k,
        torch.get_num_threads(),
    )
    return out


def add_(y: torch.Tensor, a: torch.Tensor) -> torch.Tensor | None:
    """y = a + y in place (torch's `a + y`, the same bits: bf16 summed in fp32 and rounded once), in
    one call over both threads: a residual added to a prompt's products made on another kernel
    (`lean.LeanKernels.folded`). y; None where the native kernel does not take them (their dtypes,
    device, shapes or layout), y untouched."""
    if library() is None or y.dtype not in DTYPES or a.dtype != y.dtype or a.shape != y.shape:
        return None
    if y.device.type != "cpu" or a.device.type != "cpu" or not (y.is_contiguous() and a.is_contiguous()):
        return None
    if y.requires_grad or a.requires_grad:  # autograd would not see it
        return None
    library().ee_add(a.data_ptr(), y.data_ptr(), y.numel(), int(y.dtype == torch.bfloat16), torch.get_num_threads())
    return y


def available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether the native kernel multiplies weights of `dtype` here."""
    return dtype in DTYPES and library() is not None


def pack(weight: torch.Tensor) -> torch.Tensor:
    """`weight` (M, K) laid out in panels for `linear` (a flat tensor of its dtype)."""
    lib = library()
    if lib is None or weight.dtype not in DTYPES or weight.dim() != 2:
        raise ValueError(f"native kernel: cannot pack a {tuple(weight.shape)} {weight.dtype} weight here")
    w = weight.detach().contiguous()
    m, k = w.shape
    out = huge_pages.empty((m + PANEL - 1) // PANEL * PANEL * k, w.dtype)  # streamed every step: `huge_pages`
    lib.ee_pack(w.data_ptr(), out.data_ptr(), m, k, int(w.dtype == torch.bfloat16), torch.get_num_threads())
    return out


def linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    out_features: int,
    bias: torch.Tensor | None = None,
    *,
    norm: tuple[torch.Tensor, float] | None = None,
    swiglu: bool = False,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """`F.linear(x, W, bias)` from `packed = pack(W)`; x, W, bias and residual share one dtype
    (`DTYPES`). fp32 results differ from torch's by summation order; bf16 sums in fp32 and rounds
    once. With the layer's operations around the product folded in (one call instead of several):
      norm=(gain, eps): `F.linear(lean.rms_norm(x, gain, eps), W)`;
      swiglu: x is [gate | up] (2 in_features columns): `F.linear(F.silu(gate) * up, W)`;
      residual: `residual + F.linear(...)`,
    each with the roundings of those operations (bf16 rounds where they do); the norm's mean and
    the sigmoid's exp differ from torch's by round-off."""
    x = x.contiguous()
    k = x.shape[-1] // 2 if swiglu else x.shape[-1]
    y = torch.empty(*x.shape[:-1], out_features, dtype=x.dtype)
    kind, gain, eps = (2, None, 0.0) if swiglu else (0, None, 0.0)
    if norm is not None:
        kind, gain, eps = 1, norm[0].contiguous(), float(norm[1])
    if residual is not None:
        residual = residual.contiguous()
    rc = library().ee_linear(
        x.data_ptr(),
        packed.data_ptr(),
        None if bias is None else bias.contiguous().data_ptr(),
        y.data_ptr(),
        x.numel() // x.shape[-1],
        k,
        out_features,
        int(x.dtype == torch.bfloat16),
        torch.get_num_threads(),
        kind,
        None if gain is None else gain.data_ptr(),
        eps,
        None if residual is None else residual.data_ptr(),
    )
    if rc != 0:
        raise MemoryError("native kernel: out of memory for its input rows")
    return y


def head(
    x: torch.Tensor,
    packed: torch.Tensor,
    rows: int,
    norm: tuple[torch.Tensor, float] | None,
    ids: torch.Tensor | None = None,
    vocab: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, list[int], list[float]]:
    """A vocabulary head in one call (`ee_head`): rows x (A, h) through `norm` (an RMSNorm's (gain,
    eps), or None) onto the first `rows` rows of the weight `packed` holds (`pack`); returns
    (logits, the product (A, rows) fp32 rounded to x's dtype first as the product's output is,
    each row's greedy token, its max-probability). logits: the product itself, or with `ids` (a
    draft vocabulary: `packed` holds the output weight's rows at `ids`, int64 ascending) the
    (A, vocab) fp32 row, -inf outside `ids`, and the tokens are ids. The numbers of `linear` and
    of the torch operations a head runs on its output (`Passes.draft_logits`, `vocab_logits`,
    `confidence.max_prob`, argmax), the probability within round-off (another summation order)."""
    x = x.contiguous()
    a, h = x.shape[0], x.shape[-1]
    part = torch.empty(a, rows)
    full = None if ids is None else torch.empty(a, vocab)
    tokens, conf = (ctypes.c_int64 * a)(), (ctypes.c_float * a)()
    gain, eps = (None, 0.0) if norm is None else (norm[0].contiguous(), float(norm[1]))
    rc = library().ee_head(
        x.data_ptr(), packed.data_ptr(), a, h, rows, int(x.dtype == torch.bfloat16), torch.get_num_threads(),
        None if gain is None else gain.data_ptr(), eps, None if ids is None else ids.data_ptr(), vocab,
        None if full is None else full.data_ptr(), part.data_ptr(), tokens, conf,
    )  # fmt: skip
    if rc != 0:
        raise MemoryError("native kernel: out of memory for a head's rows")
    return part if full is None else full, part, list(tokens), list(conf)


class EarlyStop:
    """The draft controller's early stop for one round as `ee_drafts` applies it without asking
    Python after each draft (`DraftController.stop_numbers`): a sequence drafts another while
    P(its drafts so far all accepted) x `accept` reaches `bar`, P(a draft accepted) read from `ok`
    by its max-probability's bin (min(int(conf x len(ok)), len(ok) - 1)); the same doubles
    multiplied in the same order as `DraftController.keep_drafting`, so the same decisions."""

    def __init__(self, bar: float, accept: float, ok: list[float]) -> None:
        self.bar, self.accept, self.ok = bar, accept, list(ok)
        self.numbers = (ctypes.c_double * (2 + len(ok)))(bar, accept, *ok)


def drafts(
    tokens: list[int],
    embedding: torch.Tensor,
    run: LayerRun,
    shape: tuple[int, int, int, int],
    tables: tuple[torch.Tensor, torch.Tensor],
    at: list[tuple[int, int]],
    pending: list[torch.Tensor],
    head: tuple[torch.Tensor, int, torch.Tensor, tuple[torch.Tensor, float]],
    keep=None,
    feed_last: bool = False,
) -> list[tuple[list[int], list[float]]] | None:
    """A self-speculative round's drafts for S sequences in one call (`ee_drafts`): sequence s
    makes up to len(pending[s]) (less one with `feed_last`) decode steps from tokens[s], each
    through `run`'s layers (0 .. L - 1, the layers below a norm-only exit) and the exit's head
    onto its draft vocabulary, each draft fed to its next step, as those decode steps
    (`layers_step`, then `head` with ids) would run them; each step takes the rows of the
    sequences still drafting together. embedding: the word embedding (V, h); tables: the rotary
    (cos, signed sine) fp32, a row of hd per position; at[s]: (cache slot, position of its first
    step); pending[s] (D_s, h): each step's hidden state at the exit (contiguous rows of x's dtype,
    written); head: (its packed rows, their count, the draft vocabulary's ids int64, the exit
    norm's (gain, eps)); keep(s, j, confidence) -> whether sequence s drafts another after its
    draft j (None: all), or an `EarlyStop` (the same rule without a call back into Python a
    draft). `feed_last`: each sequence's last draft fed through the layers too, its
    hidden state in the row after its last draft's. Returns per sequence (drafts, their
    max-probabilities), as many as were made; None where `layers_step` would not take `run`
    (nothing done)."""
    g, per, hd, ffn = shape
    cos, sin_signed = tables
    h, n = embedding.shape[-1], len(tokens)
    ok = run.caches_ok and all(run.dtype == embedding.dtype == p.dtype and p.is_contiguous() for p in pending)
    if not (ok and n and cos.dtype == torch.float32 and cos.is_contiguous() and sin_signed.is_contiguous()):
        return None
    limits = [p.shape[0] - int(feed_last) for p in pending]
    d, (panels, rows, ids, (gain, eps)) = max(max(limits), 1), head
    gain = gain.contiguous()
    i64 = ctypes.c_int64 * n
    out, conf, made = (ctypes.c_int64 * (n * d))(), (ctypes.c_float * (n * d))(), i64()
    failed: list[BaseException] = []
    ask = guarded(lambda s, j, c: bool(keep(s, j, c)), failed, 0)
    stop = keep.numbers if isinstance(keep, EarlyStop) else None

    rc = library().ee_drafts(
        d, n, i64(*tokens), embedding.data_ptr(), len(run), run.ptrs, run.eps, embedding.dtype == torch.bfloat16,
        torch.get_num_threads(), h, g, per, hd, ffn, cos.data_ptr(), sin_signed.data_ptr(), *run.strides[:3],
        i64(*(a for a, _ in at)), i64(*(b for _, b in at)), i64(*(p.data_ptr() for p in pending)), i64(*limits),
        panels.data_ptr(), rows, ids.data_ptr(), gain.data_ptr(), float(eps),
        KEEP(ask) if keep is not None and stop is None else KEEP(), stop, 0 if stop is None else len(stop) - 2,
        int(feed_last), out, conf, made,
    )  # fmt: skip
    if failed:
        raise failed[0]
    if rc != 0:
        raise MemoryError("native kernel: out of memory for a round's drafts")
    return [(list(out[s * d : s * d + made[s]]), list(conf[s * d : s * d + made[s]])) for s in range(n)]


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Attention of a decode step or a verify pass over the KV cache: q (A, G, per, hd) (each K/V
    group's query heads at one position: `attention.group_rows_attention`) or (A, R, G, per, hd)
    (R positions per sequence: SDPA with `enable_gqa`), keys / values (A, G, span, hd) (the KV
    cache's views: any strides but a contiguous last dim), mask a bool (A, 1, 1, span) or
    (A, 1, R, span) (True: attend; each position its own row) or None -> q's shape. Scores and
    softmax in fp32; fp32 within round-off of SDPA, bf16 within its output rounding; a position's
    result does not depend on the positions beside it."""
    r = q.shape[1] if q.dim() == 5 else 1
    a, g, per, hd = q.shape[0], q.shape[-3], q.shape[-2], q.shape[-1]
    span = keys.shape[2]
    q = q.contiguous()
    out = torch.empty_like(q)
    m = None if mask is None else mask.reshape(a * r, span).contiguous()  # bool: one byte, 0 or 1
    kb, kg, kp, _ = keys.stride()
    vb, vg, vp, _ = values.stride()
    rc = library().ee_attend(
        q.data_ptr(),
        keys.data_ptr(),
        values.data_ptr(),
        None if m is None else m.data_ptr(),
        out.data_ptr(),
        a,
        r,
        g,
        per,
        span,
        hd,
        kb,
        kg,
        kp,
        vb,
        vg,
        vp,
        int(q.dtype == torch.bfloat16),
        torch.get_num_threads(),
    )
    if rc != 0:
        raise MemoryError("native kernel: out of memory for attention scores")
    return out


def attends(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether `attend` takes these: one dtype of `DTYPES` on the CPU, contiguous head dims, a
    bool mask of one row per query position (or none)."""
    rows = q.shape[0] * (q.shape[1] if q.dim() == 5 else 1)
    return (
        q.dtype in DTYPES
        and keys.dtype == q.dtype == values.dtype
        and keys.stride(-1) == 1
        and values.stride(-1) == 1
        and q.device.type == "cpu"
        and (mask is None or (mask.dtype == torch.bool and mask.numel() == rows * keys.shape[2]))
    )


def rope_(qkv: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor, heads: int) -> torch.Tensor | None:
    """Rotate in place the first `heads` heads of each group of the QKV product viewed
    (N, G, per + 2, hd) (contiguous): x * cos + x.roll(hd / 2) * sin_signed in fp32, as
    `lean.LeanLayer.rotated_qkv` does; cos / sin_signed fp32 with hd per row of qkv or one row for
    all. Returns qkv, or None (nothing done) where the tables do not have that form."""
    n, g, per2, hd = qkv.shape
    c, s = cos.reshape(-1, hd), sin_signed.reshape(-1, hd)
    if (
        not qkv.is_contiguous()
        or qkv.dtype not in DTYPES
        or c.dtype != torch.float32
        or s.shape != c.shape
        or c.shape[0] not in (1, n)
        or hd > 1024
        or hd % 2
    ):
        return None
    c, s = c.contiguous(), s.contiguous()
    stride = 0 if c.shape[0] == 1 else hd
    library().ee_rope(
        qkv.data_ptr(), n, g, per2, heads, hd, c.data_ptr(), s.data_ptr(), stride, int(qkv.dtype == torch.bfloat16)
    )
    return qkv


class _ProbeArgs(ctypes.Structure):
    """`ee_probe_t`: a learned check as `ee_probe`, `ee_layer` and `ee_layers` read it."""

    _fields_ = [
        ("w1", ctypes.c_void_p),
        ("b1", ctypes.c_void_p),
        ("w2", ctypes.c_void_p),
        ("gain", ctypes.c_void_p),
        ("hidden", ctypes.c_int64),
        ("w1_bf16", ctypes.c_int32),
        ("eps", ctypes.c_float),
    ]


class Probe:
    """An RMSNorm probe's check in one call: `FoldedProbe.scores_of_scaled(lean.scaled_rows(x,
    eps))` from the backbone's rows x (A, ..., h) of a dtype of `DTYPES` on the CPU (`takes`), the
    norm's scale and the probe's products in fp32 (its mean differs from torch's by round-off).
    Made once per folded probe (`fused_check._fold`), its weights laid out then: a call is one
    ctypes call and a list (a decode step pays it at every exit that does not fire)."""

    def __init__(
        self,
        weight: torch.Tensor,
        eps: float,
        bias: torch.Tensor | None,
        out_weight: torch.Tensor | None,
        gain: torch.Tensor | None = None,
    ):
        """weight: the probe's first weight, [h] (linear probe) or [h, k] (MLP: then bias [k]
        before its GELU and out_weight [k] after), on the CPU; gain [h]: the norm's gain (None:
        folded into weight already). A linear probe's weight and an fp32 MLP probe's are kept as
        fp32 copies with the gain folded in; a bf16 MLP probe's first weight stays the module's
        bf16 (half the bytes: it is read cold after a layer, 192 KB fp32 for 384 x 128, most of
        a non-firing check's cost) and its row takes the gain instead: (s * g) w for s (w * g),
        fp32 products either way, the same scores within round-off."""
        self.hidden, self.h = (weight.shape[1] if weight.dim() == 2 else 0), weight.shape[0]
        if self.hidden and (bias is None or out_weight is None):
            raise ValueError("native probe: an MLP probe needs its first bias and its output weight")
        keep_bf16 = self.hidden > 0 and weight.dtype == torch.bfloat16
        w1 = weight.detach() if keep_bf16 else weight.detach().float()
        g = None if gain is None else gain.detach().float().contiguous()
        if g is not None and not keep_bf16:
            w1, g = w1 * (g if w1.dim() == 1 else g[:, None]), None
        self.tensors = [w1.contiguous()]
        if self.hidden:  # `ee_probe`'s layout: blocks of 16 columns, each (h, 16) contiguous, zeros past k
            pad = -self.hidden % 16
            b1, w2 = (F.pad(t.detach().float(), (0, pad)) for t in (bias, out_weight))
            blocks = (self.hidden + pad) // 16
            w1 = F.pad(w1, (0, pad)).reshape(self.h, blocks, 16).transpose(0, 1)  # (blocks, h, 16)
            if keep_bf16:  # rows k, k + 1 (k even) as 16 pairs side by side (`probe_hidden`); an odd last row as it is
                kp = self.h - self.h % 2
                pairs = w1[:, :kp].reshape(blocks, kp // 2, 2, 16).transpose(2, 3).reshape(blocks, kp * 16)
                w1 = torch.cat([pairs, w1[:, kp:].reshape(blocks, -1)], dim=1)
            w1 = w1.contiguous()
            self.tensors = [w1, b1.contiguous(), w2.contiguous()]
        if g is not None:
            self.tensors.append(g)
        ptrs = [t.data_ptr() for t in self.tensors]
        self.ref = _ProbeArgs(
            ptrs[0],
            ptrs[1] if self.hidden else None,
            ptrs[2] if self.hidden else None,
            None if g is None else g.data_ptr(),
            self.hidden,
            int(keep_bf16),
            float(eps),
        )  # what `ee_probe`, `ee_layer` and `ee_layers` take (by reference)
        self.fn = library().ee_probe

    def takes(self, x: torch.Tensor) -> bool:
        """Whether `self(x)` runs: x's rows are h wide, of a dtype of `DTYPES`, on the CPU."""
        return x.dtype in DTYPES and x.device.type == "cpu" and x.shape[-1] == self.h

    def __call__(self, x: torch.Tensor) -> list[float]:
        """The score of each row of x (A, ..., h) (`takes`), less the probe's last bias, as floats."""
        x = x.contiguous()
        a = x.numel() // self.h
        out = (ctypes.c_float * a)()
        bf16, threads = x.dtype == torch.bfloat16, torch.get_num_threads()
        if self.fn(x.data_ptr(), bf16, a, self.h, ctypes.byref(self.ref), out, threads):
            raise MemoryError("native kernel: out of memory for a probe's rows")
        return list(out)


def _layer_form(x: torch.Tensor, caches, c: torch.Tensor, s: torch.Tensor, hd: int) -> bool:
    """Whether `ee_layer` takes rows x (A, h) with these K/V caches and angles c, s (N, hd): the
    caches' form (`_caches_form`) in x's dtype, and `_angles_form`."""
    return _caches_form(caches) and caches[0].dtype == x.dtype and _angles_form(x, c, s, hd)


def _caches_form(caches) -> bool:
    """Every K/V cache of the first one's dtype and strides, hd contiguous."""
    dtype, strides = caches[0].dtype, caches[0].stride()
    return all(t.dtype == dtype and t.stride() == strides for t in caches) and strides[-1] == 1


def _angles_form(x: torch.Tensor, c: torch.Tensor, s: torch.Tensor, hd: int) -> bool:
    """fp32 angles c, s (N, hd), one row or one a row of x (A, h); an even head dim up to 1024."""
    rows = c.shape[0] in (1, x.shape[0])
    return c.dtype == torch.float32 and s.shape == c.shape and rows and hd <= 1024 and hd % 2 == 0


def layer_step(
    x: torch.Tensor,
    weights: tuple[torch.Tensor, ...],
    shape: tuple[int, int, int, int],
    eps: tuple[float, float],
    cos: torch.Tensor,
    sin_signed: torch.Tensor,
    kv: tuple,
    probe: Probe | None = None,
) -> torch.Tensor | tuple[torch.Tensor, list[float]] | None:
    """A layer's decode step in one call (`ee_layer`: `lean.LeanLayer.__call__`'s operations on
    this kernel, the same numbers): x (A, h) -> (A, h), each row's key and value written into the
    layer's cache. weights: (w_in, qkv panels, proj panels, w_mid, fc1 panels, fc2 panels) (`pack`),
    shape: (groups, query heads per group, head dim, ffn), eps: the two norms', cos / sin_signed:
    fp32 (A or 1, ..., hd) as `rope_` takes them, kv: (k, v, slots, positions, span, mask) (the
    layer's cache tensors (slots, groups, positions, hd), int64 slot and position per row, keys
    0..span-1 attended, a bool (A, ..., span) mask or None). None where the tables or the cache
    do not have that form (nothing done). `probe` (one that `takes` the rows): the next exit's
    learned check on y in the same call, (y, its scores): `probe(y)`'s numbers, without a call of
    their own where the check does not fire."""
    k, v, slots, pos, span, mask = kv
    g, per, hd, ffn = shape
    c, s = cos.reshape(-1, hd), sin_signed.reshape(-1, hd)
    a = x.shape[0]
    if not _layer_form(x, (k, v), c, s, hd):
        return None
    x, c, s = x.contiguous(), c.contiguous(), s.contiguous()
    m = None if mask is None else mask.reshape(a, span).contiguous()
    y = torch.empty_like(x)
    w_in, qkv, proj, w_mid, fc1, fc2 = weights
    sb, sg, st, _ = k.stride()
    scores = None if probe is None else (ctypes.c_float * a)()
    rc = library().ee_layer(
        x.data_ptr(), y.data_ptr(), a, x.dtype == torch.bfloat16, torch.get_num_threads(),
        x.shape[1], g, per, hd, ffn,
        w_in.data_ptr(), eps[0], qkv.data_ptr(), proj.data_ptr(),
        w_mid.data_ptr(), eps[1], fc1.data_ptr(), fc2.data_ptr(),
        c.data_ptr(), s.data_ptr(), 0 if c.shape[0] == 1 else hd,
        k.data_ptr(), v.data_ptr(), sb, sg, st, slots.data_ptr(), pos.data_ptr(), span,
        None if m is None else m.data_ptr(),
        None if probe is None else ctypes.byref(probe.ref), scores,
    )  # fmt: skip
    if rc != 0:
        raise MemoryError("native kernel: out of memory for a layer step")
    return y if probe is None else (y, list(scores))


class LayerRun:
    """What `layers_step` takes of consecutive layers that stays the same from one decode step to
    the next, worked out once: per layer (weights as `layer_step` takes them, its two norms' eps,
    its K cache, its V cache), the pointers and eps as `ee_layers` takes them. Holds the tensors,
    so the pointers stay valid while it lives. Working them out at every step cost a decode step
    ~100-250 us of Python (the CPU reference model's 12 layers: 96 pointers and each layer's
    weight copies looked up), a fifth of a step that leaves at its first exit."""

    def __init__(self, layers: list[tuple]) -> None:
        self.layers = list(layers)
        n, caches = len(self.layers), [t for _, _, k, v in self.layers for t in (k, v)]
        ptrs = (t.data_ptr() for weights, _, k, v in self.layers for t in (*weights, k, v))
        self.ptrs = (ctypes.c_int64 * (8 * n))(*ptrs)
        self.eps = (ctypes.c_float * (2 * n))(*(e for _, pair, _, _ in self.layers for e in pair))
        self.dtype, self.strides, self.caches_ok = caches[0].dtype, caches[0].stride(), _caches_form(caches)
        self.probe_args: dict[tuple, tuple] = {}  # `probe_arrays`' ctypes arrays per probes and bounds
        # (a copy of the probes, first, width, their arrays) of the latest `probe_arrays`: a decode
        # step's probes equal them as a dict (their (probe, bound) values the same objects where
        # the checks keep them: `UniformCheck.native`), which costs less than their key's hash
        # (~1 us a probe right after a run of layers had left them cold)
        self.last: tuple | None = None

    def __len__(self) -> int:
        return len(self.layers)

    def probe_arrays(self, probes: dict[int, tuple[Probe, float]], first: int = 0, width: int = 0) -> tuple | None:
        """(checked, bounds) as `ee_layers` takes `probes` ({first + layer: (probe, bound)}) on rows
        `width` wide, made once per set of probes, bounds and numbering (a decode step asks again
        for the same ones: building the ctypes arrays cost a step ~5 us per probe, a quarter of the
        check's whole cost; their key is made by C-level calls alone, the run right before it having
        left the interpreter's own data cold). None where a probe is not on one of the run's layers
        or does not read rows that wide (nothing made)."""
        last = self.last  # a decode step brings the probes of the step before: compared, not hashed
        if last is not None and last[1] == first and last[2] == width and last[0] == probes:
            return last[3]
        key = (first, width, tuple(probes.items()))
        made = self.probe_args.get(key)
        if made is None:
            n = len(self.layers)
            checked, bounds = (ctypes.c_void_p * n)(), (ctypes.c_double * n)()
            for d, (probe, bound) in probes.items():
                if not 0 <= d - first < n or probe.h != width:
                    return None
                checked[d - first], bounds[d - first] = ctypes.addressof(probe.ref), bound
            if len(self.probe_args) >= 64:  # bounds move with the policy: keep the latest few
                self.probe_args.clear()
            made = self.probe_args[key] = (checked, bounds)  # the key holds the probes (their refs stay valid)
        self.last = (dict(probes), first, width, made)  # a copy: a dict changed in place is a new set
        return made


def layers_step(
    x: torch.Tensor,
    layers: list[tuple] | LayerRun,
    shape: tuple[int, int, int, int],
    cos: torch.Tensor,
    sin_signed: torch.Tensor,
    rows_kv: tuple,
    probes: dict[int, tuple[Probe, float]] | None = None,
    first: int = 0,
) -> tuple[torch.Tensor, int, list[float] | None] | None:
    """Consecutive layers' decode steps in one call (`ee_layers`): `layer_step` over each of
    `layers` in turn, each one's output the next one's input, the same numbers. layers: per layer
    (weights as `layer_step` takes them, its two norms' eps, its K cache, its V cache), every
    cache of one dtype and strides, or their `LayerRun`; rows_kv: (slots, positions, span, mask)
    as in `layer_step`'s kv. `probes`: {first + l: (probe, bound)}: the probe (one that `takes`
    the rows) on layer l's output, and the run stops after layer l where a row's score reaches
    `bound` (compared as Python compares floats). Returns (the output of the last layer run,
    layers run, the scores of the probe on it or None); None where `layer_step` would give None
    for any layer, or a probe is on no layer of the run or does not take the rows (nothing done)."""
    run = layers if isinstance(layers, LayerRun) else LayerRun(layers)
    slots, pos, span, mask = rows_kv
    g, per, hd, ffn = shape
    c, s = cos.reshape(-1, hd), sin_signed.reshape(-1, hd)
    a = x.shape[0]
    if not (run.caches_ok and run.dtype == x.dtype and _angles_form(x, c, s, hd)):
        return None
    x, c, s = x.contiguous(), c.contiguous(), s.contiguous()
    m = None if mask is None else mask.reshape(a, span).contiguous()
    checked = bounds = None
    if probes:
        made = run.probe_arrays(probes, first, x.shape[1])
        if made is None:
            return None
        checked, bounds = made
    n = len(run)
    y, ran, scores = torch.empty_like(x), ctypes.c_int64(n), (ctypes.c_float * a)()
    rc = library().ee_layers(
        n, run.ptrs, run.eps, x.data_ptr(), y.data_ptr(), a, x.dtype == torch.bfloat16,
        torch.get_num_threads(), x.shape[1], g, per, hd, ffn,
        c.data_ptr(), s.data_ptr(), 0 if c.shape[0] == 1 else hd, *run.strides[:3],
        slots.data_ptr(), pos.data_ptr(), span, None if m is None else m.data_ptr(),
        checked, bounds, scores, ctypes.byref(ran),
    )  # fmt: skip
    if rc != 0:
        raise MemoryError("native kernel: out of memory for a layers step")
    done = ran.value
    return y, done, list(scores) if probes and first + done - 1 in probes else None


class _ExitArgs(ctypes.Structure):
    """`ee_exit_t`: one exit of `decode` (its depth, number, learned check or none, bound, its head)."""

    _fields_ = [
        ("depth", ctypes.c_int64),
        ("layer", ctypes.c_int64),
        ("probe", ctypes.c_void_p),
        ("bound", ctypes.c_double),
        ("Wp", ctypes.c_void_p),
        ("K", ctypes.c_int64),
        ("ids", ctypes.c_void_p),
        ("gain", ctypes.c_void_p),
        ("eps", ctypes.c_float),
        ("fc1", ctypes.c_void_p),
        ("fc2", ctypes.c_void_p),
        ("mlp_gain", ctypes.c_void_p),
        ("mlp_eps", ctypes.c_float),
        ("ffn", ctypes.c_int64),
    ]


@dataclasses.dataclass
class DecodeHead:
    """A head as `decode` takes it: packed rows of an output weight (`pack`), their count, the ids
    they are (a draft vocabulary, int64 ascending) or None, and the norm's (gain, eps)."""

    panels: torch.Tensor
    rows: int
    ids: torch.Tensor | None
    norm: tuple[torch.Tensor, float] | None  # None: no norm (`verify`'s final head alone)


class Seen:
    """`decode`'s record of what its vocabulary checks made (`seen`): per sequence, a token (-1:
    none) and its max-probability."""

    def __init__(self, n: int) -> None:
        self.tokens = (ctypes.c_int64 * n)(*([-1] * n))
        self.conf = (ctypes.c_float * n)()


@dataclasses.dataclass
class DecodeExit:
    """An exit as `decode` takes it: its depth, its number, its learned check (`Probe`; None: a
    vocabulary check, its head on every new row and its max-probability the score) and the bound a
    score must reach, its head."""

    depth: int
    layer: int
    probe: Probe | None
    bound: float
    head: DecodeHead
    # an MLP exit's sub-block before the head's norm (`lean.ExitMLP`): (fc1 packed, fc2 packed, its
    # width, its norm's (gain, eps)); None: the head reads the row itself
    mlp: tuple[torch.Tensor, torch.Tensor, int, tuple[torch.Tensor, float]] | None = None


class DecodeArgs:
    """What `decode` passes of its exits and final head, made once (a plan's every call passes the
    same: building the structures cost a one-step call ~5-10 us, which a replayed step's timing of
    a check, `cost_model.check_in_step`, read as the check's own): the `ee_exit_t` array and the
    gains it points at (kept alive here)."""

    def __init__(self, exits: list[DecodeExit], head: DecodeHead) -> None:
        self.exits, self.head = exits, head
        self.gains = [e.head.norm[0].contiguous() for e in exits] + [head.norm[0].contiguous()]
        self.mlp_gains = [None if e.mlp is None else e.mlp[3][0].contiguous() for e in exits]
        self.array = (_ExitArgs * max(len(exits), 1))()
        for i, (e, gain, mg) in enumerate(zip(exits, self.gains, self.mlp_gains)):
            ids = None if e.head.ids is None else e.head.ids.data_ptr()
            fc1, fc2, ffn, eps = (None, None, 0, 0.0) if e.mlp is None else (*e.mlp[:3], e.mlp[3][1])
            probe = None if e.probe is None else ctypes.addressof(e.probe.ref)  # None: a vocabulary check
            self.array[i] = _ExitArgs(e.depth, e.layer, probe, e.bound,
                                      e.head.panels.data_ptr(), e.head.rows, ids, gain.data_ptr(),
                                      float(e.head.norm[1]), None if fc1 is None else fc1.data_ptr(),
                                      None if fc2 is None else fc2.data_ptr(), None if mg is None else mg.data_ptr(),
                                      float(eps), ffn)  # fmt: skip


def verify(
    slots: list[int],
    lo: list[int],
    hi: list[int],
    filled,
    depth: int,
    pending: torch.Tensor,
    run: LayerRun,
    shape: tuple[int, int, int, int],
    tables: tuple[torch.Tensor, torch.Tensor],
    head: DecodeHead,
) -> tuple[torch.Tensor, list[int], list[float]]:
    """A verify pass in one call (`ee_verify`): the rows of sequence s (cache slot slots[s])
    pending at `depth`, positions lo[s] .. hi[s] - 1 of `pending` (B, T, h) (contiguous), through
    `run`'s layers (those from `depth` on) and the final head `head` on every row, each row attending
    up to its own position; `filled` (the cache's (L, B) int64 fill counts) set to hi[s] at those
    layers. Returns (the head's product (rows, head.rows) fp32, each row's greedy token, its
    max-probability), s's rows after s - 1's: the numbers of `lean.native_run` then `head`."""
    g, per, hd, ffn = shape
    cos, sin_signed = tables
    n, h = len(slots), pending.shape[-1]
    i64 = ctypes.c_int64 * n
    rows = sum(b - a for a, b in zip(lo, hi))
    part = torch.empty(rows, head.rows)
    tokens, conf = (ctypes.c_int64 * rows)(), (ctypes.c_float * rows)()
    gain = None if head.norm is None else head.norm[0].contiguous()
    rc = library().ee_verify(
        n, i64(*slots), i64(*lo), i64(*hi), filled.ctypes.data, filled.shape[1], depth,
        i64(*(pending[b].data_ptr() for b in slots)), len(run), run.ptrs, run.eps, pending.dtype == torch.bfloat16,
        torch.get_num_threads(), h, g, per, hd, ffn, cos.data_ptr(), sin_signed.data_ptr(), *run.strides[:3],
        head.panels.data_ptr(), head.rows, None if gain is None else gain.data_ptr(),
        0.0 if head.norm is None else float(head.norm[1]), part.data_ptr(), tokens, conf,
    )  # fmt: skip
    if rc != 0:
        raise MemoryError("native kernel: out of memory for a verify pass's rows")
    return part, list(tokens), list(conf)


def spec_rounds(
    slot: int, token: int, fed: int, filled, layers: int, pending: torch.Tensor, embedding: torch.Tensor,
    draft_run: LayerRun, draft_head: tuple, draft_layer: int, verify_run: LayerRun, head: DecodeHead,
    shape: tuple[int, int, int, int], tables: tuple[torch.Tensor, torch.Tensor], room: int, cap: int, max_cap: int,
    stop: list[float], keep, after,
) -> tuple[int, int, int]:  # fmt: skip
    """Self-speculative rounds of one sequence in one call (`ee_spec_rounds`): each round drafts up
    to `cap` tokens from the exit below `len(draft_run)` layers as `drafts` does (with feed_last; its
    head `draft_head` as `drafts` takes it, the early stop's numbers `stop`: an `EarlyStop`'s, which
    `after` may rewrite in place), verifies them as `verify` does (`verify_run`: the layers from the
    exit on, the final head `head`), keeps the agreeing drafts and the final head's token after
    them (keep(j, token, exit layer, max-probability) after each: False ends the sequence) and
    forgets the positions past them (`filled`, the cache's (L, B) int64 fill counts, in place).
    after(round, drafts, their max-probabilities, agreed, ended) after every round gives the next
    round's cap (at most max_cap), or 0: the loop returns. slot: the sequence's cache slot; token:
    its last kept token, not yet fed, at position fed; pending: its pending rows (T, h), contiguous;
    tables: the rotary (cos, signed sine) below `room`, the last position the loop may fill + 1.
    Returns (rounds, the last kept token, fed)."""
    g, per, hd, ffn = shape
    cos, sin_signed = tables
    h = embedding.shape[-1]
    panels, rows, ids, (gain, eps) = draft_head
    tok, at, made = ctypes.c_int64(token), ctypes.c_int64(fed), ctypes.c_int64(0)
    drafts, conf = (ctypes.c_int64 * max_cap)(), (ctypes.c_float * max_cap)()
    numbers = (ctypes.c_double * len(stop))(*stop)
    failed: list[BaseException] = []

    def ended_next(r: int, n: int, ok: int, ended: int) -> int:
        return after(r, list(drafts[:n]), list(conf[:n]), ok, bool(ended), numbers)

    told, asked = guarded(keep, failed, 0), guarded(ended_next, failed, 0)
    d_gain = gain.contiguous()
    f_gain = None if head.norm is None else head.norm[0].contiguous()
    rc = library().ee_spec_rounds(
        slot, ctypes.byref(tok), ctypes.byref(at), filled.ctypes.data, filled.shape[1], layers, pending.data_ptr(),
        embedding.data_ptr(), len(draft_run), draft_run.ptrs, draft_run.eps, panels.data_ptr(), rows, ids.data_ptr(),
        d_gain.data_ptr(), float(eps), draft_layer, len(verify_run), verify_run.ptrs, verify_run.eps,
        head.panels.data_ptr(), head.rows, None if f_gain is None else f_gain.data_ptr(),
        0.0 if head.norm is None else float(head.norm[1]), embedding.dtype == torch.bfloat16,
        torch.get_num_threads(), h, g, per, hd, ffn, cos.data_ptr(), sin_signed.data_ptr(), *draft_run.strides[:3],
        room, cap, max_cap, numbers, len(stop) - 2, SPEC_KEEP(told), SPEC_NEXT(asked), drafts, conf, ctypes.byref(made),
    )  # fmt: skip
    if failed:
        raise failed[0]
    if rc != 0:
        raise MemoryError("native kernel: out of memory for a self-speculative round")
    return made.value, tok.value, at.value


def guarded(fn, stop: list, failed: int):
    """`fn` as a C loop calls it back: an exception must not cross the C frames, so the first is kept
    in `stop` (the caller raises it after the call) and `failed` returned, then for every later call."""

    def call(*args) -> int:
        if stop:
            return failed
        try:
            return int(fn(*args))
        except BaseException as e:  # noqa: BLE001 (re-raised by the caller)
            stop.append(e)
            return failed

    return call


def decode(
    tokens: list[int], slots: list[int], fed: list[int], filled, pending: torch.Tensor, limits: list[int],
    rows_cap: int, embedding: torch.Tensor, run: LayerRun, shape: tuple[int, int, int, int],
    tables: tuple[torch.Tensor, torch.Tensor], heads: DecodeArgs, keep, decide=None, seen: Seen | None = None,
) -> tuple[int, int]:  # fmt: skip
    """Greedy decode steps of S sequences in one call (`ee_decode`): sequence s feeds tokens[s]
    at position fed[s] in cache slot slots[s], then each step's token, through `run`'s layers (the
    whole model's), its pending rows (`pending` (B, T, h), contiguous) joining at the layers where
    `filled` (the cache's (L, B) int64 fill counts, written in place) says they start, the exits'
    learned checks on its new row and a leaver's head, else the final head (`heads`); up to limits[s]
    steps. keep(s, step, token, exit layer, max-probability, probe score), asked of each sequence
    after each step (`step` counts this call's steps from 0), says whether s goes on (1), stops
    (0), or every sequence stops after this step (-1). decide(e, phase, info, fires) (None: every
    exit evaluated, every firing row leaving) is asked at exit e (an index into `heads.exits`) of
    each step: phase 0, before the layer below it runs, whether it is evaluated, info a list of the
    rows each sequence has there (0: not there) then whether each held pending rows as the step
    began; phase 1, after an evaluation, whether its firing rows leave, `fires` their indices among
    the sequences there. `fed` is updated in place. The loop stops before a step whose rows in one
    layer call would exceed `rows_cap`. `seen`: where given, per sequence the token and
    max-probability of the step's latest vocabulary check (an exit with no probe; an observed
    exit is one whose bound is +inf: it never fires), written before keep is asked. Returns (the
    steps made, the rows that step wanted, else 0)."""
    g, per, hd, ffn = shape
    cos, sin_signed = tables
    n, h = len(tokens), embedding.shape[-1]
    i64 = ctypes.c_int64 * n
    tok, at, rows = i64(*tokens), i64(*fed), [pending[b] for b in slots]
    head, stop = heads.head, []
    told = guarded(keep, stop, -1)  # an error halts the loop after the step (keep's -1)
    asked = (
        None
        if decide is None
        else guarded(
            lambda e, phase, info, nf, fires: bool(decide(e, phase, info[: 2 * n], fires[:nf] if nf else [])), stop, 0
        )
    )
    steps, wanted = ctypes.c_int64(0), ctypes.c_int64(0)
    rc = library().ee_decode(
        n, i64(*slots), tok, at, filled.ctypes.data, filled.shape[1], i64(*(r.data_ptr() for r in rows)),
        i64(*limits), rows_cap, embedding.data_ptr(), len(run), run.ptrs, run.eps, embedding.dtype == torch.bfloat16,
        torch.get_num_threads(), h, g, per, hd, ffn, cos.data_ptr(), sin_signed.data_ptr(), *run.strides[:3],
        len(heads.exits), heads.array, head.panels.data_ptr(), head.rows, heads.gains[-1].data_ptr(),
        float(head.norm[1]), DECODE_KEEP(told),
        NO_DECIDE if asked is None else DECODE_DECIDE(asked), ctypes.byref(steps), ctypes.byref(wanted),
        None if seen is None else seen.tokens, None if seen is None else seen.conf,
    )  # fmt: skip
    for s in range(n):
        fed[s] = at[s]
    if stop:
        raise stop[0]
    if rc != 0:
        raise MemoryError("native kernel: out of memory for a decode loop's rows")
    return steps.value, wanted.value

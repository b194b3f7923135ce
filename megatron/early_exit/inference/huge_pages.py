"""The decode kernels' weight copies on transparent huge pages (Linux; `EE_HUGE_PAGES=0` turns it off).

A decode step streams every weight it multiplies from memory. On 4 KiB pages a step of the CPU
reference model (46 MiB of bf16 panels) walks ~12,000 pages, more than a core's TLB holds (Zen 4:
3,072 entries, 12 MiB), each a walk and a restart of the hardware prefetcher's stream at its
boundary; on 2 MiB pages, 23. Measured on the AMD EPYC (Zen 4, 32 MiB of L3, 2 threads): a scratch
loop reading 46 MiB with two threads 1.20-1.47 ms a pass on 4 KiB pages, 0.85-0.90 ms on 2 MiB
pages (33-40 against 53-57 GB/s); `benchmarks/huge_pages.py` (the same engine twice, one copy per
page kind, prompt by prompt, the same tokens): a one-row product over 48 MiB 0.90-0.91x the time
(bf16), 0.67-0.89x (fp32); decode time, CPU reference bf16, full decoding 0.91-0.93x, early exit at
its calibrated thresholds 0.93-0.95x, self-speculation 0.96-0.98x (fp32: 0.925 / 0.932 / 0.942x);
SmolLM2 bf16 0.85x (115 -> 131 tokens/s decoding), fp32 0.87-0.98x. What stays in the cache gains
little (the drafts' and early exits' layers below the exit sit in L3, and two threads' halves of
them within their TLBs' reach), so full decoding gains most and the early-exit paths' speedups over
it shrink (the CPU reference's sweep, alternating processes: calibrated early exit 1.68 / 1.77x ->
1.47 / 1.49x; their decode time itself 0.95x).

The kernel gives a process huge pages where it asked for them (`madvise(MADV_HUGEPAGE)`, the
`madvise` mode most distributions ship) in 2 MiB-aligned stretches of an anonymous private mapping.
Packed weights are mostly smaller than that (a CPU reference layer's four products 0.3-1.6 MB), so
they are carved out of 32 MiB chunks (`empty`), each chunk a mapping advised before anything touches
it; a copy's bytes are reused once its last view is freed (the kernel choices' timing makes each
copy up to three times and drops the first two), and a chunk with none left in it is unmapped. Where the
kernel has no transparent huge pages (`never`, another OS), or the advice fails, the buffers are
plain `torch.empty` ones: the numbers never depend on it, only the speed.
"""

from __future__ import annotations

import functools
import math
import mmap
import os
import sys
import threading
import weakref

import torch

ENV = "EE_HUGE_PAGES"  # "0": the weight copies on ordinary pages; "1" (default): on huge pages where possible
HUGE = 1 << 21  # the x86-64 / arm64 (4 KiB base pages) transparent huge page
CHUNK = 32 << 20  # a mapping the copies are carved from
ALIGN = 4096  # each copy's start: a page (the kernels need 64 bytes)
MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"

_LOCK = threading.Lock()
_ON: list[bool | None] = [None]  # `enabled`'s setting (None: from the environment)


@functools.cache
def supported() -> bool:
    """Whether this process can ask for transparent huge pages: Linux, Python's mmap with
    `MADV_HUGEPAGE`, and the kernel's mode `always` or `madvise` (not `never`)."""
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        with open(MODE_FILE) as f:
            mode = f.read()
    except OSError:  # no such file: a kernel built without them
        return False
    return "[never]" not in mode


def enabled(on: bool | None = None) -> bool:
    """Whether new weight copies go on huge pages (`on` sets it for this process; unset: `EE_HUGE_PAGES`,
    default on). False where not `supported()`. Copies made before a change keep their pages."""
    if on is not None:
        _ON[0] = bool(on)
    if _ON[0] is None:
        text = os.environ.get(ENV, "1").strip()
        if text not in ("0", "1"):
            raise ValueError(f"{ENV}={text!r}: expected 1 (huge pages where possible) or 0 (ordinary pages)")
        _ON[0] = text == "1"
    return _ON[0] and supported()


class _Chunk:
    """A huge-page-advised mapping of CHUNK bytes that copies are carved from, first fit, ALIGN-aligned.
    A copy's bytes are a memoryview slice of the mapping that the copy's tensor holds (`torch.frombuffer`):
    when the last view of the copy is freed, so is the slice, whose finalizer hands its bytes back
    (`returned`, taken in by the next `take` under the lock: a finalizer may run inside `take`)."""

    def __init__(self, view: memoryview) -> None:
        self.view = view
        self.free = [(0, len(view))]  # (start, size), sorted, coalesced
        self.live = 0
        self.returned: list[tuple[int, int]] = []

    def give_back(self) -> None:
        if not self.returned:
            return
        while self.returned:
            start, size = self.returned.pop()
            self.live -= 1
            self.free.append((start, size))
        self.free.sort()
        merged = []
        for start, size in self.free:
            if merged and merged[-1][0] + merged[-1][1] == start:
                merged[-1] = (merged[-1][0], merged[-1][1] + size)
            else:
                merged.append((start, size))
        self.free = merged

    def take(self, nbytes: int) -> memoryview | None:
        size = _round_up(nbytes, ALIGN)
        for i, (start, room) in enumerate(self.free):
            if room >= size:
                self.free[i : i + 1] = [(start + size, room - size)] if room > size else []
                self.live += 1
                part = self.view[start : start + nbytes]
                weakref.finalize(part, self.returned.append, (start, size))
                return part
        return None


class _Arena:
    """The chunks in use (`empty`'s copies below CHUNK / 2; a larger one gets a mapping of its own)."""

    def __init__(self) -> None:
        self.chunks: list[_Chunk] = []

    def take(self, nbytes: int) -> memoryview | None:
        if _round_up(nbytes, ALIGN) > CHUNK // 2:
            own = _mapping(_round_up(nbytes, HUGE))
            return None if own is None else own[:nbytes]
        for chunk in self.chunks:
            chunk.give_back()
        self.chunks = [c for c in self.chunks if c.live or c is self.chunks[-1]]  # empty ones unmapped
        for chunk in reversed(self.chunks):
            part = chunk.take(nbytes)
            if part is not None:
                return part
        view = _mapping(CHUNK)
        if view is None:
            return None
        self.chunks.append(_Chunk(view))
        return self.chunks[-1].take(nbytes)


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def _mapping(size: int) -> memoryview | None:
    """`size` bytes (a multiple of HUGE) of a fresh anonymous private mapping that start on a huge
    page and are advised for huge pages before anything touches them, as a memoryview (which keeps
    the mapping alive); None where the mapping or the advice fails."""
    try:
        mm = mmap.mmap(-1, size + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        mm.madvise(mmap.MADV_HUGEPAGE)
    except (OSError, ValueError):
        return None
    view = memoryview(mm)
    address = torch.frombuffer(view, dtype=torch.uint8, count=1).data_ptr()
    start = -address % HUGE
    return view[start : start + size]


_ARENA = _Arena()


def empty(shape: tuple[int, ...] | int, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised contiguous CPU tensor of `shape` and `dtype` on huge pages where `enabled()`
    (ALIGN-aligned, beside other copies in one mapping), else `torch.empty`'s."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes and enabled():
        with _LOCK:
            part = _ARENA.take(nbytes)
        if part is not None:
            return torch.frombuffer(part, dtype=torch.uint8).view(dtype).view(shape)
    return torch.empty(shape, dtype=dtype)


def advised(t: torch.Tensor) -> bool:
    """Whether `t`'s first byte lies in a mapping advised for huge pages (`hg` among its VmFlags in
    /proc/self/smaps); False where that cannot be read."""
    addr = t.data_ptr()
    try:
        with open("/proc/self/smaps") as f:
            inside = False
            for line in f:
                if "-" in line.split(" ", 1)[0] and line[0] in "0123456789abcdef":
                    lo, hi = (int(x, 16) for x in line.split(" ", 1)[0].split("-"))
                    inside = lo <= addr < hi
                elif inside and line.startswith("VmFlags:"):
                    return "hg" in line.split()[1:]
    except OSError:
        pass
    return False


def backed_bytes() -> int:
    """The bytes of this process's anonymous memory on huge pages now (AnonHugePages of
    /proc/self/smaps_rollup); 0 where that cannot be read."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0

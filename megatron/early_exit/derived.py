"""Copies derived from a weight (a prepacked or transposed layout, an int8 or bf16 copy), made
once and reused while the weight stays the same.

Decoding (`inference/kernels.py`, `inference/greedy_head.py`) and cached EE-Tuning
(`training/cached_tuning.py`) each keep such copies of frozen weights; this module is what they
share, so it imports neither. A copy is keyed by the weight and a `kind`; it is remade when the
weight changed (its storage pointer or its version counter: an in-place update or a reload), and
dropped when the weight itself is freed. Copies are kept outside the modules: some (oneDNN's
packed weights) cannot be deep-copied or pickled.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable, Iterable
from typing import Any

import torch


class DerivedCopies:
    """id(weight) -> {kind: (weakref to the weight, data_ptr, version, copy)}."""

    def __init__(self) -> None:
        self._copies: dict[int, dict[Hashable, tuple]] = {}

    def get(self, weight: torch.Tensor, kind: Hashable, make: Callable[[torch.Tensor], Any]) -> Any:
        """The `kind` copy of `weight`, made by `make(weight.detach())` if missing or stale."""
        key = id(weight)
        copies = self._copies.get(key)
        hit = copies.get(kind) if copies is not None else None
        # The usual case first, in few operations: every decode-time product asks (~2 us saved each).
        if hit is not None and hit[0]() is weight and hit[1] == weight.data_ptr() and hit[2] == weight._version:
            return hit[3]
        stamp = (weight.data_ptr(), weight._version)
        if copies is None or any(entry[0]() is not weight for entry in copies.values()):
            copies = self._copies[key] = {}  # new, or another tensor that reuses a dead one's id
            weakref.finalize(weight, self._copies.pop, key, None)
        hit = copies.get(kind)
        if hit is None or hit[1:3] != stamp:
            hit = copies[kind] = (weakref.ref(weight), *stamp, make(weight.detach()))
        return hit[3]

    def kinds(self, weight: torch.Tensor) -> list[Hashable]:
        """The kinds of copy held for `weight`."""
        return list(self._copies.get(id(weight), {}))

    def drop(self, weight: torch.Tensor, kinds: Iterable[Hashable] | None = None) -> None:
        """Free `weight`'s copies of `kinds` (default: all of them)."""
        if kinds is None:
            self._copies.pop(id(weight), None)
            return
        copies = self._copies.get(id(weight), {})
        for kind in kinds:
            copies.pop(kind, None)

    def __len__(self) -> int:
        return sum(map(len, self._copies.values()))

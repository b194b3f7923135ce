"""KV cache allocated once per batch, with per-sequence, per-layer fill lengths.

Shape legend: L layers, B batch slots, ng kv heads, T capacity (positions), hd head dim,
A sequences in one pass, R rows of one sequence in that pass (padded to the longest).

Keys and values are stored [L, B, ng, T + 1, hd] and written at explicit positions, so
rows of several sequences, each at its own positions, go in with one indexed write. The
extra slot T is scratch: padding rows write there and nothing ever attends to it.

`filled[l, b]` counts the positions 0..filled-1 of sequence b whose K/V exist at layer l.
Positions are always filled in order, so this one number per (layer, sequence) is the whole
bookkeeping. An early-exited token leaves the deeper layers' counts behind; they catch up
when a later token of that sequence goes deeper (KV recomputation), and speculation rolls
them back with `truncate`.
"""

from __future__ import annotations

import functools

import numpy as np
import torch


class KVCache:
    def __init__(
        self,
        num_layers: int,
        batch: int,
        capacity: int,
        num_groups: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (num_layers, batch, num_groups, capacity + 1, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.capacity = capacity
        self.batch = batch
        self.filled = np.zeros((num_layers, batch), dtype=np.int64)  # host bookkeeping: cheap scalar access

    def layer(self, index: int, rows: RowIndex) -> LayerView | SliceView:
        """The object attention calls `update` on for one pass of layer `index`: views of every
        layer made once a pass where the rows are one block (`RowIndex.block`), else indexed."""
        if rows.block is not None:
            if rows.views is None or rows.views[0] is not self:
                rows.views = (self, *block_views(self, *rows.block, rows.span))
            return SliceView(rows.views, index, rows)
        return LayerView(self, index, rows)

    def move(self, b: int, src: int, dst: int) -> None:
        """Copy sequence b's K/V at index src to index dst at every layer (a kept alternative
        draft into its position: `RowIndex`)."""
        self.k[:, b, :, dst] = self.k[:, b, :, src]
        self.v[:, b, :, dst] = self.v[:, b, :, src]

    def truncate(self, b: int, length: int) -> None:
        """Forget K/V at positions >= length of sequence b, at every layer (speculation rollback)."""
        self.filled[:, b] = np.minimum(self.filled[:, b], length)


def row_positions(lo: int, n: int, backs: tuple[int, ...] = ()) -> list[int]:
    """The positions of one sequence's n rows at cache indices lo..lo+n-1: the indices, except
    that the last len(backs) rows are alternative drafts (`self_speculative`: a draft exit's
    second choice), the t-th standing for the position backs[t] before the end of the drafted
    chain ahead of them (`RowIndex`, `Passes.embed`)."""
    pos = list(range(lo, lo + n))
    if backs:
        end = lo + n - len(backs)  # the chain's end
        pos[n - len(backs) :] = [end - back for back in backs]
    return pos


class RowIndex:
    """Where the rows of one pass live: sequence b = seqs[a] has n[a] rows at positions
    lo[a]..lo[a]+n[a]-1; rows are right-padded to R = max(n). Built once per distinct layout
    of a pass (from host lists, so nothing waits for the device) and shared by every layer
    that sees the same layout.

    `branch` (a verify pass with alternative drafts): seqs[a]'s last len(branch[a]) rows are
    alternatives, each at its own cache index after the drafted chain but standing for a position
    of it (`row_positions`): it attends to the keys before that position and to itself, and
    nothing attends to it (every other row is before it or is another alternative). Its K/V stay
    at its index until the strategy keeps it (`KVCache.move`).
    """

    def __init__(
        self, seqs: list[int], lo: list[int], n: list[int], cache: KVCache, device: torch.device,
        branch: list[tuple[int, ...]] | None = None,
    ) -> None:  # fmt: skip
        r, a = max(n), len(seqs)
        self.seqs, self.lo, self.n, self.r = list(seqs), list(lo), list(n), r
        self.native: tuple | None = None  # (capacity, slots, cache indices) per row (`native_kv`)
        # Contiguous slots, every one with the same rows (a verify pass, one sequence's fill):
        # K/V are written and read through views of every layer (`KVCache.layer`), as the
        # uniform step does.
        first = seqs[0]
        same = min(lo) == max(lo) and min(n) == r and list(seqs) == list(range(first, first + a))
        self.block = (slice(first, first + a), lo[0], lo[0] + r) if same else None
        self.device = device
        self.alternatives = branch is not None and any(branch)  # rows whose positions are not their indices
        # Each layer's fill counts after the pass (`Passes.advance`): one numpy assignment.
        self.filled_b = self.block[0] if same else np.asarray(seqs, dtype=np.int64)
        self.filled_end = lo[0] + r if same else np.asarray(lo, dtype=np.int64) + np.asarray(n, dtype=np.int64)
        if same and not self.alternatives:  # one causal block at the same positions in every slot: fewer operations
            self.span = lo[0] + r
            mask = torch.ones(r, self.span, dtype=torch.bool).tril(lo[0])  # key j <= lo + i
            self.attn_mask = mask.expand(a, 1, r, self.span).to(device)  # (A, 1, R, span)
            self.views: tuple | None = None  # (cache, `block_views`): made on the first layer's update
            return
        # Padded rows or alternatives: each row's index, position and keys, built on the host.
        idx = np.asarray(lo, dtype=np.int64)[:, None] + np.arange(r)[None]  # (A, R) cache indices
        valid = np.arange(r)[None] < np.asarray(n)[:, None]
        pos = np.zeros((a, r), dtype=np.int64)  # padding rows: position 0
        for x in range(a):
            pos[x, : n[x]] = row_positions(lo[x], n[x], branch[x] if self.alternatives else ())
        self.positions = torch.from_numpy(pos).to(device)
        self.span = max(x + y for x, y in zip(lo, n))  # keys 0..span-1
        keys = np.arange(self.span)[None, None]
        # before the row's position, or the row itself (a chain row: key <= its index)
        mask = ((keys < pos[:, :, None]) | (keys == idx[:, :, None])) & valid[:, :, None]  # (A, R, span)
        mask[:, :, 0] |= ~valid  # padding rows attend to one key: no all-masked softmax rows
        self.attn_mask = torch.from_numpy(mask[:, None]).to(device)  # (A, 1, R, span)
        if same:  # alternatives in one block: K/V through the block's views, as above
            self.views = None
            return
        self.batch_idx = torch.tensor(seqs).to(device)
        self.whole_batch = list(seqs) == list(range(cache.batch))  # every slot, in order: keys by slicing
        self.write_pos = torch.from_numpy(np.where(valid, idx, cache.capacity)).to(device)  # padding: scratch
        self.write_b = self.batch_idx[:, None].expand(a, r)  # (A, R)

    @functools.cached_property
    def positions(self) -> torch.Tensor:
        """(A, R) long: each row's position. Made in the constructor where rows are padded or
        alternatives; for a plain block only where asked (its rotary angles are slices of the
        tables: `Passes.layout`)."""
        b, lo, end = self.block
        return torch.arange(lo, end).expand(b.stop - b.start, end - lo).to(self.device)

    def native_kv(self, cache: KVCache, index: int) -> tuple:
        """What `native.layer_step` takes of layer `index`'s cache in this pass, its A x R rows
        taken as rows of their own: (k, v (slots, groups, positions, hd), each row's slot and
        cache index (padding rows: the scratch index), span, mask (A, 1, R, span))."""
        if self.native is None or self.native[0] != cache.capacity:
            slots = [b for b in self.seqs for _ in range(self.r)]
            at = [lo + j if j < n else cache.capacity for lo, n in zip(self.lo, self.n) for j in range(self.r)]
            self.native = (cache.capacity, torch.tensor(slots, dtype=torch.int64), torch.tensor(at, dtype=torch.int64))
        return cache.k[index], cache.v[index], self.native[1], self.native[2], self.span, self.attn_mask


class LayerView:
    """Writes a pass's new K/V at their positions and returns keys/values 0..span-1 to attend to."""

    def __init__(self, cache: KVCache, index: int, rows: RowIndex) -> None:
        self.cache, self.index, self.rows = cache, index, rows

    def native_kv(self) -> tuple:
        """`RowIndex.native_kv` of this layer."""
        return self.rows.native_kv(self.cache, self.index)

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # k, v: (A, ng, R, hd); the indexed write takes rows as (A, R, ng, hd)
        r = self.rows
        kc, vc = self.cache.k[self.index], self.cache.v[self.index]  # (B, ng, T+1, hd)
        kc[r.write_b, :, r.write_pos] = k.transpose(1, 2).to(kc.dtype)
        vc[r.write_b, :, r.write_pos] = v.transpose(1, 2).to(vc.dtype)
        if r.whole_batch:
            return kc[:, :, : r.span], vc[:, :, : r.span]  # (A, ng, span, hd) views
        return kc[r.batch_idx, :, : r.span], vc[r.batch_idx, :, : r.span]


class DecodeIndex:
    """The uniform decode step's layout: sequence b = seqs[a] gets exactly one new row, at
    position pos[a], and every earlier position of it has K/V at every layer (nothing pending).

    Each row's query attends to keys 0..pos[a] of its own slot, so no causal mask is needed:
    when every position is the same the keys are a plain slice and SDPA runs without a mask;
    otherwise one (A, 1, 1, span) mask hides each shorter sequence's unfilled tail. Built once
    per step (and once more for the sequences left after an exit fires), shared by every layer.
    """

    def __init__(self, seqs: list[int], pos: list[int], cache: KVCache, device: torch.device) -> None:
        a = len(seqs)
        self.seqs, self.pos, self.device = seqs, pos, device
        self.span = max(pos) + 1  # keys 0..span-1
        self.same = min(pos) == self.span - 1
        first = seqs[0]
        self.contiguous = list(seqs) == list(range(first, first + a))
        self.batch_slice = slice(first, first + a)  # used where `contiguous`: views, not copies
        # Each layer's fill counts after the step (`Passes.decode_layer`): one numpy assignment,
        # of a number to a slice where the layout allows.
        self.filled_b = self.batch_slice if self.contiguous else np.asarray(seqs, dtype=np.int64)
        self.filled_end = self.span if self.same else np.asarray(pos, dtype=np.int64) + 1
        self.views: tuple | None = None  # (cache, `block_views`) where `same` and `contiguous`
        if self.same:
            self.attn_mask = None
        else:
            keys = torch.arange(self.span)
            pos_t = torch.tensor(pos, dtype=torch.long)
            self.attn_mask = (keys[None] <= pos_t[:, None]).view(a, 1, 1, self.span).to(device)  # (A, 1, 1, span)

    # Index tensors, made where a step needs them (most uniform steps need none: ~10 us a step).
    @functools.cached_property
    def positions(self) -> torch.Tensor:
        """(A, 1) long: each row's position."""
        return torch.tensor(self.pos, dtype=torch.long).view(len(self.pos), 1).to(self.device)

    @functools.cached_property
    def batch_idx(self) -> torch.Tensor:
        """(A,) long: each row's slot."""
        return torch.tensor(self.seqs, dtype=torch.long).to(self.device)

    @functools.cached_property
    def pos_idx(self) -> torch.Tensor | None:
        """(A,) long: each row's position where they differ, else None."""
        return None if self.same else self.positions.view(len(self.pos))

    @functools.cached_property
    def native_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(slots, positions): each row's slot and position, int64 on the host (`native.layer_step`)."""
        both = torch.tensor([self.seqs, self.pos], dtype=torch.int64)  # one tensor: each row contiguous
        return both[0], both[1]

    def native_kv(self, cache: KVCache, index: int) -> tuple:
        """What `native.layer_step` takes of layer `index`'s cache in this step: (k, v (slots,
        groups, positions, hd), slots, positions, span, mask)."""
        slots, pos = self.native_rows
        return cache.k[index], cache.v[index], slots, pos, self.span, self.attn_mask

    def layer(self, cache: KVCache, index: int) -> DecodeView | SliceView:
        if self.same and self.contiguous:
            if self.views is None or self.views[0] is not cache:
                p = self.pos[0]
                self.views = (cache, *block_views(cache, self.batch_slice, p, p + 1, p + 1))
            return SliceView(self.views, index, self)
        return DecodeView(cache, index, self)


def block_views(cache: KVCache, b: slice, lo: int, end: int, span: int) -> tuple[torch.Tensor, ...]:
    """Views over every layer of a pass whose rows are one causal block at positions lo..end-1 in
    the slots `b` (`RowIndex.block`; a uniform step: one position, p..p): where K and V are written
    (L, A, ng, R, hd), and what is read (L, A, ng, span, hd)."""
    k, v = cache.k[:, b], cache.v[:, b]
    return k[:, :, :, lo:end], v[:, :, :, lo:end], k[:, :, :, :span], v[:, :, :, :span]


class SliceView:
    """One layer's update through views of every layer made once (`block_views`): a uniform step
    whose sequences are contiguous slots at one position (`DecodeIndex.layer`), or a pass whose
    rows are one block (`KVCache.layer`); two copies and two views a layer."""

    def __init__(self, views: tuple, index: int, rows: DecodeIndex | RowIndex) -> None:
        self.views, self.index, self.rows = views, index, rows  # rows: the pass's layout

    def native_kv(self) -> tuple:
        """The layout's `native_kv` of this layer."""
        return self.rows.native_kv(self.views[0], self.index)

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # k, v: (A, ng, R, hd)
        _, kw, vw, kr, vr = self.views
        kw[self.index].copy_(k)
        vw[self.index].copy_(v)
        return kr[self.index], vr[self.index]  # (A, ng, span, hd) views


class DecodeView:
    """`LayerView` for a `DecodeIndex`: slice writes and slice reads wherever the layout allows."""

    def __init__(self, cache: KVCache, index: int, rows: DecodeIndex) -> None:
        self.cache, self.index, self.rows = cache, index, rows

    def native_kv(self) -> tuple:
        """`DecodeIndex.native_kv` of this layer."""
        return self.rows.native_kv(self.cache, self.index)

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # k, v: (A, ng, 1, hd)
        r = self.rows
        kc, vc = self.cache.k[self.index], self.cache.v[self.index]  # (B, ng, T+1, hd)
        b = r.batch_slice if r.contiguous else r.batch_idx
        if r.same:
            p = r.pos[0]
            kc[b, :, p : p + 1] = k.to(kc.dtype)
            vc[b, :, p : p + 1] = v.to(vc.dtype)
        else:  # advanced indices split by a slice: the indexed dims come first, (A, ng, hd)
            kc[r.batch_idx, :, r.pos_idx] = k[:, :, 0].to(kc.dtype)
            vc[r.batch_idx, :, r.pos_idx] = v[:, :, 0].to(vc.dtype)
        return kc[b, :, : r.span], vc[b, :, : r.span]  # (A, ng, span, hd): views where contiguous

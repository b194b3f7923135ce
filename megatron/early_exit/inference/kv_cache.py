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

    def layer(self, index: int, rows: RowIndex) -> LayerView:
        """The object attention calls `update` on for one pass of layer `index`."""
        return LayerView(self, index, rows)

    def truncate(self, b: int, length: int) -> None:
        """Forget K/V at positions >= length of sequence b, at every layer (speculation rollback)."""
        self.filled[:, b] = np.minimum(self.filled[:, b], length)


class RowIndex:
    """Where the rows of one pass live: sequence b = seqs[a] has n[a] rows at positions
    lo[a]..lo[a]+n[a]-1; rows are right-padded to R = max(n). Built once per distinct layout
    of a pass (from host lists, so nothing waits for the device) and shared by every layer
    that sees the same layout.
    """

    def __init__(self, seqs: list[int], lo: list[int], n: list[int], cache: KVCache, device: torch.device) -> None:
        r = max(n)
        steps = torch.arange(r)
        pos = torch.tensor(lo)[:, None] + steps[None]  # (A, R)
        valid = steps[None] < torch.tensor(n)[:, None]
        self.positions = torch.where(valid, pos, torch.zeros_like(pos)).to(device)
        self.batch_idx = torch.tensor(seqs).to(device)
        self.write_pos = torch.where(valid, pos, torch.full_like(pos, cache.capacity)).to(device)  # padding: scratch
        self.write_b = self.batch_idx[:, None].expand(len(seqs), r)  # (A, R)
        self.span = max(a + b for a, b in zip(lo, n))  # keys 0..span-1
        # Every slot, in order: read keys by slicing (a view) instead of gathering a copy.
        self.whole_batch = list(seqs) == list(range(cache.batch))
        keys = torch.arange(self.span)
        mask = (keys[None, None, :] <= pos[:, :, None]) & valid[:, :, None]  # (A, R, span)
        mask[:, :, 0] |= ~valid  # padding rows attend to one key: no all-masked softmax rows
        self.attn_mask = mask[:, None].to(device)  # (A, 1, R, span)


class LayerView:
    """Writes a pass's new K/V at their positions and returns keys/values 0..span-1 to attend to."""

    def __init__(self, cache: KVCache, index: int, rows: RowIndex) -> None:
        self.cache, self.index, self.rows = cache, index, rows

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # k, v: (A, ng, R, hd); the indexed write takes rows as (A, R, ng, hd)
        r = self.rows
        kc, vc = self.cache.k[self.index], self.cache.v[self.index]  # (B, ng, T+1, hd)
        kc[r.write_b, :, r.write_pos] = k.transpose(1, 2).to(kc.dtype)
        vc[r.write_b, :, r.write_pos] = v.transpose(1, 2).to(vc.dtype)
        if r.whole_batch:
            return kc[:, :, : r.span], vc[:, :, : r.span]  # (A, ng, span, hd) views
        return kc[r.batch_idx, :, : r.span], vc[r.batch_idx, :, : r.span]

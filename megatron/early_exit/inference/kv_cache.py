"""KV cache allocated once per batch, with per-sequence, per-layer fill lengths.

Shape legend: B batch slots, T capacity (positions), ng kv heads, hd head dim,
R rows processed for one sequence in one pass (new tokens plus pending early-exited ones).

Keys/values are stored [B, T + 1, ng, hd]: writing rows of several sequences at their own
positions is one index_put. The extra last slot is scratch: padding rows write there and
are never attended to.

`filled[l, b]` counts the positions 0..filled-1 of sequence b whose K/V exist at layer l.
An early-exited token leaves the deeper layers' counts behind; they catch up when a
later token of that sequence goes deeper (KV recomputation).
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, batch: int, capacity: int, num_groups: int, head_dim: int, dtype, device):
        shape = (num_layers, batch, capacity + 1, num_groups, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.capacity = capacity
        self.filled = torch.zeros(num_layers, batch, dtype=torch.long)  # on the CPU: bookkeeping

    def layer(self, index: int, batch_idx: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor):
        """A LayerKVCache for one pass of layer `index` over rows at `positions` [b, R]."""
        return _LayerView(self, index, batch_idx, positions, valid)

    def truncate(self, b: int, length: int) -> None:
        """Forget K/V at positions >= length of sequence b, at every layer (speculation rollback)."""
        self.filled[:, b] = torch.clamp(self.filled[:, b], max=length)


class _LayerView:
    """Writes the new rows' K/V at their positions and returns the keys/values to attend to:
    positions 0..t-1 of each sequence in the pass, t = 1 + the largest row position."""

    def __init__(self, cache: KVCache, index: int, batch_idx, positions, valid) -> None:
        self.cache, self.index = cache, index
        self.batch_idx, self.valid = batch_idx, valid
        self.write_pos = torch.where(valid, positions, torch.full_like(positions, cache.capacity))
        self.span = int(positions[valid].max()) + 1 if bool(valid.any()) else 1

    def update(self, k: torch.Tensor, v: torch.Tensor):
        # k, v: (b, ng, R, hd) -> stored rows (b, R, ng, hd)
        kc, vc = self.cache.k[self.index], self.cache.v[self.index]
        rows_b = self.batch_idx[:, None].expand_as(self.write_pos)
        kc[rows_b, self.write_pos] = k.transpose(1, 2).to(kc.dtype)
        vc[rows_b, self.write_pos] = v.transpose(1, 2).to(vc.dtype)
        keys = kc[self.batch_idx, : self.span].transpose(1, 2)  # (b, ng, t, hd)
        values = vc[self.batch_idx, : self.span].transpose(1, 2)
        return keys, values

"""Causal self-attention with grouped-query support, through scaled_dot_product_attention.

Shape legend: b batch, s query length, t key length (cache + new), h hidden,
nh query heads, ng query groups (kv heads), hd head dim.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from megatron.early_exit.config import ModelConfig
from megatron.early_exit.model.norm import build_norm
from megatron.early_exit.model.rotary import apply_rotary


def group_rows_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None
) -> torch.Tensor:
    """SDPA of query rows that need no causal mask among themselves: q [b, ng, r, hd] (each
    K/V group's r query rows: its query heads at one position, decoding), k/v [b, ng, t, hd]
    -> [b, ng, r, hd]; `attn_mask` [b, 1, 1, t] (or None) broadcasts over the rows.

    On the CPU in bf16, PyTorch's SDPA takes a slow path for a single query row: measured on
    the AMD EPYC (torch 2.13, 2 threads, 6 groups of 64), 76 us at 300 keys and 268 us at 1,024
    against 27 and 70 us for two rows, 3x at batch 4 too (`benchmarks/decode_attention.py`);
    fp16 shows no such gap, and fp32's single row is the fast one. There a single row goes in
    twice and the first result is kept: each query row is attended on its own, so it is the
    same arithmetic (equal, or equal to round-off where the kernel blocks the keys differently)."""
    if q.shape[2] == 1 and q.dtype == torch.bfloat16 and q.device.type == "cpu":
        twice = torch.cat((q, q), dim=2)  # contiguous: an expanded view (stride 0) ran ~1.5x slower
        return F.scaled_dot_product_attention(twice, k, v, attn_mask=attn_mask)[:, :, :1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


class LayerKVCache(Protocol):
    """What attention needs from a KV cache: store the new keys/values, return all of them."""

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v [b, ng, s, hd] for the new tokens -> keys, values [b, ng, t, hd] to attend to."""
        ...


class SelfAttention(nn.Module):
    """linear_qkv -> [QK-norm] -> RoPE -> SDPA -> linear_proj.

    QK-norm (Qwen3, `qk_layernorm`): one norm over the head dim, shared by every query head
    (`q_layernorm`) and one by every key head (`k_layernorm`), applied before RoPE.

    linear_qkv is fused in Megatron's grouped layout: for each query group its
    (nh/ng) query heads, then its key head, then its value head. Tensor parallelism can
    therefore shard the output rows contiguously by query group.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_groups = int(config.num_query_groups)
        self.head_dim = config.head_dim
        self.dropout = config.attention_dropout
        qkv_out = (self.num_heads + 2 * self.num_groups) * self.head_dim
        qkv_bias = config.add_bias_linear or config.add_qkv_bias
        self.linear_qkv = nn.Linear(config.hidden_size, qkv_out, bias=qkv_bias)
        self.linear_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.add_bias_linear)
        if config.qk_layernorm:
            self.q_layernorm = build_norm(config.normalization, self.head_dim, config.norm_epsilon)
            self.k_layernorm = build_norm(config.normalization, self.head_dim, config.norm_epsilon)
        else:
            self.q_layernorm = self.k_layernorm = None

    def split_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [b, s, h] -> q [b, nh, s, hd], k and v [b, ng, s, hd] (local head counts under TP)."""
        qkv = self.linear_qkv(x)
        b, s, _ = qkv.shape  # under sequence parallelism: the full sequence, gathered
        per_group = self.num_heads // self.num_groups
        ng = qkv.shape[-1] // ((per_group + 2) * self.head_dim)  # local groups (TP shards them)
        qkv = qkv.view(b, s, ng, per_group + 2, self.head_dim)
        q = qkv[:, :, :, :per_group].reshape(b, s, ng * per_group, self.head_dim)
        k = qkv[:, :, :, per_group]  # (b, s, ng, hd)
        v = qkv[:, :, :, per_group + 1]
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        attn_mask: torch.Tensor | None = None,
        kv_cache: LayerKVCache | None = None,
    ) -> torch.Tensor:
        """x [b, s, h] -> [b, s, h].

        Without a mask and a cache this is plain causal attention. With a cache, the caller
        passes `attn_mask` [b, 1, s, t] (True = may attend) matching what the cache returns.
        """
        q, k, v = self.split_qkv(x)
        b, _, s, _ = q.shape
        if self.q_layernorm is not None:
            q, k = self.q_layernorm(q), self.k_layernorm(k)  # over hd, per head
        if rotary is not None:
            cos, sin = rotary
            q = apply_rotary(q, cos, sin)
            k = apply_rotary(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)
        gqa = q.shape[1] != k.shape[1]
        if kv_cache is not None and s == 1 and not self.training:
            return self.linear_proj(self.one_query_attention(q, k, v, attn_mask))
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=attn_mask is None and kv_cache is None,
            enable_gqa=gqa,
        )  # (b, nh, s, hd)
        out = out.transpose(1, 2).reshape(b, s, -1)
        return self.linear_proj(out)

    def one_query_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Decoding one token: q [b, nh, 1, hd], k/v [b, ng, t, hd] -> [b, 1, nh * hd]. The query
        heads of one group share its K/V and a single query row needs no causal mask, so they go
        in as that group's rows (q viewed [b, ng, nh/ng, hd]; one row each without grouping):
        plain SDPA without `enable_gqa`, whose CPU path expands K/V per query head (3-4x slower
        at decode sizes), through `group_rows_attention`. The same dot products, so the same
        result to round-off. `attn_mask` [b, 1, 1, t] (or None) broadcasts over the group's rows."""
        b, nh, _, hd = q.shape
        ng = k.shape[1]
        out = group_rows_attention(q.view(b, ng, nh // ng, hd), k, v, attn_mask)
        return out.reshape(b, 1, nh * hd)  # heads stay in order: group-major, as linear_qkv lays them out

"""One pre-norm transformer layer: x + attn(norm(x)), then x + mlp(norm(x))."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron.early_exit.config import ModelConfig
from megatron.early_exit.model.attention import LayerKVCache, SelfAttention
from megatron.early_exit.model.mlp import MLP
from megatron.early_exit.model.norm import build_norm


class TransformerLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        eps = config.norm_epsilon
        self.input_layernorm = build_norm(config.normalization, config.hidden_size, eps)
        self.self_attention = SelfAttention(config)
        self.pre_mlp_layernorm = build_norm(config.normalization, config.hidden_size, eps)
        self.mlp = MLP(config)
        self.hidden_dropout = config.hidden_dropout

    def forward(
        self,
        x: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        attn_mask: torch.Tensor | None = None,
        kv_cache: LayerKVCache | None = None,
    ) -> torch.Tensor:
        h = self.self_attention(self.input_layernorm(x), rotary, attn_mask, kv_cache)
        x = x + F.dropout(h, self.hidden_dropout, self.training)
        h = self.mlp(self.pre_mlp_layernorm(x))
        return x + F.dropout(h, self.hidden_dropout, self.training)

"""The feed-forward block: GELU (GPT-2) or SwiGLU (Llama)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron.early_exit.config import ModelConfig


class MLP(nn.Module):
    """linear_fc1 -> activation -> linear_fc2.

    With SwiGLU, linear_fc1 is fused: its output rows are [gate; up] (each ffn wide), one
    matmul instead of two; tensor parallelism shards each half separately.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.swiglu = config.swiglu
        ffn = int(config.ffn_hidden_size)
        fc1_out = 2 * ffn if self.swiglu else ffn
        self.linear_fc1 = nn.Linear(config.hidden_size, fc1_out, bias=config.add_bias_linear)
        self.linear_fc2 = nn.Linear(ffn, config.hidden_size, bias=config.add_bias_linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear_fc1(x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh")
        return self.linear_fc2(h)

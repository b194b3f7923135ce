"""LayerNorm (GPT-2) and RMSNorm (Llama), chosen by `ModelConfig.normalization`."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 and cast back (as Llama does, for bf16 stability)."""

    def __init__(self, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def build_norm(kind: str, hidden_size: int, eps: float) -> nn.Module:
    if kind == "RMSNorm":
        return RMSNorm(hidden_size, eps)
    if kind == "LayerNorm":
        return nn.LayerNorm(hidden_size, eps=eps)
    raise ValueError(f"unknown normalization {kind!r}")

"""Rotary position embeddings (RoPE), non-interleaved ("rotate half") as in HF Llama.

The cos/sin tables are computed per call from explicit position ids, so the same code
serves training (positions 0..s-1) and cached decoding (positions of the new tokens).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def _llama3_scale(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    """Llama-3.1 frequency scaling: long wavelengths slowed by `factor`, short kept, smooth between."""
    factor = scaling["factor"]
    low = scaling.get("low_freq_factor", 1.0)
    high = scaling.get("high_freq_factor", 4.0)
    old_ctx = scaling.get("original_max_position_embeddings", 8192)
    wavelen = 2 * math.pi / inv_freq
    low_wavelen = old_ctx / low
    high_wavelen = old_ctx / high
    smooth = (old_ctx / wavelen - low) / (high - low)
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return torch.where(mid, blended, scaled)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, base: float, scaling: dict[str, Any] | None = None) -> None:
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        if scaling:
            kind = scaling.get("rope_type", scaling.get("type", "llama3"))
            if kind == "llama3":
                inv_freq = _llama3_scale(inv_freq, scaling)
            elif kind == "linear":
                inv_freq = inv_freq / scaling["factor"]
            else:
                raise ValueError(f"unsupported rope scaling type {kind!r}")
        # Not a parameter and not saved: it is a pure function of the config.
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [b, s] -> cos, sin [b, 1, s, head_dim] in fp32."""
        freqs = position_ids.float()[..., None] * self.inv_freq  # (b, s, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (b, s, hd)
        return emb.cos()[:, None], emb.sin()[:, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [b, heads, s, hd] rotated by the angles in cos/sin [b, 1, s, hd]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)

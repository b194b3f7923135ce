"""Rotary position embeddings (RoPE), non-interleaved ("rotate half") as in HF Llama.

The cos/sin tables are computed per call from explicit position ids, so the same code
serves training (positions 0..s-1) and cached decoding (positions of the new tokens).

Scaling variants (`ModelConfig.rope_scaling`, a dict with "rope_type"), all exact functions
of the config, so nothing extra is saved with the weights:

- linear: every frequency divided by `factor` (position interpolation).
- llama3: Llama-3.1's blend: long wavelengths divided by `factor`, short ones kept.
- yarn: YaRN (arXiv 2309.00071): a per-frequency ramp between interpolated and original
  frequencies, and cos/sin scaled by `attention_factor` (which scales q.k by its square).
- freq_factors: every frequency divided by its own listed factor (GGUF's `rope_freqs`
  tensor, how llama.cpp stores Llama-3.1 scaling).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

ROPE_TYPES = ("linear", "llama3", "yarn", "freq_factors")


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


def yarn_attention_factor(scaling: dict[str, Any]) -> float:
    """YaRN's cos/sin multiplier: given, or 0.1 ln(factor) + 1 (ratio of two such with mscale)."""
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    factor = float(scaling["factor"])
    m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if m and m_all:
        return mscale(factor, m) / mscale(factor, m_all)
    return mscale(factor)


def _yarn_scale(inv_freq: torch.Tensor, base: float, head_dim: int, scaling: dict[str, Any]) -> torch.Tensor:
    """Frequencies that turn fewer than beta_slow times over the original context are
    interpolated (divided by `factor`), those that turn more than beta_fast times are kept,
    with a linear ramp over the dimensions between."""
    factor = float(scaling["factor"])
    old_ctx = float(scaling["original_max_position_embeddings"])
    beta_fast = float(scaling.get("beta_fast") or 32)
    beta_slow = float(scaling.get("beta_slow") or 1)

    def dim_of(rotations: float) -> float:  # the dimension that turns `rotations` times over old_ctx
        return head_dim * math.log(old_ctx / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_of(beta_fast), dim_of(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # a zero-width ramp would divide by zero
    ramp = ((torch.arange(head_dim // 2, dtype=inv_freq.dtype) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (keep the frequency), 0: interpolate
    return inv_freq / factor * (1 - keep) + inv_freq * keep


def scaled_inv_freq(head_dim: int, base: float, scaling: dict[str, Any] | None) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [head_dim/2] in float64, cos/sin multiplier) for a rope_scaling dict."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if not scaling:
        return inv_freq, 1.0
    kind = scaling.get("rope_type", scaling.get("type", "llama3"))
    try:
        return _scale(kind, inv_freq, base, head_dim, scaling)
    except KeyError as e:
        raise ValueError(f"rope_scaling: {kind} scaling lacks {e.args[0]!r}") from None


def _scale(kind: str, inv_freq: torch.Tensor, base: float, head_dim: int, scaling: dict[str, Any]):
    if kind == "llama3":
        return _llama3_scale(inv_freq, scaling), 1.0
    if kind == "linear":
        return inv_freq / scaling["factor"], 1.0
    if kind == "yarn":
        return _yarn_scale(inv_freq, base, head_dim, scaling), yarn_attention_factor(scaling)
    if kind == "freq_factors":
        factors = torch.tensor(scaling["factors"], dtype=torch.float64)
        if factors.shape != inv_freq.shape:
            raise ValueError(f"rope_scaling: {len(factors)} freq_factors for head dim {head_dim}")
        return inv_freq / factors, 1.0
    raise ValueError(f"rope_scaling: unsupported rope_type {kind!r} (supported: {', '.join(ROPE_TYPES)})")


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, base: float, scaling: dict[str, Any] | None = None) -> None:
        super().__init__()
        inv_freq, self.attention_scaling = scaled_inv_freq(head_dim, base, scaling)
        # Not a parameter and not saved: it is a pure function of the config.
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [b, s] -> cos, sin [b, 1, s, head_dim] in fp32."""
        freqs = position_ids.float()[..., None] * self.inv_freq  # (b, s, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (b, s, hd)
        if self.attention_scaling != 1.0:
            return (emb.cos() * self.attention_scaling)[:, None], (emb.sin() * self.attention_scaling)[:, None]
        return emb.cos()[:, None], emb.sin()[:, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [b, heads, s, hd] rotated by the angles in cos/sin [b, 1, s, hd]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)

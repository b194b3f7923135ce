"""The early-exit objective (DESIGN.md section 4).

    L = sum_i w_i(t) * CE(exit_i) + w_final * CE(final)

each CE masked and averaged over tokens. w_i(t) moves from `--exit-layer-weight-init` to
`--exit-layer-weight` over `--exit-layer-weight-warmup-iters` (linear or cosine). With
`--use-dynamic-exit-layer-weight`, each token's exit loss is further scaled by that exit's
detached confidence (max softmax probability), so an exit spends its capacity on tokens it
can already nearly decide.
"""

from __future__ import annotations

import math

import torch

from megatron.early_exit.config import ExitLossConfig
from megatron.early_exit.model.gpt import ModelOutput


def exit_weights_at(cfg: ExitLossConfig, iteration: int) -> list[float]:
    """Each exit's loss weight at `iteration` (0-based count of completed updates)."""
    final = cfg.exit_layer_weight
    init = cfg.exit_layer_weight_init or final
    warm = cfg.exit_layer_weight_warmup_iters
    if warm <= 0 or iteration >= warm:
        return list(final)
    frac = iteration / warm
    if cfg.exit_layer_weight_warmup_style == "cosine":
        frac = 0.5 * (1.0 - math.cos(math.pi * frac))
    return [a + (b - a) * frac for a, b in zip(init, final)]


def masked_mean(per_token: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Average of per-token values over the tokens whose mask is 1: [b, s] -> scalar."""
    mask = loss_mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)


def combine_losses(
    out: ModelOutput,
    loss_mask: torch.Tensor,
    exit_weights: dict[int, float],
    final_weight: float,
    dynamic: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted objective and each head's own (unweighted, detached) masked-mean loss.

    Returns (total, parts) where parts has "lm loss" for the final head (when this stage
    has it) and "exit_<layer> loss" for each exit on this stage.
    """
    total = None
    parts: dict[str, torch.Tensor] = {}
    for layer, per_token in sorted(out.exit_losses.items()):
        mean = masked_mean(per_token, loss_mask)
        parts[f"exit_{layer} loss"] = mean.detach()
        if dynamic:
            weighted = masked_mean(per_token * out.exit_confidences[layer], loss_mask)
        else:
            weighted = mean
        term = exit_weights[layer] * weighted
        total = term if total is None else total + term
    if out.loss is not None:
        mean = masked_mean(out.loss, loss_mask)
        parts["lm loss"] = mean.detach()
        term = final_weight * mean
        total = term if total is None else total + term
    if total is None:
        raise RuntimeError("this stage produced no loss: it has neither exits nor the final head")
    return total, parts

"""The early-exit objective (DESIGN.md section 4).

    L = sum_i w_i(t) * CE(exit_i) + w_final * CE(final)

each CE masked and averaged over tokens. w_i(t) moves from `--exit-layer-weight-init` to
`--exit-layer-weight` over `--exit-layer-weight-warmup-iters` (linear or cosine). With
`--use-dynamic-exit-layer-weight`, each token's exit loss is further scaled by that exit's
detached confidence (max softmax probability), so an exit spends its capacity on tokens it
can already nearly decide.

`--exit-loss-curriculum rotational` (LayerSkip, arXiv 2404.16710): at iteration t only the K =
`--exit-loss-rotation-size` exits {(t*K + j) mod E : j < K} keep their weight; the others get
weight 0 (their losses are still computed and logged, their heads get zero gradient).

Confidence probes in pretraining (`--use-exit-confidence-head`): each exit's probe is trained
with binary cross-entropy, on its *detached* input (so it changes no other gradient), to
predict "the exit's top-1 token is the label". Its input is `ExitHead.probe_input`: the exit's
hidden state, or (`--exit-confidence-input backbone`) the probe's own norm of the backbone's
hidden state at the exit's depth, the same input calibration and decoding give it. That target is local to the
exit's pipeline stage and the same in every layout; EE-Tuning's probes instead predict
agreement with the final head, which the tuning stage has at hand (`tuning_losses`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

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


def rotational_exit_weights(weights: list[float], iteration: int, rotation_size: int) -> list[float]:
    """`weights` with all but the exits scheduled at `iteration` set to 0: exits
    {(iteration * K + j) mod E : j < K}, K = `rotation_size` (K >= E keeps them all)."""
    e = len(weights)
    scheduled = {(iteration * rotation_size + j) % e for j in range(min(rotation_size, e))} if e else set()
    return [w if i in scheduled else 0.0 for i, w in enumerate(weights)]


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
    probe_losses: dict[int, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted objective and each head's own (unweighted, detached) masked-mean loss.

    Returns (total, parts) where parts has "lm loss" for the final head (when this stage
    has it) and "exit_<layer> loss" for each exit on this stage. `probe_losses` (per-token
    confidence-probe BCE per exit) are added with weight 1 and logged as
    "exit_<layer> confidence loss"; they reach only the probes' own parameters.
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
        if probe_losses and layer in probe_losses:
            probe = masked_mean(probe_losses[layer], loss_mask)
            parts[f"exit_{layer} confidence loss"] = probe.detach()
            term = term + probe
        total = term if total is None else total + term
    if out.loss is not None:
        mean = masked_mean(out.loss, loss_mask)
        parts["lm loss"] = mean.detach()
        term = final_weight * mean
        total = term if total is None else total + term
    if total is None:
        raise RuntimeError("this stage produced no loss: it has neither exits nor the final head")
    return total, parts


def evaluate_exits_with_probes(
    model, out: ModelOutput, exit_inputs, rotary, labels: torch.Tensor, want_conf: bool = False
) -> dict[int, torch.Tensor]:
    """`model.evaluate_exits` with labels (same per-token losses and confidences into `out`),
    plus each confidence probe's per-token BCE [b, s] against "exit's top-1 == label",
    computed on its detached input (`probe_input`): {layer: BCE} for exits with a probe."""
    ops = model.head_ops
    probes: dict[int, torch.Tensor] = {}
    for n, h in exit_inputs:
        head = model.exits[str(n)]
        hidden = head.hidden(h, rotary)
        logits = head.project(hidden, model.tied_output_weight(), ops)
        out.exit_losses[n] = ops.token_losses(logits, labels)
        if want_conf:
            out.exit_confidences[n] = ops.max_prob(logits)
        if head.confidence is not None:
            correct = (ops.argmax(logits.detach()) == labels).float()
            conf_logit = head.confidence_logit(head.probe_input(h.detach(), hidden.detach()))
            probes[n] = F.binary_cross_entropy_with_logits(conf_logit.float(), correct, reduction="none")
    return probes


def tuning_losses(
    model,
    out: ModelOutput,
    labels: torch.Tensor,
    loss_mask: torch.Tensor,
    exit_weights: dict[int, float],
    loss_type: str = "ce",
    kd_temperature: float = 1.0,
) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """EE-Tuning objective of one stage's exits, the backbone frozen (DESIGN.md, EE-Tuning).

    `out` comes from `schedules.stage_forward` with the backbone frozen and no final head.
    Each exit's loss is cross-entropy with the labels (`ce`),
    distillation from the frozen final head (`kd`: T^2 * KL(final/T || exit/T) per token),
    or their sum (`ce+kd`). Exits with a confidence head also train it, as a probe on its
    detached input (`probe_input`: exit or backbone hidden state), with binary cross-entropy
    against "the exit's top token equals the final head's". Logged per exit: its
    cross-entropy (`exit_<n> loss`), its agreement with the final head, and the probe's loss.
    """
    ops = model.head_ops
    needs_teacher = "kd" in loss_type or any(model.exits[str(n)].confidence is not None for n, _ in out.deferred_exits)
    teacher_lp = teacher_top = None
    if needs_teacher and out.deferred_exits:
        if not model.post_process:
            raise ValueError("--exit-loss-type kd and confidence heads need the final head on the exits' stage")
        with torch.no_grad():
            t_logits = ops.project(model.decoder.final_layernorm(out.hidden_states), model.output_weight())
            teacher_lp = ops.log_softmax(t_logits / kd_temperature)
            teacher_top = ops.argmax(t_logits)
    total = None
    parts: dict[str, torch.Tensor] = {}
    for n, h in out.deferred_exits:
        head = model.exits[str(n)]
        hidden = head.hidden(h, out.rotary)
        logits = head.project(hidden, model.tied_output_weight(), ops)
        ce = ops.token_losses(logits, labels)
        parts[f"exit_{n} loss"] = masked_mean(ce, loss_mask).detach()
        per_token = ce if "ce" in loss_type.split("+") else torch.zeros_like(ce)
        if "kd" in loss_type:
            student_lp = ops.log_softmax(logits / kd_temperature)
            kd = ops.vocab_sum(teacher_lp.exp() * (teacher_lp - student_lp)) * kd_temperature**2
            parts[f"exit_{n} kd loss"] = masked_mean(kd, loss_mask).detach()
            per_token = per_token + kd
        term = exit_weights[n] * masked_mean(per_token, loss_mask)
        if teacher_top is not None:
            agree = (ops.argmax(logits.detach()) == teacher_top).float()
            parts[f"exit_{n} agreement"] = masked_mean(agree, loss_mask)
            if head.confidence is not None:
                conf_logit = head.confidence_logit(head.probe_input(h.detach(), hidden.detach()))
                bce = F.binary_cross_entropy_with_logits(conf_logit.float(), agree, reduction="none")
                parts[f"exit_{n} confidence loss"] = masked_mean(bce, loss_mask).detach()
                term = term + masked_mean(bce, loss_mask)
        total = term if total is None else total + term
    out.deferred_exits = []
    return total, parts

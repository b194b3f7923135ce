"""AdamW with Megatron's parameter groups and its learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Biases and norm weights get no weight decay (Megatron's rule); frozen params are left out."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        module = name.rsplit(".", 1)[0].rsplit(".", 1)[-1]
        if name.endswith(".bias") or "norm" in module:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(
    model: nn.Module, args, allow_empty: bool = False, dp_group=None, fused: bool = False
) -> torch.optim.Optimizer | None:
    """AdamW over the trainable parameters; None for a stage with none (allowed when tuning
    exits: a pipeline stage without exits has nothing to update, which must not crash).
    `fused`: torch's one-kernel AdamW (the same update; its step took 8 ms against foreach's 41
    ms for SmolLM2's three MLP exits on the CPU), where every trainable parameter is a float
    tensor on one CPU or CUDA device; else foreach."""
    groups = param_groups(model, args.weight_decay)
    if not groups:
        if allow_empty:
            return None
        raise ValueError("the model has no trainable parameters")
    kwargs = dict(lr=args.lr, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_eps)
    if dp_group is not None and getattr(args, "use_distributed_optimizer", False):
        # ZeRO-1: each data-parallel rank keeps Adam state for its share of the parameters
        # only, steps those, and broadcasts the updated values to the other replicas.
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return ZeroRedundancyOptimizer(groups, optimizer_class=torch.optim.AdamW, process_group=dp_group, **kwargs)
    params = [p for g in groups for p in g["params"]]
    if fused and len({p.device for p in params}) == 1 and params[0].device.type in ("cpu", "cuda"):
        if all(p.dtype in (torch.float32, torch.bfloat16, torch.float16) for p in params):
            return torch.optim.AdamW(groups, fused=True, **kwargs)
    return torch.optim.AdamW(groups, foreach=True, **kwargs)


class LRScheduler:
    """Linear warm-up from 0 to `lr` over `warmup_iters`, then decay to `min_lr` by
    `decay_iters` (constant, linear or cosine), then `min_lr`. Stateless but for the step
    count, so resuming restores it exactly."""

    def __init__(self, optimizer, lr, min_lr, warmup_iters, decay_iters, style) -> None:
        # optimizer may be None (a tuning stage without exits): the schedule still counts.
        self.optimizer = optimizer
        self.max_lr, self.min_lr = lr, min_lr
        self.warmup_iters, self.decay_iters, self.style = warmup_iters, decay_iters, style
        self.num_steps = 0
        self._apply()

    def lr_at(self, step: int) -> float:
        if self.warmup_iters > 0 and step <= self.warmup_iters:
            return self.max_lr * step / self.warmup_iters
        if self.style == "constant":
            return self.max_lr
        if step >= self.decay_iters:
            return self.min_lr
        span = max(self.decay_iters - self.warmup_iters, 1)
        frac = (step - self.warmup_iters) / span
        if self.style == "linear":
            coeff = 1.0 - frac
        else:
            coeff = 0.5 * (math.cos(math.pi * frac) + 1.0)
        return self.min_lr + coeff * (self.max_lr - self.min_lr)

    @property
    def lr(self) -> float:
        return self.lr_at(self.num_steps + 1)

    def _apply(self) -> None:
        # The lr used by update number k (1-based) is lr_at(k): warm-up never starts at 0.
        if self.optimizer is None:
            return
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr

    def step(self) -> None:
        self.num_steps += 1
        self._apply()

    SETTINGS = {
        "max_lr": "--lr",
        "min_lr": "--min-lr",
        "warmup_iters": "--lr-warmup-iters",
        "decay_iters": "--lr-decay-iters",
        "style": "--lr-decay-style",
    }

    def state_dict(self) -> dict:
        return {"num_steps": self.num_steps, **{k: getattr(self, k) for k in self.SETTINGS}}

    def changed_settings(self, state: dict) -> list[str]:
        """The schedule settings that differ from a saved state's: `--flag saved -> now` each."""
        return [
            f"{flag} {state[k]} -> {getattr(self, k)}"
            for k, flag in self.SETTINGS.items()
            if k in state and state[k] != getattr(self, k)
        ]

    def load_state_dict(self, state: dict, use_saved_settings: bool = False) -> None:
        """Restore the step count; with `use_saved_settings`, also the saved lr, warm-up and decay."""
        self.num_steps = int(state["num_steps"])
        if use_saved_settings:
            for k in self.SETTINGS:
                if k in state:
                    setattr(self, k, state[k])
        self._apply()

"""CPU decode fast path: Linear and vocabulary-head products on the kernel measured fastest.

Decoding is bound by how fast the weights stream from memory, and which kernel streams
fastest depends on the CPU, dtype and rows (`inference/kernels.py`: `F.linear`, oneDNN on
prepacked weights, `torch.mv`, or a pre-transposed copy; chosen once per shape by measuring
on the model's own weights, or forced with `EE_LINEAR_KERNEL` / `linear_kernel`). Measured
on an AMD EPYC (avx512_bf16, CPU torch 2.13.0), oneDNN's prepacked weights streamed 20-32 GB/s
where `F.linear` streamed 8-13; on an Intel Xeon (AMX) packed fp32 was slower than `F.linear`
at one row. `transformers` runs `nn.Linear`, i.e. `F.linear`.

`PackedWeights(model)` is the explicit, reversible wrapper the engine uses: while it is
entered (`with packed:`), every plain `nn.Linear` of the model, and its single-device
`HeadOps.project` (the final head and every exit's vocabulary projection), use the chosen
kernel whenever autograd is off and the input is a CPU tensor of the weight's dtype;
anything else (training, CUDA, autocast mixes) takes the ordinary path. On leaving, the
modules are as they were: the caller's model object is only changed while a pass runs.
`enable_packed_weights(model)` asks for the same routing permanently (in place, until
`disable_packed_weights(model)`); the model still trains, saves and loads exactly as before.
Packed (or transposed) copies are made lazily, kept per weight tensor and remade when the
weight changes (its data pointer or version counter moves: an optimizer step,
`load_state_dict`, `.to()`). They cost one extra copy of the chosen weights' memory;
`disable_packed_weights(model)` drops them. Tensor-parallel modules are left alone (their
collectives live in their own forward).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from megatron.early_exit.inference import kernels
from megatron.early_exit.inference.kernels import packing_available  # noqa: F401 (re-exported)
from megatron.early_exit.model.gpt import HeadOps

_MARK = "_ee_packed_enabled"
_DTYPES = (torch.float32, torch.bfloat16)


def enable_packed_weights(model: nn.Module) -> bool:
    """Route the model's plain Linears and single-device heads through packed weights.

    Idempotent; returns whether the fast path is on (False where the model does not live on
    the CPU in fp32/bf16). The kernels are chosen as `EE_LINEAR_KERNEL` says (default:
    measured). The hooks are bound methods, so a `copy.deepcopy` of the model binds them to
    the copy, which packs its own weights.
    """
    if getattr(model, _MARK, False):
        return True
    if not _packable(model):
        return False
    for m, name, hook in _hooks(model):
        m.__dict__[name] = hook
    object.__setattr__(model, _MARK, True)
    return True


class PackedWeights:
    """The chosen kernels for `model` while entered (re-entrant); a no-op where the model is
    not on the CPU in fp32/bf16. The hooks are made once, here. kernel: 'auto' (measure, or
    what `EE_LINEAR_KERNEL` forces) or one of `kernels.KERNELS`, forced while entered."""

    def __init__(self, model: nn.Module, kernel: str = "auto") -> None:
        self.model, self.depth = model, 0
        self.kernel = kernels.forced_kernel(kernel)
        self.available = _packable(model)
        self.hooks = _hooks(model) if self.available else []

    def __enter__(self) -> PackedWeights:
        if self.depth == 0 and not getattr(self.model, _MARK, False):
            for m, name, hook in self.hooks:
                m.__dict__[name] = hook
        self.kernel.__enter__()
        self.depth += 1
        return self

    def __exit__(self, *exc) -> None:
        self.depth -= 1
        self.kernel.__exit__()
        if self.depth == 0 and not getattr(self.model, _MARK, False):
            for m, name, _ in self.hooks:
                m.__dict__.pop(name, None)


def _packable(model: nn.Module) -> bool:
    p = next(model.parameters(), None)
    return p is not None and p.device.type == "cpu" and p.dtype in _DTYPES


def _hooks(model: nn.Module) -> list[tuple[nn.Module, str, object]]:
    """(module, attribute, bound packed method) for every plain Linear and single-device head;
    registers the model's matrices as the groups kernel choices are measured on."""
    kernels.register(p for p in model.parameters() if p.dim() == 2)
    hooks = []
    for m in model.modules():
        if type(m) is nn.Linear:
            hooks.append((m, "forward", types.MethodType(_packed_linear_forward, m)))
        elif type(m) is HeadOps:
            hooks.append((m, "project", types.MethodType(_packed_project, m)))
    return hooks


def disable_packed_weights(model: nn.Module) -> None:
    """Back to the ordinary kernels; frees the packed copies."""
    for m in model.modules():
        for name in ("forward", "project"):
            if name in m.__dict__ and type(m) in (nn.Linear, HeadOps):
                delattr(m, name)
    kernels.forget(model.parameters())
    object.__setattr__(model, _MARK, False)


def _fast_ok(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return (
        not torch.is_grad_enabled()
        and x.device.type == "cpu"
        and weight.device.type == "cpu"
        and x.dtype == weight.dtype
        and weight.dtype in _DTYPES
        and (bias is None or bias.dtype == weight.dtype)
        and x.numel() > 0
        and not torch.is_autocast_enabled("cpu")
    )


def packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, on the chosen kernel (`kernels.linear`) where the fast path applies."""
    if not _fast_ok(x, weight, bias):
        return F.linear(x, weight, bias)
    return kernels.linear(x, weight, bias)


def _packed_linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return packed_linear(x, self.weight, self.bias)


def _packed_project(self: HeadOps, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return packed_linear(h, weight)  # (b, s, h) @ (h, V) -> (b, s, V)

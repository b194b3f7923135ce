"""CPU decode fast path: Linear and vocabulary-head weights prepacked for oneDNN.

Decoding is bound by how fast the weights stream from memory. Measured on the 2-core
development machine (AMD EPYC with avx512_bf16, CPU torch 2.13.0), 30 matrices of
[3072, 576] against 1-16 rows: `F.linear` streams 8-13 GB/s in fp32 and bf16, while the
same product on weights reordered once into oneDNN's blocked layout
(`torch.ops.mkldnn._reorder_linear_weight`) and run by `torch.ops.mkldnn._linear_pointwise`
streams 20-32 GB/s. The results agree to fp32 round-off. `transformers` runs `nn.Linear`,
i.e. the slow kernel.

`PackedWeights(model)` is the explicit, reversible wrapper the engine uses: while it is
entered (`with packed:`), every plain `nn.Linear` of the model, and its single-device
`HeadOps.project` (the final head and every exit's vocabulary projection), use packed
copies whenever autograd is off and the input is a CPU tensor of the weight's dtype;
anything else (training, CUDA, autocast mixes) takes the ordinary path. On leaving, the
modules are as they were: the caller's model object is only changed while a pass runs.
`enable_packed_weights(model)` asks for the same routing permanently (in place, until
`disable_packed_weights(model)`); the model still trains, saves and loads exactly as before.
Packed copies are made lazily, kept per weight tensor and remade when the weight changes
(its data pointer or version counter moves: an optimizer step, `load_state_dict`, `.to()`).
They cost one extra copy of the packed weights' memory; `disable_packed_weights(model)`
drops them. Tensor-parallel modules are left alone (their collectives live in their own forward).
"""

from __future__ import annotations

import types
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from megatron.early_exit.model.gpt import HeadOps

_MARK = "_ee_packed_enabled"
_DTYPES = (torch.float32, torch.bfloat16)


def packing_available() -> bool:
    """Whether this torch build has the oneDNN ops the fast path uses."""
    ops = getattr(torch.ops, "mkldnn", None)
    try:
        return (
            torch.backends.mkldnn.is_available()
            and hasattr(ops, "_reorder_linear_weight")
            and hasattr(ops, "_linear_pointwise")
        )
    except (AttributeError, RuntimeError):
        return False


# id(weight) -> (weakref to weight, data_ptr, version, packed weight). Kept outside the
# modules: packed weights are opaque oneDNN tensors that cannot be deep-copied or pickled.
# An entry is dropped when its weight dies (weakref.finalize).
_PACKED: dict[int, tuple] = {}


def enable_packed_weights(model: nn.Module) -> bool:
    """Route the model's plain Linears and single-device heads through packed weights.

    Idempotent; returns whether the fast path is on (False where oneDNN is missing or the
    model does not live on the CPU in fp32/bf16). The hooks are bound methods, so a
    `copy.deepcopy` of the model binds them to the copy, which packs its own weights.
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
    """Packed kernels for `model` while entered (re-entrant); a no-op where they are unavailable
    or the caller already enabled them in place. The hooks are made once, here."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.depth = model, 0
        self.available = _packable(model)
        self.hooks = _hooks(model) if self.available else []

    def __enter__(self) -> PackedWeights:
        if self.depth == 0 and not getattr(self.model, _MARK, False):
            for m, name, hook in self.hooks:
                m.__dict__[name] = hook
        self.depth += 1
        return self

    def __exit__(self, *exc) -> None:
        self.depth -= 1
        if self.depth == 0 and not getattr(self.model, _MARK, False):
            for m, name, _ in self.hooks:
                m.__dict__.pop(name, None)


def _packable(model: nn.Module) -> bool:
    p = next(model.parameters(), None)
    return p is not None and p.device.type == "cpu" and p.dtype in _DTYPES and packing_available()


def _hooks(model: nn.Module) -> list[tuple[nn.Module, str, object]]:
    """(module, attribute, bound packed method) for every plain Linear and single-device head."""
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
    for p in model.parameters():
        _PACKED.pop(id(p), None)
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
    """`F.linear(x, weight, bias)`, on the packed copy of `weight` where the fast path applies."""
    if not _fast_ok(x, weight, bias):
        return F.linear(x, weight, bias)
    key, stamp = id(weight), (weight.data_ptr(), weight._version)
    hit = _PACKED.get(key)
    if hit is None or hit[0]() is not weight or hit[1:3] != stamp:
        if hit is None or hit[0]() is not weight:
            weakref.finalize(weight, _PACKED.pop, key, None)
        hit = (weakref.ref(weight), *stamp, torch.ops.mkldnn._reorder_linear_weight(weight.detach()))
        _PACKED[key] = hit
    return torch.ops.mkldnn._linear_pointwise(x, hit[3], bias, "none", [], "")


def _packed_linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return packed_linear(x, self.weight, self.bias)


def _packed_project(self: HeadOps, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return packed_linear(h, weight)  # (b, s, h) @ (h, V) -> (b, s, V)

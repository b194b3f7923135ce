"""The learned exit check, fused: the probe's logit straight from the backbone row, the norm
folded into the probe's first weight, compared against logit(threshold).

Most checks do not fire, so what a non-firing check costs is what every exit adds to every
decode step. Where the probe reads a norm of the row x (an exit with only a norm, read by the
probe: `exit_confidence_input="exit"`; or the probe's own `confidence_norm` of the backbone:
`"backbone"`), the norm's gain g folds into the probe's first weight W (one derived copy,
W' = W * g), and its per-row scale r moves after the product:

    RMSNorm    W (g * x * r) + b                  = r * (x @ W'^T) + b,
               r = rsqrt(mean(x^2) + eps)
    LayerNorm  W (g * (x - mu) * r + beta) + b    = r * (x @ W'^T - mu * W' 1) + (W beta + b),
               r = rsqrt(var(x) + eps)
    no norm    W x + b                            (an exit with neither norm nor MLP)

so the check is one product of x, one per-row reduction, a scale, and for the MLP probe an
exact GELU (torch's, as the module's) and fc_out. No normed vector is made and no sigmoid
is applied: sigmoid(z) >= t is z >= logit(t). The check runs in fp32 whatever the model's dtype
(its weights are a few hundred KB: on the Intel Xeon of the README a [1,384]x[384,128] product
took 3.7 us in fp32 and 31 us in bf16), the row is converted once. Where a row fires, the exit's
hidden state is computed by the exit itself, as before, for its projection, so tokens change
only where a logit lies within rounding (fp32: ~1e-6 relative) of the threshold.

In a decode step whose rows all reach the check, an RMSNorm probe reads `lean.scaled_rows` (x r
in fp32, the norm before its gain: `scores_of_scaled`, one product with W' / sqrt(h)), and
`Passes.folded_scores` keeps them for the next lean layer, whose input norm makes the same rows
where its eps is the probe norm's: a check that does not fire then costs that layer one product,
its value and the decision (the last product's bias moved into the bound;
measured in `benchmarks/probe_cost.py`, "in a step"). Where the native kernel is built
(`native.py`), that check is one call instead (`native.Probe`, made with the folded copies:
the norm's scale, the products and the GELU over the raw rows, in fp32; ~3.5 us for SmolLM2's
linear probe against ~15-20 us for the torch check and its list on an AMD EPYC), and the next
layer folds its own norm into its product as it does without a check.

A probe reading an exit with an MLP or a block, or any probe or norm of another type, cannot be
folded: `folded_probe` returns None and decoding takes the module path (`confidence.learned`).

Shape legend: A rows, h hidden, k probe hidden (1 for the linear probe).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from megatron.early_exit.derived import DerivedCopies
from megatron.early_exit.inference import native
from megatron.early_exit.model.exits import ConfidenceMLP
from megatron.early_exit.model.norm import RMSNorm

# The folded weights of each probe (`derived.py`: keyed by the probe's first weight, the other
# tensors' stamps in the kind, so a change to any of them remakes the copy).
_FOLDED = DerivedCopies()
_NOT_FOLDABLE = object()  # what `probe_norm` returns where the probe does not read a norm of x
# head -> (probe, norm, [(tensor, data_ptr, version)], folded probe or None): `folded_probe`'s last answer.
_LAST: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class FoldedProbe:
    """A probe with the norm before it folded in (fp32 copies; the module's own are untouched).
    Every constant is a tensor: an op with a Python number costs twice one with a tensor (the
    number is wrapped each call), and at these sizes the ops' fixed costs are the check's cost."""

    norm: str  # "rms", "layer" or "none"
    eps: torch.Tensor  # 0-dim: the norm's eps, times h for RMSNorm (see `logit`)
    weight_t: torch.Tensor  # [h, k] ([h]: linear probe): (W * g)^T, * sqrt(h) for RMSNorm
    bias: torch.Tensor  # [k]: b (+ W beta for LayerNorm)
    center: torch.Tensor | None  # [k]: -W' 1 (LayerNorm only): mu * center is the mean's share
    out_weight: torch.Tensor | None  # [k]: fc_out's weight (MLP probe only)
    out_bias: torch.Tensor | None  # [1]
    norm_eps: float = 0.0  # the norm's own eps (RMSNorm: what `scores_of_scaled`'s rows were made with)
    scaled_weight_t: torch.Tensor | None = None  # RMSNorm: weight_t / sqrt(h), for `scores_of_scaled`
    shift: float = 0.0  # what `scores_of_scaled` leaves out of the logit: the last bias (linear probe's, fc_out's)
    # RMSNorm, on the CPU where the native kernel is built: `scores_of_scaled(lean.scaled_rows(x,
    # norm_eps))` from x in one call (`native.Probe`; `Passes.shared_norm_scores` takes it)
    native: object | None = None

    def logit(self, x: torch.Tensor) -> torch.Tensor:
        """Rows x [A, h], any float dtype -> the probe's logit [A] in fp32."""
        x, mlp = x.float(), self.out_weight is not None  # a no-op in fp32
        v = torch.mm(x, self.weight_t) if mlp else torch.mv(x, self.weight_t)  # (A, k) or (A,)
        if self.norm == "rms":  # rsqrt(mean(x^2) + eps) = sqrt(h) rsqrt(|x|^2 + h eps), sqrt(h) in weight_t
            n = torch.linalg.vector_norm(x, dim=-1, keepdim=mlp)  # (A, 1) or (A,)
            v = torch.addcmul(self.bias, v, torch.addcmul(self.eps, n, n).rsqrt_())
        elif self.norm == "layer":
            var, mu = torch.var_mean(x, -1, correction=0, keepdim=mlp)
            v = torch.addcmul(self.bias, v.addcmul_(mu, self.center), var.add_(self.eps).rsqrt_())
        else:
            v = v.add_(self.bias)
        if not mlp:
            return v
        return self.finish(v)

    def scores_of_scaled(self, scaled: torch.Tensor) -> list[float]:
        """The RMSNorm probe's logit of each row, less `shift`, as floats, from the norm's rows
        before its gain, fp32 [A, h] (`lean.scaled_rows(x, self.norm_eps)`: the next layer's input
        norm makes the same rows where its eps is the same, so the check costs its product where
        the layer takes them). A row fires where its score reaches logit(threshold) - shift.
        The last product's bias moves into the bound, and for one row
        (batch 1) the last product is a dot product and its value: the linear probe's check is two
        operations, the fewest a check can pay (in a SmolLM2 decode step on an AMD EPYC, fp32,
        ~15 us against addmv and a list's ~25), the MLP probe's four."""
        v, w = scaled, self.scaled_weight_t
        if self.out_weight is not None:
            v, w = F.gelu(torch.addmm(self.bias, scaled, w)), self.out_weight  # (A, k)
        if v.shape[0] == 1:
            return [torch.dot(v.view(-1), w).item()]
        return torch.mv(v, w).tolist()

    def finish(self, v: torch.Tensor) -> torch.Tensor:
        """The MLP probe's first layer's output (A, k) -> its logit (A,)."""
        return torch.addmv(self.out_bias, F.gelu(v), self.out_weight)


def sigmoid(z: float) -> float:
    """1 / (1 + e^-z) of a float, without overflow at any z (a leaver's confidence)."""
    return 0.5 * (1.0 + math.tanh(0.5 * z))


def logit_threshold(threshold: float) -> float:
    """The logit z with sigmoid(z) = threshold: a row fires where its probe's logit >= it."""
    if threshold <= 0.0:
        return -math.inf
    if threshold >= 1.0:
        return math.inf
    return math.log(threshold) - math.log1p(-threshold)


def probe_norm(head) -> nn.Module | None | object:
    """The norm the head's probe reads the backbone row through (None: the row itself), or
    `_NOT_FOLDABLE` where the probe reads more than a norm of it (an exit MLP or block)."""
    if head.probe_reads_backbone:
        return head.confidence_norm
    if head.block is None and head.mlp is None:
        return head.norm
    return _NOT_FOLDABLE


def folded_probe(head) -> FoldedProbe | None:
    """The head's probe with its norm folded in (made once, remade when a weight changes), or
    None where it cannot be folded: no probe, a probe on an exit MLP or block, other types.
    What the last call found is kept per head: while the probe and norm modules are the same and
    their tensors unchanged (data pointer and version), a call costs that test only, not a walk
    through the modules (a dozen attribute lookups: as much as the check's arithmetic)."""
    probe, norm = head.confidence, probe_norm(head)
    last = _LAST.get(head)
    if (
        last is not None
        and last[0] is probe
        and last[1] is norm
        and all(t.data_ptr() == ptr and t._version == version for t, ptr, version in last[2])
    ):
        return last[3]
    folded, tensors = _find(probe, norm)
    _LAST[head] = (probe, norm, [(t, t.data_ptr(), t._version) for t in tensors], folded)
    return folded


def _find(probe, norm) -> tuple[FoldedProbe | None, list[torch.Tensor]]:
    """The folded probe (None where it does not fold) and the tensors it was made from."""
    if probe is None or norm is _NOT_FOLDABLE:
        return None, []
    first, out = (probe.fc_in, probe.fc_out) if type(probe) is ConfidenceMLP else (probe, None)
    if type(first) is not nn.Linear or first.bias is None or (out is not None and out.bias is None):
        return None, []
    if norm is None:
        kind, gain, shift = "none", None, None
    elif type(norm) is RMSNorm:
        kind, gain, shift = "rms", norm.weight, None
    elif type(norm) is nn.LayerNorm and norm.weight is not None and norm.bias is not None:
        kind, gain, shift = "layer", norm.weight, norm.bias
    else:
        return None, []
    sources = (first.bias, gain, shift) + ((out.weight, out.bias) if out is not None else ())
    stamp = tuple((t.data_ptr(), t._version) if t is not None else None for t in sources)
    eps = norm.eps if norm is not None else 0.0
    folded = _FOLDED.get(first.weight, ("folded", kind, eps, stamp), lambda w: _fold(w, kind, eps, *sources))
    return folded, [first.weight] + [t for t in sources if t is not None]


def _fold(weight, kind, eps, bias, gain, shift, out_weight=None, out_bias=None) -> FoldedProbe:
    """The fp32 folded copies (formulas in the module docstring)."""
    w, b = weight.float(), bias.detach().float()  # (k, h), (k,)
    if shift is not None:
        b = b + w @ shift.detach().float()
    if gain is not None:
        w = w * gain.detach().float()
    center = -w.sum(-1) if kind == "layer" else None  # (k,)
    unit, norm_eps = w, float(eps)  # RMSNorm: the weight for rows already scaled (`scores_of_scaled`)
    if kind == "rms":  # mean(x^2) = |x|^2 / h: the 1/h leaves the per-row reduction
        w, eps = w * math.sqrt(w.shape[1]), eps * w.shape[1]
    eps = torch.tensor(float(eps))
    in_c = kind == "rms" and unit.device.type == "cpu" and native.available()  # the check in one native call
    if out_weight is None:
        scaled = unit[0].contiguous() if kind == "rms" else None
        probe = native.Probe(scaled, norm_eps, None, None) if in_c else None
        return FoldedProbe(kind, eps, w[0].contiguous(), b, center, None, None, norm_eps, scaled, float(b[0]), probe)
    out, out_b = out_weight.detach().float()[0].contiguous(), out_bias.detach().float()  # (k,), (1,)
    scaled = unit.t().contiguous() if kind == "rms" else None
    # the native check takes the module's weight and the gain apart (a bf16 weight stays bf16)
    probe = native.Probe(weight.detach().t(), norm_eps, b, out, gain) if in_c else None
    return FoldedProbe(kind, eps, w.t().contiguous(), b, center, out, out_b, norm_eps, scaled, float(out_b[0]), probe)

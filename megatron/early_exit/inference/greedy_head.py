"""Greedy decoding's next token from an int8 copy of the vocabulary head, certified exact.

Greedy decoding needs only the argmax of the final logits z = W h, yet the fp32 head
(SmolLM2: 49152 x 576, 113 MB) is the largest single read of a decode step. Here a copy
of W quantized to int8 with one scale per row (W~ = s q, a quarter of the bytes; bf16 scales)
gives approximate logits z~ = W~ h~ (h~ = h in bf16) through `torch._weight_int8pack_mm`,
and every row's error is bounded rigorously:

  |z^_i - z~_i| <= ||w_i - w~_i|| ||h|| + ||w~_i|| ||h - h~||           (quantization)
                 + gamma ||w_i|| ||h||                                   (the reference's fp32 sum)
                 + 2 gamma ||w~_i|| ||h~|| + u |z~_i| / (1 - u)          (the int8 kernel: fp32
                   accumulation, fp32 scale product, bf16 output rounding, u = 2^-8)

where z^ is the reference product as any fp32-accumulating kernel computes it (Cauchy-Schwarz
bounds sum_j |w_ij h_j| by ||w_i|| ||h||; gamma = K u32 / (1 - K u32), K the hidden size,
u32 = 2^-24, covers every summation order, FMA or not; |z~_i| is bounded by the row's largest).
The row norms are computed once, in fp64, and scaled by 1.001 for the rounding of the bound's
own arithmetic; a bf16 model's reference rounds its output to bf16 too, which adds u |z^_i|.
With E_i the bound of row i, rows whose z~_i + E_i reaches max_j (z~_j - E_j) are the only ones
that can hold the maximum (SmolLM2: median 5, at most ~30 of 49152); their logits are
computed in the model's dtype (a gathered copy of those rows), and the largest is *certified*
when it beats every other candidate by more than both rows' reference rounding bands
(2 gamma ||w|| ||h||, plus the output rounding in bf16): then every fp32-accumulating kernel's
argmax is that row. Otherwise (a near-tie within round-off, non-finite values, or over a
quarter of the rows left) the logits are computed in full and `torch.argmax` decides, ties
to the lowest index, so the token always equals `argmax(F.linear(h, W))`.

Measured on the Intel Xeon here (1 thread, CPU time, loaded machine): the 49152 x 576 head at
one row: fp32 `F.linear` 15.7 ms, bf16 `F.linear` 7.0 ms, bf16 `torch.mv` 8.1 ms, int8 with
bf16 activations 2.8 ms (int8 with fp32 activations 22.7 ms: no fast kernel); at 8 rows:
43.3, 6.8, -, 8.1 ms. So int8 with bf16 activations. The whole certified argmax on SmolLM2's
own final hidden states (same conditions, machine load ~14 on 2 cores): fp32 head 2.6x faster
than `F.linear` + argmax at 1 row, 2.8x at 8 rows; on a bf16 model 0.62x and 0.26x (its
reference rounds logits to bf16, so near-ties within that rounding are common and fall back to
the full product): 'auto' uses it on fp32 heads only. Whole decoding (SmolLM2, 16 new tokens,
1 thread, CPU time, loaded): fp32 1.30x tokens/s at batch 1, 1.22x at batch 8, same tokens; a
bf16 model forced to int8 decoded 1.15x at batch 1 (unsettled against the per-call figure:
measure quietly before turning 'auto' on for bf16).

The engine uses it only where nothing but the token is needed (`EarlyExitEngine(head=...)`):
greedy, no log-probabilities, strategies whose rounds are one pass and an accept. The final
head's confidence (max probability) is then computed from z~ with the candidates' exact logits
in place (within the bound above; it is telemetry, tokens are exact). An exit's max_prob
measure needs the whole softmax, so exits keep the full product.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megatron.early_exit.derived import DerivedCopies
from megatron.early_exit.inference import huge_pages

HEADS = ("auto", "int8", "full")
ENV = "EE_GREEDY_HEAD"
# 'auto' uses the int8 head on fp32 heads from this many weight elements on (4M: 16 MB, beyond the
# caches, where streaming the weight is what a step costs); smaller heads keep the full product.
MIN_ELEMENTS = 1 << 22
U_BF16 = 2.0**-8
U_FP32 = 2.0**-24
SAFETY = 1.001  # covers the rounding of the bound's own fp32 arithmetic
_DTYPES = (torch.float32, torch.bfloat16)
# The Int8Head of each head weight (`derived.py`: remade when the weight changes, dropped with it).
_CACHE = DerivedCopies()


def check_head(name: str, what: str = "head") -> str:
    """`name` if it is one of `HEADS`; ValueError naming `what` otherwise."""
    if name not in HEADS:
        raise ValueError(f"{what}: unknown head {name!r}; choose one of {', '.join(HEADS)}")
    return name


def available() -> bool:
    """Whether this torch build has the int8 kernel."""
    return hasattr(torch, "_weight_int8pack_mm")


def gamma(k: int) -> float:
    """Higham's gamma_k for fp32: the relative error bound of a k-term dot product."""
    return k * U_FP32 / (1 - k * U_FP32)


@dataclass
class Int8Head:
    """The int8 copy of one head weight [V, K] and the per-row norms its error bound needs."""

    q: torch.Tensor  # (V, K) int8
    scales: torch.Tensor  # (V,) bf16
    slack: torch.Tensor  # (V,) fp32: SAFETY (||w_i - w~_i|| + gamma ||w_i||), times ||h|| in the bound
    qnorms: torch.Tensor  # (V,) fp32: SAFETY ||w~_i||, times ||h - h~|| + 2 gamma ||h~|| in the bound
    norms: torch.Tensor  # (V,) fp32 ||w_i||: the candidates' rounding bands


def quantize(weight: torch.Tensor) -> Int8Head:
    """Symmetric per-row int8 of `weight` [V, K] (fp32 or bf16), norms computed in fp64 (and
    rounded up by SAFETY, so that their fp32 copies still bound)."""
    w = weight.detach().double()  # (V, K)
    scales = (w.abs().amax(1) / 127).clamp_min(1e-30).to(torch.bfloat16)  # (V,)
    s = scales.double()[:, None]
    q = torch.round(w / s).clamp(-128, 127)
    deq = q * s  # (V, K): what the kernel multiplies by, exactly
    norms = w.norm(dim=1)
    streamed = huge_pages.empty(tuple(q.shape), torch.int8)  # read whole every step: `huge_pages`
    streamed.copy_(q)
    return Int8Head(
        q=streamed,
        scales=scales,
        slack=(SAFETY * ((w - deq).norm(dim=1) + gamma(w.shape[1]) * norms)).float(),
        qnorms=(SAFETY * deq.norm(dim=1)).float(),
        norms=norms.float(),
    )


def int8_head(weight: torch.Tensor, rows: int | None = None) -> Int8Head:
    """The cached int8 copy of `weight[:rows]` (the real vocabulary; default all rows), remade
    when the weight changed (pointer or version)."""
    rows = weight.shape[0] if rows is None else rows
    return _CACHE.get(weight, ("int8", rows), lambda w: quantize(w[:rows]))


def forget(weights) -> None:
    """Drop the int8 copies of `weights`."""
    for w in weights:
        _CACHE.drop(w)


def wants_int8(weight: torch.Tensor, head: str) -> bool:
    """Whether `head` (or `EE_GREEDY_HEAD` when 'auto') asks for the int8 head on `weight`."""
    if head == "auto":
        head = check_head(os.environ.get(ENV, "auto"), ENV)
    if head == "full" or not available() or weight.device.type != "cpu" or weight.dtype not in _DTYPES:
        return False
    # auto: fp32 heads only. A bf16 reference rounds its logits to bf16, so near-ties within that
    # rounding (common) fall back to the full product: 0.26-0.62x the bf16 head's speed on SmolLM2.
    return head == "int8" or (weight.numel() >= MIN_ELEMENTS and weight.dtype == torch.float32)


def error_bound(h: torch.Tensor, approx: torch.Tensor, head: Int8Head) -> torch.Tensor:
    """A bound [A, V] on |z^_i - z~_i| for each row of h [A, K] and vocabulary row i (see the
    module docstring); `approx` [A, V] is z~ in fp32. inf/nan where the inputs are not finite."""
    hd = h.double()
    hb = hd.to(torch.bfloat16).double()  # h~, exactly as the kernel reads it
    nh, ndh, nht = hd.norm(dim=1), (hd - hb).norm(dim=1), hb.norm(dim=1)  # (A,)
    biggest = approx.abs().amax(1).double()  # (A,)
    out = SAFETY * U_BF16 / (1 - U_BF16) * biggest  # the kernel's bf16 output rounding
    if h.dtype == torch.bfloat16:  # the reference's own output is rounded to bf16 too
        out = out * (1 + U_BF16) + SAFETY * U_BF16 * biggest
    bf16_ref = 1 + U_BF16 if h.dtype == torch.bfloat16 else 1.0
    per_h = (nh * bf16_ref).float()[:, None], ((ndh + 2 * gamma(h.shape[-1]) * nht) * bf16_ref).float()[:, None]
    bound = head.slack * per_h[0] + head.qnorms * per_h[1]  # (A, V)
    return bound.add_(out.float()[:, None])


def certified_argmax(h: torch.Tensor, weight: torch.Tensor, head: Int8Head, full) -> tuple[torch.Tensor, torch.Tensor]:
    """h [A, K] (the model's dtype) -> (tokens [A], logits [A, V] fp32) where tokens equal
    `argmax(F.linear(h, weight))` exactly and logits are z~ with the candidates' exact values
    (each row computed in full where it could not be certified). `weight` [V, K] is the head
    `head` was made from; `full(h) -> [A, V]`: fp32 logits as the plain path makes them (used
    only where a row could not be certified)."""
    approx = torch._weight_int8pack_mm(h.to(torch.bfloat16).contiguous(), head.q, head.scales).float()  # (A, V)
    bound = error_bound(h, approx, head)  # (A, V)
    floor = (approx - bound).amax(1, keepdim=True)  # (A, 1): the best lower bound
    keep = (approx + bound >= floor).any(0)  # (V,): rows whose upper bound reaches it, in any row of h
    cols = keep.nonzero().squeeze(1)  # (U,) candidates
    if not bool(floor.isfinite().all()) or not 0 < len(cols) <= len(keep) // 4:
        logits = full(h)  # non-finite values, or a bound too loose to pay: the full product
        return logits.argmax(1), logits
    exact = F.linear(h, weight.index_select(0, cols)).float()  # (A, U)
    best = exact.argmax(1)  # (A,): the lowest index among equal maxima, as torch.argmax
    ok = certified(exact, best, band(h, exact, head.norms[cols]))
    tokens = cols[best]
    approx[:, cols] = exact
    bad = (~ok).nonzero().squeeze(1)
    if len(bad):  # a near-tie within round-off, or non-finite values: the full product decides
        logits = full(h)[bad]  # (B, V): every row, as the plain path computes them (its rounding)
        tokens[bad], approx[bad] = logits.argmax(1), logits
    return tokens, approx


def band(h: torch.Tensor, exact: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """How far each candidate's logit [A, U] as computed here can be from the reference's:
    both are fp32 sums within gamma ||w|| ||h|| of the exact value (+ bf16 output rounding)."""
    nh = h.double().norm(dim=1).float()[:, None]  # (A, 1)
    width = 2.02 * gamma(h.shape[-1]) * norms[None, :] * nh  # (A, U)
    if h.dtype == torch.bfloat16:
        width = width + 2.02 * U_BF16 * exact.abs()
    return width


def certified(exact: torch.Tensor, best: torch.Tensor, width: torch.Tensor) -> torch.Tensor:
    """[A] bool: whether candidate `best` of each row beats every other one by more than both
    rounding bands, so that every fp32 kernel's argmax is it."""
    rows = torch.arange(exact.shape[0])
    low = exact[rows, best] - width[rows, best]  # (A,)
    high = (exact + width).index_put((rows, best), torch.tensor(-math.inf))  # (A, U)
    return (low > high.amax(1)) & low.isfinite()

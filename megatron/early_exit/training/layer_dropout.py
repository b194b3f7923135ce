"""LayerSkip's layer dropout (arXiv 2404.16710, section 4.1): which layers a micro-batch skips.

Layer l (0-based) of L is skipped with probability

    p(l, t) = P * C(t) * (e^{l ln 2 / (L - 1)} - 1)

the paper's exponential depth scale (0 for the first layer, 1 for the last, so the last layer
gets exactly P = `--layer-dropout-max`), times a curriculum C(t) over iterations: 1 (`none`)
or min(1, t / W) (`linear`, W = `--layer-dropout-warmup-iters`). A skipped layer is the
identity on the residual stream.

**Per micro-batch, not per sample.** LayerSkip drops a layer for some samples of a batch and
not others. Here one decision covers a whole micro-batch: a skipped layer is then simply not
run (it costs nothing), and the decision needs no per-sample masks that tensor or sequence
parallelism would have to shard. Across the micro-batches of a global batch the layers still
see a mix of dropped and kept inputs.

**Layout invariance.** Each decision draws from a generator of its own, seeded from
(seed, iteration, global micro-batch, layer): never the global RNG, so a rate of 0 draws
nothing and training is bit-identical to a run without the flag, and every parallel layout
(each pipeline stage decides for its own layers; tensor-parallel ranks decide alike) drops
the same layers of the same micro-batches. The global micro-batch index is the one the
single process would use: data-parallel rank r's k-th micro-batch is k * dp + r (the data
loader hands rank r the r-th slice of each block of dp micro-batches).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LayerDropout:
    max_rate: float  # P: the last layer's rate once the curriculum is done
    num_layers: int  # L: the whole model's layers, whatever this stage holds
    seed: int
    curriculum: str = "none"  # or "linear"
    warmup_iters: int = 0

    def depth_scale(self, layer: int) -> float:
        """LayerSkip's e^{l ln 2 / (L-1)} - 1: 0 at the first layer, 1 at the last."""
        if self.num_layers == 1:
            return 1.0
        return math.exp(layer * math.log(2.0) / (self.num_layers - 1)) - 1.0

    def curriculum_scale(self, iteration: int) -> float:
        if self.curriculum == "linear" and self.warmup_iters > 0:
            return min(1.0, iteration / self.warmup_iters)
        return 1.0

    def rate(self, layer: int, iteration: int) -> float:
        """Probability that 0-based `layer` is skipped at `iteration` (0-based count of updates)."""
        return self.max_rate * self.curriculum_scale(iteration) * self.depth_scale(layer)

    def skipped(self, iteration: int, micro_batch: int, layers) -> frozenset[int]:
        """The 0-based layers among `layers` that global micro-batch `micro_batch` skips."""
        out = set()
        for layer in layers:
            p = self.rate(layer, iteration)
            if p > 0.0 and _uniform(self.seed, iteration, micro_batch, layer) < p:
                out.add(layer)
        return frozenset(out)


def _uniform(seed: int, iteration: int, micro_batch: int, layer: int) -> float:
    """A uniform draw in [0, 1) from its own generator, a function of its four keys alone."""
    digest = hashlib.sha256(f"layer-dropout:{seed}:{iteration}:{micro_batch}:{layer}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return float(torch.rand((), generator=gen))


def fill_missing_grads(model: torch.nn.Module) -> None:
    """Zero gradients for trainable parameters that got none (a layer that every micro-batch of
    this rank skipped), so data-parallel all-reduces see the same tensors on every rank and the
    optimizer treats the parameter the same whatever the layout."""
    for p in model.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)

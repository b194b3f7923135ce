"""Token choice and confidence measures over one row of logits per sequence."""

from __future__ import annotations

import math

import torch

MEASURES = ("max_prob", "top2_margin", "entropy", "learned")


def confidence(logits: torch.Tensor, measure: str) -> torch.Tensor:
    """logits [A, V] -> confidence in [0, 1] per row (higher = surer).

    max_prob: the top token's probability; top2_margin: p1 - p2; entropy: 1 - H / log V.
    """
    probs = torch.softmax(logits.float(), dim=-1)
    if measure == "max_prob":
        return probs.max(-1).values
    if measure == "top2_margin":
        top = probs.topk(2, dim=-1).values
        return top[:, 0] - top[:, 1]
    if measure == "entropy":
        ent = -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1)
        return 1.0 - ent / math.log(probs.shape[-1])
    raise ValueError(f"unknown confidence measure {measure!r}; choose from {', '.join(MEASURES)}")


def choose(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator) -> torch.Tensor:
    """logits [A, V] -> token ids [A]: greedy at temperature 0, else top-k / top-p sampling."""
    if temperature <= 0:
        return logits.argmax(-1)
    scores = logits.float() / temperature
    if top_k and top_k > 0:
        kth = scores.topk(min(top_k, scores.shape[-1]), dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if 0 < top_p < 1:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        cum = torch.softmax(sorted_scores, -1).cumsum(-1)
        drop = cum - torch.softmax(sorted_scores, -1) > top_p  # keep the smallest prefix reaching top_p
        sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
        scores = torch.full_like(scores, float("-inf")).scatter(-1, order, sorted_scores)
    probs = torch.softmax(scores, -1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)

"""Choosing the next token from one row of logits per sequence."""

from __future__ import annotations

import torch


def make_generator(seed: int | None) -> torch.Generator | None:
    """A CPU generator: sampling draws on the CPU, so a seed gives the same tokens on any device."""
    return torch.Generator().manual_seed(int(seed)) if seed is not None else None


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """logits [A, V] -> scores [A, V] in fp32 with the excluded tokens at -inf.

    top_k keeps the k largest; top_p keeps the smallest set of most likely tokens whose
    probability reaches p (always at least the top token).
    """
    scores = logits.float() / temperature
    if top_k > 0 and top_k < scores.shape[-1]:
        kth = scores.topk(top_k, dim=-1).values[:, -1:]  # (A, 1)
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if 0.0 < top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        probs = torch.softmax(sorted_scores, dim=-1)
        before = probs.cumsum(-1) - probs  # mass of the strictly more likely tokens
        sorted_scores = sorted_scores.masked_fill(before >= top_p, float("-inf"))
        scores = torch.full_like(scores, float("-inf")).scatter(-1, order, sorted_scores)
    return scores


def choose(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """logits [A, V] -> token ids [A]: greedy at temperature 0, else top-k / top-p sampling."""
    if temperature <= 0.0:
        return logits.argmax(-1)
    probs = torch.softmax(filter_logits(logits, temperature, top_k, top_p), dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)

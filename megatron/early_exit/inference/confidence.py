"""Confidence measures: how sure an exit is of its token, mapped to [0, 1] (higher = surer).

A token leaves at an exit when its confidence reaches the threshold, so 0.0 always exits and
1.0 never does (the engine does not even evaluate the exits then).

- max_prob: the top token's probability (EE-LLM's default).
- top2_margin: p1 - p2, the gap between the two most likely tokens.
- entropy: 1 - H(p) / log V: 1 for a one-hot distribution, 0 for the uniform one.
- learned: sigmoid of the exit's confidence probe (a linear layer on the exit's hidden
  state trained to predict "this exit's token equals the final head's"). It needs no
  vocabulary projection, which is what makes an exit that does not fire nearly free.
"""

from __future__ import annotations

import math

import torch

MEASURES = ("max_prob", "top2_margin", "entropy", "learned")


def from_logits(logits: torch.Tensor, measure: str) -> torch.Tensor:
    """logits [A, V] -> confidence [A] in fp32 for the measures computed from a distribution."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    if measure in ("max_prob", "learned"):  # "learned" reports max_prob where logits exist anyway
        return logp.max(-1).values.exp()
    if measure == "top2_margin":
        if logp.shape[-1] < 2:
            return torch.ones(logp.shape[0], device=logp.device)
        top = logp.topk(2, dim=-1).values.exp()
        return top[:, 0] - top[:, 1]
    if measure == "entropy":
        ent = -(logp.exp() * logp).sum(-1)
        return (1.0 - ent / math.log(max(logp.shape[-1], 2))).clamp(0.0, 1.0)
    raise ValueError(f"unknown confidence measure {measure!r}; choose from {', '.join(MEASURES)}")


def learned(head, exit_hidden: torch.Tensor) -> torch.Tensor:
    """The exit's probe: exit hidden [A, 1, h] -> P(exit agrees with the final head) [A] in fp32."""
    return torch.sigmoid(head.confidence_logit(exit_hidden)[:, 0].float())

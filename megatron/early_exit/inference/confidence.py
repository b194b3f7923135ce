"""Confidence measures: how sure an exit is of its token, mapped to [0, 1] (higher = surer).

A token leaves at an exit when its confidence reaches the threshold, so 0.0 always exits and
1.0 never does (the engine does not even evaluate the exits then).

Every measure is one `Measure` in the `MEASURES` registry; the CLI choices, the API schemas
and the sweep read the names from it. A measure either reads the exit's logits
(`needs_vocab=True`: the vocabulary projection runs for every candidate) or the exit's hidden
state alone (`needs_vocab=False`: the projection runs only for the tokens that leave, which is
what makes an exit that does not fire nearly free).

- max_prob: the top token's probability (EE-LLM's default).
- top2_margin: p1 - p2, the gap between the two most likely tokens.
- entropy: 1 - H(p) / log V: 1 for a one-hot distribution, 0 for the uniform one.
- learned: sigmoid of the exit's confidence probe (a linear layer on the exit's hidden
  state, or on the backbone's through the probe's own norm with `exit_confidence_input=
  "backbone"`, trained to predict "this exit's token equals the final head's"); needs probes.
  Where the probe reads a norm of the backbone row (the backbone through the probe's norm, or
  an exit that is only a norm), decoding runs it fused (`fused_check.py`): the norm folded into
  the probe, the logit compared with logit(threshold); a check that does not fire costs one
  product and one per-row reduction.

A new measure is one `register_measure(Measure(...))` call in any imported module (for the
command-line tools: `--plugin MODULE`).

Shape legend: A candidate rows, V vocabulary, h hidden.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Measure:
    """One confidence measure. `from_logits`: logits [A, V] -> confidence [A] (fp32), required
    when `needs_vocab`; `from_hidden`: (exit head, exit hidden [A, 1, h]) -> confidence [A],
    required otherwise. `needs_probe`: the exits must carry confidence probes. `from_backbone`:
    (exit head, backbone row at the exit's depth [A, 1, h]) -> confidence [A], used instead of
    `from_hidden` for exits whose probe reads the backbone (`head.probe_reads_backbone`), so
    the exit's own layers run only for the rows that fire. `probe_logit`: the confidence is
    sigmoid(the exit probe's logit) of the probe's input, so decoding may compute that logit
    with the fused check (`fused_check.py`) and compare it with logit(threshold) instead."""

    name: str
    needs_vocab: bool = True
    from_logits: Callable[[torch.Tensor], torch.Tensor] | None = None
    from_hidden: Callable[[object, torch.Tensor], torch.Tensor] | None = None
    needs_probe: bool = False
    from_backbone: Callable[[object, torch.Tensor], torch.Tensor] | None = None
    probe_logit: bool = False


MEASURES: dict[str, Measure] = {}


def register_measure(measure: Measure) -> Measure:
    """Add (or replace) a measure under its name; returns it."""
    if measure.needs_vocab and measure.from_logits is None:
        raise ValueError(f"measure {measure.name!r}: needs_vocab=True needs from_logits")
    if not measure.needs_vocab and measure.from_hidden is None:
        raise ValueError(f"measure {measure.name!r}: needs_vocab=False needs from_hidden")
    MEASURES[measure.name] = measure
    return measure


def measure_names() -> tuple[str, ...]:
    """Every registered measure's name, in registration order."""
    return tuple(MEASURES)


def get_measure(name: str) -> Measure:
    if name not in MEASURES:
        raise ValueError(f"measure must be one of {', '.join(MEASURES)}, got {name!r}")
    return MEASURES[name]


def max_prob(logits: torch.Tensor) -> torch.Tensor:
    """logits [A, V] -> the top token's probability [A] in fp32."""
    return torch.log_softmax(logits.float(), dim=-1).max(-1).values.exp()


def top2_margin(logits: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits.float(), dim=-1)
    if logp.shape[-1] < 2:
        return torch.ones(logp.shape[0], device=logp.device)
    top = logp.topk(2, dim=-1).values.exp()
    return top[:, 0] - top[:, 1]


def entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits.float(), dim=-1)
    ent = -(logp.exp() * logp).sum(-1)
    return (1.0 - ent / math.log(max(logp.shape[-1], 2))).clamp(0.0, 1.0)


def learned(head, exit_hidden: torch.Tensor) -> torch.Tensor:
    """The exit's probe: exit hidden [A, 1, h] -> P(exit agrees with the final head) [A] in fp32
    (exits whose probe reads the exit's hidden state, `exit_confidence_input="exit"`)."""
    return torch.sigmoid(head.confidence_logit(exit_hidden)[:, 0].float())


def learned_from_backbone(head, backbone: torch.Tensor) -> torch.Tensor:
    """The exit's probe on the backbone row [A, 1, h] at its depth, through the probe's own norm
    (`exit_confidence_input="backbone"`) -> P(exit agrees with the final head) [A] in fp32."""
    return torch.sigmoid(head.confidence_logit(head.probe_input(backbone))[:, 0].float())


register_measure(Measure("max_prob", from_logits=max_prob))
register_measure(Measure("top2_margin", from_logits=top2_margin))
register_measure(Measure("entropy", from_logits=entropy))
register_measure(
    Measure(
        "learned",
        needs_vocab=False,
        from_hidden=learned,
        needs_probe=True,
        from_backbone=learned_from_backbone,
        probe_logit=True,
    )
)

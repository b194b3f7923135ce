"""Exit heads: small output heads on intermediate layers (EE-LLM, EE-Tuning).

An exit reads the hidden state after its layer (before it with `pre_exit`) and computes

    h -> [transformer block] -> [h + MLP(norm_mlp(h))] -> [norm] -> h @ W^T / temperature

Each bracket is optional (`--use-exit-block`, `--use-exit-mlp`, `--use-exit-norm`). The
norm comes last, right before the projection, exactly where the final head has its final
norm; so a norm-only exit copied from the final norm and placed after the last layer *is*
the final head, and an MLP exit copied from its layer's own MLP starts as "one more MLP
sub-block" of the backbone. W is the word embedding (tied, default) or the exit's own
`output_layer` (`--untie-exit-output-weights`).

An optional confidence head (a probe trained to predict whether the exit's top token equals
the final head's: a linear one, or with `exit_confidence_hidden_size` k > 0 the MLP
Linear(h, k) -> GELU -> Linear(k, 1)) lets decoding decide to exit without computing the
vocabulary projection at all. It reads the exit's hidden state, or (`exit_confidence_input="backbone"`)
the backbone's hidden state through its own norm, so that a check that does not fire skips
the exit's MLP too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron.early_exit.config import ModelConfig
from megatron.early_exit.model.layer import TransformerLayer
from megatron.early_exit.model.mlp import MLP
from megatron.early_exit.model.norm import build_norm


class ConfidenceMLP(nn.Module):
    """The MLP probe: Linear(h, k) -> GELU -> Linear(k, 1). GELU (exact), not the model's
    SwiGLU: the probe is one small map to a logit, and a gated first layer would double its
    cost (whether it ranks better was not measured). Replicated under tensor parallelism, like
    the linear probe."""

    def __init__(self, hidden_size: int, probe_hidden_size: int) -> None:
        super().__init__()
        self.fc_in = nn.Linear(hidden_size, probe_hidden_size)
        self.fc_out = nn.Linear(probe_hidden_size, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc_out(F.gelu(self.fc_in(h)))  # [..., h] -> [..., k] -> [..., 1]


PROBE_MODULES = ("confidence", "confidence_norm")


def is_probe_parameter(name: str) -> bool:
    """Whether a model parameter's name ("exits.<layer>.<module>...") is a confidence probe's (the
    probe and the norm it reads the backbone through): what `--tune-exit-confidence-only` trains."""
    parts = name.split(".")
    return len(parts) > 2 and parts[0] == "exits" and parts[2] in PROBE_MODULES


def build_probe(config: ModelConfig) -> nn.Module | None:
    """The exit's confidence probe: None, a Linear(h, 1), or a ConfidenceMLP."""
    if not config.use_exit_confidence_head:
        return None
    if config.exit_confidence_hidden_size:
        return ConfidenceMLP(config.hidden_size, config.exit_confidence_hidden_size)
    return nn.Linear(config.hidden_size, 1)


class ExitHead(nn.Module):
    """One exit: `hidden` (norm / MLP / block) then `project` (the vocabulary projection); no
    `forward`, since callers decide whether and for which rows the projection runs."""

    def __init__(self, config: ModelConfig, layer_number: int) -> None:
        super().__init__()
        self.layer_number = layer_number
        self.temperature = config.exit_temperature(layer_number)
        eps = config.norm_epsilon
        self.block = TransformerLayer(config) if config.use_exit_block else None
        if config.use_exit_mlp:
            self.mlp_norm = build_norm(config.normalization, config.hidden_size, eps)
            self.mlp = MLP(config)
        else:
            self.mlp_norm = self.mlp = None
        self.norm = build_norm(config.normalization, config.hidden_size, eps) if config.use_exit_norm else None
        self.output_layer = (
            nn.Linear(config.hidden_size, config.vocab_size, bias=False) if config.untie_exit_output_weights else None
        )
        self.confidence = build_probe(config)
        self.probe_reads_backbone = config.use_exit_confidence_head and config.exit_confidence_input == "backbone"
        reads_backbone = self.probe_reads_backbone
        self.confidence_norm = build_norm(config.normalization, config.hidden_size, eps) if reads_backbone else None

    def hidden(
        self,
        h: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        attn_mask: torch.Tensor | None = None,
        kv_cache=None,
    ) -> torch.Tensor:
        """The exit's hidden state [b, s, h], right before the vocabulary projection."""
        if self.block is not None:
            h = self.block(h, rotary, attn_mask, kv_cache)
        if self.mlp is not None:
            h = h + self.mlp(self.mlp_norm(h))
        if self.norm is not None:
            h = self.norm(h)
        return h

    def project(self, h: torch.Tensor, tied_weight: torch.Tensor | None, ops=None) -> torch.Tensor:
        """Exit hidden [b, s, h] -> logits [b, s, vocab], temperature applied.

        `ops` is the model's HeadOps (vocab-parallel under TP); None means a plain matmul.
        """
        return self.project_onto(h, self.output_weight(tied_weight), ops)

    def output_weight(self, tied_weight: torch.Tensor | None) -> torch.Tensor:
        """The projection's weight [vocab, h]: the exit's own (untied) or the tied one."""
        weight = self.output_layer.weight if self.output_layer is not None else tied_weight
        if weight is None:
            raise RuntimeError(f"exit {self.layer_number} is tied but no embedding weight was given")
        return weight

    def project_onto(self, h: torch.Tensor, weight: torch.Tensor, ops=None) -> torch.Tensor:
        """Exit hidden [b, s, h] -> logits [b, s, rows] on `weight`'s rows (the output weight, or
        some of its rows: a draft vocabulary's), temperature applied."""
        logits = ops.project(h, weight) if ops is not None else torch.matmul(h, weight.t())
        if self.temperature != 1.0:
            logits = logits / self.temperature
        return logits

    def confidence_logit(self, h: torch.Tensor) -> torch.Tensor:
        """Exit hidden [b, s, h] -> [b, s] logit of P(exit agrees with the final head)."""
        if self.confidence is None:
            raise RuntimeError(f"exit {self.layer_number} has no confidence head")
        dtype = next(self.confidence.parameters()).dtype
        return self.confidence(h.to(dtype)).squeeze(-1)

    def probe_input(self, backbone: torch.Tensor, exit_hidden: torch.Tensor | None = None) -> torch.Tensor:
        """What the confidence head reads, given the backbone's hidden state [b, s, h] at the
        exit's depth: its own norm of it (`exit_confidence_input="backbone"`), or the exit's
        hidden state (`exit_hidden` where the caller already has it)."""
        if self.probe_reads_backbone:
            return self.confidence_norm(backbone)
        return exit_hidden if exit_hidden is not None else self.hidden(backbone)

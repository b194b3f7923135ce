"""The early-exit GPT: one pipeline stage's slice of the decoder, with the exits it holds.

A single-process model is simply the stage that owns everything (`pre_process`,
`post_process`, all layers). Pipeline stages are the same class with the modules they do
not own absent; layers keep their *global* index as their name (`decoder.layers.7`) so
weights are named the same whatever the layout.

Shape legend: b batch, s sequence, h hidden, V padded vocabulary.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from megatron.early_exit.config import ModelConfig
from megatron.early_exit.model.exits import ExitHead
from megatron.early_exit.model.layer import TransformerLayer
from megatron.early_exit.model.norm import build_norm
from megatron.early_exit.model.rotary import RotaryEmbedding


@dataclass
class ModelOutput:
    """What a forward pass returns.

    Without labels: `logits` [b, s, real V] from the final head and `exit_logits`
    {layer_number: [b, s, real V]} (the tokenizer's vocabulary: padded rows cut off).
    With labels: per-token losses instead (`loss` [b, s] and `exit_losses` {layer: [b, s]}),
    plus each exit's detached max-probability confidence per token in `exit_confidences`
    when asked (dynamic exit-loss weights need it).
    """

    logits: torch.Tensor | None = None
    exit_logits: dict[int, torch.Tensor] = field(default_factory=dict)
    loss: torch.Tensor | None = None
    exit_losses: dict[int, torch.Tensor] = field(default_factory=dict)
    exit_confidences: dict[int, torch.Tensor] = field(default_factory=dict)
    hidden_states: torch.Tensor | None = None  # output of the last layer this stage ran


class Embedding(nn.Module):
    """Word (+ learned position) embeddings. `word_only` builds the copy of the word
    embedding that a later pipeline stage holds for its tied output / exit heads."""

    def __init__(self, config: ModelConfig, word_only: bool = False) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = (
            nn.Embedding(config.max_position_embeddings, config.hidden_size)
            if config.position_embedding_type == "learned_absolute" and not word_only
            else None
        )
        self.dropout = config.hidden_dropout

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        h = self.word_embeddings(input_ids)  # (b, s, h)
        if self.position_embeddings is not None:
            h = h + self.position_embeddings(position_ids)
        return F.dropout(h, self.dropout, self.training)


class Decoder(nn.Module):
    def __init__(self, config: ModelConfig, layer_ids: range, post_process: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleDict({str(i): TransformerLayer(config) for i in layer_ids})
        self.final_layernorm = (
            build_norm(config.normalization, config.hidden_size, config.norm_epsilon) if post_process else None
        )


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy in fp32: logits [b, s, V], labels [b, s] -> [b, s]."""
    b, s, v = logits.shape
    return F.cross_entropy(logits.float().view(-1, v), labels.reshape(-1), reduction="none").view(b, s)


def max_prob(logits: torch.Tensor) -> torch.Tensor:
    """Max softmax probability per token, detached: [b, s, V] -> [b, s]."""
    with torch.no_grad():
        lf = logits.float()
        return torch.exp(lf.max(-1).values - torch.logsumexp(lf, -1))


class HeadOps(nn.Module):
    """The vocabulary-side operations of every head (final and exits), in one place.

    Single device: a plain matmul and cross-entropy. Tensor parallelism replaces this
    module with a vocab-parallel one (logits stay sharded over the vocabulary, the loss is
    computed without gathering them), which is how TP is applied from outside the model.
    """

    def project(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return torch.matmul(h, weight.t())  # (b, s, h) @ (h, V) -> (b, s, V)

    def token_losses(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return token_losses(logits, labels)

    def max_prob(self, logits: torch.Tensor) -> torch.Tensor:
        return max_prob(logits)

    def full_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Whatever `project` returned -> logits over the whole vocabulary."""
        return logits

    def log_softmax(self, logits: torch.Tensor) -> torch.Tensor:
        """Log-probabilities in fp32, in the same (possibly sharded) layout as `logits`."""
        return torch.log_softmax(logits.float(), dim=-1)

    def vocab_sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the (possibly sharded) vocabulary dimension: [b, s, V] -> [b, s]."""
        return x.sum(-1)

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        """Index of the largest logit over the whole vocabulary: [b, s, V] -> [b, s]."""
        return logits.argmax(-1)


class EarlyExitGPT(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        pre_process: bool = True,
        post_process: bool = True,
        layer_range: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.pre_process = pre_process
        self.post_process = post_process
        start, end = layer_range if layer_range is not None else (0, config.num_layers)
        self.layer_ids = range(start, end)
        self.recompute_activations = False

        self.exit_layer_ids = [n for n in config.exit_layer_nums if n - 1 in self.layer_ids]
        tied_exits = bool(self.exit_layer_ids) and not config.untie_exit_output_weights
        tied_output = post_process and not config.untie_embeddings_and_output_weights
        # Stages without the input embedding still hold a copy of the word embedding when a
        # head of theirs is tied to it; the copies are kept equal by summing their gradients
        # over the embedding group (as Megatron does).
        if pre_process:
            self.embedding = Embedding(config)
        elif tied_exits or tied_output:
            self.embedding = Embedding(config, word_only=True)
        else:
            self.embedding = None
        self.rotary = (
            RotaryEmbedding(config.head_dim, config.rotary_base, config.rope_scaling)
            if config.position_embedding_type == "rope"
            else None
        )
        self.decoder = Decoder(config, self.layer_ids, post_process)
        # An exit at layer n (1-based) lives with layer index n-1, whether it reads the
        # layer's output (default) or its input (pre_exit).
        self.exits = nn.ModuleDict({str(n): ExitHead(config, n) for n in self.exit_layer_ids})
        needs_output = post_process and config.untie_embeddings_and_output_weights
        self.output_layer = nn.Linear(config.hidden_size, config.vocab_size, bias=False) if needs_output else None
        self.head_ops = HeadOps()

    # ----- weights -----------------------------------------------------------------------

    @property
    def exit_layer_numbers(self) -> list[int]:
        return sorted(int(k) for k in self.exits)

    def tied_output_weight(self) -> torch.Tensor | None:
        """The word embedding, used as the output projection by tied heads."""
        return self.embedding.word_embeddings.weight if self.embedding is not None else None

    def output_weight(self) -> torch.Tensor:
        if self.output_layer is not None:
            return self.output_layer.weight
        weight = self.tied_output_weight()
        if weight is None:
            raise RuntimeError("tied output layer needs the word embedding on this stage")
        return weight

    def init_weights(self, seed: int) -> None:
        """Initialise every parameter from (seed, its name) alone.

        Each tensor draws from its own generator, so the full model is the same whatever
        the pipeline layout or the order modules were built in (DESIGN.md section 5).
        Megatron's scheme: N(0, std) for weights, N(0, std / sqrt(2 * layers)) for the
        output projections that feed the residual stream, ones for norms, zeros for biases.
        """
        std = self.config.init_method_std
        scaled = std / math.sqrt(2.0 * self.config.num_layers)
        with torch.no_grad():
            for name, param in self.named_parameters():
                param.copy_(init_tensor(name, tuple(param.shape), seed, std, scaled))

    # ----- forward -----------------------------------------------------------------------

    def _run_layer(self, layer, h, rotary):
        if self.recompute_activations and self.training and torch.is_grad_enabled():
            return checkpoint(layer, h, rotary, use_reentrant=False)
        return layer(h, rotary)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        hidden_states: torch.Tensor | None = None,
        return_exit_confidences: bool = False,
        compute_final: bool = True,
    ) -> ModelOutput:
        """input_ids [b, s] (first stage) or hidden_states [b, s, h] (later stages).
        compute_final: False skips the final head (`out.hidden_states` is still there)."""
        h, rotary = self.embed_input(input_ids, position_ids, hidden_states)
        h, exit_inputs = self.run_layers(h, rotary)
        out = ModelOutput(hidden_states=h)
        self.evaluate_exits(out, exit_inputs, rotary, labels, return_exit_confidences)
        if self.post_process and compute_final:
            self.final_head(out, h, labels)
        return out

    def embed_input(
        self, input_ids: torch.Tensor | None, position_ids: torch.Tensor | None, hidden_states: torch.Tensor | None
    ) -> tuple[torch.Tensor, tuple | None]:
        """The first layer's input [b, s, h] (embedded ids, or a previous stage's hidden states)
        and the rotary tables for `position_ids` (default 0..s-1)."""
        if self.pre_process:
            b, s = input_ids.shape
            device = input_ids.device
        else:
            b, s = hidden_states.shape[:2]
            device = hidden_states.device
        if position_ids is None:
            position_ids = torch.arange(s, device=device).unsqueeze(0).expand(b, s)
        h = self.embedding(input_ids, position_ids) if self.pre_process else hidden_states
        return h, self.rotary(position_ids) if self.rotary is not None else None

    def run_layers(
        self, h: torch.Tensor, rotary, skip: frozenset[int] = frozenset()
    ) -> tuple[torch.Tensor, list[tuple[int, torch.Tensor]]]:
        """This stage's layers over h; returns their output and [(exit layer, exit input)].
        `skip`: 0-based layers left out, each the identity on h (layer dropout, chosen by the trainer)."""
        exit_inputs = []
        for i in self.layer_ids:
            n = i + 1
            if n in self.exits_by_layer and self.config.pre_exit:
                exit_inputs.append((n, h))
            if i not in skip:
                h = self._run_layer(self.decoder.layers[str(i)], h, rotary)
            if n in self.exits_by_layer and not self.config.pre_exit:
                exit_inputs.append((n, h))
        return h, exit_inputs

    def final_head(self, out: ModelOutput, h: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """The final head on h: `out.logits`, or per-token `out.loss` with labels."""
        logits = self.head_ops.project(self.decoder.final_layernorm(h), self.output_weight())
        if labels is None:
            out.logits = self.visible_logits(logits)
        else:
            out.loss = self.head_ops.token_losses(logits, labels)

    def visible_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits as callers see them: over the whole vocabulary, without the padded rows
        (`config.real_vocab_size`), so a log-softmax over them normalises over real tokens only."""
        full = self.head_ops.full_logits(logits)
        real = self.config.real_vocab_size
        return full[..., :real] if real and real < full.shape[-1] else full

    @property
    def exits_by_layer(self) -> set[int]:
        return set(self.exit_layer_ids)

    def evaluate_exits(self, out: ModelOutput, exit_inputs, rotary, labels=None, want_conf: bool = False) -> None:
        """The exit heads on their inputs [(layer, h)]; fills exit logits, or losses with labels."""
        for n, h in exit_inputs:
            head = self.exits[str(n)]
            logits = head.project(head.hidden(h, rotary), self.tied_output_weight(), self.head_ops)
            if labels is None:
                out.exit_logits[n] = self.visible_logits(logits)
                continue
            out.exit_losses[n] = self.head_ops.token_losses(logits, labels)
            if want_conf:
                out.exit_confidences[n] = self.head_ops.max_prob(logits)


def _stable_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def init_tensor(name: str, shape: tuple[int, ...], seed: int, std: float, scaled_std: float) -> torch.Tensor:
    """The initial value of the parameter called `name` (full, unsharded), on the CPU in fp32."""
    leaf = name.rsplit(".", 1)[-1]
    module = name.rsplit(".", 1)[0].rsplit(".", 1)[-1]  # e.g. "input_layernorm"
    is_norm = "norm" in module
    if leaf == "bias":
        return torch.zeros(shape)
    if is_norm:
        return torch.ones(shape)
    gen = torch.Generator().manual_seed(_stable_seed(seed, name))
    sigma = scaled_std if ("linear_proj" in name or "linear_fc2" in name) else std
    return torch.randn(shape, generator=gen) * sigma

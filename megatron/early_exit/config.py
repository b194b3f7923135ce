"""Typed configuration: the model (with its exits) and training settings.

`arguments.py` turns Megatron-style flags into these dataclasses and validates them in one
place; everything else reads the dataclasses. `ModelConfig` is what travels with a
checkpoint (as JSON), so a saved model can be rebuilt without any flags.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ModelConfig:
    """Shape of a GPT-2 or Llama family decoder plus its exit heads.

    Families differ only in these fields: GPT-2 is LayerNorm + GELU + learned positions +
    biases + tied output; Llama is RMSNorm + SwiGLU + RoPE + no biases (+ GQA, + untied).
    """

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    vocab_size: int  # padded size: rows of the embedding and the output projection
    max_position_embeddings: int
    ffn_hidden_size: int | None = None  # default 4 * hidden
    num_query_groups: int | None = None  # GQA; None means multi-head (groups == heads)
    kv_channels: int | None = None  # head dim; default hidden / heads
    normalization: str = "LayerNorm"  # or "RMSNorm"
    norm_epsilon: float = 1e-5
    swiglu: bool = False  # SwiGLU MLP; otherwise GELU (tanh approximation off)
    position_embedding_type: str = "learned_absolute"  # or "rope"
    rotary_base: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": linear|llama3|yarn|freq_factors, ...}: rotary.py
    add_bias_linear: bool = True
    add_qkv_bias: bool = False  # Qwen2: bias on QKV only (used when add_bias_linear is False)
    qk_layernorm: bool = False  # Qwen3: a norm over the head dim on every query and key head
    untie_embeddings_and_output_weights: bool = False
    init_method_std: float = 0.02
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    real_vocab_size: int | None = None  # tokenizer's size before padding; logits users see have it

    # Exit heads. Layer numbers are 1-based: exit i sits after layer i (before it with pre_exit).
    exit_layer_nums: list[int] = field(default_factory=list)
    pre_exit: bool = False
    use_exit_norm: bool = False
    use_exit_mlp: bool = False
    use_exit_block: bool = False
    untie_exit_output_weights: bool = False
    exit_layer_temperature: list[float] = field(default_factory=list)  # one per exit; 1.0 default
    use_exit_confidence_head: bool = False  # a probe predicting "exit agrees with final"
    # What the probe reads: "exit" = the exit's hidden state (after its MLP/block and norm);
    # "backbone" = the backbone's hidden state at the exit's depth through the probe's own
    # norm, so that an exit that does not fire costs one norm and one dot product.
    exit_confidence_input: str = "exit"
    # The probe's shape: 0 = one Linear(hidden, 1); k > 0 = Linear(hidden, k) -> GELU ->
    # Linear(k, 1), which ranks agreement better (exit 3 of the CPU reference model: AUC 0.671
    # linear, 0.779 with k = 128) for 3-5% of a layer's time at batch 1 in fp32 (~7% in bf16).
    exit_confidence_hidden_size: int = 0

    def __post_init__(self) -> None:
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        if self.kv_channels is None:
            self.kv_channels = self.hidden_size // self.num_attention_heads
        self.exit_layer_nums = [int(x) for x in self.exit_layer_nums]
        if not self.exit_layer_temperature:
            self.exit_layer_temperature = [1.0] * len(self.exit_layer_nums)
        self.exit_layer_temperature = [float(x) for x in self.exit_layer_temperature]

    @property
    def head_dim(self) -> int:
        return int(self.kv_channels)

    @property
    def num_exits(self) -> int:
        return len(self.exit_layer_nums)

    def exit_temperature(self, layer_number: int) -> float:
        return self.exit_layer_temperature[self.exit_layer_nums.index(layer_number)]

    def validate(self) -> None:
        """Raise ValueError naming the offending flag; called by arguments.py and loaders."""
        if self.hidden_size % self.num_attention_heads and self.kv_channels is None:
            raise ValueError("--hidden-size must be divisible by --num-attention-heads")
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"--num-attention-heads ({self.num_attention_heads}) must be divisible by "
                f"--num-query-groups ({self.num_query_groups})"
            )
        if self.normalization not in ("LayerNorm", "RMSNorm"):
            raise ValueError(f"--normalization must be LayerNorm or RMSNorm, got {self.normalization!r}")
        if self.position_embedding_type not in ("learned_absolute", "rope"):
            raise ValueError(
                f"--position-embedding-type must be learned_absolute or rope, got {self.position_embedding_type!r}"
            )
        if self.position_embedding_type == "rope" and self.head_dim % 2:
            raise ValueError("rotary embeddings need an even head dim (--kv-channels)")
        if self.rope_scaling:
            from megatron.early_exit.model.rotary import scaled_inv_freq

            scaled_inv_freq(self.head_dim, self.rotary_base, self.rope_scaling)  # ValueError naming the problem
        seen = set()
        for n in self.exit_layer_nums:
            if not 1 <= n <= self.num_layers:
                raise ValueError(f"--exit-layer-nums: layer {n} is outside 1..{self.num_layers}")
            if n in seen:
                raise ValueError(f"--exit-layer-nums: layer {n} is given twice")
            seen.add(n)
        if self.exit_layer_nums != sorted(self.exit_layer_nums):
            raise ValueError("--exit-layer-nums must be in increasing order")
        if self.exit_confidence_input not in ("exit", "backbone"):
            raise ValueError(f"--exit-confidence-input must be exit or backbone, got {self.exit_confidence_input!r}")
        if not isinstance(self.exit_confidence_hidden_size, int) or self.exit_confidence_hidden_size < 0:
            raise ValueError(
                f"--exit-confidence-hidden-size must be an integer >= 0, got {self.exit_confidence_hidden_size!r}"
            )
        if self.exit_confidence_hidden_size and not self.use_exit_confidence_head:
            raise ValueError("--exit-confidence-hidden-size needs --use-exit-confidence-head")
        if len(self.exit_layer_temperature) != len(self.exit_layer_nums):
            raise ValueError(
                f"--exit-layer-temperature has {len(self.exit_layer_temperature)} values for "
                f"{len(self.exit_layer_nums)} exits"
            )
        if any(t <= 0 for t in self.exit_layer_temperature):
            raise ValueError("--exit-layer-temperature values must be > 0")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**d)


def pad_vocab_size(size: int, divisible_by: int = 128, tensor_parallel_size: int = 1) -> int:
    """Megatron pads the vocabulary so every TP shard of the embedding has equal rows."""
    multiple = divisible_by * tensor_parallel_size
    return int(math.ceil(size / multiple) * multiple)


@dataclass
class ExitLossConfig:
    """How per-exit losses are weighted into the training objective (DESIGN.md section 4)."""

    exit_layer_weight: list[float] = field(default_factory=list)
    exit_layer_weight_init: list[float] = field(default_factory=list)
    exit_layer_weight_warmup_iters: int = 0
    exit_layer_weight_warmup_style: str = "linear"  # or "cosine"
    final_layer_weight: float = 1.0
    use_dynamic_exit_layer_weight: bool = False

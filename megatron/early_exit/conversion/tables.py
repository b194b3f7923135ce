"""Name maps between our parameters and other formats: one table per family, both directions.

A `Rule` ties one of our tensors to one or more of theirs through a reversible op (copy,
transpose, fuse Q/K/V, concatenate gate and up, ...). `to_theirs` runs the rules forwards
(export), `to_ours` backwards (import), so a family is written once (torchtitan's state-dict
adapters are the model). A rule applies when our model, built from the config, has that
tensor: the config alone says whether there is an output layer, a Q/K/V bias or a QK-norm.

The expected shape of every foreign tensor is found by running `to_theirs` on the model
built on the meta device, so import checks names and shapes against the same table.

Adding a family: a table here, a config entry in hf.py (or gguf.py) and a parity test.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from megatron.early_exit.config import ModelConfig
from megatron.early_exit.conversion.common import ConversionError, fuse_qkv, pad_rows, split_qkv


@dataclass(frozen=True)
class Rule:
    """Our tensor `ours` <-> their tensors `theirs` ("{i}": the layer index), through `op`."""

    ours: str
    theirs: tuple[str, ...]
    op: str = "copy"
    vocab: bool = False  # rows are the vocabulary: padded here, the real size there


def R(ours: str, *theirs: str, op: str = "copy", vocab: bool = False) -> Rule:  # noqa: N802 (table shorthand)
    return Rule(ours, tuple(theirs), op, vocab)


# ----------------------------------------------------------------------------------------
# ops: split (ours -> theirs) and join (theirs -> ours), exact inverses


def _dims(c: ModelConfig) -> tuple[int, int, int]:
    return c.num_attention_heads, int(c.num_query_groups), c.head_dim


def permute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's per-head row order: rotate-half halves [x_0..x_{d/2-1} | y_0..] -> pairs [x_0, y_0, x_1, ...]."""
    hd = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, hd // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape).contiguous()


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `permute_qk` (llama.cpp's interleaved pairs -> HF's rotate-half halves)."""
    hd = w.shape[0] // n_heads
    return w.reshape(n_heads, hd // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape).contiguous()


def _split_qkv(w, c):
    return split_qkv(w, *_dims(c))


def _join_qkv(parts, c):
    return fuse_qkv(*parts, *_dims(c))


def _split_qkv_llamacpp(w, c):
    q, k, v = split_qkv(w, *_dims(c))
    return permute_qk(q, c.num_attention_heads), permute_qk(k, int(c.num_query_groups)), v


def _join_qkv_llamacpp(parts, c):
    q, k, v = parts
    return fuse_qkv(unpermute_qk(q, c.num_attention_heads), unpermute_qk(k, int(c.num_query_groups)), v, *_dims(c))


def _split_qkv_stacked(w, c):  # GPT-2's c_attn: one [q; k; v], a Conv1D weight stored [in, out]
    qkv = torch.cat(split_qkv(w, *_dims(c)), dim=0)
    return (qkv.t() if qkv.dim() == 2 else qkv,)


def _join_qkv_stacked(parts, c):
    (w,) = parts
    w = w.t() if w.dim() == 2 else w
    return fuse_qkv(*w.chunk(3, dim=0), *_dims(c))


# name -> (split: ours -> tuple of theirs, join: list of theirs -> ours)
OPS: dict[str, tuple[Callable, Callable]] = {
    "copy": (lambda w, c: (w,), lambda p, c: p[0]),
    "t": (lambda w, c: (w.t(),), lambda p, c: p[0].t()),  # Conv1D keeps [in, out]
    "cat": (lambda w, c: tuple(w.chunk(2, dim=0)), lambda p, c: torch.cat(p, dim=0)),  # SwiGLU gate | up
    "qkv": (_split_qkv, _join_qkv),
    "qkv_llamacpp": (_split_qkv_llamacpp, _join_qkv_llamacpp),
    "qkv_stacked": (_split_qkv_stacked, _join_qkv_stacked),
}


# ----------------------------------------------------------------------------------------
# the tables

_L, _H = "decoder.layers.{i}.", "model.layers.{i}."
HF_LLAMA = (  # Llama, Mistral, Qwen2 (Q/K/V bias), Qwen3 (QK-norm)
    R("embedding.word_embeddings.weight", "model.embed_tokens.weight", vocab=True),
    R(_L + "input_layernorm.weight", _H + "input_layernorm.weight"),
    R(
        _L + "self_attention.linear_qkv.weight",
        *(_H + f"self_attn.{p}_proj.weight" for p in "qkv"),
        op="qkv",
    ),
    R(_L + "self_attention.linear_qkv.bias", *(_H + f"self_attn.{p}_proj.bias" for p in "qkv"), op="qkv"),
    R(_L + "self_attention.q_layernorm.weight", _H + "self_attn.q_norm.weight"),
    R(_L + "self_attention.k_layernorm.weight", _H + "self_attn.k_norm.weight"),
    R(_L + "self_attention.linear_proj.weight", _H + "self_attn.o_proj.weight"),
    R(_L + "pre_mlp_layernorm.weight", _H + "post_attention_layernorm.weight"),
    R(_L + "mlp.linear_fc1.weight", _H + "mlp.gate_proj.weight", _H + "mlp.up_proj.weight", op="cat"),
    R(_L + "mlp.linear_fc2.weight", _H + "mlp.down_proj.weight"),
    R("decoder.final_layernorm.weight", "model.norm.weight"),
    R("output_layer.weight", "lm_head.weight", vocab=True),
)

_G = "transformer.h.{i}."
HF_GPT2 = (
    R("embedding.word_embeddings.weight", "transformer.wte.weight", vocab=True),
    R("embedding.position_embeddings.weight", "transformer.wpe.weight"),
    R(_L + "input_layernorm.weight", _G + "ln_1.weight"),
    R(_L + "input_layernorm.bias", _G + "ln_1.bias"),
    R(_L + "self_attention.linear_qkv.weight", _G + "attn.c_attn.weight", op="qkv_stacked"),
    R(_L + "self_attention.linear_qkv.bias", _G + "attn.c_attn.bias", op="qkv_stacked"),
    R(_L + "self_attention.linear_proj.weight", _G + "attn.c_proj.weight", op="t"),
    R(_L + "self_attention.linear_proj.bias", _G + "attn.c_proj.bias"),
    R(_L + "pre_mlp_layernorm.weight", _G + "ln_2.weight"),
    R(_L + "pre_mlp_layernorm.bias", _G + "ln_2.bias"),
    R(_L + "mlp.linear_fc1.weight", _G + "mlp.c_fc.weight", op="t"),
    R(_L + "mlp.linear_fc1.bias", _G + "mlp.c_fc.bias"),
    R(_L + "mlp.linear_fc2.weight", _G + "mlp.c_proj.weight", op="t"),
    R(_L + "mlp.linear_fc2.bias", _G + "mlp.c_proj.bias"),
    R("decoder.final_layernorm.weight", "transformer.ln_f.weight"),
    R("decoder.final_layernorm.bias", "transformer.ln_f.bias"),
    R("output_layer.weight", "lm_head.weight", vocab=True),
)


def gguf_table(permuted_qk: bool) -> tuple[Rule, ...]:
    """llama.cpp's names (llama, qwen2, qwen3 architectures); Llama files store Q/K permuted."""
    b, qkv = "blk.{i}.", "qkv_llamacpp" if permuted_qk else "qkv"
    return (
        R("embedding.word_embeddings.weight", "token_embd.weight", vocab=True),
        R(_L + "input_layernorm.weight", b + "attn_norm.weight"),
        R(_L + "self_attention.linear_qkv.weight", *(b + f"attn_{p}.weight" for p in "qkv"), op=qkv),
        R(_L + "self_attention.linear_qkv.bias", *(b + f"attn_{p}.bias" for p in "qkv"), op=qkv),
        R(_L + "self_attention.q_layernorm.weight", b + "attn_q_norm.weight"),
        R(_L + "self_attention.k_layernorm.weight", b + "attn_k_norm.weight"),
        R(_L + "self_attention.linear_proj.weight", b + "attn_output.weight"),
        R(_L + "pre_mlp_layernorm.weight", b + "ffn_norm.weight"),
        R(_L + "mlp.linear_fc1.weight", b + "ffn_gate.weight", b + "ffn_up.weight", op="cat"),
        R(_L + "mlp.linear_fc2.weight", b + "ffn_down.weight"),
        R("decoder.final_layernorm.weight", "output_norm.weight"),
        R("output_layer.weight", "output.weight", vocab=True),
    )


# ----------------------------------------------------------------------------------------
# running a table


def expand(table: tuple[Rule, ...], num_layers: int) -> list[Rule]:
    """Per-layer rules ("{i}") repeated for every layer, in table order."""
    out = []
    for rule in table:
        if "{i}" not in rule.ours:
            out.append(rule)
            continue
        for i in range(num_layers):
            out.append(Rule(rule.ours.format(i=i), tuple(t.format(i=i) for t in rule.theirs), rule.op, rule.vocab))
    return out


def to_theirs(table, config: ModelConfig, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our (backbone) weights -> their names, vocabulary rows cut to the real size."""
    real = int(config.real_vocab_size or config.vocab_size)
    out = {}
    for rule in expand(table, config.num_layers):
        if rule.ours not in weights:
            continue
        w = weights[rule.ours][:real] if rule.vocab else weights[rule.ours]
        for name, t in zip(rule.theirs, OPS[rule.op][0](w, config), strict=True):
            out[name] = t.contiguous()
    return out


def their_shapes(table, config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the other format must hold for this config, with its shape (torch order)."""
    from megatron.early_exit.model import EarlyExitGPT

    with torch.device("meta"):
        model = EarlyExitGPT(config)
    backbone = {k: v for k, v in model.state_dict().items() if not k.startswith("exits.")}
    return {k: tuple(v.shape) for k, v in to_theirs(table, config, backbone).items()}


def to_ours(table, config: ModelConfig, take: Callable[[str, tuple[int, ...]], torch.Tensor]) -> dict:
    """Their tensors (read by `take(name, shape)`, which checks the shape) -> our weights,
    vocabulary rows padded to `config.vocab_size`."""
    shapes = their_shapes(table, config)
    out = {}
    for rule in expand(table, config.num_layers):
        if rule.theirs[0] not in shapes:
            continue
        parts = [take(name, shapes[name]) for name in rule.theirs]
        w = OPS[rule.op][1](parts, config)
        out[rule.ours] = pad_rows(w, config.vocab_size) if rule.vocab else w.contiguous()
    return out


def check_table_covers(table, config: ModelConfig) -> None:
    """An internal check: every backbone tensor of the model has a rule (else export would drop it)."""
    from megatron.early_exit.model import EarlyExitGPT

    with torch.device("meta"):
        names = {k for k in EarlyExitGPT(config).state_dict() if not k.startswith("exits.")}
    covered = {r.ours for r in expand(table, config.num_layers)}
    if names - covered:
        raise ConversionError(f"no conversion rule for {sorted(names - covered)[:5]}")

"""Hugging Face checkpoints <-> our model.

Import: a directory with `config.json` and weights (`model.safetensors`, sharded
safetensors with an index, or `pytorch_model.bin` read with `weights_only=True`) of a
Llama, Mistral or Qwen2 model (RMSNorm, SwiGLU, RoPE, GQA; Qwen2 has a bias on Q/K/V
only) or a GPT-2 model (LayerNorm, tanh-GELU, learned positions, biases; its Conv1D
weights are stored [in, out], so they are transposed). The tokenizer comes from
`tokenizer.json`, or `vocab.json` + `merges.txt` (GPT-2), or `tokenizer.model`.

Export: the inverse, loadable by `transformers` as LlamaForCausalLM (Qwen2ForCausalLM when
the model has Q/K/V biases, GPT2LMHeadModel for GPT-2 style models), with the vocabulary
unpadded. Exit heads (which no HF class knows about) go beside it in
`early_exit_heads.safetensors`, and our full `ModelConfig` in `early_exit_config.json`, so
importing our own export restores the exits bit for bit.
"""

from __future__ import annotations

import json
import os
import warnings

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from megatron.early_exit.config import ModelConfig
from megatron.early_exit.conversion.common import (
    ConversionError,
    build_model,
    fuse_qkv,
    is_vocab_tensor,
    model_weights,
    pad_rows,
    padded_vocab,
    split_qkv,
)

EXIT_HEADS_FILE = "early_exit_heads.safetensors"
EXIT_CONFIG_FILE = "early_exit_config.json"
PADDING_PREFIX = "vocab_padding."
LLAMA_TYPES = ("llama", "mistral", "qwen2")
GPT2_GELUS = ("gelu_new", "gelu_pytorch_tanh")
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")

# ----------------------------------------------------------------------------------------
# reading HF files


def read_hf_config(path: str) -> dict:
    if not os.path.isdir(path):
        raise ConversionError(f"--load-dir: no such directory: {path}")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise ConversionError(f"--load-dir: {path} has no config.json (not a Hugging Face model directory)")
    try:
        with open(cfg_path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConversionError(f"--load-dir: cannot read {cfg_path}: {e}") from None


def _load_safetensors(path: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ConversionError(f"--load-dir: cannot read weights {path}: {e}") from None


def _load_bin(path: str) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors come in many classes; name the file
        raise ConversionError(f"--load-dir: cannot read weights {path}: {e}") from None
    if not isinstance(state, dict):
        raise ConversionError(f"--load-dir: {path} does not hold a state dict")
    return state


def _load_sharded(path: str, index_name: str, loader) -> dict[str, torch.Tensor]:
    index_path = os.path.join(path, index_name)
    try:
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError) as e:
        raise ConversionError(f"--load-dir: cannot read {index_path}: {e}") from None
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = os.path.join(path, shard)
        if not os.path.isfile(shard_path):
            raise ConversionError(f"--load-dir: {index_path} names {shard}, which does not exist")
        state.update(loader(shard_path))
    return state


def read_hf_state_dict(path: str) -> dict[str, torch.Tensor]:
    """All weights of an HF model directory, whatever file layout it uses."""
    candidates = (
        ("model.safetensors", _load_safetensors),
        ("model.safetensors.index.json", None),
        ("pytorch_model.bin", _load_bin),
        ("pytorch_model.bin.index.json", None),
    )
    for name, loader in candidates:
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            continue
        if loader is not None:
            return loader(file)
        shard_loader = _load_safetensors if name.startswith("model.safetensors") else _load_bin
        return _load_sharded(path, name, shard_loader)
    raise ConversionError(f"--load-dir: {path} has no model.safetensors or pytorch_model.bin weights")


def load_hf_tokenizer(path: str):
    """Our tokenizer for an HF directory, or None when it ships none."""
    from megatron.early_exit.tokenizer import build_tokenizer

    if os.path.isfile(os.path.join(path, "tokenizer.json")):
        return build_tokenizer("HuggingFaceTokenizer", tokenizer_model=path)
    vocab, merges = os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt")
    if os.path.isfile(vocab) and os.path.isfile(merges):
        return build_tokenizer("GPT2BPETokenizer", vocab_file=vocab, merge_file=merges)
    sp = os.path.join(path, "tokenizer.model")
    if os.path.isfile(sp):
        return build_tokenizer("SentencePieceTokenizer", tokenizer_model=sp)
    return None


# ----------------------------------------------------------------------------------------
# HF -> ours


class _Tensors:
    """Takes tensors out of an HF state dict by name, with errors that name the file."""

    def __init__(self, state: dict[str, torch.Tensor], source: str) -> None:
        self.state = dict(state)
        self.source = source

    def take(self, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        if name not in self.state:
            raise ConversionError(f"{self.source}: missing tensor {name}")
        t = self.state.pop(name)
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise ConversionError(f"{self.source}: {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
        return t

    def drop(self, name: str) -> None:
        self.state.pop(name, None)

    def check_consumed(self) -> None:
        left = sorted(k for k in self.state if not k.endswith(IGNORED_SUFFIXES))
        if left:
            more = f" and {len(left) - 5} more" if len(left) > 5 else ""
            raise ConversionError(
                f"{self.source}: unexpected tensors {left[:5]}{more} (an architecture variant we do not support)"
            )


def _model_type(hf: dict, source: str) -> str:
    kind = hf.get("model_type")
    if kind is None:
        archs = hf.get("architectures") or []
        kind = archs[0].lower().replace("forcausallm", "").replace("lmheadmodel", "") if archs else None
    if kind not in LLAMA_TYPES + ("gpt2",):
        raise ConversionError(
            f"{source}: unsupported architecture {kind!r} (supported: {', '.join(LLAMA_TYPES + ('gpt2',))})"
        )
    return kind


def _rope_settings(hf: dict, source: str) -> tuple[float, dict | None]:
    params = hf.get("rope_parameters") or {}
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    scaling = hf.get("rope_scaling") or ({k: v for k, v in params.items() if k != "rope_theta"} or None)
    if not scaling:
        return theta, None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind == "linear":
        return theta, {"rope_type": "linear", "factor": float(scaling["factor"])}
    if kind == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        missing = [k for k in keys if k not in scaling]
        if missing:
            raise ConversionError(f"{source}: llama3 rope_scaling lacks {missing}")
        return theta, {"rope_type": "llama3", **{k: scaling[k] for k in keys}}
    raise ConversionError(f"{source}: unsupported rope scaling type {kind!r} (supported: linear, llama3)")


def _llama_config(hf: dict, kind: str, source: str) -> ModelConfig:
    if hf.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"{source}: unsupported hidden_act {hf.get('hidden_act')!r} (expected silu)")
    if hf.get("mlp_bias"):
        raise ConversionError(f"{source}: mlp_bias=true is not supported")
    if kind != "qwen2" and hf.get("attention_bias"):
        raise ConversionError(f"{source}: attention_bias=true (bias on every projection) is not supported")
    if float(hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ConversionError(f"{source}: partial_rotary_factor != 1 is not supported")
    if kind == "qwen2" and hf.get("use_sliding_window"):
        warnings.warn(
            f"{source}: sliding-window attention is ignored (exact for sequences up to the window)", stacklevel=3
        )
    if kind == "mistral" and hf.get("sliding_window"):
        warnings.warn(
            f"{source}: Mistral sliding window {hf['sliding_window']} is ignored (exact up to the window)",
            stacklevel=3,
        )
    try:
        nh = int(hf["num_attention_heads"])
        hidden = int(hf["hidden_size"])
        theta, scaling = _rope_settings(hf, source)
        real_vocab = int(hf["vocab_size"])
        return ModelConfig(
            num_layers=int(hf["num_hidden_layers"]),
            hidden_size=hidden,
            num_attention_heads=nh,
            vocab_size=padded_vocab(real_vocab),
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            ffn_hidden_size=int(hf["intermediate_size"]),
            num_query_groups=int(hf.get("num_key_value_heads") or nh),
            kv_channels=int(hf.get("head_dim") or hidden // nh),
            normalization="RMSNorm",
            norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
            swiglu=True,
            position_embedding_type="rope",
            rotary_base=theta,
            rope_scaling=scaling,
            add_bias_linear=False,
            add_qkv_bias=kind == "qwen2",
            untie_embeddings_and_output_weights=not hf.get("tie_word_embeddings", False),
            init_method_std=float(hf.get("initializer_range", 0.02)),
            real_vocab_size=real_vocab,
        )
    except KeyError as e:
        raise ConversionError(f"{source}: config.json lacks {e.args[0]!r}") from None


def _gpt2_config(hf: dict, source: str) -> ModelConfig:
    act = hf.get("activation_function", "gelu_new")
    if act not in GPT2_GELUS:
        raise ConversionError(f"{source}: unsupported activation_function {act!r} (supported: {GPT2_GELUS})")
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("scale_attn_weights") is False:
        raise ConversionError(f"{source}: non-standard GPT-2 attention scaling is not supported")
    try:
        hidden = int(hf["n_embd"])
        real_vocab = int(hf["vocab_size"])
        return ModelConfig(
            num_layers=int(hf["n_layer"]),
            hidden_size=hidden,
            num_attention_heads=int(hf["n_head"]),
            vocab_size=padded_vocab(real_vocab),
            max_position_embeddings=int(hf["n_positions"]),
            ffn_hidden_size=int(hf.get("n_inner") or 4 * hidden),
            normalization="LayerNorm",
            norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-5)),
            swiglu=False,
            position_embedding_type="learned_absolute",
            add_bias_linear=True,
            untie_embeddings_and_output_weights=not hf.get("tie_word_embeddings", True),
            init_method_std=float(hf.get("initializer_range", 0.02)),
            real_vocab_size=real_vocab,
        )
    except KeyError as e:
        raise ConversionError(f"{source}: config.json lacks {e.args[0]!r}") from None


def _llama_weights(c: ModelConfig, t: _Tensors) -> dict[str, torch.Tensor]:
    h, nh, ng, hd, ffn = c.hidden_size, c.num_attention_heads, int(c.num_query_groups), c.head_dim, c.ffn_hidden_size
    real = int(c.real_vocab_size)
    out = {"embedding.word_embeddings.weight": t.take("model.embed_tokens.weight", (real, h))}
    for i in range(c.num_layers):
        src, dst = f"model.layers.{i}.", f"decoder.layers.{i}."
        out[dst + "input_layernorm.weight"] = t.take(src + "input_layernorm.weight", (h,))
        q = t.take(src + "self_attn.q_proj.weight", (nh * hd, h))
        k = t.take(src + "self_attn.k_proj.weight", (ng * hd, h))
        v = t.take(src + "self_attn.v_proj.weight", (ng * hd, h))
        out[dst + "self_attention.linear_qkv.weight"] = fuse_qkv(q, k, v, nh, ng, hd)
        if c.add_qkv_bias:
            qb = t.take(src + "self_attn.q_proj.bias", (nh * hd,))
            kb = t.take(src + "self_attn.k_proj.bias", (ng * hd,))
            vb = t.take(src + "self_attn.v_proj.bias", (ng * hd,))
            out[dst + "self_attention.linear_qkv.bias"] = fuse_qkv(qb, kb, vb, nh, ng, hd)
        out[dst + "self_attention.linear_proj.weight"] = t.take(src + "self_attn.o_proj.weight", (h, nh * hd))
        out[dst + "pre_mlp_layernorm.weight"] = t.take(src + "post_attention_layernorm.weight", (h,))
        gate = t.take(src + "mlp.gate_proj.weight", (ffn, h))
        up = t.take(src + "mlp.up_proj.weight", (ffn, h))
        out[dst + "mlp.linear_fc1.weight"] = torch.cat((gate, up), dim=0)
        out[dst + "mlp.linear_fc2.weight"] = t.take(src + "mlp.down_proj.weight", (h, ffn))
    out["decoder.final_layernorm.weight"] = t.take("model.norm.weight", (h,))
    if c.untie_embeddings_and_output_weights:
        out["output_layer.weight"] = t.take("lm_head.weight", (real, h))
    else:
        t.drop("lm_head.weight")  # some tied checkpoints store the shared matrix twice
    return out


def _gpt2_weights(c: ModelConfig, t: _Tensors) -> dict[str, torch.Tensor]:
    h, nh, hd, ffn = c.hidden_size, c.num_attention_heads, c.head_dim, c.ffn_hidden_size
    real = int(c.real_vocab_size)
    out = {
        "embedding.word_embeddings.weight": t.take("wte.weight", (real, h)),
        "embedding.position_embeddings.weight": t.take("wpe.weight", (c.max_position_embeddings, h)),
    }
    for i in range(c.num_layers):
        src, dst = f"h.{i}.", f"decoder.layers.{i}."
        for ours, theirs in (("input_layernorm", "ln_1"), ("pre_mlp_layernorm", "ln_2")):
            out[f"{dst}{ours}.weight"] = t.take(f"{src}{theirs}.weight", (h,))
            out[f"{dst}{ours}.bias"] = t.take(f"{src}{theirs}.bias", (h,))
        # Conv1D keeps weights as [in, out]: transpose to nn.Linear's [out, in].
        qkv = t.take(src + "attn.c_attn.weight", (h, 3 * nh * hd)).t()
        qkv_b = t.take(src + "attn.c_attn.bias", (3 * nh * hd,))
        out[dst + "self_attention.linear_qkv.weight"] = fuse_qkv(*qkv.chunk(3, dim=0), nh, nh, hd)
        out[dst + "self_attention.linear_qkv.bias"] = fuse_qkv(*qkv_b.chunk(3, dim=0), nh, nh, hd)
        out[dst + "self_attention.linear_proj.weight"] = t.take(src + "attn.c_proj.weight", (nh * hd, h)).t()
        out[dst + "self_attention.linear_proj.bias"] = t.take(src + "attn.c_proj.bias", (h,))
        out[dst + "mlp.linear_fc1.weight"] = t.take(src + "mlp.c_fc.weight", (h, ffn)).t()
        out[dst + "mlp.linear_fc1.bias"] = t.take(src + "mlp.c_fc.bias", (ffn,))
        out[dst + "mlp.linear_fc2.weight"] = t.take(src + "mlp.c_proj.weight", (ffn, h)).t()
        out[dst + "mlp.linear_fc2.bias"] = t.take(src + "mlp.c_proj.bias", (h,))
    out["decoder.final_layernorm.weight"] = t.take("ln_f.weight", (h,))
    out["decoder.final_layernorm.bias"] = t.take("ln_f.bias", (h,))
    if c.untie_embeddings_and_output_weights:
        out["output_layer.weight"] = t.take("lm_head.weight", (real, h))
    else:
        t.drop("lm_head.weight")
    return {k: v.contiguous() for k, v in out.items()}


def _normalise_names(state: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    """One naming per family: LlamaModel saves lack 'model.', GPT2LMHeadModel saves add 'transformer.'."""
    if kind == "gpt2":
        return {k.removeprefix("transformer."): v for k, v in state.items()}
    if "model.embed_tokens.weight" not in state and "embed_tokens.weight" in state:
        return {(k if k == "lm_head.weight" else "model." + k): v for k, v in state.items()}
    return state


def hf_to_ee(
    hf: dict, state: dict[str, torch.Tensor], source: str, tensor_parallel_size: int = 1
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """An HF config dict and state dict -> our ModelConfig and weights (vocabulary padded)."""
    kind = _model_type(hf, source)
    config = _gpt2_config(hf, source) if kind == "gpt2" else _llama_config(hf, kind, source)
    try:
        config.validate()
    except ValueError as e:
        raise ConversionError(f"{source}: unsupported model configuration: {e}") from None
    tensors = _Tensors(_normalise_names(state, kind), source)
    weights = _gpt2_weights(config, tensors) if kind == "gpt2" else _llama_weights(config, tensors)
    tensors.check_consumed()
    config.vocab_size = padded_vocab(int(config.real_vocab_size), tensor_parallel_size)
    for name in list(weights):
        if is_vocab_tensor(name):
            weights[name] = pad_rows(weights[name], config.vocab_size)
    return config, weights


def _restore_exits(path: str, config: ModelConfig, weights: dict[str, torch.Tensor], source: str) -> ModelConfig:
    """Read our exit heads and full config saved beside an HF export, if there are any."""
    cfg_path = os.path.join(path, EXIT_CONFIG_FILE)
    if not os.path.isfile(cfg_path):
        return config
    try:
        with open(cfg_path) as f:
            ours = ModelConfig.from_dict(json.load(f))
    except (OSError, json.JSONDecodeError, TypeError, ValueError) as e:
        raise ConversionError(f"{cfg_path}: not a valid early-exit config: {e}") from None
    for field_name in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size"):
        if getattr(ours, field_name) != getattr(config, field_name):
            raise ConversionError(
                f"{cfg_path}: {field_name}={getattr(ours, field_name)} disagrees with config.json "
                f"({getattr(config, field_name)})"
            )
    if ours.vocab_size != config.vocab_size:  # keep our padding unless the target TP needs more
        size = max(ours.vocab_size, config.vocab_size)
        ours.vocab_size = size
        for name in list(weights):
            if is_vocab_tensor(name):
                weights[name] = pad_rows(weights[name], size)
    heads_path = os.path.join(path, EXIT_HEADS_FILE)
    extra = _load_safetensors(heads_path) if os.path.isfile(heads_path) else {}
    for name, tensor in extra.items():
        if name.startswith(PADDING_PREFIX):
            target = name[len(PADDING_PREFIX) :]
            if target in weights and weights[target].shape[0] == ours.vocab_size:
                real = weights[target].shape[0] - tensor.shape[0]
                weights[target] = torch.cat((weights[target][:real], tensor.to(weights[target].dtype)), dim=0)
        elif name.startswith("exits."):
            weights[name] = pad_rows(tensor, ours.vocab_size) if is_vocab_tensor(name) else tensor
        else:
            raise ConversionError(f"{heads_path}: unexpected tensor {name}")
    return ours


def load_hf_model(path: str, dtype: torch.dtype | None = None, tensor_parallel_size: int = 1):
    """An HF model directory -> (EarlyExitGPT in eval mode, tokenizer or None).

    Exits saved by `export_hf` beside the weights are restored.
    """
    hf = read_hf_config(path)
    _model_type(hf, path)  # an unsupported architecture is reported before reading its weights
    state = read_hf_state_dict(path)
    config, weights = hf_to_ee(hf, state, path, tensor_parallel_size)
    config = _restore_exits(path, config, weights, path)
    model = build_model(config, weights, path, dtype)
    return model, load_hf_tokenizer(path)


# ----------------------------------------------------------------------------------------
# ours -> HF


def hf_family(config: ModelConfig) -> str:
    """Which HF class can hold this model: 'llama', 'qwen2' or 'gpt2' (ConversionError if none)."""
    llama_like = (
        config.normalization == "RMSNorm"
        and config.swiglu
        and config.position_embedding_type == "rope"
        and not config.add_bias_linear
    )
    if llama_like:
        return "qwen2" if config.add_qkv_bias else "llama"
    gpt2_like = (
        config.normalization == "LayerNorm"
        and not config.swiglu
        and config.position_embedding_type == "learned_absolute"
        and config.add_bias_linear
        and config.num_query_groups == config.num_attention_heads
        and config.head_dim * config.num_attention_heads == config.hidden_size
    )
    if gpt2_like:
        return "gpt2"
    raise ConversionError(
        "--saver hf: this model is neither Llama-style (RMSNorm, SwiGLU, RoPE, no biases) nor GPT-2 style "
        "(LayerNorm, GELU, learned positions, biases, no GQA); no transformers class can hold it"
    )


def _hf_config(config: ModelConfig, family: str, tokenizer, dtype: torch.dtype) -> dict:
    real = int(config.real_vocab_size or config.vocab_size)
    dtype_name = str(dtype).removeprefix("torch.")
    eos = tokenizer.eod if tokenizer is not None else None
    bos = tokenizer.bos if tokenizer is not None else None
    if family == "gpt2":
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": real,
            "n_positions": config.max_position_embeddings,
            "n_embd": config.hidden_size,
            "n_layer": config.num_layers,
            "n_head": config.num_attention_heads,
            "n_inner": config.ffn_hidden_size,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": config.norm_epsilon,
            "resid_pdrop": config.hidden_dropout,
            "embd_pdrop": config.hidden_dropout,
            "attn_pdrop": config.attention_dropout,
            "initializer_range": config.init_method_std,
            "tie_word_embeddings": not config.untie_embeddings_and_output_weights,
            "bos_token_id": bos if bos is not None else eos,
            "eos_token_id": eos,
            "torch_dtype": dtype_name,
        }
    out = {
        "architectures": ["Qwen2ForCausalLM" if family == "qwen2" else "LlamaForCausalLM"],
        "model_type": family,
        "vocab_size": real,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.ffn_hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_query_groups,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.norm_epsilon,
        "rope_theta": config.rotary_base,
        "rope_scaling": dict(config.rope_scaling) if config.rope_scaling else None,
        "tie_word_embeddings": not config.untie_embeddings_and_output_weights,
        "attention_dropout": config.attention_dropout,
        "initializer_range": config.init_method_std,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "torch_dtype": dtype_name,
    }
    if family == "llama":
        out.update(attention_bias=False, mlp_bias=False)
    else:
        out.update(use_sliding_window=False, sliding_window=None)
    return out


def ee_to_hf(config: ModelConfig, weights: dict[str, torch.Tensor]) -> tuple[str, dict, dict]:
    """Our weights -> (family, HF state dict with the vocabulary unpadded, extras).

    `extras` holds the exit heads and any non-zero padded vocabulary rows, which no HF
    class has a place for.
    """
    family = hf_family(config)
    real = int(config.real_vocab_size or config.vocab_size)
    nh, ng, hd = config.num_attention_heads, int(config.num_query_groups), config.head_dim
    w = weights
    out: dict[str, torch.Tensor] = {}
    extras: dict[str, torch.Tensor] = {k: v for k, v in w.items() if k.startswith("exits.")}
    for name, tensor in w.items():
        if is_vocab_tensor(name) and not name.startswith("exits.") and tensor.shape[0] > real:
            if torch.count_nonzero(tensor[real:]):
                extras[PADDING_PREFIX + name] = tensor[real:]

    def vocab(name):
        return w[name][:real]

    if family == "gpt2":
        p = "transformer."
        out[p + "wte.weight"] = vocab("embedding.word_embeddings.weight")
        out[p + "wpe.weight"] = w["embedding.position_embeddings.weight"]
        for i in range(config.num_layers):
            src, dst = f"decoder.layers.{i}.", f"{p}h.{i}."
            for ours, theirs in (("input_layernorm", "ln_1"), ("pre_mlp_layernorm", "ln_2")):
                out[f"{dst}{theirs}.weight"] = w[f"{src}{ours}.weight"]
                out[f"{dst}{theirs}.bias"] = w[f"{src}{ours}.bias"]
            q, k, v = split_qkv(w[src + "self_attention.linear_qkv.weight"], nh, nh, hd)
            out[dst + "attn.c_attn.weight"] = torch.cat((q, k, v), dim=0).t()
            qb, kb, vb = split_qkv(w[src + "self_attention.linear_qkv.bias"], nh, nh, hd)
            out[dst + "attn.c_attn.bias"] = torch.cat((qb, kb, vb), dim=0)
            out[dst + "attn.c_proj.weight"] = w[src + "self_attention.linear_proj.weight"].t()
            out[dst + "attn.c_proj.bias"] = w[src + "self_attention.linear_proj.bias"]
            out[dst + "mlp.c_fc.weight"] = w[src + "mlp.linear_fc1.weight"].t()
            out[dst + "mlp.c_fc.bias"] = w[src + "mlp.linear_fc1.bias"]
            out[dst + "mlp.c_proj.weight"] = w[src + "mlp.linear_fc2.weight"].t()
            out[dst + "mlp.c_proj.bias"] = w[src + "mlp.linear_fc2.bias"]
        out[p + "ln_f.weight"] = w["decoder.final_layernorm.weight"]
        out[p + "ln_f.bias"] = w["decoder.final_layernorm.bias"]
    else:
        ffn = int(config.ffn_hidden_size)
        out["model.embed_tokens.weight"] = vocab("embedding.word_embeddings.weight")
        for i in range(config.num_layers):
            src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
            out[dst + "input_layernorm.weight"] = w[src + "input_layernorm.weight"]
            q, k, v = split_qkv(w[src + "self_attention.linear_qkv.weight"], nh, ng, hd)
            out[dst + "self_attn.q_proj.weight"] = q
            out[dst + "self_attn.k_proj.weight"] = k
            out[dst + "self_attn.v_proj.weight"] = v
            if config.add_qkv_bias:
                qb, kb, vb = split_qkv(w[src + "self_attention.linear_qkv.bias"], nh, ng, hd)
                out[dst + "self_attn.q_proj.bias"] = qb
                out[dst + "self_attn.k_proj.bias"] = kb
                out[dst + "self_attn.v_proj.bias"] = vb
            out[dst + "self_attn.o_proj.weight"] = w[src + "self_attention.linear_proj.weight"]
            out[dst + "post_attention_layernorm.weight"] = w[src + "pre_mlp_layernorm.weight"]
            fc1 = w[src + "mlp.linear_fc1.weight"]
            out[dst + "mlp.gate_proj.weight"] = fc1[:ffn]
            out[dst + "mlp.up_proj.weight"] = fc1[ffn:]
            out[dst + "mlp.down_proj.weight"] = w[src + "mlp.linear_fc2.weight"]
        out["model.norm.weight"] = w["decoder.final_layernorm.weight"]
    if config.untie_embeddings_and_output_weights:
        out["lm_head.weight"] = vocab("output_layer.weight")
    return family, {k: v.contiguous() for k, v in out.items()}, {k: v.contiguous() for k, v in extras.items()}


def _save_tokenizer(tokenizer, out_dir: str) -> None:
    if tokenizer is None:
        return
    tokenizer.save(out_dir)
    cfg_path = os.path.join(out_dir, "tokenizer_config.json")
    if os.path.isfile(cfg_path):
        return
    from megatron.early_exit.tokenizer.gpt2_bpe import GPT2BPETokenizer

    if isinstance(tokenizer, GPT2BPETokenizer):
        eod = "<|endoftext|>"
        cfg = {"tokenizer_class": "GPT2Tokenizer", "bos_token": eod, "eos_token": eod, "unk_token": eod}
        with open(cfg_path, "w") as f:
            json.dump(cfg, f, indent=2)


def export_hf(model, tokenizer, out_dir: str, dtype: torch.dtype | None = None) -> str:
    """Write `model` (and its tokenizer) as an HF directory `transformers` can load.

    Exit heads and our full config are saved beside it (EXIT_HEADS_FILE, EXIT_CONFIG_FILE).
    """
    config: ModelConfig = model.config
    weights = model_weights(model)
    if dtype is not None:
        weights = {k: v.to(dtype) for k, v in weights.items()}
    family, state, extras = ee_to_hf(config, weights)
    save_dtype = next(iter(state.values())).dtype
    os.makedirs(out_dir, exist_ok=True)
    hf_cfg = _hf_config(config, family, tokenizer, save_dtype)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_cfg, f, indent=2)
    save_file(state, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, EXIT_CONFIG_FILE), "w") as f:
        json.dump(config.to_dict(), f, indent=2)
    heads_path = os.path.join(out_dir, EXIT_HEADS_FILE)
    if extras:
        save_file(extras, heads_path, metadata={"format": "megatron-early-exit"})
    elif os.path.exists(heads_path):
        os.remove(heads_path)
    _save_tokenizer(tokenizer, out_dir)
    return out_dir

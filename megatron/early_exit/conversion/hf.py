"""Hugging Face checkpoints <-> our model.

Import: a directory with `config.json` and weights (`model.safetensors`, sharded
safetensors with an index, or `pytorch_model.bin` read with `weights_only=True`) of a
Llama, Mistral, Qwen2 or Qwen3 model (RMSNorm, SwiGLU, RoPE with linear / llama3 / yarn
scaling, GQA; Qwen2 has a bias on Q/K/V only, Qwen3 a QK-norm)
or a GPT-2 model (LayerNorm, tanh-GELU, learned positions, biases; its Conv1D weights are
stored [in, out], so they are transposed). The tokenizer comes from
`tokenizer.json`, or `vocab.json` + `merges.txt` (GPT-2), or `tokenizer.model`.

Export: the inverse, loadable by `transformers` as LlamaForCausalLM (Qwen2ForCausalLM when
the model has Q/K/V biases, Qwen3ForCausalLM with QK-norm, GPT2LMHeadModel for GPT-2 style
models), with the vocabulary unpadded. Tensor names go both ways through one table per
family (`tables.py`); `FAMILIES` below adds what tells the families apart. Exit heads
(which no HF class knows about) go beside it in
`early_exit_heads.safetensors`, and our full `ModelConfig` in `early_exit_config.json`, so
importing our own export restores the exits bit for bit.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from megatron.early_exit.config import ModelConfig
from megatron.early_exit.conversion.common import (
    ConversionError,
    build_model,
    is_vocab_tensor,
    model_weights,
    pad_rows,
    padded_vocab,
)
from megatron.early_exit.conversion.tables import HF_GPT2, HF_LLAMA, Rule, check_table_covers, to_ours, to_theirs
from megatron.early_exit.model.rotary import yarn_attention_factor

EXIT_HEADS_FILE = "early_exit_heads.safetensors"
EXIT_CONFIG_FILE = "early_exit_config.json"
PADDING_PREFIX = "vocab_padding."
LLAMA_TYPES = ("llama", "mistral", "qwen2", "qwen3")
GPT2_GELUS = ("gelu_new", "gelu_pytorch_tanh")
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")


@dataclass(frozen=True)
class HFFamily:
    """One transformers family: its class, its name table, and what tells it apart."""

    architecture: str
    table: tuple[Rule, ...]
    qkv_bias: bool = False  # bias on Q/K/V only
    qk_norm: bool = False  # per-head RMSNorm on q and k
    export_config: dict = field(default_factory=dict)  # fixed config.json keys on export


FAMILIES = {
    "llama": HFFamily("LlamaForCausalLM", HF_LLAMA, export_config={"attention_bias": False, "mlp_bias": False}),
    "mistral": HFFamily("MistralForCausalLM", HF_LLAMA, export_config={"sliding_window": None}),
    "qwen2": HFFamily(
        "Qwen2ForCausalLM", HF_LLAMA, qkv_bias=True, export_config={"use_sliding_window": False, "sliding_window": None}
    ),
    "qwen3": HFFamily(
        "Qwen3ForCausalLM",
        HF_LLAMA,
        qk_norm=True,
        export_config={"attention_bias": False, "use_sliding_window": False, "sliding_window": None},
    ),
    "gpt2": HFFamily("GPT2LMHeadModel", HF_GPT2),
}

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
    if kind == "yarn":
        return theta, _yarn_settings(hf, scaling)
    raise ConversionError(f"{source}: unsupported rope scaling type {kind!r} (supported: linear, llama3, yarn)")


def _yarn_settings(hf: dict, scaling: dict) -> dict:
    """transformers' YaRN defaults made explicit, so our config and an export need no defaults."""
    old_ctx = int(
        hf.get("original_max_position_embeddings")  # Phi-3 style: outside the scaling dict, and preferred
        or scaling.get("original_max_position_embeddings")
        or hf.get("max_position_embeddings", 2048)
    )
    factor = scaling.get("factor") or hf.get("max_position_embeddings", old_ctx) / old_ctx
    out = {
        "rope_type": "yarn",
        "factor": float(factor),
        "original_max_position_embeddings": old_ctx,
        "beta_fast": float(scaling.get("beta_fast") or 32),
        "beta_slow": float(scaling.get("beta_slow") or 1),
        "truncate": bool(scaling.get("truncate", True)),
    }
    given = {k: scaling.get(k) for k in ("attention_factor", "mscale", "mscale_all_dim")}
    out["attention_factor"] = yarn_attention_factor({**given, "factor": out["factor"]})
    return out


def _llama_config(hf: dict, kind: str, source: str) -> ModelConfig:
    if hf.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"{source}: unsupported hidden_act {hf.get('hidden_act')!r} (expected silu)")
    if hf.get("mlp_bias"):
        raise ConversionError(f"{source}: mlp_bias=true is not supported")
    if kind != "qwen2" and hf.get("attention_bias"):
        raise ConversionError(f"{source}: attention_bias=true (bias on every projection) is not supported")
    if float(hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ConversionError(f"{source}: partial_rotary_factor != 1 is not supported")
    if kind in ("qwen2", "qwen3") and hf.get("use_sliding_window"):
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
            add_qkv_bias=FAMILIES[kind].qkv_bias,
            qk_layernorm=FAMILIES[kind].qk_norm,
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


def _normalise_names(state: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    """One naming per family: bare LlamaModel / GPT2Model saves lack the 'model.' / 'transformer.' prefix."""
    prefix, probe = ("transformer.", "wte.weight") if kind == "gpt2" else ("model.", "embed_tokens.weight")
    if prefix + probe not in state and probe in state:
        return {(k if k == "lm_head.weight" else prefix + k): v for k, v in state.items()}
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
    config.vocab_size = padded_vocab(int(config.real_vocab_size), tensor_parallel_size)
    tensors = _Tensors(_normalise_names(state, kind), source)
    if not config.untie_embeddings_and_output_weights:
        tensors.drop("lm_head.weight")  # some tied checkpoints store the shared matrix twice
    weights = to_ours(FAMILIES[kind].table, config, tensors.take)
    tensors.check_consumed()
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
    """Which HF family can hold this model (a key of FAMILIES; ConversionError if none)."""
    llama_like = (
        config.normalization == "RMSNorm"
        and config.swiglu
        and config.position_embedding_type == "rope"
        and not config.add_bias_linear
    )
    if llama_like:
        for name in ("llama", "qwen2", "qwen3"):
            fam = FAMILIES[name]
            if (fam.qkv_bias, fam.qk_norm) == (bool(config.add_qkv_bias), bool(config.qk_layernorm)):
                return name
        raise ConversionError("--saver hf: Q/K/V biases together with QK-norm: no transformers class holds both")
    gpt2_like = (
        config.normalization == "LayerNorm"
        and not config.swiglu
        and config.position_embedding_type == "learned_absolute"
        and config.add_bias_linear
        and not config.qk_layernorm
        and config.num_query_groups == config.num_attention_heads
        and config.head_dim * config.num_attention_heads == config.hidden_size
    )
    if gpt2_like:
        return "gpt2"
    raise ConversionError(
        "--saver hf: this model is neither Llama-style (RMSNorm, SwiGLU, RoPE, no biases) nor GPT-2 style "
        "(LayerNorm, GELU, learned positions, biases, no GQA); no transformers class can hold it"
    )


def _hf_rope_scaling(config: ModelConfig) -> dict | None:
    scaling = dict(config.rope_scaling) if config.rope_scaling else None
    if scaling and scaling.get("rope_type") == "freq_factors":
        raise ConversionError(
            "--saver hf: per-frequency rope factors (a GGUF rope_freqs tensor that is not Llama-3.1 "
            "scaling) have no transformers equivalent"
        )
    return scaling


def _gpt2_hf_config(config: ModelConfig) -> dict:
    return {
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
    }


def _llama_hf_config(config: ModelConfig) -> dict:
    return {
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
        "rope_scaling": _hf_rope_scaling(config),
        "attention_dropout": config.attention_dropout,
    }


def _hf_config(config: ModelConfig, family: str, tokenizer, dtype: torch.dtype) -> dict:
    fam = FAMILIES[family]
    eos = tokenizer.eod if tokenizer is not None else None
    bos = tokenizer.bos if tokenizer is not None else None
    if family == "gpt2" and bos is None:
        bos = eos
    return {
        "architectures": [fam.architecture],
        "model_type": family,
        "vocab_size": int(config.real_vocab_size or config.vocab_size),
        **(_gpt2_hf_config(config) if family == "gpt2" else _llama_hf_config(config)),
        **fam.export_config,
        "tie_word_embeddings": not config.untie_embeddings_and_output_weights,
        "initializer_range": config.init_method_std,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def ee_to_hf(config: ModelConfig, weights: dict[str, torch.Tensor]) -> tuple[str, dict, dict]:
    """Our weights -> (family, HF state dict with the vocabulary unpadded, extras).

    `extras` holds the exit heads and any non-zero padded vocabulary rows, which no HF
    class has a place for.
    """
    family = hf_family(config)
    real = int(config.real_vocab_size or config.vocab_size)
    extras: dict[str, torch.Tensor] = {k: v.contiguous() for k, v in weights.items() if k.startswith("exits.")}
    for name, tensor in weights.items():
        if is_vocab_tensor(name) and not name.startswith("exits.") and tensor.shape[0] > real:
            if torch.count_nonzero(tensor[real:]):
                extras[PADDING_PREFIX + name] = tensor[real:].contiguous()
    table = FAMILIES[family].table
    check_table_covers(table, config)
    return family, to_theirs(table, config, weights), extras


def _save_tokenizer(tokenizer, out_dir: str) -> None:
    if tokenizer is not None:
        tokenizer.save(out_dir)  # its files and a tokenizer_config.json for AutoTokenizer


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

"""Checkpoint conversion: Hugging Face and GGUF import, Hugging Face export, adding exits.

    from megatron.early_exit.conversion import load_hf_model, load_gguf_model, export_hf, add_exits
    model, tokenizer = load_hf_model("path/to/hf_dir")        # Llama / Mistral / Qwen2 / GPT-2
    model, tokenizer = load_gguf_model("model.gguf")          # llama.cpp files, any quantisation
    export_hf(model, tokenizer, "out_dir")                    # transformers-loadable (+ exit heads)
    model = add_exits(model, [8, 16], use_exit_norm=True)     # EE-Tuning stage 1

Every function returns an `EarlyExitGPT` in eval mode (fp32 unless a dtype is given) and
raises `ConversionError` (a ValueError) with a one-line message on bad input.
"""

from __future__ import annotations

import os

from megatron.early_exit.conversion.common import ConversionError, parse_dtype
from megatron.early_exit.conversion.exits import add_exits, replace_probes, untie_exits
from megatron.early_exit.conversion.gguf import load_gguf_model
from megatron.early_exit.conversion.hf import export_hf, load_hf_model

LOADERS = ("hf", "gguf", "ee")


def detect_format(path: str) -> str:
    """'ee' (our checkpoint), 'hf' (config.json + weights) or 'gguf' (a .gguf file or a dir with one)."""
    from megatron.early_exit.checkpointing import CONFIG_FILE, MARKER

    if os.path.isfile(path):
        if path.endswith(".gguf"):
            return "gguf"
        raise ConversionError(f"--load-dir: {path} is a file but not a .gguf")
    if not os.path.isdir(path):
        raise ConversionError(f"--load-dir: no such file or directory: {path}")
    if os.path.isfile(os.path.join(path, MARKER)):
        return "ee"
    cfg = os.path.join(path, CONFIG_FILE)
    if os.path.isfile(cfg):
        import json

        try:
            with open(cfg) as f:
                fmt = json.load(f).get("format")
        except (OSError, ValueError, AttributeError):
            fmt = None
        return "ee" if fmt == "megatron-early-exit" else "hf"
    if any(f.endswith(".gguf") for f in os.listdir(path)):
        return "gguf"
    raise ConversionError(f"--load-dir: cannot tell the format of {path} (no config.json, marker or .gguf file)")


def load_model(path: str, loader: str | None = None, dtype=None, tensor_parallel_size: int = 1):
    """Load any supported checkpoint -> (EarlyExitGPT, tokenizer, iteration or None)."""
    loader = loader or detect_format(path)
    if loader == "hf":
        return (*load_hf_model(path, dtype, tensor_parallel_size), None)
    if loader == "gguf":
        return (*load_gguf_model(path, dtype, tensor_parallel_size), None)
    if loader == "ee":
        from megatron.early_exit.checkpointing import (
            load_tokenizer_from,
            read_meta,
            read_weights,
        )
        from megatron.early_exit.conversion.common import build_model, padded_vocab, repad_vocab

        try:
            meta = read_meta(path)
            weights = read_weights(meta.directory)
        except ValueError as e:
            raise ConversionError(str(e).replace("--load:", "--load-dir:", 1)) from None
        config = meta.model_config
        if config.vocab_size % tensor_parallel_size:
            repad_vocab(
                config, weights, padded_vocab(config.real_vocab_size or config.vocab_size, tensor_parallel_size)
            )
        model = build_model(config, weights, meta.directory, dtype)
        return model, load_tokenizer_from(meta), meta.iteration
    raise ConversionError(f"--loader must be one of {', '.join(LOADERS)}, got {loader!r}")


__all__ = [
    "ConversionError",
    "add_exits",
    "replace_probes",
    "untie_exits",
    "detect_format",
    "export_hf",
    "load_gguf_model",
    "load_hf_model",
    "load_model",
    "parse_dtype",
]

"""GGUF (llama.cpp) files -> our model, with the `gguf` package (no llama.cpp needed).

Tensors are dequantised with `gguf.quants.dequantize` (F32, F16, BF16, Q4_0/Q4_1/Q8_0/K-quants
...). llama.cpp's converter stores a Llama's Q and K projections with the rows of each head
permuted from HF's rotate-half order into interleaved (real, imaginary) pairs, because
llama.cpp's Llama RoPE rotates adjacent pairs; we undo that permutation. Qwen2 GGUFs are
stored unpermuted (llama.cpp rotates them NeoX-style).

The tokenizer is rebuilt as an HF `tokenizers` BPE from the `tokenizer.ggml.*` fields
(gpt2-style byte-level BPE: tokens, merges, special ids, pre-tokeniser by name) with the
file's chat template, and wrapped as our HuggingFaceTokenizer.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings

import numpy as np
import torch

from megatron.early_exit.config import ModelConfig
from megatron.early_exit.conversion.common import ConversionError, build_model, fuse_qkv, pad_rows, padded_vocab
from megatron.early_exit.tokenizer.huggingface import HuggingFaceTokenizer

SUPPORTED_ARCHS = ("llama", "qwen2")
# GGUF token types (llama.cpp): 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
CONTROL, USER_DEFINED = 3, 4
# Pre-tokeniser regexes, by llama.cpp's `tokenizer.ggml.pre` name (public facts).
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _require_gguf():
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ConversionError("--loader gguf needs the gguf package: pip install gguf") from None
    return gguf


def find_gguf_file(path: str) -> str:
    """A .gguf file, or a directory holding exactly one."""
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise ConversionError(f"--load-dir: no such file or directory: {path}")
    found = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
    if len(found) != 1:
        what = "no .gguf file" if not found else f"several .gguf files ({', '.join(found)}); name one"
        raise ConversionError(f"--load-dir: {what} in {path}")
    return os.path.join(path, found[0])


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's per-head row permutation (interleaved pairs -> rotate-half halves).

    llama.cpp's converter maps each head's rows [x_0 .. x_{d/2-1} | y_0 .. y_{d/2-1}] to
    [x_0, y_0, x_1, y_1, ...]; this maps them back. Works for weights and biases.
    """
    rows = w.shape[0]
    hd = rows // n_heads
    return w.reshape(n_heads, hd // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape).contiguous()


def permute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's permutation (rotate-half -> interleaved pairs); the inverse of `unpermute_qk`."""
    rows = w.shape[0]
    hd = rows // n_heads
    return w.reshape(n_heads, 2, hd // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape).contiguous()


class _Fields:
    def __init__(self, reader, source: str) -> None:
        self.reader = reader
        self.source = source

    def get(self, key: str, default=None):
        field = self.reader.fields.get(key)
        if field is None:
            return default
        return field.contents()

    def need(self, key: str):
        value = self.get(key)
        if value is None:
            raise ConversionError(f"{self.source}: missing metadata {key}")
        return value


def _gguf_config(f: _Fields, arch: str, tied: bool, vocab_rows: int) -> ModelConfig:
    p = arch + "."
    hidden = int(f.need(p + "embedding_length"))
    nh = int(f.need(p + "attention.head_count"))
    ng = int(f.get(p + "attention.head_count_kv", nh))
    hd = int(f.get(p + "attention.key_length", hidden // nh))
    rope_dim = int(f.get(p + "rope.dimension_count", hd))
    if rope_dim != hd:
        raise ConversionError(f"{f.source}: partial rotary embeddings (rope.dimension_count {rope_dim}) not supported")
    scaling = None
    kind = f.get(p + "rope.scaling.type")
    if kind not in (None, "none"):
        if kind != "linear":
            raise ConversionError(f"{f.source}: unsupported rope scaling type {kind!r} (supported: linear)")
        factor = float(f.get(p + "rope.scaling.factor", 1.0))
        scaling = {"rope_type": "linear", "factor": factor} if factor != 1.0 else None
    return ModelConfig(
        num_layers=int(f.need(p + "block_count")),
        hidden_size=hidden,
        num_attention_heads=nh,
        vocab_size=padded_vocab(vocab_rows),
        max_position_embeddings=int(f.get(p + "context_length", 2048)),
        ffn_hidden_size=int(f.need(p + "feed_forward_length")),
        num_query_groups=ng,
        kv_channels=hd,
        normalization="RMSNorm",
        norm_epsilon=float(f.get(p + "attention.layer_norm_rms_epsilon", 1e-5)),
        swiglu=True,
        position_embedding_type="rope",
        rotary_base=float(f.get(p + "rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        add_bias_linear=False,
        add_qkv_bias=arch == "qwen2",
        untie_embeddings_and_output_weights=not tied,
        real_vocab_size=vocab_rows,
    )


def read_gguf(path: str, tensor_parallel_size: int = 1) -> tuple[ModelConfig, dict[str, torch.Tensor], _Fields]:
    """A .gguf file -> (our ModelConfig, our fp32 weights with the vocabulary padded, metadata)."""
    gguf = _require_gguf()
    file = find_gguf_file(path)
    try:
        reader = gguf.GGUFReader(file)
    except Exception as e:  # the reader raises ValueError/struct errors on foreign files
        raise ConversionError(f"--load-dir: {file} is not a readable GGUF file: {e}") from None
    f = _Fields(reader, file)
    arch = f.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise ConversionError(f"{file}: unsupported architecture {arch!r} (supported: {', '.join(SUPPORTED_ARCHS)})")
    tensors = {t.name: t for t in reader.tensors}
    if "rope_freqs.weight" in tensors:
        raise ConversionError(f"{file}: per-frequency rope factors (rope_freqs, Llama-3.1 scaling) are not supported")

    def take(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        t = tensors.pop(name, None)
        if t is None:
            raise ConversionError(f"{file}: missing tensor {name}")
        try:
            arr = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise ConversionError(f"{file}: {name}: cannot dequantize {t.tensor_type.name}: {e}") from None
        arr = np.ascontiguousarray(arr, dtype=np.float32).reshape(tuple(int(x) for x in reversed(t.shape.tolist())))
        if arr.shape != shape:
            raise ConversionError(f"{file}: {name} has shape {arr.shape}, expected {shape}")
        return torch.from_numpy(arr.copy())

    if "token_embd.weight" not in tensors:
        raise ConversionError(f"{file}: missing tensor token_embd.weight")
    vocab_rows = int(tensors["token_embd.weight"].shape.tolist()[1])
    tied = "output.weight" not in tensors
    c = _gguf_config(f, arch, tied, vocab_rows)
    c.vocab_size = padded_vocab(vocab_rows, tensor_parallel_size)
    try:
        c.validate()
    except ValueError as e:
        raise ConversionError(f"{file}: unsupported model configuration: {e}") from None
    h, nh, ng, hd, ffn = c.hidden_size, c.num_attention_heads, int(c.num_query_groups), c.head_dim, c.ffn_hidden_size
    permuted = arch == "llama"
    w = {"embedding.word_embeddings.weight": take("token_embd.weight", (vocab_rows, h))}
    for i in range(c.num_layers):
        src, dst = f"blk.{i}.", f"decoder.layers.{i}."
        w[dst + "input_layernorm.weight"] = take(src + "attn_norm.weight", (h,))
        q = take(src + "attn_q.weight", (nh * hd, h))
        k = take(src + "attn_k.weight", (ng * hd, h))
        v = take(src + "attn_v.weight", (ng * hd, h))
        if permuted:
            q, k = unpermute_qk(q, nh), unpermute_qk(k, ng)
        w[dst + "self_attention.linear_qkv.weight"] = fuse_qkv(q, k, v, nh, ng, hd)
        if c.add_qkv_bias:
            qb = take(src + "attn_q.bias", (nh * hd,))
            kb = take(src + "attn_k.bias", (ng * hd,))
            vb = take(src + "attn_v.bias", (ng * hd,))
            w[dst + "self_attention.linear_qkv.bias"] = fuse_qkv(qb, kb, vb, nh, ng, hd)
        w[dst + "self_attention.linear_proj.weight"] = take(src + "attn_output.weight", (h, nh * hd))
        w[dst + "pre_mlp_layernorm.weight"] = take(src + "ffn_norm.weight", (h,))
        gate = take(src + "ffn_gate.weight", (ffn, h))
        up = take(src + "ffn_up.weight", (ffn, h))
        w[dst + "mlp.linear_fc1.weight"] = torch.cat((gate, up), dim=0)
        w[dst + "mlp.linear_fc2.weight"] = take(src + "ffn_down.weight", (h, ffn))
    w["decoder.final_layernorm.weight"] = take("output_norm.weight", (h,))
    if not tied:
        w["output_layer.weight"] = take("output.weight", (vocab_rows, h))
    if tensors:
        left = sorted(tensors)
        raise ConversionError(f"{file}: unexpected tensors {left[:5]} (an architecture variant we do not support)")
    for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        if name in w:
            w[name] = pad_rows(w[name], c.vocab_size)
    return c, w, f


# ----------------------------------------------------------------------------------------
# tokenizer


class GGUFTokenizer(HuggingFaceTokenizer):
    """A HuggingFaceTokenizer built in memory from GGUF metadata; saves as tokenizer.json +
    tokenizer_config.json, which load back as a plain HuggingFaceTokenizer."""

    def __init__(self, tokenizer_json: str, tokenizer_config: dict) -> None:
        tmp = tempfile.mkdtemp(prefix="ee-gguf-tokenizer-")
        try:
            with open(os.path.join(tmp, "tokenizer.json"), "w", encoding="utf-8") as f:
                f.write(tokenizer_json)
            with open(os.path.join(tmp, "tokenizer_config.json"), "w", encoding="utf-8") as f:
                json.dump(tokenizer_config, f, indent=2, ensure_ascii=False)
            super().__init__(tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self._json = tokenizer_json
        self._config = tokenizer_config

    def save(self, directory: str) -> dict:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "tokenizer.json"), "w", encoding="utf-8") as f:
            f.write(self._json)
        with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(self._config, f, indent=2, ensure_ascii=False)
        return {"tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": "tokenizer.json"}


def _pre_tokenizer(name: str | None, source: str):
    from tokenizers import Regex, pre_tokenizers

    if name in ("smollm", "starcoder", "refact"):  # single digits, then GPT-2's pattern
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    if name in ("llama-bpe", "llama3", "qwen2"):
        pattern = QWEN2_SPLIT if name == "qwen2" else LLAMA3_SPLIT
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    if name not in (None, "default", "gpt2", "gpt-2"):
        warnings.warn(f"{source}: unknown pre-tokenizer {name!r}; using GPT-2's", stacklevel=3)
    return pre_tokenizers.ByteLevel(add_prefix_space=False)


def gguf_tokenizer(f: _Fields) -> GGUFTokenizer | None:
    """Our tokenizer from the GGUF's `tokenizer.ggml.*` fields (None, with a warning, when unsupported)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models

    model = f.get("tokenizer.ggml.model")
    if model is None:
        warnings.warn(f"{f.source}: no tokenizer in the file", stacklevel=2)
        return None
    if model != "gpt2":
        warnings.warn(f"{f.source}: tokenizer model {model!r} is not supported (only gpt2-style BPE)", stacklevel=2)
        return None
    tokens = f.need("tokenizer.ggml.tokens")
    merges = f.need("tokenizer.ggml.merges")
    types = f.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab = {tok: i for i, tok in enumerate(tokens)}
    pairs = []
    for m in merges:
        a, sep, b = m.partition(" ")
        if not sep:
            raise ConversionError(f"{f.source}: malformed merge {m!r}")
        pairs.append((a, b))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = _pre_tokenizer(f.get("tokenizer.ggml.pre"), f.source)
    tok.decoder = decoders.ByteLevel()
    special = [AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(types) if t == CONTROL]
    user = [AddedToken(tokens[i], special=False, normalized=False) for i, t in enumerate(types) if t == USER_DEFINED]
    if special:
        tok.add_special_tokens(special)
    if user:
        tok.add_tokens(user)

    def name_of(key):
        i = f.get(key)
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": name_of("tokenizer.ggml.bos_token_id"),
        "eos_token": name_of("tokenizer.ggml.eos_token_id"),
        "unk_token": name_of("tokenizer.ggml.unknown_token_id"),
        "pad_token": name_of("tokenizer.ggml.padding_token_id"),
        "add_bos_token": bool(f.get("tokenizer.ggml.add_bos_token", False)),
        "clean_up_tokenization_spaces": False,
    }
    template = f.get("tokenizer.chat_template")
    if template:
        config["chat_template"] = template
    config = {k: v for k, v in config.items() if v is not None}
    return GGUFTokenizer(tok.to_str(), config)


def load_gguf_model(path: str, dtype: torch.dtype | None = None, tensor_parallel_size: int = 1):
    """A .gguf file (or a directory with one) -> (EarlyExitGPT in eval mode, tokenizer or None)."""
    config, weights, fields = read_gguf(path, tensor_parallel_size)
    model = build_model(config, weights, fields.source, dtype)
    return model, gguf_tokenizer(fields)

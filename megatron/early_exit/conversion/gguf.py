"""GGUF (llama.cpp) files -> our model, with the `gguf` package (no llama.cpp needed).

Tensors are dequantised with `gguf.quants.dequantize` (F32, F16, BF16, Q4_0/Q4_1/Q8_0/K-quants
...). llama.cpp's converter stores a Llama's Q and K projections with the rows of each head
permuted from HF's rotate-half order into interleaved (real, imaginary) pairs, because
llama.cpp's Llama RoPE rotates adjacent pairs; we undo that permutation. Qwen2 and Qwen3
GGUFs are stored unpermuted (llama.cpp rotates them NeoX-style). Names go through the same
table as export would (`tables.gguf_table`). A `rope_freqs` tensor (Llama 3.1) becomes the
llama3 rope scaling it encodes, or per-frequency factors when it encodes none.

The tokenizer is rebuilt from the `tokenizer.ggml.*` fields with the file's chat template:
a gpt2-style byte-level BPE (tokens, merges, special ids, pre-tokeniser by name) as an HF
`tokenizers` BPE wrapped as our HuggingFaceTokenizer, or a "llama" SentencePiece vocabulary
(pieces, scores, types) as the SentencePiece model it was converted from.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import warnings

import numpy as np
import torch

from megatron.early_exit.config import ModelConfig
from megatron.early_exit.conversion.common import ConversionError, build_model, padded_vocab
from megatron.early_exit.conversion.tables import gguf_table, to_ours
from megatron.early_exit.model.rotary import scaled_inv_freq, yarn_attention_factor
from megatron.early_exit.tokenizer.huggingface import HuggingFaceTokenizer
from megatron.early_exit.tokenizer.sentencepiece import SentencePieceTokenizer

SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3")
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


def _rope_scaling(f: _Fields, p: str) -> dict | None:
    kind = f.get(p + "rope.scaling.type")
    if kind in (None, "none"):
        return None
    if kind == "yarn":
        return _yarn_scaling(f, p)
    if kind != "linear":
        raise ConversionError(f"{f.source}: unsupported rope scaling type {kind!r} (supported: linear, yarn)")
    factor = float(f.get(p + "rope.scaling.factor", 1.0))
    return {"rope_type": "linear", "factor": factor} if factor != 1.0 else None


def _yarn_scaling(f: _Fields, p: str) -> dict:
    """What llama.cpp's converter writes for an HF YaRN config (factor, original context, betas),
    read back as that config; its cos/sin multiplier is YaRN's default 0.1 ln(factor) + 1."""
    for key in ("rope.scaling.attn_factor", "rope.scaling.yarn_attn_factor"):
        if float(f.get(p + key, 1.0)) != 1.0:
            raise ConversionError(f"{f.source}: {p + key} != 1 is not supported")
    factor = float(f.need(p + "rope.scaling.factor"))
    return {
        "rope_type": "yarn",
        "factor": factor,
        "original_max_position_embeddings": int(f.need(p + "rope.scaling.original_context_length")),
        "beta_fast": float(f.get(p + "rope.scaling.yarn_beta_fast", 32.0)),
        "beta_slow": float(f.get(p + "rope.scaling.yarn_beta_slow", 1.0)),
        "truncate": True,
        "attention_factor": yarn_attention_factor({"factor": factor}),
    }


def _gguf_config(f: _Fields, arch: str, tied: bool, vocab_rows: int) -> ModelConfig:
    p = arch + "."
    hidden = int(f.need(p + "embedding_length"))
    nh = int(f.need(p + "attention.head_count"))
    ng = int(f.get(p + "attention.head_count_kv", nh))
    hd = int(f.get(p + "attention.key_length", hidden // nh))
    rope_dim = int(f.get(p + "rope.dimension_count", hd))
    if rope_dim != hd:
        raise ConversionError(f"{f.source}: partial rotary embeddings (rope.dimension_count {rope_dim}) not supported")
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
        rope_scaling=_rope_scaling(f, p),
        add_bias_linear=False,
        add_qkv_bias=arch == "qwen2",
        qk_layernorm=arch == "qwen3",
        untie_embeddings_and_output_weights=not tied,
        real_vocab_size=vocab_rows,
    )


def llama3_from_factors(factors: list[float], head_dim: int, base: float) -> dict | None:
    """The Llama-3.1 rope_scaling that yields these per-frequency divisors, or None if none does.

    llama.cpp stores Llama-3.1 scaling as divisors f_i = inv_freq_i / scaled_i: 1 for short
    wavelengths, `factor` for long ones, and 1 / ((1 - s) / factor + s) between, with s linear
    in 1 / wavelength. Two blended frequencies fix that line; its parameters are only defined
    up to a common scale, so original_max_position_embeddings is set to Llama-3.1's 8192.
    """
    inv_freq, _ = scaled_inv_freq(head_dim, base, None)
    f = torch.tensor(factors, dtype=torch.float64)
    factor = float(f.max())
    mid = [i for i in range(len(factors)) if 1 + 1e-6 < factors[i] < factor * (1 - 1e-6)]
    if factor <= 1 or len(mid) < 2:
        return None
    inv_wavelen = inv_freq / (2 * math.pi)
    smooth = (1 / f - 1 / factor) / (1 - 1 / factor)  # s at each frequency
    i, j = mid[0], mid[-1]
    slope = float((smooth[j] - smooth[i]) / (inv_wavelen[j] - inv_wavelen[i]))  # old / (high - low)
    offset = float(slope * inv_wavelen[i] - smooth[i])  # low / (high - low)
    old = 8192.0
    low, high = old * offset / slope, old * (1 + offset) / slope
    guess = {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": int(old),
    }
    again = inv_freq / scaled_inv_freq(head_dim, base, guess)[0]
    return guess if torch.allclose(again, f, rtol=1e-5, atol=0) else None


def _rope_freqs(factors: torch.Tensor, c: ModelConfig, source: str) -> dict:
    """GGUF's `rope_freqs` tensor (per-frequency divisors) -> our rope_scaling."""
    if c.rope_scaling:
        raise ConversionError(f"{source}: rope_freqs together with rope scaling metadata is not supported")
    values = [float(x) for x in factors.flatten()]
    if len(values) != c.head_dim // 2:
        raise ConversionError(f"{source}: rope_freqs has {len(values)} values, expected {c.head_dim // 2}")
    return llama3_from_factors(values, c.head_dim, c.rotary_base) or {"rope_type": "freq_factors", "factors": values}


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

    def take(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        t = tensors.pop(name, None)
        if t is None:
            raise ConversionError(f"{file}: missing tensor {name}")
        try:
            arr = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise ConversionError(f"{file}: {name}: cannot dequantize {t.tensor_type.name}: {e}") from None
        arr = np.ascontiguousarray(arr, dtype=np.float32).reshape(tuple(int(x) for x in reversed(t.shape.tolist())))
        if arr.shape != tuple(shape):
            raise ConversionError(f"{file}: {name} has shape {arr.shape}, expected {tuple(shape)}")
        return torch.from_numpy(arr.copy())

    if "token_embd.weight" not in tensors:
        raise ConversionError(f"{file}: missing tensor token_embd.weight")
    vocab_rows = int(tensors["token_embd.weight"].shape.tolist()[1])
    c = _gguf_config(f, arch, "output.weight" not in tensors, vocab_rows)
    c.vocab_size = padded_vocab(vocab_rows, tensor_parallel_size)
    if "rope_freqs.weight" in tensors:
        c.rope_scaling = _rope_freqs(take("rope_freqs.weight", (c.head_dim // 2,)), c, file)
    try:
        c.validate()
    except ValueError as e:
        raise ConversionError(f"{file}: unsupported model configuration: {e}") from None
    w = to_ours(gguf_table(permuted_qk=arch == "llama"), c, take)
    if tensors:
        left = sorted(tensors)
        raise ConversionError(f"{file}: unexpected tensors {left[:5]} (an architecture variant we do not support)")
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


class GGUFSentencePieceTokenizer(SentencePieceTokenizer):
    """A SentencePieceTokenizer over a model rebuilt in memory from GGUF metadata; saves as
    tokenizer.model, which loads back as a plain SentencePieceTokenizer."""

    def __init__(self, model_proto: bytes, chat_template: str | None = None) -> None:
        tmp = tempfile.mkdtemp(prefix="ee-gguf-spm-")
        try:
            path = os.path.join(tmp, "tokenizer.model")
            with open(path, "wb") as out:
                out.write(model_proto)
            super().__init__(path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self._proto = model_proto
        self.chat_template = chat_template

    def save(self, directory: str) -> dict:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "tokenizer.model"), "wb") as out:
            out.write(self._proto)
        self.model_file = os.path.join(directory, "tokenizer.model")
        return super().save(directory)


def _spm_proto(f: _Fields) -> bytes:
    """llama.cpp's "llama" vocabulary (SentencePiece pieces, scores, types) -> a SentencePiece
    BPE ModelProto, as the tokenizer.model it was converted from (GGUF and SentencePiece number
    piece types alike: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    tokens = f.need("tokenizer.ggml.tokens")
    scores = f.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    types = f.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if not len(tokens) == len(scores) == len(types):
        raise ConversionError(f"{f.source}: tokenizer.ggml tokens, scores and token_type differ in length")
    m = pb.ModelProto()
    for piece, score, kind in zip(tokens, scores, types):
        m.pieces.add(piece=piece, score=float(score), type=int(kind))
    m.trainer_spec.model_type = pb.TrainerSpec.BPE
    m.trainer_spec.byte_fallback = 6 in types
    m.trainer_spec.unk_id = int(f.get("tokenizer.ggml.unknown_token_id", 0))
    m.trainer_spec.bos_id = int(f.get("tokenizer.ggml.bos_token_id", -1))
    m.trainer_spec.eos_id = int(f.get("tokenizer.ggml.eos_token_id", -1))
    m.trainer_spec.pad_id = int(f.get("tokenizer.ggml.padding_token_id", -1))
    m.normalizer_spec.name = "identity"
    m.normalizer_spec.add_dummy_prefix = bool(f.get("tokenizer.ggml.add_space_prefix", True))
    m.normalizer_spec.remove_extra_whitespaces = False
    m.normalizer_spec.escape_whitespaces = True
    return m.SerializeToString()


def sentencepiece_tokenizer(f: _Fields) -> GGUFSentencePieceTokenizer | None:
    """Our tokenizer for a GGUF "llama" (SentencePiece) vocabulary (None, with a warning, without protobuf)."""
    try:
        proto = _spm_proto(f)
    except ImportError:
        warnings.warn(f"{f.source}: rebuilding a SentencePiece tokenizer needs protobuf", stacklevel=3)
        return None
    try:
        return GGUFSentencePieceTokenizer(proto, f.get("tokenizer.chat_template"))
    except ValueError as e:
        raise ConversionError(f"{f.source}: cannot rebuild its SentencePiece tokenizer: {e}") from None


def gguf_tokenizer(f: _Fields) -> GGUFTokenizer | SentencePieceTokenizer | None:
    """Our tokenizer from the GGUF's `tokenizer.ggml.*` fields (None, with a warning, when unsupported)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models

    model = f.get("tokenizer.ggml.model")
    if model is None:
        warnings.warn(f"{f.source}: no tokenizer in the file", stacklevel=2)
        return None
    if model == "llama":
        return sentencepiece_tokenizer(f)
    if model != "gpt2":
        warnings.warn(
            f"{f.source}: tokenizer model {model!r} is not supported (gpt2-style BPE and llama SentencePiece)",
            stacklevel=2,
        )
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

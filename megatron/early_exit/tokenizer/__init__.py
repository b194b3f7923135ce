"""Tokenizers behind one interface, selected by Megatron's `--tokenizer-type`.

    GPT2BPETokenizer        --vocab-file vocab.json --merge-file merges.txt (default: GPT-2's own)
    SentencePieceTokenizer  --tokenizer-model x.model
    HuggingFaceTokenizer    --tokenizer-model tokenizer.json, or the directory holding it
    NullTokenizer           --vocab-size N (text is whitespace-separated ids, eod = N)

`Tokenizer.save(directory)` copies a tokenizer's files into a checkpoint and returns a JSON
spec; `load_tokenizer(directory, spec)` rebuilds the same tokenizer from it.
"""

from __future__ import annotations

import os

from megatron.early_exit.tokenizer.base import Tokenizer
from megatron.early_exit.tokenizer.gpt2_bpe import default_gpt2_files

TOKENIZER_TYPES = ("GPT2BPETokenizer", "SentencePieceTokenizer", "HuggingFaceTokenizer", "NullTokenizer")


def build_tokenizer(
    tokenizer_type: str,
    *,
    vocab_file: str | None = None,
    merge_file: str | None = None,
    tokenizer_model: str | None = None,
    vocab_size: int | None = None,
) -> Tokenizer:
    """Build a tokenizer from Megatron's tokenizer flags. Errors are ValueErrors naming the flag."""
    if tokenizer_type == "GPT2BPETokenizer":
        from megatron.early_exit.tokenizer.gpt2_bpe import GPT2BPETokenizer

        if vocab_file is None and merge_file is None:
            vocab_file, merge_file = default_gpt2_files()
        return GPT2BPETokenizer(vocab_file, merge_file)
    if tokenizer_type == "SentencePieceTokenizer":
        from megatron.early_exit.tokenizer.sentencepiece import SentencePieceTokenizer

        return SentencePieceTokenizer(tokenizer_model)
    if tokenizer_type == "HuggingFaceTokenizer":
        from megatron.early_exit.tokenizer.huggingface import HuggingFaceTokenizer

        return HuggingFaceTokenizer(tokenizer_model)
    if tokenizer_type == "NullTokenizer":
        from megatron.early_exit.tokenizer.null import NullTokenizer

        return NullTokenizer(vocab_size)
    raise ValueError(
        f"--tokenizer-type {tokenizer_type!r} is not supported; choose one of {', '.join(TOKENIZER_TYPES)}"
    )


def load_tokenizer(directory: str, spec: dict) -> Tokenizer:
    """Rebuild a tokenizer from the spec `Tokenizer.save(directory)` returned (paths relative to
    `directory`)."""
    if not isinstance(spec, dict) or "tokenizer_type" not in spec:
        raise ValueError(f"not a tokenizer spec (a dict with 'tokenizer_type'): {spec!r}")

    def resolve(key: str) -> str | None:
        name = spec.get(key)
        return os.path.join(directory, name) if name else None

    return build_tokenizer(
        spec["tokenizer_type"],
        vocab_file=resolve("vocab_file"),
        merge_file=resolve("merge_file"),
        tokenizer_model=resolve("tokenizer_model"),
        vocab_size=spec.get("vocab_size"),
    )


__all__ = ["TOKENIZER_TYPES", "Tokenizer", "build_tokenizer", "default_gpt2_files", "load_tokenizer"]

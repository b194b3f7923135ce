"""Tokenizers behind one interface: GPT-2 BPE, SentencePiece, HF tokenizer.json, Null."""

from __future__ import annotations

import os

from megatron.early_exit.tokenizer.base import Tokenizer
from megatron.early_exit.tokenizer.gpt2_bpe import default_gpt2_files

TYPES = ("GPT2BPETokenizer", "SentencePieceTokenizer", "HuggingFaceTokenizer", "NullTokenizer")


def build_tokenizer(tokenizer_type: str, *, vocab_file=None, merge_file=None, tokenizer_model=None, vocab_size=None):
    """Build a tokenizer from Megatron's flags; errors name the flag."""
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
    raise ValueError(f"--tokenizer-type {tokenizer_type!r} is not one of {', '.join(TYPES)}")


def load_tokenizer(directory: str, spec: dict) -> Tokenizer:
    """Rebuild a tokenizer saved with `Tokenizer.save(directory)`."""

    def path(key):
        return os.path.join(directory, spec[key]) if spec.get(key) else None

    kind = spec.get("tokenizer_type")
    return build_tokenizer(
        kind,
        vocab_file=path("vocab_file"),
        merge_file=path("merge_file"),
        tokenizer_model=path("tokenizer_model"),
        vocab_size=spec.get("vocab_size"),
    )


__all__ = ["Tokenizer", "build_tokenizer", "load_tokenizer", "default_gpt2_files", "TYPES"]

"""Megatron's NullTokenizer: text is whitespace-separated integer ids (tests, mock data)."""

from __future__ import annotations

from megatron.early_exit.tokenizer.base import Tokenizer


class NullTokenizer(Tokenizer):
    """Ids 0..N-1 are tokens; N is the end-of-document id, so the vocabulary has N + 1."""

    def __init__(self, vocab_size: int) -> None:
        if vocab_size is None or vocab_size < 1:
            raise ValueError("--tokenizer-type NullTokenizer needs --vocab-size N (N >= 1)")
        self.n = int(vocab_size)

    @property
    def vocab_size(self) -> int:
        return self.n + 1

    @property
    def eod(self) -> int:
        return self.n

    def tokenize(self, text: str) -> list[int]:
        try:
            ids = [int(x) for x in text.split()]
        except ValueError:
            raise ValueError(f"NullTokenizer: text must be whitespace-separated integers, got {text[:40]!r}") from None
        bad = [i for i in ids if not 0 <= i <= self.n]
        if bad:
            raise ValueError(f"NullTokenizer: ids {bad[:5]} outside 0..{self.n}")
        return ids

    def detokenize(self, ids: list[int]) -> str:
        return " ".join(str(int(i)) for i in ids)

    def save(self, directory: str) -> dict:
        return {"tokenizer_type": "NullTokenizer", "vocab_size": self.n}

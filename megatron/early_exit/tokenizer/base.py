"""The tokenizer interface shared by training, data preprocessing, checkpoints and inference.

Method and property names follow Megatron-LM (`tokenize`, `detokenize`, `vocab_size`, `eod`),
so code written against Megatron's tokenizers reads the same here.
"""

from __future__ import annotations

import json
import os
import shutil
from abc import ABC, abstractmethod

#: What `transformers.AutoTokenizer.from_pretrained` reads to pick a tokenizer class.
HF_CONFIG_FILE = "tokenizer_config.json"


class Tokenizer(ABC):
    """Abstract tokenizer: text <-> token ids, plus the special ids the trainer needs.

    `vocab_size` is the real vocabulary size (every id a tokenizer can produce is below it);
    padding the embedding table to a multiple is done by the model config, not here.
    """

    #: A Jinja chat template (from a Hugging Face tokenizer_config.json), when one ships.
    chat_template: str | None = None

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids in the vocabulary (before any padding)."""

    @property
    @abstractmethod
    def eod(self) -> int:
        """The end-of-document id appended between documents."""

    @property
    def bos(self) -> int | None:
        """The beginning-of-sequence id, or None when the vocabulary has none."""
        return None

    @abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Text to ids. Never adds BOS/EOS on its own."""

    @abstractmethod
    def detokenize(self, ids: list[int]) -> str:
        """Ids to text. Ids outside the vocabulary (embedding padding) are dropped."""

    @abstractmethod
    def save(self, directory: str) -> dict:
        """Copy the files this tokenizer needs into `directory` and return a JSON-serialisable
        spec (file names relative to `directory`) from which `load_tokenizer` rebuilds it."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, eod={self.eod}, bos={self.bos})"


def require_file(path: str | None, flag: str, what: str) -> str:
    """Return `path` if it names a readable file, else raise a ValueError that names the flag."""
    if path is None:
        raise ValueError(f"{flag} is required: {what}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"{flag}: no such file: {path}")
    return path


def copy_into(directory: str, source: str, name: str) -> str:
    """Copy `source` to `directory/name` (creating the directory) and return `name`."""
    os.makedirs(directory, exist_ok=True)
    target = os.path.join(directory, name)
    if os.path.abspath(source) != os.path.abspath(target):
        shutil.copyfile(source, target)
    return name


def write_hf_config(directory: str, config: dict) -> None:
    """Write `tokenizer_config.json` so `transformers.AutoTokenizer` can load `directory`
    (None values left out); an existing one (copied from the source) is kept."""
    path = os.path.join(directory, HF_CONFIG_FILE)
    if os.path.isfile(path):
        return
    os.makedirs(directory, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump({k: v for k, v in config.items() if v is not None}, f, indent=2, ensure_ascii=False)


def in_vocab(ids, size: int) -> list[int]:
    """The ids as Python ints, keeping those in 0..size-1 (padded-vocabulary ids fall away)."""
    out = []
    for i in ids:
        i = int(i)
        if 0 <= i < size:
            out.append(i)
    return out

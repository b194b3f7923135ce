"""The one tokenizer interface every tool uses (Megatron's method names)."""

from __future__ import annotations

import os
import shutil
from abc import ABC, abstractmethod


class Tokenizer(ABC):
    """tokenize(text) -> ids, detokenize(ids) -> text, plus the special ids."""

    chat_template: str | None = None

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @property
    @abstractmethod
    def eod(self) -> int: ...

    @property
    def bos(self) -> int | None:
        return None

    @abstractmethod
    def tokenize(self, text: str) -> list[int]: ...

    @abstractmethod
    def detokenize(self, ids: list[int]) -> str: ...

    @abstractmethod
    def save(self, directory: str) -> dict:
        """Copy the files this tokenizer needs into `directory`; return a JSON spec with
        paths relative to it, from which `load_tokenizer` rebuilds it."""


def require_file(path: str | None, flag: str) -> str:
    if path is None:
        raise ValueError(f"{flag} is required for this tokenizer")
    if not os.path.isfile(path):
        raise ValueError(f"{flag}: no such file: {path}")
    return path


def copy_into(directory: str, path: str, name: str) -> str:
    os.makedirs(directory, exist_ok=True)
    shutil.copyfile(path, os.path.join(directory, name))
    return name

"""A Hugging Face `tokenizer.json` (the `tokenizers` library), e.g. Llama-3, Qwen2, SmolLM2.

`tokenizer_config.json` beside it, when present, names the EOS/BOS tokens and carries the
chat template.
"""

from __future__ import annotations

import json
import os

from megatron.early_exit.tokenizer.base import Tokenizer, copy_into

EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|im_end|>", "<|eot_id|>", "<eos>")


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


class HuggingFaceTokenizer(Tokenizer):
    def __init__(self, path: str) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        if path is None:
            raise ValueError(
                "--tokenizer-model is required for HuggingFaceTokenizer (a tokenizer.json or its directory)"
            )
        tok_file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.isfile(tok_file):
            raise ValueError(f"--tokenizer-model: no such file: {tok_file}")
        self.tokenizer_file = tok_file
        try:
            self.tok = HFTokenizer.from_file(tok_file)
        except Exception as e:  # the library raises a bare Exception on malformed JSON
            raise ValueError(f"--tokenizer-model {tok_file}: not a tokenizer.json: {e}") from None
        self.config_file = os.path.join(os.path.dirname(tok_file), "tokenizer_config.json")
        config = {}
        if os.path.isfile(self.config_file):
            with open(self.config_file, encoding="utf-8") as f:
                config = json.load(f)
        else:
            self.config_file = None
        self.chat_template = config.get("chat_template")
        eos = _token_text(config.get("eos_token"))
        candidates = ([eos] if eos else []) + list(EOS_CANDIDATES)
        ids = [self.tok.token_to_id(t) for t in candidates]
        found = [i for i in ids if i is not None]
        if not found:
            raise ValueError(f"--tokenizer-model {tok_file}: cannot find an end-of-text token")
        self._eod = found[0]
        bos = _token_text(config.get("bos_token"))
        self._bos = self.tok.token_to_id(bos) if bos else None

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def bos(self) -> int | None:
        return self._bos

    def tokenize(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def detokenize(self, ids: list[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, directory: str) -> dict:
        spec = {
            "tokenizer_type": "HuggingFaceTokenizer",
            "tokenizer_model": copy_into(directory, self.tokenizer_file, "tokenizer.json"),
        }
        if self.config_file:
            copy_into(directory, self.config_file, "tokenizer_config.json")
        return spec

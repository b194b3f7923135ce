"""A Hugging Face `tokenizer.json` (the `tokenizers` library): Llama-3, Qwen2, SmolLM2, GPT-2, ...

`--tokenizer-model` is the tokenizer.json itself or the directory holding it. Companion files
beside it are read when present:
  tokenizer_config.json    eos_token / bos_token, chat_template
  special_tokens_map.json  eos_token / bos_token (older exports)
  chat_template.jinja      the chat template (newer exports keep it out of the config)
Without a configured eos token, eod is the first of the usual end-of-text tokens the
vocabulary has. `tokenize` never adds special tokens (no automatic BOS from a post-processor).
"""

from __future__ import annotations

import json
import os

from megatron.early_exit.tokenizer.base import Tokenizer, copy_into, in_vocab, write_hf_config

EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<eos>")
BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "<bos>")
COMPANIONS = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def _token_content(value) -> str | None:
    """A special token as written in HF configs: a string, or an AddedToken dict with "content"."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _pick_chat_template(value) -> str | None:
    """`chat_template` is a string, or a list of {"name", "template"} of which "default" is used."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if "default" in named:
            return named["default"]
        return next(iter(named.values()), None)
    return None


def _read_json(path: str, flag_path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"--tokenizer-model {flag_path}: cannot read {os.path.basename(path)}: {e}") from None
    return data if isinstance(data, dict) else {}


class HuggingFaceTokenizer(Tokenizer):
    def __init__(self, path: str) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        if path is None:
            raise ValueError(
                "--tokenizer-model is required: HuggingFaceTokenizer needs a tokenizer.json or a directory holding one"
            )
        path = os.fspath(path)
        tokenizer_file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.isfile(tokenizer_file):
            raise ValueError(f"--tokenizer-model: no such file: {tokenizer_file}")
        self.tokenizer_file = tokenizer_file
        try:
            self.tok = HFTokenizer.from_file(tokenizer_file)
        except Exception as e:  # the Rust library raises a plain Exception for a malformed file
            raise ValueError(f"--tokenizer-model {tokenizer_file}: not a Hugging Face tokenizer.json: {e}") from None

        folder = os.path.dirname(os.path.abspath(tokenizer_file))
        self.companion_files = [
            os.path.join(folder, name) for name in COMPANIONS if os.path.isfile(os.path.join(folder, name))
        ]
        config, special_map, template_file = {}, {}, None
        for f in self.companion_files:
            name = os.path.basename(f)
            if name == "tokenizer_config.json":
                config = _read_json(f, tokenizer_file)
            elif name == "special_tokens_map.json":
                special_map = _read_json(f, tokenizer_file)
            else:
                template_file = f

        self.chat_template = _pick_chat_template(config.get("chat_template"))
        if self.chat_template is None and template_file is not None:
            with open(template_file, encoding="utf-8") as f:
                self.chat_template = f.read()

        vocab = self.tok.get_vocab(with_added_tokens=True)
        self._vocab_size = max(self.tok.get_vocab_size(with_added_tokens=True), max(vocab.values(), default=-1) + 1)

        eos = _token_content(config.get("eos_token")) or _token_content(special_map.get("eos_token"))
        eod = self._first_known(([eos] if eos else []) + list(EOS_CANDIDATES))
        if eod is None:
            raise ValueError(
                f"--tokenizer-model {tokenizer_file}: no end-of-text token found (set eos_token in "
                f"tokenizer_config.json, or have one of {', '.join(EOS_CANDIDATES)} in the vocabulary)"
            )
        self._eod = eod

        if "bos_token" in config or "bos_token" in special_map:
            bos = _token_content(config.get("bos_token")) or _token_content(special_map.get("bos_token"))
            self._bos = self._first_known([bos]) if bos else None
        else:  # no configuration says: recognise the usual BOS tokens
            self._bos = self._first_known(list(BOS_CANDIDATES))

    def _first_known(self, tokens: list[str]) -> int | None:
        for token in tokens:
            i = self.tok.token_to_id(token)
            if i is not None:
                return i
        return None

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def bos(self) -> int | None:
        return self._bos

    def tokenize(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def detokenize(self, ids: list[int]) -> str:
        return self.tok.decode(in_vocab(ids, self._vocab_size), skip_special_tokens=False)

    def save(self, directory: str) -> dict:
        spec = {
            "tokenizer_type": "HuggingFaceTokenizer",
            "tokenizer_model": copy_into(directory, self.tokenizer_file, "tokenizer.json"),
        }
        for f in self.companion_files:
            copy_into(directory, f, os.path.basename(f))
        bos = self.tok.id_to_token(self._bos) if self._bos is not None else None
        write_hf_config(  # only when the source had none
            directory,
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "eos_token": self.tok.id_to_token(self._eod),
                "bos_token": bos,
                "chat_template": self.chat_template,
                "clean_up_tokenization_spaces": False,
            },
        )
        return spec

"""SentencePiece models (`--tokenizer-model x.model`): Llama-1/2 style vocabularies."""

from __future__ import annotations

from megatron.early_exit.tokenizer.base import Tokenizer, copy_into, require_file


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, model_file: str) -> None:
        import sentencepiece

        self.model_file = require_file(model_file, "--tokenizer-model")
        self.sp = sentencepiece.SentencePieceProcessor()
        try:
            self.sp.Load(model_file)
        except (OSError, RuntimeError) as e:
            raise ValueError(f"--tokenizer-model {model_file}: not a SentencePiece model: {e}") from None

    @property
    def vocab_size(self) -> int:
        return self.sp.GetPieceSize()

    @property
    def eod(self) -> int:
        return self.sp.eos_id()

    @property
    def bos(self) -> int | None:
        b = self.sp.bos_id()
        return b if b >= 0 else None

    def tokenize(self, text: str) -> list[int]:
        return list(self.sp.EncodeAsIds(text))

    def detokenize(self, ids: list[int]) -> str:
        size = self.vocab_size
        return self.sp.DecodeIds([int(i) for i in ids if 0 <= int(i) < size])

    def save(self, directory: str) -> dict:
        return {
            "tokenizer_type": "SentencePieceTokenizer",
            "tokenizer_model": copy_into(directory, self.model_file, "tokenizer.model"),
        }

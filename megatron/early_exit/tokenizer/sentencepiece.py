"""A SentencePiece model (`--tokenizer-model x.model`), e.g. Llama-1/2 style vocabularies.

eod is the model's end-of-sentence piece and bos its beginning-of-sentence piece; neither is
added by `tokenize` (the data pipeline appends eod itself).
"""

from __future__ import annotations

from megatron.early_exit.tokenizer.base import Tokenizer, copy_into, in_vocab, require_file


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, model_file: str) -> None:
        import sentencepiece

        self.model_file = require_file(
            model_file, "--tokenizer-model", "SentencePieceTokenizer needs a SentencePiece .model file"
        )
        self.sp = sentencepiece.SentencePieceProcessor()
        try:
            self.sp.Load(self.model_file)
        except (OSError, RuntimeError) as e:
            raise ValueError(f"--tokenizer-model {self.model_file}: not a SentencePiece model: {e}") from None
        self._vocab_size = self.sp.GetPieceSize()
        self._eod = self.sp.eos_id()
        if self._eod < 0:
            raise ValueError(f"--tokenizer-model {self.model_file}: the model has no end-of-sentence (eos) piece")
        bos = self.sp.bos_id()
        self._bos = bos if bos >= 0 else None

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
        return list(self.sp.EncodeAsIds(text))

    def detokenize(self, ids: list[int]) -> str:
        return self.sp.DecodeIds(in_vocab(ids, self._vocab_size))

    def save(self, directory: str) -> dict:
        return {
            "tokenizer_type": "SentencePieceTokenizer",
            "tokenizer_model": copy_into(directory, self.model_file, "tokenizer.model"),
        }

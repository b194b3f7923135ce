"""A SentencePiece model (`--tokenizer-model x.model`), e.g. Llama-1/2 style vocabularies.

eod is the model's end-of-sentence piece and bos its beginning-of-sentence piece; neither is
added by `tokenize` (the data pipeline appends eod itself).

Saved beside `tokenizer.model`: a `tokenizer.json` that reproduces a BPE model exactly (the
pieces, merges ranked by the merged piece's rank, byte fallback, SentencePiece's dummy prefix
as a normaliser) and a `tokenizer_config.json`, so `transformers.AutoTokenizer` loads the
folder with our ids. transformers' own LlamaTokenizer differs on text that starts with a space
(its Metaspace does not prepend to a leading "▁"), hence the explicit file. Models whose
normaliser changes text (NFKC, whitespace folding) or unigram models get only the config,
with transformers' LlamaTokenizer (as do models with user-defined pieces).
"""

from __future__ import annotations

import os

from megatron.early_exit.tokenizer.base import Tokenizer, copy_into, in_vocab, require_file, write_hf_config

SPACE = "\u2581"  # SentencePiece's visible space
NORMALISER_PROBE = " a  b\tc \ufb01 \u00e9"  # leading / double spaces, a tab, a ligature NFKC would split


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
        spec = {
            "tokenizer_type": "SentencePieceTokenizer",
            "tokenizer_model": copy_into(directory, self.model_file, "tokenizer.model"),
        }
        self.save_hf_files(directory)
        return spec

    def _piece(self, i: int | None) -> str | None:
        return self.sp.IdToPiece(i) if i is not None and i >= 0 else None

    def save_hf_files(self, directory: str) -> None:
        """tokenizer.json (when it can be exact) and tokenizer_config.json, for AutoTokenizer."""
        tokenizer_json = hf_tokenizer_json(self.sp)
        if tokenizer_json is not None:
            with open(os.path.join(directory, "tokenizer.json"), "w", encoding="utf-8") as f:
                f.write(tokenizer_json)
        write_hf_config(
            directory,
            {
                "tokenizer_class": "PreTrainedTokenizerFast" if tokenizer_json else "LlamaTokenizer",
                "bos_token": self._piece(self._bos),
                "eos_token": self._piece(self._eod),
                "unk_token": self._piece(self.sp.unk_id()),
                "pad_token": self._piece(self.sp.pad_id()),
                "add_bos_token": False,
                "add_eos_token": False,
                "chat_template": self.chat_template,
                "clean_up_tokenization_spaces": False,
            },
        )


def _exact_in_tokenizers(sp) -> bool:
    """A BPE model (only BPE has merges to rebuild) whose normaliser keeps text as is, without
    user-defined pieces (SentencePiece matches them after its dummy prefix, which an HF added
    token cannot copy)."""
    if sp.DecodeIds(sp.EncodeAsIds(NORMALISER_PROBE)) != NORMALISER_PROBE or _user_defined(sp):
        return False  # NFKC or whitespace folding: only transformers' converter reproduces it
    # Unigram models give every piece a log-probability; BPE models rank pieces by negative id.
    scores = [sp.GetScore(i) for i in range(sp.GetPieceSize()) if _kind(sp, i) == "normal"]
    return all(a > b for a, b in zip(scores, scores[1:]))


def _kind(sp, i: int) -> str:
    if sp.IsControl(i):
        return "control"
    if sp.IsUnknown(i):
        return "unknown"
    if sp.IsByte(i):
        return "byte"
    return "unused" if sp.IsUnused(i) else "normal"


def _user_defined(sp) -> list[int]:
    """Ids of user-defined pieces (read from the model proto; without protobuf, none are assumed)."""
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError:
        return []
    m = pb.ModelProto()
    m.ParseFromString(sp.serialized_model_proto())
    return [i for i, p in enumerate(m.pieces) if p.type == pb.ModelProto.SentencePiece.USER_DEFINED]


def _merges(vocab: dict[str, int]) -> list[tuple[str, str]]:
    """BPE merges: every split of a piece into two pieces, ranked by the merged piece (SentencePiece
    merges the pair whose result ranks first), then by the parts."""
    found = []
    for piece, rank in vocab.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                found.append((rank, vocab[left], vocab[right], left, right))
    return [(left, right) for *_, left, right in sorted(found)]


def hf_tokenizer_json(sp) -> str | None:
    """An HF tokenizer.json equal to this SentencePiece BPE model, or None where it cannot be exact."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    if not _exact_in_tokenizers(sp):
        return None
    n = sp.GetPieceSize()
    vocab = {sp.IdToPiece(i): i for i in range(n)}
    byte_fallback = any(sp.IsByte(i) for i in range(n))
    unk = sp.IdToPiece(sp.unk_id()) if sp.unk_id() >= 0 else None
    tok = Tokenizer(models.BPE(vocab, _merges(vocab), unk_token=unk, fuse_unk=True, byte_fallback=byte_fallback))
    dummy_prefix = sp.EncodeAsPieces("a")[0].startswith(SPACE)
    steps = [normalizers.Prepend(SPACE)] if dummy_prefix else []
    tok.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", SPACE)])
    strip = [decoders.Strip(content=" ", left=1, right=0)] if dummy_prefix else []
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), *strip])
    control = [AddedToken(sp.IdToPiece(i), special=True, normalized=False) for i in range(n) if sp.IsControl(i)]
    tok.add_special_tokens(control)
    return tok.to_str()

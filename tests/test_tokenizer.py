"""Tokenizers round-trip text and agree with reference implementations."""

import json
import unicodedata

import pytest
import tokenizers

from megatron.early_exit.tokenizer import build_tokenizer, default_gpt2_files, load_tokenizer

EDGE_CASES = [
    "Hello world!",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\n\n",
    "naïve café — 東京 🙂 ∑x²",
    "it's they're we've I'm you'll he'd",
    "12345 3.14159 1e-5",
    "",
]


def reference_gpt2():
    vocab, merges = default_gpt2_files()
    ref = tokenizers.Tokenizer(tokenizers.models.BPE.from_file(vocab, merges))
    ref.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    ref.decoder = tokenizers.decoders.ByteLevel()
    return ref


def test_gpt2_bpe_matches_reference_and_round_trips(corpus_texts):
    tok = build_tokenizer("GPT2BPETokenizer")
    ref = reference_gpt2()
    assert tok.vocab_size == 50257 and tok.eod == 50256
    for text in EDGE_CASES + corpus_texts:
        ids = tok.tokenize(text)
        assert ids == ref.encode(text).ids, text[:60]
        assert tok.detokenize(ids) == text


def test_huggingface_tokenizer_json(tmp_path, corpus_texts):
    ref = reference_gpt2()
    ref.add_special_tokens(["<|endoftext|>"])
    path = tmp_path / "tokenizer.json"
    ref.save(str(path))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "<|endoftext|>", "chat_template": "{{x}}"})
    )
    tok = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(tmp_path))
    assert tok.eod == 50256 and tok.chat_template == "{{x}}"
    gpt2 = build_tokenizer("GPT2BPETokenizer")
    for text in EDGE_CASES + corpus_texts[:50]:
        assert tok.tokenize(text) == gpt2.tokenize(text)
        assert tok.detokenize(tok.tokenize(text)) == text


def test_sentencepiece_round_trip(corpus, corpus_texts):
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(corpus / "tokenizer.model"))
    assert tok.vocab_size == 2000 and tok.eod == 1 and tok.bos == 2
    for text in corpus_texts[:100] + ["naïve café 東京"]:
        ids = tok.tokenize(text)
        assert all(0 <= i < 2000 for i in ids)
        # SentencePiece's default normalisation: NFKC, whitespace runs collapsed.
        assert tok.detokenize(ids) == " ".join(unicodedata.normalize("NFKC", text).split())


def test_null_tokenizer():
    tok = build_tokenizer("NullTokenizer", vocab_size=128)
    assert tok.vocab_size == 129 and tok.eod == 128
    assert tok.tokenize("3 17 5") == [3, 17, 5] and tok.detokenize([3, 17, 5]) == "3 17 5"
    with pytest.raises(ValueError, match="outside"):
        tok.tokenize("500")


@pytest.mark.parametrize("kind", ["GPT2BPETokenizer", "SentencePieceTokenizer", "NullTokenizer"])
def test_save_and_load_give_identical_ids(tmp_path, corpus, corpus_texts, kind):
    kwargs = {
        "SentencePieceTokenizer": {"tokenizer_model": str(corpus / "tokenizer.model")},
        "NullTokenizer": {"vocab_size": 50},
    }.get(kind, {})
    tok = build_tokenizer(kind, **kwargs)
    spec = tok.save(str(tmp_path / "tok"))
    json.dumps(spec)  # a JSON spec with relative paths
    again = load_tokenizer(str(tmp_path / "tok"), spec)
    text = "1 2 3" if kind == "NullTokenizer" else corpus_texts[3]
    assert again.tokenize(text) == tok.tokenize(text) and again.eod == tok.eod


def test_errors_name_the_flag(tmp_path):
    with pytest.raises(ValueError, match="--tokenizer-type"):
        build_tokenizer("BertTokenizer")
    with pytest.raises(ValueError, match="--vocab-file"):
        build_tokenizer("GPT2BPETokenizer", vocab_file=str(tmp_path / "missing.json"), merge_file="x")
    with pytest.raises(ValueError, match="--tokenizer-model"):
        build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(tmp_path / "missing.model"))
    with pytest.raises(ValueError, match="--vocab-size"):
        build_tokenizer("NullTokenizer")

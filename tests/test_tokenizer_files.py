"""Checkpoint tokenizer folders load with `transformers.AutoTokenizer.from_pretrained` and give our ids.

Every tokenizer type that has a text vocabulary is covered: GPT-2 BPE (vocab.json + merges.txt),
HF tokenizer.json (with and without its own tokenizer_config.json) and SentencePiece (BPE, with
byte fallback). NullTokenizer is skipped by design: its "text" is whitespace-separated ids,
which no transformers tokenizer class reads.
"""

from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

transformers = pytest.importorskip("transformers", reason="needs transformers (pip install .[hf])")

from megatron.early_exit.tokenizer import build_tokenizer, load_tokenizer  # noqa: E402

TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    " leading space, then  two and a tab\tend",
    "Early-exit models decode faster; don't they? 12345 tokens.\n\nNew paragraph.",
    "naïve café – 東京 🙂",
    "",
]


def _check(tok, directory: str, add_special_tokens: bool = True):
    """Save `tok`, reload it with AutoTokenizer and with our loader: same ids on every text."""
    spec = tok.save(directory)
    assert os.path.isfile(os.path.join(directory, "tokenizer_config.json"))
    auto = transformers.AutoTokenizer.from_pretrained(directory)
    ours = load_tokenizer(directory, spec)
    for text in TEXTS:
        ids = tok.tokenize(text)
        assert auto(text, add_special_tokens=add_special_tokens).input_ids == ids, (type(auto).__name__, text)
        assert ours.tokenize(text) == ids
        assert auto.decode(ids) == tok.detokenize(ids), text
    if tok.eod is not None:
        assert auto.convert_tokens_to_ids(auto.eos_token) == tok.eod
    return auto


def test_gpt2_bpe_folder(tmp_path):
    tok = build_tokenizer("GPT2BPETokenizer")  # GPT-2's own vocab.json + merges.txt
    auto = _check(tok, str(tmp_path / "gpt2"))
    assert type(auto).__name__ == "GPT2Tokenizer"


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TEXTS * 10, trainer)
    d = tmp_path_factory.mktemp("hf")
    tok.save(str(d / "tokenizer.json"))
    return str(d / "tokenizer.json")


def test_hf_tokenizer_json_without_config(tmp_path, tokenizer_json):
    tok = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=tokenizer_json)
    auto = _check(tok, str(tmp_path / "out"))
    cfg = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert cfg["eos_token"] == "<|endoftext|>" and type(auto).__name__ in (
        "PreTrainedTokenizerFast",
        "TokenizersBackend",
    )


def test_hf_tokenizer_json_keeps_its_config(tmp_path, tokenizer_json):
    src = tmp_path / "src"
    src.mkdir()
    (src / "tokenizer.json").write_text(open(tokenizer_json).read())
    own = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_start|>", "chat_template": "{{ 1 }}"}
    (src / "tokenizer_config.json").write_text(json.dumps(own))
    tok = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(src))
    _check(tok, str(tmp_path / "out"))
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text()) == own


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("spm")
    corpus = d / "corpus.txt"
    corpus.write_text("\n".join(["the quick brown fox jumps over the lazy dog", "early exit models 123"] * 50))
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(d / "sp"),
        vocab_size=300,
        model_type="bpe",
        byte_fallback=True,  # Llama's settings
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        minloglevel=2,
    )
    return str(d / "sp.model")


def test_sentencepiece_folder(tmp_path, sp_model):
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=sp_model)
    auto = _check(tok, str(tmp_path / "sp"))
    assert type(auto).__name__ != "LlamaTokenizer"  # our exact tokenizer.json, not transformers' conversion
    assert os.path.isfile(tmp_path / "sp" / "tokenizer.json")


def test_sentencepiece_with_normaliser_falls_back_to_llama_class(tmp_path):
    import sentencepiece as spm

    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(["the quick brown fox", "jumps over the lazy dog"] * 30))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "n"), vocab_size=60, model_type="bpe", minloglevel=2
    )  # default nmt_nfkc normaliser, folds whitespace: no exact tokenizer.json
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(tmp_path / "n.model"))
    tok.save(str(tmp_path / "out"))
    assert not os.path.isfile(tmp_path / "out" / "tokenizer.json")
    cfg = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "LlamaTokenizer"
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert auto("the lazy fox").input_ids == tok.tokenize("the lazy fox")

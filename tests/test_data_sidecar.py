"""Issue 16 (and the data side of 14): preprocess_data.py writes a tokenizer sidecar; training
refuses data made with another tokenizer or with ids beyond the model's vocabulary."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from megatron.early_exit import checkpointing as ckpt
from megatron.early_exit.data.checks import SIDECAR_SUFFIX, read_index, tokenizer_info
from megatron.early_exit.tokenizer import build_tokenizer
from megatron.early_exit.training.trainer import main as train_main

pytestmark = pytest.mark.usefixtures("one_thread")

MODEL = (
    "--num-layers 2 --hidden-size 16 --num-attention-heads 2 --seq-length 16 --micro-batch-size 2 "
    "--global-batch-size 2 --train-iters 2 --lr 1e-3 --log-interval 100 --eval-interval 0 --split 1 --dry-run"
).split()


def exit_code(main, *argv) -> int:
    """The exit code of a tool's `main(argv)`: 0 where it returns, else what it exits with."""
    with pytest.raises(SystemExit) as e:
        main(list(argv))
        raise SystemExit(0)
    return e.value.code


def preprocess(*argv):
    import preprocess_data

    return exit_code(preprocess_data.main, *argv)


@pytest.fixture(scope="module")
def docs(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("docs") / "small.jsonl"
    with open(corpus / "train.jsonl") as f, open(out, "w") as g:
        for line in list(f)[:6]:
            g.write(json.dumps({"text": json.loads(line)["text"][:1500]}) + "\n")
    return out


@pytest.fixture(scope="module")
def prefixes(docs, corpus, tmp_path_factory):
    d = tmp_path_factory.mktemp("prefixes")
    sp = ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", str(corpus / "tokenizer.model")]
    assert preprocess("--input", str(docs), "--output-prefix", str(d / "sp"), *sp, "--append-eod") == 0
    gpt2 = ["--tokenizer-type", "GPT2BPETokenizer"]
    assert preprocess("--input", str(docs), "--output-prefix", str(d / "gpt2"), *gpt2, "--append-eod") == 0
    return {"sp": (str(d / "sp_text_document"), sp), "gpt2": (str(d / "gpt2_text_document"), gpt2)}


def train(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        train_main([*MODEL, *argv])
        raise SystemExit(0)
    captured = capsys.readouterr()
    return e.value.code, captured.err.strip()


def test_the_sidecar_names_the_tokenizer_and_counts(prefixes, corpus):
    prefix, _ = prefixes["sp"]
    side = json.load(open(prefix + SIDECAR_SUFFIX))
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(corpus / "tokenizer.model"))
    assert side["tokenizer"] == tokenizer_info(tok) and side["tokenizer"]["type"] == "SentencePieceTokenizer"
    assert side["tokenizer"]["vocab_size"] == 2000 and side["documents"] == 6
    info = read_index(prefix)
    ids = np.memmap(prefix + ".bin", dtype=info.dtype, mode="r")
    assert side["tokens"] == info.tokens == len(ids) and side["max_token_id"] == int(ids.max())
    gpt2 = json.load(open(prefixes["gpt2"][0] + SIDECAR_SUFFIX))["tokenizer"]
    assert gpt2["type"] == "GPT2BPETokenizer" and gpt2["eod"] == 50256
    assert gpt2["fingerprint"] != side["tokenizer"]["fingerprint"]


@pytest.mark.parametrize(("data", "run"), [("gpt2", "sp"), ("sp", "gpt2")])
def test_data_from_another_tokenizer_is_one_line_naming_both(prefixes, capsys, data, run):
    prefix, _ = prefixes[data]
    code, err = train(capsys, "--data-path", prefix, *prefixes[run][1])
    assert code == 2 and len(err.splitlines()) == 1
    names = {"sp": "SentencePieceTokenizer", "gpt2": "GPT2BPETokenizer"}
    assert f"--data-path {prefix} was tokenized with {names[data]}" in err
    assert f"this run's tokenizer is {names[run]}" in err


def test_matching_data_starts_without_a_warning(prefixes, capsys):
    prefix, flags = prefixes["sp"]
    code, err = train(capsys, "--data-path", prefix, *flags)
    assert code == 0 and "warning" not in err and "error" not in err


def _without_sidecar(prefix, tmp_path):
    import shutil

    out = str(tmp_path / "plain")
    for ext in (".bin", ".idx"):
        shutil.copy(prefix + ext, out + ext)
    return out


def test_sidecarless_data_trains_with_one_warning(prefixes, tmp_path, capsys):
    prefix, flags = prefixes["sp"]
    plain = _without_sidecar(prefix, tmp_path)
    code, err = train(capsys, "--data-path", plain, *flags)
    assert code == 0 and len(err.splitlines()) == 1 and err.startswith(f"warning: --data-path {plain} has no")


def test_ids_beyond_the_vocabulary_are_refused_before_training(prefixes, tmp_path, capsys):
    plain = _without_sidecar(prefixes["gpt2"][0], tmp_path)  # ids up to 50256, no sidecar
    null = ["--tokenizer-type", "NullTokenizer", "--vocab-size", "1000"]
    code, err = train(capsys, "--data-path", plain, *null)
    assert code == 2 and len(err.splitlines()) == 1 and "beyond the model's vocabulary of 1024" in err


def test_tune_exit_refuses_ids_beyond_the_loaded_models_vocabulary(prefixes, tmp_path, capsys):
    from megatron.early_exit.config import ModelConfig
    from megatron.early_exit.model import EarlyExitGPT

    cfg = ModelConfig(2, 16, 2, 1024, 16, exit_layer_nums=[1], use_exit_norm=True)
    ckpt.save_checkpoint(str(tmp_path / "m"), 0, EarlyExitGPT(cfg), build_tokenizer("NullTokenizer", vocab_size=1000))
    plain = _without_sidecar(prefixes["gpt2"][0], tmp_path)
    code, err = train(capsys, "--load", str(tmp_path / "m"), "--tune-exit", "--data-path", plain)
    assert code == 2 and "has token id 50256, beyond the model's vocabulary of 1024" in err


def test_preprocess_refuses_an_empty_corpus_and_leaves_nothing(tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    argv = ["--output-prefix", str(tmp_path / "out"), "--tokenizer-type", "NullTokenizer", "--vocab-size", "10"]
    assert preprocess("--input", str(tmp_path / "empty.jsonl"), *argv) == 2
    assert "no documents" in capsys.readouterr().err
    assert os.listdir(tmp_path) == ["empty.jsonl"]


@pytest.mark.parametrize(
    ("body", "where", "what"),
    [
        (b'{"text": "1 2"}\n{"text": "3"}\n{"text": \n', ":3:", "invalid JSON"),
        (b'{"text": "1 2"}\n{"text": "\xff\xfe"}\n', ":2:", "not valid UTF-8"),
        (b'{"text": "1 2"}\n{"text": "1 two"}\n', ":2:", "the tokenizer failed"),
    ],
    ids=["json", "utf8", "tokenizer"],
)
def test_preprocess_errors_name_file_and_line_and_leave_no_partial_output(tmp_path, capsys, body, where, what):
    src = tmp_path / "in.jsonl"
    src.write_bytes(body)
    argv = ["--output-prefix", str(tmp_path / "out"), "--tokenizer-type", "NullTokenizer", "--vocab-size", "10"]
    assert preprocess("--input", str(src), *argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{src}{where}" in err and what in err
    assert os.listdir(tmp_path) == ["in.jsonl"]  # no .bin.tmp, no .idx

"""tools/make_distillation_corpus.py: the model's own greedy answers to summary prompts from aclsum
papers outside the test split, as token ids that preprocess_data.py takes as they are."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from megatron.early_exit.data.checks import read_index
from megatron.early_exit.inference import EarlyExitEngine, GenerationSettings
from tests.test_data_sidecar import exit_code, preprocess  # a tool's exit code, as the sidecar tests run it
from tests.test_ee_sweep import tiny_gpt2_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ck") / "ck")
    model, tok = tiny_gpt2_checkpoint(path, num_layers=2, max_position_embeddings=512)
    return path, model, tok


def run_tool(*argv) -> int:
    import make_distillation_corpus

    return exit_code(make_distillation_corpus.main, *argv)


@pytest.fixture(scope="module")
def written(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("distill") / "d.jsonl"
    argv = ["--load", checkpoint[0], "--output", str(out), "--max-prompts", "5", "--max-new-tokens", "3"]
    assert run_tool(*argv, "--max-prompt-chars", "300", "--batch-size", "2") == 0
    with open(out) as f:
        return out, [json.loads(line) for line in f]


def test_records_are_the_models_own_greedy_answers_to_the_sweeps_prompt(checkpoint, written):
    _, model, tok = checkpoint
    _, records = written
    assert len(records) == 5
    engine = EarlyExitEngine(model.eval(), tok)
    for r in records:
        head = r["text"].split("\nSummary:")[0] + "\nSummary:"
        assert head.startswith(f"{r['source'].capitalize()}: ")  # the sweep's format without a chat template
        ids = tok.tokenize(head)
        assert r["prompt"] == head and r["text"].startswith(head)
        assert r["tokens"][: len(ids)] == ids
        (full,) = engine.generate([ids], GenerationSettings("full", max_new_tokens=3))
        assert r["tokens"][len(ids) :] == full.tokens and len(full.tokens) == 3  # the final head's greedy tokens
        assert r["loss_mask"] == [0] * len(ids) + [1] * 3  # the answer's tokens are the targets
        assert r["finish_reason"] == "length"


def test_prompts_come_from_train_and_val_papers_one_paper_at_a_time(written):
    from make_distillation_corpus import split_ids
    from prepare_aclsum_corpus import aclsum_dir

    _, records = written
    test_ids = split_ids(aclsum_dir(), ["test"])
    allowed = split_ids(aclsum_dir(), ["train", "val"])
    assert all(r["paper"] in allowed and r["paper"] not in test_ids for r in records)
    # Round robin over the papers (sorted by id): the first prompts are each paper's abstract.
    assert [r["source"] for r in records] == ["abstract"] * 5
    assert len({r["paper"] for r in records}) == 5
    assert [r["paper"] for r in records] == sorted(r["paper"] for r in records)


def test_prompts_only_writes_the_prompts_after_the_skipped_ones(checkpoint, written, tmp_path):
    """--prompts-only --skip-prompts 2: the prompts that follow the first two (held out from a
    corpus of those two), as text, without answers: calibrate_thresholds.py --prompts reads them."""
    _, records = written
    out = tmp_path / "p.jsonl"
    argv = ["--load", checkpoint[0], "--output", str(out), "--max-prompts", "3", "--skip-prompts", "2"]
    assert run_tool(*argv, "--max-prompt-chars", "300", "--prompts-only") == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines == [{"prompt": r["prompt"], "paper": r["paper"], "source": r["source"]} for r in records[2:5]]
    assert run_tool(*argv[:-2], "--skip-prompts", "-1", "--prompts-only") == 2


def test_passages_join_paragraphs_up_to_the_limit():
    from make_distillation_corpus import interleave, passages

    paper = {"pdf_parse": {"body_text": [{"text": "a" * 40}, {"text": "b" * 50}, {"text": " "}, {"text": "c" * 30},
                                         {"text": "d" * 150}]}}  # fmt: skip
    assert passages(paper, 100) == ["a" * 40 + "\n" + "b" * 50, "c" * 30, "d" * 100]
    assert interleave([[1, 2, 3], [4], [5, 6]], None) == [1, 4, 5, 2, 6, 3]
    assert interleave([[1, 2, 3], [4], [5, 6]], 4) == [1, 4, 5, 2]


def test_preprocess_takes_the_token_ids_as_they_are(written, tmp_path):
    path, records = written
    prefix = tmp_path / "distill"
    argv = ["--input", str(path), "--output-prefix", str(prefix), "--json-keys", "tokens"]
    assert preprocess(*argv, "--tokenizer-type", "GPT2BPETokenizer") == 0
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(prefix) + "_tokens_document")
    assert len(ds) == len(records)
    for k, r in enumerate(records):
        assert np.asarray(ds[k]).tolist() == r["tokens"]
    assert read_index(str(prefix) + "_tokens_document").tokens == sum(len(r["tokens"]) for r in records)


def test_preprocess_refuses_ids_outside_the_vocabulary_naming_the_line(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text('{"tokens": [1, 2]}\n{"tokens": [3, 11]}\n')
    argv = ["--input", str(src), "--output-prefix", str(tmp_path / "o"), "--json-keys", "tokens"]
    code = preprocess(*argv, "--tokenizer-type", "NullTokenizer", "--vocab-size", "10")
    err = capsys.readouterr().err.strip()
    assert code == 2 and f"{src}:2:" in err and "token ids in 0..10" in err
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]


def test_bad_flags_are_one_line_errors(checkpoint, tmp_path, capsys):
    assert run_tool("--load", checkpoint[0], "--output", str(tmp_path / "x.jsonl"), "--max-prompts", "0") == 2
    assert capsys.readouterr().err.strip() == "error: --max-prompts must be >= 1, got 0"
    assert run_tool("--load", checkpoint[0], "--output", str(tmp_path / "no" / "x.jsonl")) == 2
    assert "--output: no such directory" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x.jsonl")

"""A corpus's own per-token loss mask (a completion-only loss: the answer of a prompt and answer):
`preprocess_data.py --loss-mask-key` writes it beside the tokens, and `--data-loss-mask` makes
each sample's loss mask count a position exactly where its label is a target, in training's
datasets and in the activation cache; clear errors where the mask is missing or another corpus's."""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil

import numpy as np
import pytest

from megatron.early_exit.arguments import parse_args, validate_args
from megatron.early_exit.data import build_datasets
from megatron.early_exit.tokenizer import build_tokenizer
from tests.test_data_sidecar import preprocess
from tests.test_exit_cache import VOCAB, _tool, make_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")
SEQ = 16


def write_corpus(root, name: str, docs: list[list[int]], mask=lambda t: t % 2 == 0, extra=()) -> str:
    """`docs` as a jsonl of token ids with a loss mask (by default: even ids are targets), preprocessed."""
    src = root / f"{name}.jsonl"
    with open(src, "w") as f:
        for d in docs:
            f.write(json.dumps({"tokens": d, "loss_mask": [int(mask(t)) for t in d]}) + "\n")
    argv = ["--input", str(src), "--output-prefix", str(root / name), "--json-keys", "tokens"]
    argv += ["--loss-mask-key", "loss_mask", "--tokenizer-type", "NullTokenizer", "--vocab-size", str(VOCAB - 1)]
    assert preprocess(*argv, *extra) == 0
    return str(root / name) + "_tokens_document"


def random_docs(seed: int, n: int = 30) -> list[list[int]]:
    gen = random.Random(seed)
    return [[gen.randrange(0, VOCAB - 1) for _ in range(gen.randrange(3, 40))] for _ in range(n)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("masked")
    docs = random_docs(0)
    return root, write_corpus(root, "c", docs), docs


def datasets(prefix: str, loss_mask: bool, samples: int = 40):
    tok = build_tokenizer("NullTokenizer", vocab_size=VOCAB - 1)
    return build_datasets(tokenizer=tok, seq_length=SEQ, seed=1, data_path=[prefix], split="1",
                          train_samples=samples, valid_samples=0, test_samples=0, loss_mask=loss_mask)[0]  # fmt: skip


def test_preprocess_writes_the_mask_beside_the_tokens(corpus):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    root, prefix, docs = corpus
    mask = IndexedDataset(prefix + "_loss_mask")
    assert len(mask) == len(docs) and mask.index.dtype == np.uint8
    for k, d in enumerate(docs):
        assert np.asarray(mask[k]).tolist() == [int(t % 2 == 0) for t in d]
    assert os.path.exists(prefix + ".tokenizer.json") and not os.path.exists(prefix + "_loss_mask.tokenizer.json")
    # with --append-eod the end of each document is no target
    eod = write_corpus(root, "e", docs[:3], extra=("--append-eod",))
    ends = IndexedDataset(eod + "_loss_mask")  # held: its documents are views of its memory map
    assert [np.asarray(ends[k]).tolist() for k in range(3)] == [[int(t % 2 == 0) for t in d] + [0] for d in docs[:3]]


def test_every_position_counts_where_its_label_is_a_target(corpus):
    """Samples span documents (each a window of the shuffled concatenation): whatever the window,
    a position counts in the masked dataset exactly where it did before and its label is even."""
    _, prefix, _ = corpus
    plain, masked = datasets(prefix, False), datasets(prefix, True)
    assert len(plain) == len(masked) >= 40  # whole epochs of the corpus
    counted = 0
    for i in range(len(plain)):
        a, b = plain[i], masked[i]
        assert a["tokens"].equal(b["tokens"]) and a["labels"].equal(b["labels"])
        want = a["loss_mask"] * (a["labels"] % 2 == 0).float()
        assert b["loss_mask"].equal(want)
        counted += int(want.sum())
    assert 0 < counted < sum(int(plain[i]["loss_mask"].sum()) for i in range(len(plain)))
    again = pickle.loads(pickle.dumps(masked))  # as a spawned data loader worker gets it
    assert type(again).__name__ == "MaskedGPTDataset" and again[3]["loss_mask"].equal(masked[3]["loss_mask"])


def test_a_missing_or_foreign_mask_is_a_clear_error(corpus, tmp_path, capsys):
    root, prefix, docs = corpus
    shutil.copy(prefix + ".bin", tmp_path / "p.bin")
    shutil.copy(prefix + ".idx", tmp_path / "p.idx")
    shutil.copy(prefix + ".tokenizer.json", tmp_path / "p.tokenizer.json")
    with pytest.raises(ValueError, match=f"--data-loss-mask: no {tmp_path}/p_loss_mask.bin/.idx beside"):
        datasets(str(tmp_path / "p"), True)
    other = write_corpus(tmp_path, "o", random_docs(1))
    for ext in ("bin", "idx"):  # another corpus's mask beside these tokens
        shutil.copy(f"{other}_loss_mask.{ext}", tmp_path / f"p_loss_mask.{ext}")
    with pytest.raises(ValueError, match="lengths differ from .*p's 30: not made with these tokens"):
        datasets(str(tmp_path / "p"), True)
    with pytest.raises(ValueError, match="--data-loss-mask needs --data-path"):
        build_datasets(tokenizer=build_tokenizer("NullTokenizer", vocab_size=VOCAB - 1), seq_length=SEQ, seed=1,
                       data_path=None, mock_data=True, train_samples=4, valid_samples=0, test_samples=0,
                       loss_mask=True)  # fmt: skip
    # preprocess: a mask that does not fit its tokens names the line; a second field is refused
    src = tmp_path / "bad.jsonl"
    src.write_text('{"tokens": [1, 2], "loss_mask": [0, 1]}\n{"tokens": [3, 4], "loss_mask": [1]}\n')
    argv = ["--input", str(src), "--output-prefix", str(tmp_path / "bad"), "--tokenizer-type", "NullTokenizer",
            "--vocab-size", "10", "--loss-mask-key", "loss_mask"]  # fmt: skip
    assert preprocess(*argv, "--json-keys", "tokens") == 2
    err = capsys.readouterr().err
    assert f"{src}:2: field 'loss_mask' is not a list of 0/1, one per token of 'tokens' (2)" in err
    assert not any(p.name.startswith("bad_") for p in tmp_path.iterdir())  # nothing half-written
    assert preprocess(*argv, "--json-keys", "tokens", "loss_mask") == 2
    assert "--loss-mask-key loss_mask: one --json-keys field, got 2" in capsys.readouterr().err


def test_the_activation_cache_keeps_the_corpus_mask(corpus, tmp_path):
    """Cached with and without --data-loss-mask: the same sequences, labels and states, and the
    masked cache's loss mask is the other's where the label is a target, else 0."""
    _, prefix, _ = corpus
    ckpt = make_checkpoint(tmp_path / "ck", "mlp")
    caches = {}
    for flag in ((), ("--data-loss-mask",)):
        out = tmp_path / f"cache{len(flag)}"
        argv = f"--load {ckpt} --data-path {prefix} --split 1 --output {out} --seq-length {SEQ} --num-samples 6 "
        argv += "--top-k 4 --dtype fp32 --seed 3 --micro-batch-size 3 --no-progress-bar"
        _tool().main([*argv.split(), *flag])
        caches[bool(flag)] = {k: np.load(out / "train" / f"{k}.npy") for k in ("labels", "loss_mask", "hidden_1")}
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["corpus"]["loss_mask"] is bool(flag)
    plain, masked = caches[False], caches[True]
    assert np.array_equal(plain["labels"], masked["labels"]) and np.array_equal(plain["hidden_1"], masked["hidden_1"])
    assert np.array_equal(masked["loss_mask"], plain["loss_mask"] * (plain["labels"] % 2 == 0))
    assert 0 < masked["loss_mask"].sum() < plain["loss_mask"].sum()


def test_trainer_flags(tmp_path):
    base = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
            "--max-position-embeddings", "16", "--micro-batch-size", "1", "--global-batch-size", "1",
            "--train-iters", "1", "--tokenizer-type", "NullTokenizer", "--vocab-size", "10"]  # fmt: skip
    with pytest.raises(ValueError, match="--data-loss-mask needs --data-path"):
        validate_args(parse_args([*base, "--mock-data", "--data-loss-mask"]))
    with pytest.raises(ValueError, match="the activation cache holds its loss mask"):
        validate_args(parse_args([*base, "--exit-activation-cache", str(tmp_path), "--data-loss-mask"]))
    args = parse_args([*base, "--data-path", "x", "--data-loss-mask"])
    validate_args(args)
    assert args.data_loss_mask


def test_training_batches_take_the_mask(corpus):
    """The trainer with --data-loss-mask: the same batches as without it, each position's loss mask
    the plain one where its label is a target, else 0 (what every loss term averages over)."""
    from megatron.early_exit.training.trainer import Trainer

    _, prefix, _ = corpus
    argv = ["--num-layers", "2", "--hidden-size", "16", "--num-attention-heads", "2", "--seq-length", str(SEQ),
            "--max-position-embeddings", str(SEQ), "--micro-batch-size", "4", "--global-batch-size", "4",
            "--train-iters", "3", "--lr", "1e-3", "--split", "1", "--tokenizer-type", "NullTokenizer",
            "--vocab-size", str(VOCAB - 1), "--data-path", prefix, "--device", "cpu"]  # fmt: skip
    batches = {}
    for flag in ((), ("--data-loss-mask",)):
        trainer = Trainer(parse_args([*argv, *flag]))
        batches[bool(flag)] = [next(trainer.train_iter) for _ in range(3)]
        trainer.close()
    for plain, masked in zip(batches[False], batches[True]):
        assert plain["labels"].equal(masked["labels"])
        assert masked["loss_mask"].equal(plain["loss_mask"] * (plain["labels"] % 2 == 0).float())

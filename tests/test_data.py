"""preprocess_data.py -> .bin/.idx -> megatron-core datasets -> resumable loader."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from megatron.early_exit.data import build_data_loader, build_datasets
from megatron.early_exit.data.datasets import import_core_datasets
from megatron.early_exit.tokenizer import build_tokenizer

ROOT = __import__("os").path.dirname(__import__("os").path.dirname(__import__("os").path.abspath(__file__)))


def preprocess(tmp_path, texts, name, workers=2, extra=()):
    src = tmp_path / f"{name}.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    cmd = [
        sys.executable,
        f"{ROOT}/tools/preprocess_data.py",
        "--input",
        str(src),
        "--output-prefix",
        str(tmp_path / name),
        "--tokenizer-type",
        "GPT2BPETokenizer",
        "--append-eod",
        "--workers",
        str(workers),
        *extra,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    return proc, str(tmp_path / f"{name}_text_document")


@pytest.fixture(scope="module")
def gpt2():
    return build_tokenizer("GPT2BPETokenizer")


@pytest.fixture(scope="module")
def prefixes(tmp_path_factory, corpus_texts):
    tmp = tmp_path_factory.mktemp("data")
    a = preprocess(tmp, corpus_texts[:150], "a")
    b = preprocess(tmp, corpus_texts[150:], "b")
    assert a[0].returncode == 0 and b[0].returncode == 0, a[0].stderr + b[0].stderr
    return {"a": a[1], "b": b[1], "texts_a": corpus_texts[:150]}


def test_preprocess_writes_the_tokenised_documents(prefixes, gpt2):
    import_core_datasets()
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefixes["a"])
    assert len(ds) == 150
    for i in (0, 7, 149):
        expected = gpt2.tokenize(prefixes["texts_a"][i]) + [gpt2.eod]
        assert ds[i].tolist() == expected
    assert ds[0].dtype == np.uint16


def test_datasets_split_and_shift(prefixes, gpt2):
    train, valid, test = build_datasets(
        tokenizer=gpt2,
        seq_length=32,
        seed=1,
        data_path=[prefixes["a"]],
        split="90,10,0",
        train_samples=20,
        valid_samples=4,
        test_samples=0,
    )
    assert test is None and len(train) >= 20 and len(valid) >= 4
    sample = train[0]
    assert sample["tokens"].shape == (32,) and sample["labels"].shape == (32,)
    assert torch.equal(sample["tokens"][1:], sample["labels"][:-1])  # labels = tokens shifted by one


def test_blending_two_prefixes_with_weights(prefixes, gpt2):
    train, _, _ = build_datasets(
        tokenizer=gpt2,
        seq_length=16,
        seed=1,
        data_path=["0.7", prefixes["a"], "0.3", prefixes["b"]],
        split="100,0,0",
        train_samples=100,
        valid_samples=0,
        test_samples=0,
    )
    counts = np.bincount(train.dataset_index[:100], minlength=2)
    assert counts.tolist() == [70, 30]


def test_mock_data_is_learnable_sequences():
    tok = build_tokenizer("NullTokenizer", vocab_size=128)
    train, _, _ = build_datasets(
        tokenizer=tok,
        seq_length=16,
        seed=1,
        data_path=None,
        mock_data=True,
        split="100,0,0",
        train_samples=8,
        valid_samples=0,
        test_samples=0,
    )
    s = train[0]
    toks, labels = s["tokens"], s["labels"]
    body = labels != tok.eod
    # Mock documents count upwards: each next token is the current one + 1 (mod vocab), or eod.
    assert torch.all((labels[body] == (toks[body] + 1) % 129) | (toks[body] == tok.eod))


def test_loader_resumes_at_any_sample_and_slices_dp(prefixes, gpt2):
    train, _, _ = build_datasets(
        tokenizer=gpt2,
        seq_length=16,
        seed=3,
        data_path=[prefixes["a"]],
        split="100,0,0",
        train_samples=64,
        valid_samples=0,
        test_samples=0,
    )
    full = list(build_data_loader(train, consumed_samples=0, micro_batch_size=4))
    resumed = list(build_data_loader(train, consumed_samples=8, micro_batch_size=4))
    assert len(resumed) == len(full) - 2
    for a, b in zip(full[2:], resumed):
        assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["labels"], b["labels"])
    r0 = list(build_data_loader(train, consumed_samples=0, micro_batch_size=2, dp_rank=0, dp_size=2))
    r1 = list(build_data_loader(train, consumed_samples=0, micro_batch_size=2, dp_rank=1, dp_size=2))
    for k in range(3):
        both = torch.cat([r0[k]["tokens"], r1[k]["tokens"]])
        assert torch.equal(both, full[k]["tokens"])  # disjoint slices that make up the dp=1 batch
    assert full[0]["loss_mask"].dtype == torch.float32 and full[0]["position_ids"][0].tolist() == list(range(16))


def test_errors_name_the_flag(tmp_path, prefixes, gpt2):
    kw = dict(tokenizer=gpt2, seq_length=16, seed=1, train_samples=4, valid_samples=0, test_samples=0)
    with pytest.raises(ValueError, match="--data-path.*missing"):
        build_datasets(data_path=[str(tmp_path / "nothing")], **kw)
    with pytest.raises(ValueError, match="--data-path"):
        build_datasets(data_path=["0.5", prefixes["a"], "0.5"], **kw)
    with pytest.raises(ValueError, match="--split"):
        build_datasets(data_path=[prefixes["a"]], split="a,b", **kw)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json\n')
    proc = subprocess.run(
        [
            sys.executable,
            f"{ROOT}/tools/preprocess_data.py",
            "--input",
            str(bad),
            "--output-prefix",
            str(tmp_path / "bad"),
            "--tokenizer-type",
            "GPT2BPETokenizer",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and f"{bad}:2" in proc.stderr and "Traceback" not in proc.stderr


def test_core_datasets_import_without_the_core_package_init():
    # A fresh process: the datasets load without running megatron/core/__init__.py (its
    # transformer stack and torch.compile wrappers); a later import of megatron.core and of
    # names its __init__ defines still works.
    code = (
        "import sys\n"
        "from megatron.early_exit.data.datasets import import_core_datasets\n"
        "builder, gpt = import_core_datasets()\n"
        "print('megatron.core.transformer' in sys.modules, 'torch._dynamo' in sys.modules)\n"
        "import megatron.core\n"
        "from megatron.core import ModelParallelConfig, parallel_state, tensor_parallel\n"
        "print(megatron.core.datasets.gpt_dataset is gpt)\n"
        "print(parallel_state is sys.modules['megatron.core.parallel_state'])\n"
        "print(ModelParallelConfig.__module__, tensor_parallel.__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    names = ["megatron.core.model_parallel_config", "megatron.core.tensor_parallel"]
    assert out == ["False", "False", "True", "True", *names]

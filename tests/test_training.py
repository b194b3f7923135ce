"""Single-process training: the CLI, falling losses, exact resume, errors, the Python API."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from megatron.early_exit import load_checkpoint
from megatron.early_exit.arguments import parse_args
from megatron.early_exit.training.trainer import Trainer
from tests.launch import run_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "pretrain_early_exit_gpt.py")

# The command from the issue, verbatim.
ISSUE_CMD = (
    "--mock-data --tokenizer-type NullTokenizer --vocab-size 128 --num-layers 4 --hidden-size 64 "
    "--num-attention-heads 4 --seq-length 64 --max-position-embeddings 64 --micro-batch-size 2 "
    "--global-batch-size 4 --train-iters 30 --lr 1e-3 --exit-layer-nums 1 2 "
    "--exit-layer-weight 0.5 0.5 --log-interval 5"
).split()


def run_cli(*args, check=True, threads=2):
    proc = run_script(SCRIPT, list(args), env=dict(os.environ, OMP_NUM_THREADS=str(threads)))  # tests/launch.py
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


def records(path):
    return [json.loads(line) for line in open(path)]


def test_issue_command_trains_and_losses_fall(tmp_path):
    proc = run_cli(*ISSUE_CMD, "--log-jsonl", str(tmp_path / "log.jsonl"), "--eval-interval", "30", "--eval-iters", "2")
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip().startswith("iteration")]
    assert len(lines) == 6 and all("exit_1 loss" in ln and "exit_2 loss" in ln and "lm loss" in ln for ln in lines)
    assert "validation loss at iteration 30" in proc.stdout
    log = records(tmp_path / "log.jsonl")
    assert [r["iteration"] for r in log] == [5, 10, 15, 20, 25, 30]
    for head in ("lm loss", "exit_1 loss", "exit_2 loss"):
        assert log[-1][head] < log[0][head], head
    assert log[-1]["lm loss"] < log[0]["lm loss"] - 0.5  # the final head really learns the mock sequences
    assert {"lr", "tokens_per_sec"} <= set(log[0])


def test_stop_and_resume_equals_straight_run(tmp_path):
    # One thread: the weights must be bitwise equal, and with two threads some CPU kernels'
    # reduction order varies from run to run (the weights after 30 steps then differed in the
    # last bits in 1 of 4 runs on the 2-core machine, with every loss still equal to 1e-6).
    base = [*ISSUE_CMD, "--log-interval", "1", "--eval-interval", "0", "--use-exit-norm"]
    run_cli(*base, "--save", str(tmp_path / "straight"), "--log-jsonl", str(tmp_path / "straight.jsonl"), threads=1)
    run_cli(
        *base, "--exit-interval", "15", "--save", str(tmp_path / "resumed"), "--log-jsonl", str(tmp_path / "r.jsonl"),
        threads=1,
    )  # fmt: skip
    assert open(tmp_path / "resumed" / "latest_checkpointed_iteration.txt").read().strip() == "15"
    proc = run_cli(
        *base,
        "--load",
        str(tmp_path / "resumed"),
        "--save",
        str(tmp_path / "resumed"),
        "--log-jsonl",
        str(tmp_path / "r.jsonl"),
        threads=1,
    )
    assert "resumed from" in proc.stdout and "at iteration 15" in proc.stdout
    straight, resumed = records(tmp_path / "straight.jsonl"), records(tmp_path / "r.jsonl")
    assert [r["iteration"] for r in resumed] == list(range(1, 31))
    for a, b in zip(straight, resumed):
        for head in ("lm loss", "exit_1 loss", "exit_2 loss"):
            assert b[head] == pytest.approx(a[head], rel=1e-6, abs=0), (a["iteration"], head)
    w1 = load_file(str(tmp_path / "straight" / "iter_0000030" / "model.safetensors"))
    w2 = load_file(str(tmp_path / "resumed" / "iter_0000030" / "model.safetensors"))
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


def train_in_process(argv):
    trainer = Trainer(parse_args(argv))
    return trainer, trainer.run()


SMALL = (
    "--mock-data --tokenizer-type NullTokenizer --vocab-size 64 --num-layers 3 --hidden-size 32 "
    "--num-attention-heads 4 --seq-length 32 --micro-batch-size 2 --global-batch-size 4 --train-iters 8 "
    "--lr 3e-3 --log-interval 100 --eval-interval 0 --seed 5"
).split()


def test_zero_weight_exits_train_exactly_as_the_plain_gpt():
    plain, plain_state = train_in_process(SMALL)
    ee, ee_state = train_in_process(
        [*SMALL, "--exit-layer-nums", "1", "2", "--exit-layer-weight", "0", "0", "--use-exit-norm", "--use-exit-mlp"]
    )
    for a, b in zip(plain_state.history, ee_state.history):
        assert a["lm loss"] == b["lm loss"]
    ee_params = dict(ee.model.named_parameters())
    for name, p in plain.model.named_parameters():
        assert torch.equal(p, ee_params[name]), name


@pytest.mark.parametrize(
    "family",
    [
        [],  # GPT-2 style: LayerNorm, GELU, learned positions, biases, tied output
        [
            "--normalization",
            "RMSNorm",
            "--swiglu",
            "--position-embedding-type",
            "rope",
            "--disable-bias-linear",
            "--num-query-groups",
            "2",
            "--untie-embeddings-and-output-weights",
        ],
    ],
    ids=["gpt2", "llama"],
)
def test_both_families_train(family):
    _, state = train_in_process(
        [
            *SMALL,
            *family,
            "--train-iters",
            "20",
            "--exit-layer-nums",
            "2",
            "--use-exit-norm",
            "--exit-layer-weight",
            "0.5",
        ]
    )
    first, last = state.history[0], state.history[-1]
    assert last["lm loss"] < first["lm loss"] - 0.3 and last["exit_2 loss"] < first["exit_2 loss"] - 0.3


def test_bf16_recompute_warmup_dynamic_and_logging(tmp_path):
    argv = [
        *SMALL,
        "--bf16",
        "--recompute-activations",
        "--exit-layer-nums",
        "1",
        "2",
        "--use-exit-norm",
        "--exit-layer-weight",
        "0.5",
        "1.0",
        "--exit-layer-weight-init",
        "0",
        "0",
        "--exit-layer-weight-warmup-iters",
        "4",
        "--use-dynamic-exit-layer-weight",
        "--tensorboard-dir",
        str(tmp_path / "tb"),
        "--log-jsonl",
        str(tmp_path / "log.jsonl"),
        "--log-interval",
        "2",
    ]
    trainer, state = train_in_process(argv)
    assert trainer._exit_weights() == {1: 0.5, 2: 1.0}
    assert all(torch.isfinite(torch.tensor(h["lm loss"])) for h in state.history)
    assert len(records(tmp_path / "log.jsonl")) == 4 and os.listdir(tmp_path / "tb")


def test_load_checkpoint_api(tmp_path):
    run_cli(*SMALL, "--exit-layer-nums", "1", "--use-exit-norm", "--save", str(tmp_path / "ck"))
    model, tok = load_checkpoint(str(tmp_path / "ck"))
    ids = torch.tensor([tok.tokenize("1 2 3 4 5")])
    out = model(ids)
    assert out.logits.shape == (1, 5, 65) and list(out.exit_logits) == [1]
    assert not model.training and tok.eod == 64


ERRORS = [
    (["--exit-layer-nums", "9"], "--exit-layer-nums"),
    (["--exit-layer-nums", "1", "2", "--exit-layer-weight", "0.5"], "--exit-layer-weight"),
    (["--global-batch-size", "5"], "--global-batch-size"),
    (["--tokenizer-type", "WordPiece"], "--tokenizer-type"),
    (["--num-query-groups", "3"], "--num-query-groups"),
    (["--hidden-dropout", "0.1", "--fp16"], "--fp16"),
    (["--tensor-model-parallel-size", "2"], "world size"),
]


@pytest.mark.parametrize(("extra", "flag"), ERRORS, ids=[f for _, f in ERRORS])
def test_bad_flags_are_one_line_errors(extra, flag):
    proc = run_cli(*SMALL, *extra, check=False)
    assert proc.returncode == 2
    assert flag in proc.stderr and "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_bad_data_path_and_checkpoints(tmp_path):
    argv = [a for a in SMALL if a != "--mock-data"]
    proc = run_cli(*argv, "--data-path", str(tmp_path / "nope"), check=False)
    assert proc.returncode == 2 and "--data-path" in proc.stderr and "nope.bin" in proc.stderr
    run_cli(*SMALL, "--save", str(tmp_path / "ck"))
    weights = tmp_path / "ck" / "iter_0000008" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    proc = run_cli(*SMALL, "--load", str(tmp_path / "ck"), "--train-iters", "10", check=False)
    assert proc.returncode == 2 and "model.safetensors" in proc.stderr and "Traceback" not in proc.stderr
    run_cli(*SMALL, "--save", str(tmp_path / "ck2"))
    proc = run_cli(*SMALL, "--load", str(tmp_path / "ck2"), "--hidden-size", "64", "--train-iters", "10", check=False)
    assert proc.returncode == 2 and "--hidden-size 64 does not match" in proc.stderr
    (tmp_path / "ck2" / "latest_checkpointed_iteration.txt").write_text("garbage")
    proc = run_cli(*SMALL, "--load", str(tmp_path / "ck2"), check=False)
    assert proc.returncode == 2 and "corrupt marker" in proc.stderr
    assert (tmp_path / "ck2" / "iter_0000008" / "model.safetensors").exists()  # nothing saved is lost

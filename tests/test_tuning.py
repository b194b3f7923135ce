"""EE-Tuning (--tune-exit): only exits learn, the backbone stays bit-identical."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from megatron.early_exit.arguments import parse_args
from megatron.early_exit.training.trainer import Trainer
from tests.distributed import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = (
    "--mock-data --tokenizer-type NullTokenizer --vocab-size 64 --num-layers 4 --hidden-size 32 "
    "--num-attention-heads 4 --seq-length 32 --micro-batch-size 2 --global-batch-size 4 --lr 3e-3 "
    "--log-interval 1 --eval-interval 0 --seed 3 --device cpu"
).split()


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("pre") / "ck"
    args = [
        *MODEL,
        "--train-iters",
        "10",
        "--exit-layer-nums",
        "1",
        "3",
        "--use-exit-norm",
        "--use-exit-mlp",
        "--exit-layer-weight",
        "0",
        "0",
        "--save",
        str(out),
    ]  # exits untrained: weight 0
    Trainer(parse_args(args)).run()
    return out


def weights(path, it):
    return load_file(str(path / f"iter_{it:07d}" / "model.safetensors"))


@pytest.mark.parametrize("loss_type", ["ce", "kd", "ce+kd"])
def test_tune_exit_changes_only_exits_and_losses_fall(tmp_path, pretrained, loss_type):
    out = tmp_path / "tuned"
    trainer = Trainer(
        parse_args(
            [
                *MODEL[:-2],
                "--load",
                str(pretrained),
                "--tune-exit",
                "--train-iters",
                "12",
                "--exit-loss-type",
                loss_type,
                "--save",
                str(out),
                "--eval-iters",
                "4",
            ]
        )
    )
    val_before = trainer.evaluate()
    assert trainer.state.iteration == 0  # a new run from the pretrained weights
    assert all(p.requires_grad == n.startswith("exits.") for n, p in trainer.model.named_parameters())
    # Without distillation the layers after the last exit are not built.
    assert sorted(trainer.model.decoder.layers) == (["0", "1", "2"] if loss_type == "ce" else ["0", "1", "2", "3"])
    state = trainer.run()
    before, after = weights(pretrained, 10), weights(out, 12)
    assert before.keys() == after.keys()
    for name in before:
        same = torch.equal(before[name], after[name])
        assert same != name.startswith("exits."), name  # backbone identical, every exit tensor moved
    val_after = trainer.evaluate()
    for layer in (1, 3):  # validation losses of the exits fall
        assert val_after[f"exit_{layer} loss"] < val_before[f"exit_{layer} loss"], (loss_type, layer)
    assert len(state.history) == 12
    if "kd" in loss_type:
        assert "exit_1 agreement" in state.history[-1] and state.history[-1]["exit_1 kd loss"] >= 0


def test_tune_exit_pipeline_equals_single_process(tmp_path, pretrained):
    base = [*MODEL, "--load", str(pretrained), "--tune-exit", "--train-iters", "4"]
    single = tmp_path / "single.jsonl"
    Trainer(parse_args([*base, "--log-jsonl", str(single), "--save", str(tmp_path / "s")])).run()
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node=2",
        f"--master-port={free_port()}",
        os.path.join(ROOT, "pretrain_early_exit_gpt.py"),
        *base,
        "--tune-exit-pipeline-parallel-size",
        "2",
        "--log-jsonl",
        str(tmp_path / "pp.jsonl"),
        "--save",
        str(tmp_path / "p"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = [json.loads(x) for x in single.read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "pp.jsonl").read_text().splitlines()]
    for x, y in zip(a, b):
        for k in ("exit_1 loss", "exit_3 loss"):
            assert y[k] == pytest.approx(x[k], rel=1e-5)


def test_tune_exit_errors(tmp_path):
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "pretrain_early_exit_gpt.py"), *MODEL, "--train-iters", "2", "--tune-exit"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 2 and "--tune-exit needs --load" in proc.stderr

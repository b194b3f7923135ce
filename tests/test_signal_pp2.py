"""Issue 14: SIGTERM during PP2 training under torchrun with --exit-signal-handler saves the
iteration in progress on every rank and exits 0; the resumed run continues as a straight run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from megatron.early_exit.arguments import parse_args
from megatron.early_exit.training.trainer import Trainer
from tests.distributed import free_port

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = (
    "--mock-data --tokenizer-type NullTokenizer --vocab-size 64 --num-layers 4 --hidden-size 32 "
    "--num-attention-heads 4 --seq-length 32 --micro-batch-size 2 --global-batch-size 4 --train-iters 500 "
    "--lr 1e-3 --log-interval 1 --eval-interval 0 --seed 7 --exit-layer-nums 1 3 --use-exit-norm --device cpu"
).split()


def torchrun(*argv):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", f"--master-port={free_port()}"]
    cmd += [os.path.join(ROOT, "pretrain_early_exit_gpt.py"), *FLAGS, "--pipeline-model-parallel-size", "2", *argv]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def logged(path):
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def workers(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(x) for x in f.read().split()]


def test_sigterm_under_torchrun_pp2_saves_the_current_iteration_and_resume_continues_exactly(tmp_path):
    save, log = str(tmp_path / "ck"), str(tmp_path / "log.jsonl")
    proc = torchrun("--save", save, "--log-jsonl", log, "--exit-signal-handler")
    deadline = time.time() + 240
    while len(logged(log)) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()
    for pid in workers(proc.pid):  # what Slurm's `scancel --signal=TERM --full` does: every rank gets it
        os.kill(pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    stopped = logged(log)[-1]["iteration"]
    assert int(open(os.path.join(save, "latest_checkpointed_iteration.txt")).read()) == stopped
    assert f"SIGTERM received: stopped after iteration {stopped}, checkpoint saved" in out
    assert "Traceback" not in err

    # Resume (in this process: a checkpoint loads into any layout) and compare with a straight run.
    argv = [*FLAGS, "--exit-interval", str(stopped + 2)]
    resumed = Trainer(parse_args([*argv, "--load", save, "--save", save])).run().history
    assert [r["iteration"] for r in resumed] == [stopped + 1, stopped + 2]
    rows = logged(log) + resumed
    straight = Trainer(parse_args(argv)).run().history
    for ref, got in zip(straight, rows):
        for head in ("exit_1 loss", "exit_3 loss", "lm loss"):
            assert got[head] == pytest.approx(ref[head], rel=1e-5), (ref["iteration"], head)

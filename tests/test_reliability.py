"""Issue 14: checkpoints survive crashes and damage, training stops on NaN and on signals,
resumes refuse silent schedule changes, outputs and data are checked before any work."""

from __future__ import annotations

import fcntl
import multiprocessing
import os
import random
import signal
import sys
import time

import numpy as np
import pytest
import torch

from megatron.early_exit import checkpointing as ckpt
from megatron.early_exit import load_checkpoint
from megatron.early_exit.arguments import parse_args
from megatron.early_exit.training.trainer import Trainer, main

pytestmark = pytest.mark.usefixtures("one_thread")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "checkpoint"))

TINY = (
    "--mock-data --tokenizer-type NullTokenizer --vocab-size 64 --num-layers 2 --hidden-size 16 "
    "--num-attention-heads 2 --seq-length 16 --micro-batch-size 2 --global-batch-size 2 --train-iters 4 "
    "--lr 1e-3 --log-interval 100 --eval-interval 0 --seed 3 --exit-layer-nums 1"
).split()
FORK = multiprocessing.get_context("fork")


def train(*extra):
    trainer = Trainer(parse_args([*TINY, *extra]))
    return trainer, trainer.run()


def marker(save):
    return int(open(os.path.join(save, ckpt.MARKER)).read())


def run_main(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        main([*TINY, *argv])
    return e.value.code, capsys.readouterr().err.strip()


# ----- 1, 2, 12: re-save, stale temporaries, lock, modes ------------------------------------


def _resave_child(save, crash_at):
    os.environ["MEGATRON_EE_CRASH_AT"] = crash_at
    torch.set_num_threads(1)
    trainer = Trainer(parse_args([*TINY, "--load", save, "--save", save]))
    trainer.run()  # the run is finished: this re-saves iteration 4, and dies at crash_at


@pytest.mark.parametrize("crash_at", ["before-rename", "before-cleanup"])
def test_resave_killed_at_its_most_dangerous_moment_keeps_a_loadable_checkpoint(tmp_path, crash_at):
    save = str(tmp_path / "ck")
    train("--save", save)
    before = ckpt.read_weights(ckpt.iteration_dir(save, 4))
    child = FORK.Process(target=_resave_child, args=(save, crash_at))
    child.start()
    child.join(120)
    assert child.exitcode == -signal.SIGKILL
    names = sorted(os.listdir(save))
    if crash_at == "before-rename":  # the old copy is aside, the new one not yet in: the worst moment
        assert "iter_0000004" not in names and any(n.startswith("iter_0000004.old-") for n in names)
    model, _ = load_checkpoint(save)  # the marker's directory is found aside
    assert all(torch.equal(p, before[k]) for k, p in model.named_parameters())
    trainer, state = train("--load", save, "--save", save, "--train-iters", "6", "--lr-decay-iters", "4")
    assert state.iteration == 6 and marker(save) == 6
    assert not [n for n in os.listdir(save) if ".tmp-" in n or ".old-" in n]


def _train_forever(save, seed, conn):
    torch.set_num_threads(1)
    argv = [*TINY, "--train-iters", "100000", "--lr-decay-style", "constant"]
    trainer = Trainer(parse_args([*argv, "--load", save, "--save", save, "--save-interval", "1", "--seed", seed]))
    conn.send(trainer.state.iteration)  # where it resumed
    trainer.run()


def test_random_kills_always_leave_the_latest_checkpoint_loadable_and_resumable(tmp_path):
    """N = 20 kill -9 at random moments of training that saves every iteration: each time the
    latest checkpoint verifies and the next run resumes exactly there; nothing stale piles up."""
    save, rng, resumed, stale_seen = str(tmp_path / "ck"), random.Random(0), [], 0
    for _ in range(20):
        expected = marker(save) if os.path.exists(os.path.join(save, ckpt.MARKER)) else 0
        parent, child_end = FORK.Pipe()
        child = FORK.Process(target=_train_forever, args=(save, "3", child_end))
        child.start()
        assert parent.poll(120)
        resumed.append((expected, parent.recv()))
        time.sleep(rng.uniform(0.05, 0.6))
        os.kill(child.pid, signal.SIGKILL)
        child.join(30)
        stale_seen += sum(".tmp-" in n or ".old-" in n for n in os.listdir(save))
    assert all(a == b for a, b in resumed), resumed
    assert marker(save) > 0
    model, _ = load_checkpoint(save)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    ckpt.lock_save_dir(save)  # the lock cleans the dead runs' temporaries
    ckpt.unlock_save_dir(save)
    assert not [n for n in os.listdir(save) if ".tmp-" in n or ".old-" in n]
    print(f"kill trials: 20, resumed at {[b for _, b in resumed]}, stale temporaries seen {stale_seen}")


def test_stale_temporaries_of_dead_processes_go_live_ones_stay(tmp_path):
    save = str(tmp_path / "ck")
    train("--save", save)
    dead = FORK.Process(target=os._exit, args=(0,))
    dead.start()
    dead.join()
    os.makedirs(os.path.join(save, f"iter_0000002.tmp-{dead.pid}"))
    os.makedirs(os.path.join(save, f"iter_0000003.tmp-{os.getppid()}"))  # a live process: kept
    open(os.path.join(save, f"{ckpt.MARKER}.tmp-{dead.pid}"), "w").close()
    assert sorted(ckpt.clean_stale(save)) == [f"iter_0000002.tmp-{dead.pid}", f"{ckpt.MARKER}.tmp-{dead.pid}"]
    assert os.path.isdir(os.path.join(save, f"iter_0000003.tmp-{os.getppid()}"))


def test_a_second_writer_of_the_save_directory_is_refused(tmp_path, capsys):
    save = str(tmp_path / "ck")
    os.makedirs(save)
    fd = os.open(os.path.join(save, ckpt.LOCK_FILE), os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another run holds it
    os.pwrite(fd, b"4242\n", 0)
    try:
        code, err = run_main(capsys, "--save", save)
    finally:
        os.close(fd)
    assert code == 2 and len(err.splitlines()) == 1 and "in use by another process (pid 4242)" in err
    assert not os.path.exists(os.path.join(save, ckpt.MARKER))


def test_checkpoint_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        train("--save", str(tmp_path / "ck"))
    finally:
        os.umask(old)
    it_dir = tmp_path / "ck" / "iter_0000004"
    modes = {p.name: p.stat().st_mode & 0o777 for p in it_dir.iterdir() if p.is_file()}
    assert modes["model.safetensors"] == 0o644 and set(modes.values()) == {0o644}


# ----- 5: integrity, NaN ---------------------------------------------------------------------


def test_weights_overwritten_with_ff_bytes_are_refused_naming_the_file(tmp_path, capsys):
    save = str(tmp_path / "ck")
    train("--save", save)
    path = os.path.join(ckpt.iteration_dir(save, 4), ckpt.MODEL_FILE)
    data = bytearray(open(path, "rb").read())
    header = 8 + int.from_bytes(data[:8], "little")
    data[header:] = b"\xff" * (len(data) - header)  # header intact: safetensors alone loads it
    open(path, "wb").write(bytes(data))
    with pytest.raises(ValueError, match="model.safetensors is corrupt: its SHA-256"):
        load_checkpoint(save)
    code, err = run_main(capsys, "--load", save, "--save", save)
    assert code == 2 and "model.safetensors is corrupt" in err and len(err.splitlines()) == 1


def test_non_finite_loss_stops_training_and_never_becomes_the_latest_checkpoint(tmp_path, capsys):
    save = str(tmp_path / "ck")
    code, err = run_main(capsys, "--lr", "1e30", "--train-iters", "20", "--save", save, "--save-interval", "1")
    assert code == 1 and len(err.splitlines()) == 1
    assert err.startswith("error: non-finite ") and "at iteration " in err
    stopped_at = int(err.split("at iteration ")[1].split()[0].rstrip(":"))
    assert 1 < stopped_at < 20
    latest = marker(save)
    assert latest < stopped_at
    model, _ = load_checkpoint(save)
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ----- 3: signals -------------------------------------------------------------------------------


def test_sigterm_with_exit_signal_handler_saves_the_current_iteration(tmp_path):
    save = str(tmp_path / "ck")
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        trainer = Trainer(parse_args([*TINY, "--train-iters", "50", "--save", save, "--exit-signal-handler"]))
        os.kill(os.getpid(), signal.SIGTERM)  # arrives before iteration 1 ends
        state = trainer.run()
    finally:
        for s, h in before.items():
            signal.signal(s, h)
    assert state.stopped_by_signal and state.iteration == 1 and marker(save) == 1


def test_ctrl_c_without_the_handler_is_one_line(tmp_path, capsys, monkeypatch):
    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "train_step", interrupted)
    code, err = run_main(capsys)
    assert code == 130 and len(err.splitlines()) == 1 and "interrupted at iteration 0" in err


# ----- 4, 12: paths before any work; auto-resume ------------------------------------------------


@pytest.mark.parametrize(
    ("flag", "make"),
    [
        ("--save", lambda d: _file(d / "f")),
        ("--tensorboard-dir", lambda d: str(_file(d / "f")) + "/tb"),
        ("--log-jsonl", lambda d: str(_file(d / "f")) + "/log.jsonl"),
        ("--log-jsonl", lambda d: str(d)),
    ],
)
def test_bad_output_paths_are_found_before_any_work(tmp_path, capsys, flag, make):
    code, err = run_main(capsys, flag, str(make(tmp_path)))
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith(f"error: {flag} ")


def _file(path):
    path.write_text("x")
    return path


def test_load_equal_to_save_on_an_empty_directory_starts_from_scratch(tmp_path, capsys):
    save = tmp_path / "run"
    save.mkdir()
    trainer, state = train("--load", str(save), "--save", str(save))
    assert state.iteration == 4 and marker(str(save)) == 4
    assert "starting from scratch" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--load: no checkpoint in"):
        Trainer(parse_args([*TINY, "--load", str(tmp_path / "typo"), "--save", str(save)]))


# ----- 8: schedule changes on resume -----------------------------------------------------------


def test_a_changed_schedule_on_resume_needs_an_override_flag(tmp_path, capsys):
    save = str(tmp_path / "ck")
    train("--save", save, "--train-iters", "8", "--exit-interval", "4", "--lr-warmup-iters", "2")
    code, err = run_main(capsys, "--load", save, "--save", save, "--train-iters", "8", "--lr", "5e-3")
    assert code == 2 and "--lr 0.001 -> 0.005" in err and "--override-opt_param-scheduler" in err
    argv = [*TINY, "--load", save, "--save", save, "--train-iters", "8", "--lr", "5e-3", "--dry-run"]
    new = Trainer(parse_args([*argv, "--override-opt_param-scheduler"]))
    assert new.scheduler.max_lr == 5e-3 and new.scheduler.lr == pytest.approx(new.scheduler.lr_at(5))
    kept = Trainer(parse_args([*argv, "--use-checkpoint-opt_param-scheduler"]))
    assert kept.scheduler.max_lr == 1e-3 and kept.scheduler.warmup_iters == 2 and kept.scheduler.decay_iters == 8
    code, err = run_main(capsys, "--load", save, "--save", save, "--train-iters", "8", "--global-batch-size", "4")
    assert code == 2 and "--global-batch-size 2 -> 4" in err


# ----- 6: damaged data -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(tmp_path_factory.mktemp("data") / "d")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    rng = np.random.default_rng(0)
    for _ in range(40):
        ids = rng.integers(0, 60, 50)
        builder.add_document(torch.tensor(ids), [len(ids)])
    builder.finalize(prefix + ".idx")
    return prefix


def _copy(prefix, directory):
    import shutil

    out = str(directory / "copy")
    for ext in (".bin", ".idx"):
        shutil.copy(prefix + ext, out + ext)
    return out


@pytest.mark.parametrize(
    ("damage", "names"),
    [
        (lambda p: _truncate(p + ".bin", 0.5), ".bin is damaged"),
        (lambda p: _truncate(p + ".idx", 0.5), ".idx is damaged"),
        (lambda p: open(p + ".idx", "r+b").write(b"\0" * os.path.getsize(p + ".idx")), ".idx is not a Megatron"),
    ],
    ids=["bin-half", "idx-half", "idx-zeroed"],
)
def test_damaged_data_files_are_one_line_naming_the_file(tmp_path, capsys, tiny_data, damage, names):
    prefix = _copy(tiny_data, tmp_path)
    damage(prefix)
    argv = [a for a in TINY if a != "--mock-data"]
    with pytest.raises(SystemExit) as e:
        main([*argv, "--data-path", prefix])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and f"{prefix}{names}" in err


def _truncate(path, fraction):
    with open(path, "r+b") as f:
        f.truncate(int(os.path.getsize(path) * fraction))


# ----- 7: conversion targets -------------------------------------------------------------------


def test_add_exits_and_convert_refuse_a_non_empty_target_without_overwrite(tmp_path, capsys):
    import add_exits
    import convert

    run = str(tmp_path / "run")
    train("--save", run)
    src = str(tmp_path / "src")
    train("--save", src, "--exit-layer-nums", "1")
    argv = ["--load-dir", src, "--save-dir", run, "--add-exit-layer-nums", "2"]
    assert add_exits.main(argv) == 2
    assert "--save-dir" in capsys.readouterr().err and marker(run) == 4
    assert convert.main(["--loader", "ee", "--load-dir", src, "--save-dir", run]) == 2
    assert "is not empty (give --overwrite" in capsys.readouterr().err and marker(run) == 4
    assert convert.main(["--loader", "ee", "--load-dir", src, "--save-dir", run, "--overwrite"]) == 0
    assert marker(run) == 4  # the source's iteration, written through the atomic re-save


# ----- 9: flags -------------------------------------------------------------------------------


BAD = [
    (["--num-attention-heads", "128"], "--hidden-size"),
    (["--num-attention-heads", "5"], "--hidden-size"),
    (["--num-query-groups", "0"], "--num-query-groups"),
    (["--kv-channels", "0"], "--kv-channels"),
    (["--make-vocab-size-divisible-by", "0"], "--make-vocab-size-divisible-by"),
    (["--ffn-hidden-size", "-4"], "--ffn-hidden-size"),
    (["--ffn-hidden-size", "0"], "--ffn-hidden-size"),
    (["--max-position-embeddings", "0"], "--max-position-embeddings"),
    (["--hidden-dropout", "1.0"], "--hidden-dropout"),
    (["--attention-dropout", "-0.1"], "--attention-dropout"),
    (["--device", "foo"], "--device"),
    (["--seed", "-1"], "--seed"),
    (["--lr", "inf"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--norm-epsilon", "-1"], "--norm-epsilon"),
    (["--exit-layer-weight", "-1"], "--exit-layer-weight"),
    (["--lr-warmup-iters", "-1"], "--lr-warmup-iters"),
    (["--lr-decay-iters", "-5"], "--lr-decay-iters"),
    (["--weight-decay", "-0.1"], "--weight-decay"),
    (["--clip-grad", "-1"], "--clip-grad"),
    (["--init-method-std", "-0.02"], "--init-method-std"),
    (["--exit-layer-temperature", "inf"], "--exit-layer-temperature"),
    (["--override-opt_param-scheduler", "--use-checkpoint-opt_param-scheduler"], "--override-opt_param-scheduler"),
]


@pytest.mark.parametrize(("extra", "flag"), BAD, ids=[" ".join(e) for e, _ in BAD])
def test_wrong_flags_are_one_line_naming_the_flag(capsys, extra, flag):
    code, err = run_main(capsys, *extra)
    assert code == 2 and len(err.splitlines()) == 1 and flag in err and "Traceback" not in err


def test_a_tokenizer_beyond_the_loaded_models_vocabulary_is_refused(tmp_path, capsys):
    from megatron.early_exit.model import EarlyExitGPT

    cfg = Trainer(parse_args([*TINY, "--dry-run"])).config
    cfg.vocab_size, cfg.real_vocab_size = 128, 128
    ckpt.save_checkpoint(str(tmp_path / "m"), 0, EarlyExitGPT(cfg), None)
    argv = ["--load", str(tmp_path / "m"), "--tune-exit", "--tokenizer-type", "NullTokenizer", "--vocab-size", "128"]
    code, err = run_main(capsys, *argv)
    assert code == 2 and "end-of-document id 128" in err and "vocabulary of 128" in err


def test_a_full_disk_during_save_is_one_line_and_leaves_no_temporary(tmp_path, capsys, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    save = str(tmp_path / "ck")
    monkeypatch.setattr(ckpt.torch, "save", full)
    code, err = run_main(capsys, "--save", save)
    assert code == 1 and len(err.splitlines()) == 1 and "No space left on device" in err
    assert os.listdir(save) == [ckpt.LOCK_FILE]

"""Issue 14: hundreds of drawn flag combinations for the trainer and tools/generate.py never give
a traceback: either a clean start, or one line naming a flag and exit code 2."""

from __future__ import annotations

import contextlib
import io
import os
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megatron.early_exit.training.trainer import main as train_main

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

BASE = (
    "--mock-data --tokenizer-type NullTokenizer --vocab-size 64 --num-layers 2 --hidden-size 16 "
    "--num-attention-heads 2 --seq-length 16 --micro-batch-size 2 --global-batch-size 2 --train-iters 4 "
    "--lr 1e-3 --log-interval 100 --eval-interval 0"
).split()
INTS = st.sampled_from(["-3", "-1", "0", "1", "2", "3", "4", "8", "16", "abc", "1e3"])
FLOATS = st.sampled_from(["-1", "0", "1e-6", "0.1", "0.5", "0.999", "1", "2", "inf", "-inf", "nan", "x"])
TRAINER_FLAGS = {
    **{
        f: INTS
        for f in (
            "--num-layers --hidden-size --ffn-hidden-size --num-attention-heads --num-query-groups --kv-channels "
            "--seq-length --max-position-embeddings --make-vocab-size-divisible-by --micro-batch-size "
            "--global-batch-size --train-iters --lr-warmup-iters --lr-decay-iters --save-interval --eval-iters "
            "--eval-interval --log-interval --exit-interval --seed --vocab-size --num-workers "
            "--exit-layer-weight-warmup-iters --num-fill-warmup-microbatches --num-fill-cooldown-microbatches "
            "--tensor-model-parallel-size --pipeline-model-parallel-size --tune-exit-pipeline-parallel-size"
        ).split()
    },
    **{
        f: FLOATS
        for f in (
            "--lr --min-lr --norm-epsilon --rotary-base --init-method-std --hidden-dropout --attention-dropout "
            "--weight-decay --adam-beta1 --adam-beta2 --adam-eps --clip-grad --lr-warmup-fraction --kd-temperature"
        ).split()
    },
    "--exit-layer-nums": st.lists(INTS, min_size=1, max_size=3),
    "--exit-layer-weight": st.lists(FLOATS, min_size=1, max_size=3),
    "--exit-layer-weight-init": st.lists(FLOATS, min_size=1, max_size=3),
    "--exit-layer-temperature": st.lists(FLOATS, min_size=1, max_size=3),
    "--device": st.sampled_from(["cpu", "auto", "cuda", "cuda:7", "foo", "meta", "cpu:0"]),
    "--normalization": st.sampled_from(["LayerNorm", "RMSNorm", "BatchNorm"]),
    "--position-embedding-type": st.sampled_from(["rope", "learned_absolute", "alibi"]),
    "--lr-decay-style": st.sampled_from(["constant", "linear", "cosine", "step"]),
    "--split": st.sampled_from(["98,2,0", "1", "-1,2", "a,b", "0,0,0", "1,1,1,1"]),
    "--tokenizer-type": st.sampled_from(["NullTokenizer", "GPT2BPETokenizer", "WordPiece"]),
    "--exit-loss-type": st.sampled_from(["ce", "kd", "ce+kd", "mse"]),
    **{
        f: st.just(None)
        for f in (
            "--swiglu --untie-embeddings-and-output-weights --pre-exit --use-exit-norm --use-exit-mlp "
            "--use-exit-block --untie-exit-output-weights --use-dynamic-exit-layer-weight --fill-explicit-bubbles "
            "--tune-exit --bf16 --fp16 --sequence-parallel --recompute-activations --disable-bias-linear "
            "--exit-signal-handler --override-opt_param-scheduler --use-checkpoint-opt_param-scheduler --finetune"
        ).split()
    },
}
CASES = {"trainer": 0, "generate": 0}


def flag_sets(table):
    def to_argv(pairs):
        argv = []
        for flag, value in pairs:
            argv.append(flag)
            if isinstance(value, list):
                argv.extend(value)
            elif value is not None:
                argv.append(value)
        return argv

    pair = st.sampled_from(sorted(table)).flatmap(lambda f: st.tuples(st.just(f), table[f]))
    return st.lists(pair, min_size=1, max_size=4).map(to_argv)


def call(fn, argv) -> tuple[int, str]:
    """(exit code, stderr) of an in-process CLI call; 0 when it returns normally."""
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            fn(argv)
            code = 0
        except SystemExit as e:
            code = e.code
    return code, err.getvalue()


def assert_clean_or_one_line(code, err, argv):
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith("warning:")]
    if code == 0:
        assert not lines, (argv, err)
        return
    assert code == 2, (argv, code, err)
    assert len(lines) == 1 and "error:" in lines[0] and "--" in lines[0], (argv, err)


SETTINGS = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@SETTINGS
@given(flag_sets(TRAINER_FLAGS))
def test_trainer_flags_never_traceback(extra):
    argv = [*BASE, *extra, "--dry-run"]
    CASES["trainer"] += 1
    code, err = call(train_main, argv)
    assert_clean_or_one_line(code, err, argv)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("gen") / "ck")
    code, err = call(train_main, [*BASE, "--exit-layer-nums", "1", "--use-exit-norm", "--save", path])
    assert code == 0, err
    return path


GENERATE_FLAGS = {
    **{
        f: INTS
        for f in (
            "--max-new-tokens --num-draft-tokens --draft-exit-layer --min-exit-layer --top-k --seed "
            "--stop-token-id --tensor-model-parallel-size --pipeline-model-parallel-size"
        ).split()
    },
    **{f: FLOATS for f in ("--temperature", "--top-p", "--early-exit-thres")},
    "--exit-layers": st.lists(INTS, min_size=1, max_size=2),
    "--strategy": st.sampled_from(["full", "early_exit", "self_speculative", "beam"]),
    "--measure": st.sampled_from(["max_prob", "top2_margin", "entropy", "learned", "oracle"]),
    "--device": st.sampled_from(["cpu", "cuda", "foo"]),
    "--prompt": st.sampled_from(["1 2 3", "", "7", "x y", "999"]),
    **{f: st.just(None) for f in ("--ignore-eos", "--add-bos", "--logprobs", "--json", "--bf16")},
}


@settings(SETTINGS, max_examples=150)
@given(extra=flag_sets(GENERATE_FLAGS))
def test_generate_flags_never_traceback(checkpoint, extra):
    import generate

    if "--max-new-tokens" not in extra:
        extra = [*extra, "--max-new-tokens", "2"]
    argv = ["--load", checkpoint, "--prompt", "4 5", *extra]
    CASES["generate"] += 1
    code, err = call(generate.main, argv)
    assert_clean_or_one_line(code, err, argv)


def test_report_case_counts():
    if not all(CASES.values()):
        pytest.skip("counts come from the two tests above")
    print(f"flag cases tried: trainer {CASES['trainer']}, generate {CASES['generate']}")
    assert CASES["trainer"] >= 300 and CASES["generate"] >= 150

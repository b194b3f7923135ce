"""3D-parallel training (gloo, CPU) equals the single-process run.

Each run is `pretrain_early_exit_gpt.py` with its flags on torchrun's environment, its ranks
forked from a process that imported torch and the trainer once (`tests/launch.py`: the same
script and code path without the launcher's and each rank's ~5 s of imports).

Each layout trains 5 iterations from the same seed on mock data (fp32). The per-iteration
loss of the final head and of every exit must equal the single-process run to 1e-5
relative, and the saved (full, gathered) weights after the last update must match.
Tolerances: sharded matmuls and all-reduces sum in a different order than one process
does, so losses differ by fp32 round-off only (measured: <= 7e-8 relative). Weights get
atol 5e-5: Adam moves every element by up to lr = 1e-3 per step whatever its gradient's
size, so for elements whose gradient is round-off-small the update's sign can differ
(measured: 1.4e-5 on one element at TP2xPP2, 1e-7 elsewhere).
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from tests.launch import run_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BASE = [
    "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "128",
    "--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4", "--num-query-groups", "2",
    "--ffn-hidden-size", "64", "--seq-length", "16", "--max-position-embeddings", "16",
    "--normalization", "RMSNorm", "--swiglu", "--position-embedding-type", "rope", "--disable-bias-linear",
    "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "5",
    "--lr", "1e-3", "--lr-warmup-iters", "1", "--log-interval", "1", "--eval-interval", "0",
    "--exit-layer-nums", "1", "3", "--exit-layer-weight", "0.5", "0.8", "--use-exit-norm", "--use-exit-mlp",
    "--seed", "11", "--device", "cpu",
]  # fmt: skip


def train(tmp_path, name, nproc, extra=(), base=BASE, with_stdout=False):
    out = tmp_path / name
    args = [*base, *extra, "--log-jsonl", str(out / "log.jsonl")]
    if "--save" not in extra:
        args += ["--save", str(out / "ckpt")]
    env = dict(os.environ, OMP_NUM_THREADS="1")  # the single-process reference too
    proc = run_script(os.path.join(ROOT, "pretrain_early_exit_gpt.py"), args, nproc, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    if with_stdout:
        return records, proc.stdout
    weights = load_file(str(out / "ckpt" / "iter_0000005" / "model.safetensors"))
    return records, weights


GPT2_BASE = [
    a
    for a in BASE
    if a not in ("--normalization", "RMSNorm", "--swiglu", "--position-embedding-type", "rope", "--disable-bias-linear")
]  # LayerNorm, GELU, learned positions, biases

VARIANTS = {
    "tied": (BASE, []),
    "untied": (BASE, ["--untie-exit-output-weights"]),
    "gpt2": (GPT2_BASE, ["--untie-embeddings-and-output-weights"]),
    # Explicit-bubble filling: 2 extra micro-batches at the warm-up bubble, 1 after the cool-down,
    # feeding only exit losses; the single process computes the same objective.
    "fill": (
        BASE,
        ["--fill-explicit-bubbles", "--num-fill-warmup-microbatches", "2", "--num-fill-cooldown-microbatches", "1"],
    ),
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    cache = {}

    def get(variant):
        if variant not in cache:
            base, extra = VARIANTS[variant]
            cache[variant] = train(tmp_path_factory.mktemp("ref"), variant, 1, extra, base)
        return cache[variant]

    return get


def assert_same(run, ref):
    records, weights = run
    ref_records, ref_weights = ref
    assert len(records) == len(ref_records) == 5
    for r, e in zip(records, ref_records):
        heads = [k for k in e if k.endswith("loss")]
        assert heads == ["exit_1 loss", "exit_3 loss", "lm loss"]
        for k in heads:
            assert r[k] == pytest.approx(e[k], rel=1e-5), (r["iteration"], k)
    assert ref_records[-1]["lm loss"] < ref_records[0]["lm loss"]  # it really trains
    assert weights.keys() == ref_weights.keys()
    for name in ref_weights:
        torch.testing.assert_close(weights[name], ref_weights[name], rtol=1e-4, atol=5e-5, msg=name)


LAYOUTS = {
    "tp2": (2, ["--tensor-model-parallel-size", "2"]),
    "pp2": (2, ["--pipeline-model-parallel-size", "2"]),
    "pp4": (4, ["--pipeline-model-parallel-size", "4"]),
    "tp2xpp2": (4, ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]),
    "dp2xpp2": (4, ["--pipeline-model-parallel-size", "2"]),
    "dp2xpp2-zero1": (4, ["--pipeline-model-parallel-size", "2", "--use-distributed-optimizer"]),
    # Small buckets: several all-reduces per stage, some launched inside the last backward.
    "dp2xpp2-buckets": (4, ["--pipeline-model-parallel-size", "2", "--ddp-bucket-size", "3000"]),
    # Evaluation between steps leaves FSDP2 gathered: training must not see stale gradients.
    "dp2xpp2-fsdp2": (
        4,
        ["--pipeline-model-parallel-size", "2", "--use-torch-fsdp2", "--eval-interval", "2", "--eval-iters", "1"],
    ),
    "tp2xpp2-sp": (
        4,
        ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2", "--sequence-parallel"],
    ),
}

CASES = [(layout, "tied") for layout in LAYOUTS] + [
    ("pp2", "untied"),
    ("tp2xpp2", "untied"),
    ("tp2xpp2-sp", "gpt2"),
    ("pp2", "fill"),
    ("pp4", "fill"),  # exits on stages 0 and 2: fill activations and gradients cross stages
]


@pytest.mark.parametrize(("layout", "variant"), CASES)
def test_layout_equals_single_process(tmp_path, reference, layout, variant):
    nproc, extra = LAYOUTS[layout]
    base, variant_extra = VARIANTS[variant]
    assert_same(train(tmp_path, layout, nproc, extra + variant_extra, base), reference(variant))


def test_bubble_filling_trains_the_exits_on_extra_data(reference):
    fill, plain = reference("fill"), reference("tied")
    assert fill[0][0]["lm loss"] == plain[0][0]["lm loss"]  # same first batch
    moved = [k for k in plain[1] if not torch.equal(fill[1][k], plain[1][k])]
    assert "exits.1.mlp.linear_fc1.weight" in moved and "decoder.layers.0.mlp.linear_fc1.weight" in moved


def test_replicated_parameters_stay_identical_across_ranks(tmp_path):
    # DP replicas, TP-replicated norms and the tied word-embedding copies on both stages.
    extra = ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2", "--check-replicated-params"]
    _, stdout = train(tmp_path, "check", 4, extra, with_stdout=True)
    assert "replicated parameters identical across ranks after every step" in stdout
    _, stdout = train(
        tmp_path, "check_dp", 4, ["--pipeline-model-parallel-size", "2", "--check-replicated-params"], with_stdout=True
    )
    assert "replicated parameters identical across ranks after every step" in stdout


@pytest.mark.parametrize(
    ("first", "second"),
    [("tp2xpp2", None), (None, "tp2xpp2"), ("dp2xpp2-fsdp2", "tp2")],
    ids=["tp2xpp2-to-1", "1-to-tp2xpp2", "fsdp2-to-tp2"],
)
def test_checkpoint_resumes_under_another_layout(tmp_path, reference, first, second):
    """Stop after 3 iterations under one layout, resume under another: iterations 4 and 5
    give the single-process run's losses."""
    ckpt = str(tmp_path / "ckpt")

    def layout(name):
        return LAYOUTS[name] if name else (1, [])

    n1, e1 = layout(first)
    train(tmp_path, "part1", n1, [*e1, "--exit-interval", "3", "--save", ckpt], with_stdout=True)
    n2, e2 = layout(second)
    records, stdout = train(tmp_path, "part2", n2, [*e2, "--load", ckpt, "--save", ckpt], with_stdout=True)
    assert "resumed from" in stdout and [r["iteration"] for r in records] == [4, 5]
    ref_records = reference("tied")[0]
    for r, e in zip(records, ref_records[3:]):
        for k in ("exit_1 loss", "exit_3 loss", "lm loss"):
            assert r[k] == pytest.approx(e[k], rel=1e-5), (r["iteration"], k)

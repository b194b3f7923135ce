"""The threshold sweep: ROUGE-L and the CSV/plots it writes."""

import csv
import json
import os
import sys

import pytest

from megatron.early_exit.checkpointing import save_checkpoint
from megatron.early_exit.config import ModelConfig
from megatron.early_exit.model import EarlyExitGPT
from megatron.early_exit.tokenizer import build_tokenizer

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "eval"))
from ee_sweep import decode_rate, main, rouge_l, shared_seconds  # noqa: E402


def tiny_gpt2_checkpoint(path, **overrides) -> tuple[EarlyExitGPT, object]:
    """A random 3-layer model (a normed exit after layer 1) with the GPT-2 tokenizer, saved at
    `path`; `overrides`: other `ModelConfig` fields. Returns (model, tokenizer)."""
    tok = build_tokenizer("GPT2BPETokenizer")
    fields = dict(
        num_layers=3, hidden_size=32, num_attention_heads=4, vocab_size=50304, real_vocab_size=50257,
        max_position_embeddings=256, exit_layer_nums=[1], use_exit_norm=True,
    )  # fmt: skip
    model = EarlyExitGPT(ModelConfig(**{**fields, **overrides}))
    model.init_weights(0)
    save_checkpoint(str(path), 0, model, tok)
    return model, tok


def sweep_inputs(tmp_path, rows: list[dict]) -> tuple[str, str]:
    """(checkpoint, data file) of a sweep: `tiny_gpt2_checkpoint` at tmp_path/ck and `rows` (aclsum
    test records) as jsonl."""
    tiny_gpt2_checkpoint(tmp_path / "ck")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(tmp_path / "ck"), str(data)


def test_rouge_l_is_lcs_f1():
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == 1.0
    assert rouge_l("", "x") == 0.0
    # LCS("a b c d", "a c d e") = "a c d" (3): P = R = 3/4.
    assert rouge_l("a b c d", "a c d e") == pytest.approx(0.75)
    assert rouge_l("A B", "a b") == 1.0


@pytest.mark.parametrize("batch_size", [2, 1])
def test_sweep_writes_csv_and_plots(tmp_path, batch_size):
    rows = [
        {"abstract": "We study early exit in language models.", "challenge": "a", "approach": "b", "outcome": "c"},
        {"abstract": "Exits save compute on easy tokens.", "challenge": "d", "approach": "e", "outcome": "f"},
    ]
    ck, data = sweep_inputs(tmp_path, rows)
    main(
        [
            "--load",
            ck,
            "--data",
            data,
            "--output",
            str(tmp_path / "out"),
            "--thresholds",
            "1.0",
            "0.0",
            "--max-new-tokens",
            "4",
            "--batch-size",
            str(batch_size),
            "--explain",
        ]
    )
    with open(tmp_path / "out" / "sweep.csv") as f:
        table = list(csv.DictReader(f))
    assert [float(r["threshold"]) for r in table] == [1.0, 0.0]
    full, zero = table
    assert float(full["rougeL_vs_full"]) == 100.0 and float(full["token_agreement"]) == 1.0
    # per decode step given full decoding's prefix (teacher-forced): every step of the 0.0 row
    # leaves at exit 1, and its agreement is exit 1's with the final head on those steps
    assert float(full["step_agreement"]) == 1.0 and 0.0 <= float(zero["step_agreement"]) <= 1.0
    assert float(full["average_exit_layer"]) == 3.0
    assert json.loads(zero["exit_share"])["1"] > 0.5  # threshold 0: decode tokens leave at exit 1
    # What the exits' tokens allow with perfect decisions (every step at its shallowest exit that
    # agrees with full decoding), and each exit's agreement a share. Here exit 1 always agrees, so
    # the oracle leaves every decode step there, as the 0.0 row does, priced by that row's cost model:
    # the same ideal but for the prefill share (the oracle takes full decoding's prefill time, the
    # row its own; timed apart, they move the ideal by a few percent). Not ">= 1": on this 3-layer
    # model a step at exit 1 saves two small layers and pays a vocabulary-wide check, and timed
    # beside other jobs the oracle once read 0.984.
    with open(tmp_path / "out" / "oracle.json") as f:
        oracle = json.load(f)
    if json.loads(oracle["exit_agreement"])["1"] == 1.0:
        assert float(oracle["oracle_ideal_speedup"]) == pytest.approx(float(zero["ideal_speedup"]), rel=0.1)
    assert set(json.loads(oracle["exit_agreement"])) == {"1"}
    assert all(0.0 <= a <= 1.0 for a in json.loads(oracle["exit_agreement"]).values())
    assert sum(json.loads(oracle["oracle_exit_share"]).values()) == pytest.approx(1.0, abs=1e-3)
    # one exit: a step leaves at it exactly where its token is full decoding's
    assert json.loads(oracle["oracle_exit_share"]).get("1", 0.0) == json.loads(oracle["exit_agreement"])["1"]
    # The cost model's columns: full decoding is its own ideal; efficiency = achieved / ideal.
    assert float(full["ideal_speedup"]) == 1.0
    for r in table:
        s, i = float(r["speedup"]), float(r["ideal_speedup"])
        # each column rounded to 3 decimals: s / i can be off by what rounding s and i moves it
        rounding = 5e-4 * (1 / i + s / i**2) + 5e-4
        assert float(r["efficiency"]) == pytest.approx(s / i, abs=rounding + 1e-9)
        assert float(r["decode_speedup"]) > 0  # decoding after the prefill, paired as speedup is
        # cost_aware's clock is off where exits are priced from parameter counts (the suite's costs)
        assert float(r["paused_share"]) == float(r["free_share"]) == 0.0
        assert float(r["layer_ms"]) > 0 and float(r["fixed_ms"]) >= 0
    # the cost model timed again right before the row that evaluates an exit (`cost_model.retime`)
    assert float(full["host_speed"]) == 1.0 and float(zero["host_speed"]) > 0
    # --explain: the 0.0 row's decode steps, each timed and priced, by kind (4 tokens: at most 3 steps a batch).
    with open(tmp_path / "out" / "explain.csv") as f:
        kinds = list(csv.DictReader(f))
    assert kinds and {r["kind"] for r in kinds} <= {"exit 1", "exit 1 + fill", "full depth", "full depth + fill"}
    assert all(float(r["threshold"]) == 0.0 and float(r["measured_ms"]) > 0 < float(r["predicted_ms"]) for r in kinds)
    assert 1 <= sum(int(r["steps"]) for r in kinds) <= 3 * (2 // batch_size)
    pytest.importorskip("matplotlib")
    assert {"speedup.png", "quality_vs_speedup.png", "exit_histogram.png"} <= set(os.listdir(tmp_path / "out"))


def test_decode_rate_counts_the_tokens_after_each_first_over_the_time_after_each_prefill():
    def batch(tokens: list[int], elapsed: float, prefill: float) -> tuple:
        after = sum(t - 1 for t in tokens)
        stats = {"elapsed_s": elapsed, "prefill_s": prefill, "decode_tokens_per_sec": after / (elapsed - prefill)}
        return elapsed, [type("R", (), {"tokens": [0] * t, "stats": stats})() for t in tokens]

    # (9 + 4) + 20 tokens after the firsts over (1.0 - 0.5) + (2.0 - 0.5) seconds
    assert decode_rate([batch([10, 5], 1.0, 0.5), batch([21], 2.0, 0.5)]) == pytest.approx(33 / 2.0)


def test_the_ideals_shared_seconds_are_each_calls_time_outside_its_decode_loop():
    """The ideal speedup's fixed part (prefill and the Python around the decode loop, the same in
    full decoding and early exit) from the full runs of the row's own pairs: each call's wall
    seconds less its decode loop's time after the prefill."""

    def batch(wall: float, elapsed: float, prefill: float) -> tuple:
        return wall, [type("R", (), {"stats": {"elapsed_s": elapsed, "prefill_s": prefill}})()]

    # (1.25 - (1.0 - 0.5)) + (2.5 - (2.0 - 0.25))
    assert shared_seconds([batch(1.25, 1.0, 0.5), batch(2.5, 2.0, 0.25)]) == pytest.approx(0.75 + 0.75)


def test_self_speculation_is_warmed_at_every_batch_bucket_it_can_meet():
    """A batch shrinks as its sequences stop, and self-speculation times its draft costs on first
    use at each batch bucket (~1 s each): the sweep's untimed warm-up meets every bucket a batch of
    its size can reach, so none is timed inside a paired run."""
    from ee_sweep import warm_sizes

    from megatron.early_exit.inference.strategies.self_speculative import batch_bucket

    for size in range(1, 18):
        reachable = {batch_bucket(running) for running in range(1, size + 1)}
        assert {batch_bucket(s) for s in warm_sizes(size)} == reachable and warm_sizes(size)[0] == size


def test_calibrated_adds_a_row_at_the_checkpoints_own_thresholds(tmp_path, capsys):
    """--calibrated decodes a row at the per-exit thresholds calibrate_thresholds.py wrote into the
    checkpoint (with their measure): thresholds {1: 0.0} send every decoded token out at exit 1,
    as the shared threshold 0.0 does; a checkpoint without a record is named in the error."""
    from megatron.early_exit.checkpointing import THRESHOLDS_FILE, resolve_checkpoint_dir

    rows = [{"abstract": "We study early exit in language models.", "challenge": "a", "approach": "b", "outcome": "c"}]
    ck, data = sweep_inputs(tmp_path, rows)
    args = ["--load", ck, "--data", data, "--output", str(tmp_path / "out"), "--max-new-tokens", "4",
            "--batch-size", "1", "--thresholds", "1.0", "0.0", "--measure", "max_prob", "--calibrated"]  # fmt: skip
    with pytest.raises(SystemExit):
        main(args)
    err = capsys.readouterr().err
    assert "--calibrated" in err and "no calibrated thresholds" in err
    record = {"exits": [1], "thresholds": {"1": 0.0}, "measure": "max_prob"}
    with open(os.path.join(resolve_checkpoint_dir(ck), THRESHOLDS_FILE), "w") as f:
        json.dump(record, f)
    main(args)
    with open(tmp_path / "out" / "sweep.csv") as f:
        table = {r["threshold"]: r for r in csv.DictReader(f)}
    assert set(table) == {"1.0", "0.0", "calibrated"}
    assert table["calibrated"]["exit_share"] == table["0.0"]["exit_share"]
    assert json.loads(table["calibrated"]["exit_share"])["1"] > 0.5  # decode tokens leave at exit 1
    assert table["calibrated"]["token_agreement"] == table["0.0"]["token_agreement"]
    assert table["calibrated"]["step_agreement"] == table["0.0"]["step_agreement"]  # the same decisions

"""Issue 16: every script under examples/ runs with `python` and `torchrun` replaced by stubs that
record their arguments; each recorded training command then goes through the trainer's checks
(single-process ones build everything with --dry-run; multi-process ones check flags, layout,
tokenizer, model and data for their world size, as every rank would before its process group)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import stat
import subprocess

import pytest

from megatron.early_exit.arguments import parse_args
from megatron.early_exit.inference import native
from megatron.early_exit.training import trainer as trainer_mod

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(
    os.path.relpath(os.path.join(d, f), ROOT)
    for d, _, files in os.walk(os.path.join(ROOT, "examples"))
    for f in files
    if f.endswith((".sh", ".sbatch"))
)
STUB = """#!/bin/bash
{{ printf '%s\\n' "$(basename "$0")" "$@"; echo '<<end>>'; }} >> {log}
if [ "$1" = "-c" ]; then echo /stub/model.gguf; fi
if [ "$1 $2 $3" = "-m megatron.early_exit.precision --decode-dtype" ]; then echo bf16; fi
if [ "$(basename "$0")" = srun ]; then while [[ "$1" == --* ]]; do shift; done; "$@"; fi
exit 0
"""


def record_commands(script, env, tmp_path):
    """Run the script with stub python/torchrun/srun/scontrol on PATH; returns the recorded argvs."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.txt"
    bin_dir.mkdir(exist_ok=True)
    for name in ("python", "torchrun", "srun", "scontrol"):
        path = bin_dir / name
        path.write_text(STUB.format(log=log))
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, **env, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    proc = subprocess.run(["bash", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    calls, current = [], []
    for line in log.read_text().splitlines() if log.exists() else []:
        if line == "<<end>>":
            calls.append(current)
            current = []
        else:
            current.append(line)
    return calls


def load_tool(path: str):
    """A tool or example script under ROOT as a module (they are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Tools the examples call whose flags are checked too: each recorded call is parsed by the tool's
# own parser; the activation cache is built for real (tiny), since the tuning command reads it.
PARSED_TOOLS = (
    "tools/eval/calibrate_thresholds.py",
    "tools/eval/ee_sweep.py",
    "tools/make_distillation_corpus.py",
    "tools/preprocess_data.py",
    "examples/ee_tuning/demo_generate.py",
    "examples/ee_tuning/report_exits.py",
)
RUN_TOOLS = ("tools/checkpoint/cache_exit_activations.py",)
# Run where the call rewrites a checkpoint the stand-ins provide (new probes on pretraining's
# checkpoint); parsed elsewhere (adding exits to a real model needs its weights).
RUN_WITH_FLAG = {"tools/checkpoint/add_exits.py": "--replace-probes"}


def check_tool_calls(calls) -> None:
    for call in calls:
        script = call[1] if len(call) > 1 else ""
        if script in PARSED_TOOLS:
            load_tool(script).build_parser().parse_args(call[2:])
        elif script in RUN_TOOLS or RUN_WITH_FLAG.get(script) in call:
            load_tool(script).main(call[2:])
        elif script in RUN_WITH_FLAG:
            load_tool(script).build_parser().parse_args(call[2:])


def training_commands(calls):
    """(world size, trainer argv) of each recorded pretrain_early_exit_gpt.py call."""
    out = []
    for call in calls:
        if "pretrain_early_exit_gpt.py" not in call:
            continue
        i = call.index("pretrain_early_exit_gpt.py")
        world = 1
        if call[0] == "torchrun":
            opts = dict(zip(call[1:i:2], call[2:i:2]))
            world = int(opts.get("--nproc-per-node", 1)) * int(opts.get("--nnodes", 1))
        out.append((world, call[i + 1 :]))
    return out


@pytest.fixture(scope="module")
def data(corpus, tmp_path_factory):
    """Stand-ins for what the examples expect: the aclsum corpus tokenized as `make demo` does
    (SentencePiece, here the 2k test model), a GPT-2 prefix, and for EE-Tuning a small
    checkpoint with exits whose tokenizer made the tuning data."""
    import preprocess_data

    from megatron.early_exit.checkpointing import save_checkpoint
    from megatron.early_exit.config import ModelConfig
    from megatron.early_exit.model import EarlyExitGPT
    from megatron.early_exit.tokenizer import build_tokenizer

    root = tmp_path_factory.mktemp("examples")
    aclsum = root / "aclsum"
    aclsum.mkdir()
    shutil.copy(corpus / "tokenizer.model", aclsum / "tokenizer.model")
    small = aclsum / "train.jsonl"
    with open(corpus / "train.jsonl") as f, open(small, "w") as g:
        for line in list(f)[:60]:
            g.write(json.dumps({"text": json.loads(line)["text"][:1000]}) + "\n")
    sp = ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", str(aclsum / "tokenizer.model")]
    for name in ("aclsum", "smollm2", "ee_distill"):
        preprocess_data.main(["--input", str(small), "--output-prefix", str(aclsum / name), *sp, "--append-eod"])
    for ext in ("bin", "idx"):  # the self-distillation corpora as `--json-keys tokens` names them
        for name in ("ee_distill", "smollm2_distill"):
            shutil.copy(aclsum / f"ee_distill_text_document.{ext}", aclsum / f"{name}_tokens_document.{ext}")
    answers_mask(str(aclsum / "ee_distill_tokens_document"))  # `--loss-mask-key loss_mask` writes it
    preprocess_data.main(["--input", str(small), "--output-prefix", str(root / "gpt2"), "--tokenizer-type",
                          "GPT2BPETokenizer", "--append-eod"])  # fmt: skip
    tune = root / "tune"
    (tune / "base" / "iter_0000000" / "tokenizer").mkdir(parents=True)
    (tune / "base" / "iter_0000000" / "tokenizer" / "tokenizer.json").write_text("{}")
    cfg = ModelConfig(4, 32, 4, 2048, 256, exit_layer_nums=[1, 2], use_exit_norm=True, use_exit_mlp=True)
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(aclsum / "tokenizer.model"))
    model = EarlyExitGPT(cfg)
    save_checkpoint(str(tune / "with_exits"), 0, model, tok)
    # the same backbone with probes (a cache of the one tunes the other's probes)
    probed = EarlyExitGPT(dataclasses.replace(cfg, use_exit_confidence_head=True, exit_confidence_hidden_size=8))
    probed.load_state_dict(model.state_dict(), strict=False)
    save_checkpoint(str(tune / "with_probes"), 0, probed, tok)
    return {"aclsum": str(aclsum), "gpt2": str(root / "gpt2_text_document"), "tune": str(tune)}


def answers_mask(prefix: str) -> None:
    """A loss mask beside the corpus `prefix` (every other token a target), as
    `preprocess_data.py --loss-mask-key` writes one: what `--data-loss-mask` reads."""
    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    from megatron.early_exit.data.datasets import loss_mask_prefix

    tokens = IndexedDataset(prefix)  # held: its lengths are a view of its memory map
    lengths = [int(n) for n in tokens.sequence_lengths]
    out = loss_mask_prefix(prefix)
    builder = IndexedDatasetBuilder(out + ".bin", dtype=np.uint8)
    for n in lengths:
        builder.add_document(torch.arange(int(n)) % 2, [int(n)])
    builder.finalize(out + ".idx")


class StopBeforeProcessGroups(Exception):
    pass


def check_multi_process(argv, world, monkeypatch):
    """Everything a rank checks before it starts its process group, for `world` processes."""

    def stop(*args, **kwargs):
        raise StopBeforeProcessGroups

    monkeypatch.setattr(trainer_mod, "initialize", stop)
    monkeypatch.setenv("WORLD_SIZE", str(world))
    with pytest.raises(StopBeforeProcessGroups):
        trainer_mod.Trainer(parse_args([*argv, "--device", "cpu"]))


@pytest.mark.parametrize("script", SCRIPTS)
def test_example_scripts_pass_the_trainers_checks(script, data, tmp_path, monkeypatch):
    env = {
        "DATA": data["gpt2"],
        "SAVE": str(tmp_path / "save"),
        "RUN": str(tmp_path / "run"),
        "SLURM_JOB_NODELIST": "node1",
        "SLURM_JOB_NUM_NODES": "4",
        "SLURM_NODEID": "0",
    }
    if "cpu_" in script:
        env["DATA"] = data["aclsum"]
    if "cpu_pretrain" in script:  # its EE-Tuning passes load what the passes before saved: stand-ins for those
        for saved in ("checkpoints", "tuned"):
            shutil.copytree(os.path.join(data["tune"], "with_exits"), tmp_path / "run" / saved)
        shutil.copytree(os.path.join(data["tune"], "with_probes"), tmp_path / "run" / "distilled")
        # the stand-in corpus is ~15k tokens: don't cache it 40 times over
        env.update(CACHE_TOKENS="1024", DISTILL_TOKENS="1024")
    if "ee_tuning" in script:
        run = tmp_path / "tune"  # the demo writes its activation cache there
        shutil.copytree(data["tune"], run)
        env.update(DATA=data["aclsum"], RUN=str(run), CACHE_TOKENS="1024", TUNE_ITERS="3")
        if "tune_smollm2" in script:  # its self-distillation caches from the tuning's output: a stand-in
            shutil.copytree(run / "with_exits", run / "tuned")
            env["DISTILL_TOKENS"] = "1024"
    calls = record_commands(script, env, tmp_path)
    check_tool_calls(calls)
    commands = training_commands(calls)
    assert commands, f"{script} runs no training command"
    for world, argv in commands:
        if world == 1:
            state = trainer_mod.main([*argv, "--dry-run"])
            assert state.iteration == 0
        else:
            check_multi_process([*argv, "--dry-run"], world, monkeypatch)


def test_demo_generate_marks_each_tokens_exit_and_times_every_way(data, corpus, capsys):
    """The demo's last step on a tiny checkpoint (exits after layers 1 and 2 of 4, no probes, so
    max_prob): threshold 0 sends every early-exit token out at layer 1; full decoding's line is
    the engine's own greedy text, unmarked; self-speculation reproduces it; three speed rows, each a
    ratio to full decoding paired by round, and the control's."""
    from megatron.early_exit import load_checkpoint
    from megatron.early_exit.inference import EarlyExitEngine, GenerationSettings

    demo = load_tool("examples/ee_tuning/demo_generate.py")
    load = os.path.join(data["tune"], "with_exits")
    demo.main(["--load", load, "--data", str(corpus), "--num-prompts", "1", "--max-new-tokens", "6",
               "--repeats", "1", "--threshold", "0", "--dtype", "fp32", "--threads", "1"])  # fmt: skip
    out = capsys.readouterr().out.splitlines()
    from ee_sweep import build_prompt, load_examples  # on sys.path once the demo is loaded

    model, tok = load_checkpoint(load)
    ids = build_prompt(tok, load_examples(os.path.join(corpus, "test_summarization.jsonl"), 1)[0]["abstract"], 700)
    settings = GenerationSettings(max_new_tokens=6, stop_strings=("\n",))
    full = EarlyExitEngine(model, tok).generate([ids], settings)[0]
    speed = out.index(next(x for x in out if x.startswith("=== speed")))
    heads = [i for i, line in enumerate(out[:speed]) if line.startswith("  ") and not line.startswith("   ")]
    texts = {out[i].split("(")[0].strip(): out[i + 1].strip() for i in heads}
    assert texts["full"] == "".join(tok.detokenize([t]) for t in full.tokens).replace("\n", "⏎").strip()
    # the first token comes from the prefill, through every layer; each later one leaves at layer 1
    pieces = texts["early_exit"].split("₁")
    assert len(pieces) == len(full.tokens) and pieces[-1] == "", texts["early_exit"]
    assert any("identical to full: yes" in line for line in out)
    rows = [line.split() for line in out[speed + 1 : speed + 4]]
    assert [r[0] for r in rows] == ["full", "early_exit", "self_speculative"] and rows[0][3:5] == ["1.00x", "[1.00,"]
    assert all(float(r[1]) > 0 for r in rows)
    assert out[speed + 4].startswith("  (control: full decoding run twice a round read ")
    # a way is faster or slower only where every round's ratio lies beyond the control's spread
    assert demo.verdict([1.10, 1.20], 0.05).strip() == "faster than full decoding"
    assert demo.verdict([0.80, 0.90], 0.05).strip() == "SLOWER than full decoding"
    assert demo.verdict([0.89, 1.02], 0.05).startswith("  no clear difference")
    assert demo.verdict([0.93, 0.94], 0.08).startswith("  no clear difference")
    fake = type("R", (), {"tokens": full.tokens[:2], "exit_layers": [2, 4]})
    first, second = (tok.detokenize([t]).replace("\n", "⏎") for t in full.tokens[:2])
    assert demo.annotated(tok, fake, 4) == (first + "₂" + second).strip()


def test_report_exits_reports_every_checkpoint_in_one_process(data, capsys):
    """`--load A B --label before after` prints A's lines then B's, each as the single-checkpoint
    evaluation prints them (here the same checkpoint twice: the same numbers under both labels)."""
    from megatron.early_exit import load_checkpoint

    report = load_tool("examples/ee_tuning/report_exits.py")
    load, prefix = os.path.join(data["tune"], "with_exits"), os.path.join(data["aclsum"], "smollm2_text_document")
    args = ["--data", prefix, "--samples", "4", "--seq-length", "32"]
    report.main(["--load", load, load, "--label", "before", "after", *args])
    lines = [x for x in capsys.readouterr().out.splitlines() if ": exit after layer" in x]
    model, tok = load_checkpoint(load)
    report.evaluate_exits(model, tok, prefix, 4, 32, "alone")
    alone = [x for x in capsys.readouterr().out.splitlines() if ": exit after layer" in x]
    assert len(alone) == 2 and lines == [x.replace("alone", "before") for x in alone] + [
        x.replace("alone", "after") for x in alone
    ]
    with pytest.raises(SystemExit):
        report.main(["--load", load, "--label", "before", "after", *args])
    assert "--label: 2 labels for 1 checkpoints in --load" in capsys.readouterr().err


def test_timed_alternating_without_warm_up_runs_only_the_timed_rounds():
    """warm=False (the demo's shown generations warmed up already): repeats x settings calls,
    none of them warm_up's 8-token run; warm=True adds one such run per setting first."""
    from megatron.early_exit.inference import GenerationSettings

    timed_alternating = load_tool("benchmarks/decode_speed.py").timed_alternating

    class Engine:
        num_layers = 4

        def __init__(self):
            self.calls = []

        def generate(self, prompts, settings):
            self.calls.append((settings.strategy, settings.max_new_tokens))
            stats = {"tokens_per_sec": 10.0, "elapsed_s": 0.1, "average_exit_layer": 4.0}
            return [type("R", (), {"tokens": [1, 2], "exit_layers": [4, 4], "stats": stats})()]

    runs = [(s, GenerationSettings(strategy=s, max_new_tokens=5)) for s in ("full", "early_exit")]
    engine = Engine()
    timed_alternating(engine, [[1]], runs, repeats=2, warm=False)
    assert engine.calls == [("full", 5), ("early_exit", 5)] * 2
    engine = Engine()
    timed_alternating(engine, [[1]], runs, repeats=1)
    assert engine.calls == [("full", 8), ("early_exit", 8), ("full", 5), ("early_exit", 5)]


def test_decode_speed_times_every_setting_unprofiled_and_profiles_each_once(capsys):
    """`profile` times each exit check on the general path (the uniform step's checks off), so the
    timed rounds run without it; the exit-time column comes from one profiled run per setting."""
    import argparse

    from megatron.early_exit.config import ModelConfig

    bench_batch = load_tool("benchmarks/decode_speed.py").bench_batch

    class Engine:
        num_layers, vocab = 4, 50
        config = ModelConfig(
            num_layers=4, hidden_size=8, num_attention_heads=2, vocab_size=50, max_position_embeddings=16,
            exit_layer_nums=[2],
        )  # fmt: skip

        def __init__(self):
            self.calls = []

        def generate(self, prompts, settings):
            self.calls.append((settings.strategy, settings.early_exit_threshold, settings.profile))
            stats = {"tokens_per_sec": 10.0, "elapsed_s": 0.1, "average_exit_layer": 4.0}
            if settings.profile:
                stats["exit_time_share"] = 0.25
            return [type("R", (), {"tokens": [1, 2], "exit_layers": [4, 4], "stats": stats})()]

    args = argparse.Namespace(
        prompt_len=4, same_prompt=False, new_tokens=2, draft=2, repeats=2, clock="wall",
        thresholds=[0.9], learned_thresholds=[], exit_policies=["cost_aware"], early_exit_only=True,
        clock_modes=False,
    )  # fmt: skip
    engine = Engine()
    bench_batch(engine, None, 1, args)
    timed = [c for c in engine.calls if not c[2]]
    assert len(timed) == 3 * (1 + 2)  # full, its control and max_prob 0.9: a warm-up and two rounds each
    assert [c for c in engine.calls if c[2]] == [("full", 0.8, True), ("full", 0.8, True), ("early_exit", 0.9, True)]
    row = next(x for x in capsys.readouterr().out.splitlines() if "max_prob @ 0.9" in x)
    assert "25.0%" in row  # the profiled run's share, in the exit-time column


def test_decode_speed_clock_modes_run_each_cost_aware_row_held_in_each_mode(capsys):
    """`--clock-modes`: the cost_aware row three more times, each on an engine of its own whose clock
    holds every decode step in one mode: paused steps run full depth (nothing leaves, every step
    paused), free ones let every firing row leave (threshold 0: every token after the prefill's)."""
    import argparse

    from megatron.early_exit.inference import EarlyExitEngine
    from tests.test_inference import make

    bench_batch = load_tool("benchmarks/decode_speed.py").bench_batch
    args = argparse.Namespace(
        prompt_len=4, same_prompt=False, new_tokens=5, draft=2, repeats=1, clock="wall",
        thresholds=[0.0], learned_thresholds=[], exit_policies=["cost_aware"], early_exit_only=True,
        clock_modes=True,
    )  # fmt: skip
    bench_batch(EarlyExitEngine(make("llama")), None, 2, args)
    rows = {line.split("  ")[1].strip(): line for line in capsys.readouterr().out.splitlines() if "@ 0 " in line}
    name = "early_exit max_prob @ 0 cost_aware"
    assert list(rows) == [name, f"{name} [paused]", f"{name} [on]", f"{name} [free]"]
    paused, free = rows[f"{name} [paused]"].split(), rows[f"{name} [free]"].split()
    # columns after the name: tokens/s, vs full, exited, avg exit, = full, exit time, paused, free
    assert paused[8:10] == ["0%", "4.00"] and paused[12:14] == ["100%", "0%"]
    assert free[8:10] == ["80%", "1.60"] and free[12:14] == ["0%", "100%"]


def test_native_drafts_benchmark_pairs_the_three_settings_and_counts_its_calls(data, corpus, capsys):
    """`benchmarks/native_drafts.py` on a tiny checkpoint whose exits hold an MLP (so every draft
    phase steps, and says so): three rows per round, the ratios, both self-speculative settings
    identical to full decoding (fp32)."""
    bench = load_tool("benchmarks/native_drafts.py")
    bench.main(["--load", os.path.join(data["tune"], "with_exits"), "--data",
                os.path.join(corpus, "test_summarization.jsonl"), "--num-examples", "1", "--new-tokens", "4",
                "--rounds", "2", "--threads", "1"])  # fmt: skip
    out = capsys.readouterr().out.splitlines()
    rounds = [line for line in out if line.startswith("round ")]
    assert len(rounds) == 2 and all(line.count("tok/s") == 3 for line in rounds)
    assert any(line.startswith("drafts in one call / step by step:") and "0 of " in line for line in out)
    assert sum("identical to full" in line and "NOT" not in line for line in out) == 2


def test_server_benchmark_plans_staggered_arrivals_the_same_for_every_setting():
    """`server_throughput.request_plan`: together, no wait and --max-tokens each; staggered, waits
    and lengths drawn per client and request from a seeded generator: the same plan on every call
    (each setting and round meets it alike), another for another seed, lengths within
    [--max-tokens // 4, --max-tokens] and waits averaging about --mean-gap."""
    import argparse

    plan = load_tool("benchmarks/server_throughput.py").request_plan
    args = argparse.Namespace(arrivals="together", max_tokens=32, requests_per_client=3, mean_gap=0.5, seed=0)
    assert plan(2, args) == [[(0.0, 32)] * 3] * 2
    args.arrivals, args.requests_per_client = "staggered", 50
    first = plan(16, args)
    assert first == plan(16, args) and len(first) == 16 and all(len(c) == 50 for c in first)
    assert first != plan(16, argparse.Namespace(**{**vars(args), "seed": 1}))
    waits = [w for c in first for w, _ in c]
    lengths = {n for c in first for _, n in c}
    assert min(lengths) == 8 and max(lengths) == 32 and len(lengths) > 16
    assert 0.45 < sum(waits) / len(waits) < 0.55  # 800 exponential draws of mean 0.5: ~1.8% standard error


def test_exit_vocabulary_benchmark_runs_every_setting_with_both_vocabularies(data, corpus, tmp_path, capsys):
    """`benchmarks/exit_vocabulary.py` on a tiny checkpoint with probes and a calibration record
    holding a draft vocabulary: a row per setting (full, its control, each threshold x policy x
    vocabulary), exact rows leaving at the same share with either vocabulary (the probes decide);
    a checkpoint without a draft vocabulary is a one-line error naming --load."""
    from megatron.early_exit.checkpointing import THRESHOLDS_FILE, resolve_checkpoint_dir, save_checkpoint
    from megatron.early_exit.config import ModelConfig
    from megatron.early_exit.model import EarlyExitGPT
    from megatron.early_exit.tokenizer import build_tokenizer

    cfg = ModelConfig(4, 32, 4, 2048, 256, exit_layer_nums=[1, 2], use_exit_norm=True, use_exit_confidence_head=True)
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=os.path.join(data["aclsum"], "tokenizer.model"))
    model = EarlyExitGPT(cfg)
    model.init_weights(3)
    save_checkpoint(str(tmp_path / "ck"), 0, model, tok)
    bench = load_tool("benchmarks/exit_vocabulary.py")
    argv = ["--load", str(tmp_path / "ck"), "--data", str(corpus), "--num-prompts", "1", "--max-new-tokens", "5",
            "--repeats", "2", "--threads", "1", "--dtype", "fp32", "--thresholds", "0.0", "calibrated"]  # fmt: skip
    with pytest.raises(SystemExit):
        bench.main(argv)
    assert "no draft vocabulary" in capsys.readouterr().err
    drafts = {"tokens": list(range(1024))}
    record = {"thresholds": {"1": 0.0, "2": 1.0}, "measure": "learned", "draft_vocabulary": drafts}
    with open(os.path.join(resolve_checkpoint_dir(str(tmp_path / "ck")), THRESHOLDS_FILE), "w") as f:
        json.dump(record, f)
    bench.main(argv)
    rows = {line.split("  ")[1].strip(): line for line in capsys.readouterr().out.splitlines() if line.startswith("  ")}
    names = ["full", "full (again)"] + [f"{t} {p} {v}" for t in ("0.0", "calibrated") for p in ("exact", "cost_aware")
                                        for v in ("full", "draft")]  # fmt: skip
    assert [n for n in rows if n != "setting"] == names
    for t in ("0.0", "calibrated"):  # every token after the prefill's leaves at exit 1 (threshold 0.0)
        assert rows[f"{t} exact full"].split()[-2] == rows[f"{t} exact draft"].split()[-2] == "80.0%"


def test_prefill_bound_splits_a_prefill_and_prices_its_ceiling(data, corpus, capsys):
    """`benchmarks/prefill_bound.py` times prompts' prefills plain and with each kind of call
    counted: the parts and "rest" make up the counted prefill (shares summing to 100%), the products
    counted with their FLOPs against one large product's rate, and full decoding's calls give the
    prefill's share p, from which each ceiling 1 / (p + (1 - p) / s) is printed. A count below one
    is a one-line error naming the flags."""
    bench = load_tool("benchmarks/prefill_bound.py")
    argv = ["--load", os.path.join(data["tune"], "with_exits"), "--data",
            os.path.join(corpus, "test_summarization.jsonl"), "--num-examples", "2", "--max-new-tokens", "4",
            "--max-prompt-chars", "300", "--repeats", "1", "--threads", "1"]  # fmt: skip
    bench.main(argv)
    out = capsys.readouterr().out.splitlines()
    parts = {line.split("  ")[1].strip(): line for line in out if line.startswith("  ") and line.endswith("%")}
    assert "products" in parts and "rest" in parts
    assert float(parts["products"].split()[1]) > 0  # products counted per prefill
    shares = [float(line.split()[-1].rstrip("%")) for line in parts.values()]
    assert abs(sum(shares) - 100) < 0.1 * len(shares)  # each share printed to 0.1%
    assert any(line.startswith("products: ") and "GFLOP/s" in line for line in out)
    share_line = next(line for line in out if line.startswith("full decoding's generate calls"))
    p = float(share_line.split("the prefill ")[1].split("%")[0]) / 100
    ceilings = next(line for line in out if "decoding alone sped up by s" in line)
    for s in (1.5, 2, 3, 4):  # p printed to 0.1%: the ceilings within 0.01 of those it gives
        printed = float(ceilings.split(f" {s:g}x -> ")[1].split("x")[0])
        assert abs(printed - 1 / (p + (1 - p) / s)) < 0.01
    with pytest.raises(SystemExit):
        bench.main(argv[:-4] + ["--repeats", "0"])
    assert "--repeats must be at least 1" in capsys.readouterr().err


@pytest.mark.skipif(not native.available(), reason="no native kernel here (no C compiler)")
def test_huge_pages_bench_pairs_the_two_page_kinds_prompt_by_prompt(data, corpus, capsys):
    """`benchmarks/huge_pages.py` makes one engine's weight copies on huge pages and the other's on
    ordinary ones (their products equal in its stream probe), decodes each prompt with both back to
    back, checks that they made the same tokens and prints each setting's median ratio over prompts x
    repeats pairs; new copies go on huge pages again afterwards."""
    from megatron.early_exit.inference import huge_pages

    if not huge_pages.supported():
        pytest.skip("no transparent huge pages here")
    bench = load_tool("benchmarks/huge_pages.py")
    bench.main(["--load", os.path.join(data["tune"], "with_exits"), "--data",
                os.path.join(corpus, "test_summarization.jsonl"), "--num-examples", "2", "--max-new-tokens", "4",
                "--max-prompt-chars", "300", "--repeats", "2", "--threads", "1", "--stream-mib", "1",
                "--pairs", "3"])  # fmt: skip
    out = capsys.readouterr().out.splitlines()
    probe = [line for line in out if line.startswith("stream probe")]
    assert len(probe) == 1 and probe[0].split()[-1] == "3"
    rows = {line.split()[0]: line for line in out if line.startswith("  ") and "pairs" in line}
    assert set(rows) == {"full", "self_speculative"}  # no calibration record: no early-exit row
    assert all(line.split()[-1] == "4" and float(line.split()[2]) > 0 for line in rows.values())  # 2 prompts x 2
    assert sum(line.startswith("pass ") for line in out) == 2 and huge_pages.enabled()


@pytest.mark.skipif(not native.available(), reason="no native kernel here (no C compiler)")
def test_native_ab_pairs_two_builds_of_the_kernel_prompt_by_prompt(data, corpus, tmp_path, capsys):
    """`benchmarks/native_ab.py` builds a second library from another source (here this checkout's
    with a comment added: another build of the same code), decodes each prompt with both back to
    back, checks that they made the same tokens and prints each setting's median ratio over
    prompts x repeats pairs; `native.library` is this checkout's again afterwards. A revision or a
    file that does not hold the source is a one-line error naming the flag."""
    bench = load_tool("benchmarks/native_ab.py")
    other = tmp_path / "native_linear.c"
    other.write_text(native.SOURCE.read_text() + "\n/* another build */\n")
    ours = native.library()
    bench.main(["--load", os.path.join(data["tune"], "with_exits"), "--data",
                os.path.join(corpus, "test_summarization.jsonl"), "--num-examples", "2", "--max-new-tokens", "4",
                "--max-prompt-chars", "300", "--repeats", "2", "--threads", "1", "--source", str(other)])  # fmt: skip
    out = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line for line in out if line.startswith("  ")}
    assert set(rows) == {"full", "self_speculative", "prefill"}  # no calibration record: no early-exit row
    assert all(line.split()[-1] == "4" and float(line.split()[2]) > 0 for line in rows.values())  # 2 prompts x 2
    assert sum(line.startswith("pass ") for line in out) == 2 and native.library() is ours
    bench.main(["--load", os.path.join(data["tune"], "with_exits"), "--threads", "1", "--source", str(other),
                "--attention", "20", "2", "--pairs", "3"])  # fmt: skip
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("  attention")]
    assert [r[1] for r in rows] == ["20", "2"] and all(r[-1] == "3" for r in rows)  # a prompt's rows, a verify's
    assert native.library() is ours
    for flag, value in (("--source", str(tmp_path / "missing.c")), ("--against", "no-such-rev")):
        with pytest.raises(SystemExit, match=flag):
            bench.main(["--load", os.path.join(data["tune"], "with_exits"), flag, value])

"""Issue 16: every script under examples/ runs with `python` and `torchrun` replaced by stubs that
record their arguments; each recorded training command then goes through the trainer's checks
(single-process ones build everything with --dry-run; multi-process ones check flags, layout,
tokenizer, model and data for their world size, as every rank would before its process group)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import stat
import subprocess

import pytest

from megatron.early_exit.arguments import parse_args
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
PARSED_TOOLS = ("tools/eval/calibrate_thresholds.py", "examples/ee_tuning/demo_generate.py")
RUN_TOOLS = ("tools/checkpoint/cache_exit_activations.py",)


def check_tool_calls(calls) -> None:
    for call in calls:
        script = call[1] if len(call) > 1 else ""
        if script in PARSED_TOOLS:
            load_tool(script).build_parser().parse_args(call[2:])
        elif script in RUN_TOOLS:
            load_tool(script).main(call[2:])


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
    for name in ("aclsum", "smollm2"):
        preprocess_data.main(["--input", str(small), "--output-prefix", str(aclsum / name), *sp, "--append-eod"])
    preprocess_data.main(["--input", str(small), "--output-prefix", str(root / "gpt2"), "--tokenizer-type",
                          "GPT2BPETokenizer", "--append-eod"])  # fmt: skip
    tune = root / "tune"
    (tune / "base" / "iter_0000000" / "tokenizer").mkdir(parents=True)
    (tune / "base" / "iter_0000000" / "tokenizer" / "tokenizer.json").write_text("{}")
    cfg = ModelConfig(4, 32, 4, 2048, 256, exit_layer_nums=[1, 2], use_exit_norm=True, use_exit_mlp=True)
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(aclsum / "tokenizer.model"))
    save_checkpoint(str(tune / "with_exits"), 0, EarlyExitGPT(cfg), tok)
    return {"aclsum": str(aclsum), "gpt2": str(root / "gpt2_text_document"), "tune": str(tune)}


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
    if "ee_tuning" in script:
        run = tmp_path / "tune"  # the demo writes its activation cache there
        shutil.copytree(data["tune"], run)
        env.update(DATA=data["aclsum"], RUN=str(run), CACHE_TOKENS="1024", TUNE_ITERS="3")
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

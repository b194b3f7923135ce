"""Strategies and confidence measures come from registries: a toy strategy and a toy measure
(tests/ee_toy_plugin.py) registered in a test run through `generate`, `tools/generate.py
--plugin` and the server; and every function of the inference package is short."""

import ast
import json
import os
import pathlib
import subprocess
import sys
import threading

import pytest
import torch

from megatron.early_exit.inference import MEASURES, STRATEGIES, generate

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11]]
NEW = 8
MAX_FUNCTION_LINES = 60

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def toy():
    """The toy plugin registered for one test, and unregistered after it."""
    sys.path.insert(0, str(ROOT / "tests"))
    import ee_toy_plugin

    ee_toy_plugin.register()
    yield ee_toy_plugin
    STRATEGIES.pop("exit_at", None)
    MEASURES.pop("always_sure", None)
    sys.path.remove(str(ROOT / "tests"))


def tiny():
    from megatron.early_exit.config import ModelConfig
    from megatron.early_exit.model import EarlyExitGPT

    cfg = ModelConfig(4, 32, 4, 64, 64, exit_layer_nums=[1, 2, 3], use_exit_norm=True, use_exit_mlp=True)
    model = EarlyExitGPT(cfg)
    model.init_weights(3)
    return model.eval()


def decode(model, tok=None, prompts=PROMPTS, **kw):
    return [(r.tokens, r.exit_layers) for r in generate(model, tok, prompts, max_new_tokens=NEW, **kw)]


def test_toy_strategy_and_measure_through_generate(toy):
    model = tiny()
    first_at_2 = decode(model, strategy="early_exit", early_exit_threshold=0.0, exit_layers=[2])
    assert decode(model, strategy="exit_at", exit_layers=[2]) == first_at_2
    assert all(set(layers[1:]) == {2} for _, layers in first_at_2)  # the first token comes from the prefill
    sure = generate(model, None, PROMPTS, strategy="early_exit", measure="always_sure", early_exit_threshold=0.9,
                    exit_layers=[2], max_new_tokens=NEW)  # fmt: skip
    assert [(r.tokens, r.exit_layers) for r in sure] == first_at_2
    assert all(c == 1.0 for r in sure for c in r.confidences[1:])
    with pytest.raises(ValueError, match="strategy must be one of full, early_exit, self_speculative, exit_at"):
        generate(model, None, PROMPTS, strategy="nope")
    with pytest.raises(ValueError, match="exit_layers: exit_at needs an allowed exit"):
        generate(model, None, PROMPTS, strategy="exit_at", min_exit_layer=4)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from tests.test_server import build_checkpoint

    return build_checkpoint(str(tmp_path_factory.mktemp("plugins")))


def cli(ckpt, *args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    cmd = [
        sys.executable,
        str(ROOT / "tools" / "generate.py"),
        "--load",
        ckpt,
        "--json",
        "--prompt",
        "Early exit",
        "--exit-policy",
        "exact",
    ]  # every token that fires leaves (cost_aware may skip a check that cannot pay)
    out = subprocess.run([*cmd, "--max-new-tokens", str(NEW), *args], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[0])


def test_toy_plugin_through_the_generate_cli(ckpt):
    want = cli(ckpt, "--strategy", "early_exit", "--early-exit-thres", "0", "--exit-layers", "2")
    got = cli(ckpt, "--plugin", "ee_toy_plugin", "--strategy", "exit_at", "--exit-layers", "2")
    assert (got["tokens"], got["exit_layers"]) == (want["tokens"], want["exit_layers"])
    sure = cli(ckpt, "--plugin", "ee_toy_plugin", "--measure", "always_sure", "--early-exit-thres", "0.9",
               "--exit-layers", "2")  # fmt: skip
    assert (sure["tokens"], sure["exit_layers"]) == (want["tokens"], want["exit_layers"])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    bad = subprocess.run([sys.executable, str(ROOT / "tools" / "generate.py"), "--plugin", "no_such_plugin_mod",
                          "--load", ckpt, "--prompt", "x"], capture_output=True, text=True, env=env)  # fmt: skip
    assert bad.returncode == 2 and "--plugin" in bad.stderr


def test_toy_plugin_through_the_server(ckpt, toy):
    from fastapi.testclient import TestClient

    from megatron.early_exit import load_checkpoint
    from megatron.early_exit.inference import EarlyExitEngine
    from megatron.early_exit.inference.server import Context, EngineDriver, Limits, Metrics, Scheduler, create_app

    model, tok = load_checkpoint(ckpt)
    engine = EarlyExitEngine(model, tok)
    scheduler = Scheduler(EngineDriver(engine), max_batch_size=4, capacity=64, max_queued=8)
    scheduler.start()
    ctx = Context(engine, tok, Limits(48, 16, 64, 4), "ck")
    try:
        client = TestClient(create_app(scheduler, ctx, Metrics(model.config.num_layers)))
        want = generate(model, tok, [tok.tokenize("Early exit")], strategy="early_exit", early_exit_threshold=0.0,
                        exit_layers=[2], max_new_tokens=NEW)[0]  # fmt: skip
        for ee in ({"mode": "exit_at", "exit_layers": [2]},
                   {"mode": "early_exit", "measure": "always_sure", "threshold": 0.9, "exit_layers": [2]}):  # fmt: skip
            body = {"prompt": "Early exit", "max_tokens": NEW, "temperature": 0, "early_exit": ee}
            r = client.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            choice = r.json()["choices"][0]
            assert choice["text"] == want.text and choice["early_exit"]["exit_layers"] == want.exit_layers
        r = client.post("/v1/completions", json={"prompt": "a", "early_exit": {"mode": "nope"}})
        assert r.status_code == 422 and "exit_at" in r.json()["error"]["message"]
    finally:
        scheduler.stop()


def test_toy_plugin_through_the_server_tool(ckpt, monkeypatch):
    """tools/run_text_generation_server.py --plugin: the toy names work over HTTP."""
    import httpx

    from tests.test_server import start_server, stop_server

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    proc, url = start_server(ckpt, "--plugin", "ee_toy_plugin")
    try:
        ee = {"mode": "exit_at", "exit_layers": [2]}
        body = {"prompt": "Early exit", "max_tokens": NEW, "temperature": 0, "early_exit": ee}
        r = httpx.post(url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        layers = r.json()["choices"][0]["early_exit"]["exit_layers"]
        assert layers[0] == 4 and set(layers[1:]) == {2}  # the first token comes from the prefill
    finally:
        stop_server(proc)


def test_streamed_text_is_incremental_and_equals_the_whole(ckpt):
    """The server's incremental detokenizer gives, chunk by chunk, the text decoded at the end."""
    from megatron.early_exit import load_checkpoint
    from megatron.early_exit.inference import EarlyExitEngine, GenerationSettings
    from megatron.early_exit.inference.server import EngineDriver, Job, Scheduler

    model, tok = load_checkpoint(ckpt)
    engine = EarlyExitEngine(model, tok)
    scheduler = Scheduler(EngineDriver(engine), max_batch_size=2, capacity=128, max_queued=4)
    scheduler.start()
    chunks, done = [], threading.Semaphore(0)

    def sink(ev):
        chunks.append(ev)
        if ev.kind in ("done", "error"):
            done.release()

    s = GenerationSettings("full", 40, temperature=1.0, seed=1, ignore_eos=True)
    p = tok.tokenize("The quick")
    try:
        scheduler.submit(Job([p], s, engine.check(s, [p]), stream=True, sink=sink))
        assert done.acquire(timeout=60)
    finally:
        scheduler.stop()
    text = "".join(ev.text for ev in chunks if ev.kind == "delta")
    assert text == engine.generate([p], s)[0].text and sum(ev.kind == "delta" for ev in chunks) > 1


def test_no_inference_function_is_longer_than_60_lines():
    long = []
    for path in sorted((ROOT / "megatron" / "early_exit" / "inference").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long


def test_registries_feed_the_cli_and_the_schemas(toy):
    sys.path.insert(0, str(ROOT / "tools"))
    import generate as generate_tool

    from megatron.early_exit.inference.server.schemas import EarlyExitOptions

    parser = generate_tool.build_parser()
    choices = {a.dest: a.choices for a in parser._actions if a.choices}
    assert "exit_at" in choices["strategy"] and "always_sure" in choices["measure"]
    assert EarlyExitOptions(mode="exit_at", measure="always_sure").mode == "exit_at"
    assert torch.is_tensor(MEASURES["always_sure"].from_hidden(None, torch.zeros(3, 1, 4)))

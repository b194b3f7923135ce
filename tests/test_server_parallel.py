"""Serving under torchrun (2 gloo ranks on CPU), and the batch-at-a-time scheduler it uses for
pipeline parallelism.

The server runs the tiny checkpoint of tests/test_server.py with TP2 and with PP2; greedy texts
and exit layers (early exit at thresholds 0 and 1) must equal single-process tools/generate.py,
for requests that arrive together. SIGINT to torchrun must end every process it started.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque

import pytest
import torch

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from tests.test_server import (  # noqa: E402
    NEW,
    PROMPTS,
    ROOT,
    STRATEGIES,
    build_checkpoint,
    free_port,
    generate_cli,
    metric,
    wait_healthy,
)

PARALLEL = {"tp2": "--tensor-model-parallel-size", "pp2": "--pipeline-model-parallel-size"}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_checkpoint(str(tmp_path_factory.mktemp("server_parallel")))


@pytest.fixture(scope="module")
def reference(ckpt):
    """Single-process tools/generate.py output per strategy name (one batch of both prompts)."""
    torch.set_num_threads(1)
    return {name: generate_cli(ckpt, PROMPTS, *STRATEGIES[name][0]) for name in ("ee0", "ee1")}


# ----- the server under torchrun ---------------------------------------------------------------


def start_torchrun_server(ckpt: str, flag: str, log_path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port())]
    cmd += [os.path.join(ROOT, "tools", "run_text_generation_server.py"), "--load", ckpt, flag, "2"]
    cmd += ["--port", str(port), "--num-threads", "1", "--log-level", "warning", "--max-batch-size", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = open(log_path, "w")  # a file, not a pipe: nobody reads while the test runs
    # Its own session: cleanup can then reach every process torchrun started, by its group id.
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url, lambda: open(log_path).read(), timeout=120)
    except BaseException:
        _kill_group(proc)
        raise
    return proc, url


def descendants(pid: int) -> set[int]:
    """Every live process below `pid` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])  # the name may contain spaces
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            found.add(c)
            todo.append(c)
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _kill_group(proc: subprocess.Popen) -> None:
    """Last resort when a test failed: our own session's processes, by group id."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


def shut_down(proc: subprocess.Popen, log_path) -> None:
    """SIGINT to torchrun, as Ctrl-C would: every rank must exit, none may be left behind."""
    ranks = descendants(proc.pid)
    assert len(ranks) >= 2, open(log_path).read()
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=40)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"torchrun did not exit after SIGINT:\n{open(log_path).read()}") from None
    deadline = time.time() + 5
    while time.time() < deadline and any(alive(p) for p in ranks):
        time.sleep(0.1)
    assert not [p for p in ranks if alive(p)], open(log_path).read()
    # Orderly: the ranks exited within torchrun's grace period (the follower on rank 0's "shutdown"),
    # and no traceback came from our code (torchrun itself prints one for the signal).
    text = open(log_path).read()
    assert "forcefully exiting" not in text, text
    assert "run_text_generation_server" not in text and "megatron/early_exit" not in text, text


def requests_for(name: str) -> list[tuple[str, str, dict]]:
    _, fields, ee = STRATEGIES[name]
    api = {"prompts": PROMPTS, "tokens_to_generate": NEW, "temperature": 0.0, **fields}
    cmpl = {"model": "ck", "prompt": PROMPTS, "max_tokens": NEW, "temperature": 0, "early_exit": ee}
    return [("PUT", "/api", api), ("POST", "/v1/completions", cmpl)]


def texts_of(path: str, out: dict) -> tuple[list[str], list[list[int]]]:
    if path == "/api":
        return out["text"], out["exit_layers"]
    return [c["text"] for c in out["choices"]], [c["early_exit"]["exit_layers"] for c in out["choices"]]


@pytest.mark.parametrize("layout", list(PARALLEL))
def test_server_under_torchrun_equals_one_process(ckpt, reference, tmp_path, layout):
    log_path = tmp_path / "server.log"
    proc, url = start_torchrun_server(ckpt, PARALLEL[layout], log_path)
    try:
        calls = [(name, *req) for name in reference for req in requests_for(name)]
        replies: list[httpx.Response | None] = [None] * len(calls)

        def call(k: int) -> None:
            _, method, path, body = calls[k]
            replies[k] = httpx.request(method, url + path, json=body, timeout=120)

        threads = [threading.Thread(target=call, args=(k,)) for k in range(len(calls))]
        for t in threads:  # together: continuous batching (TP) or batches that wait (PP)
            t.start()
        for t in threads:
            t.join()
        for (name, _, path, _), r in zip(calls, replies):
            assert r.status_code == 200, (layout, path, r.text)
            want = reference[name]
            assert texts_of(path, r.json()) == ([w["text"] for w in want], [w["exit_layers"] for w in want])
        assert metric(url, "ee_generation_requests_total") == len(calls)
        if layout == "pp2":
            check_pipeline_only_behaviour(url, reference)
    except BaseException:
        _kill_group(proc)
        raise
    try:
        shut_down(proc, log_path)
    except BaseException:  # a failed shutdown must not leave the ranks running past the test
        _kill_group(proc)
        raise


def check_pipeline_only_behaviour(url: str, reference: dict) -> None:
    """Streaming sends the whole text after the batch; what PP cannot do is a 400 naming the field."""
    body = {"prompt": PROMPTS[0], "max_tokens": NEW, "temperature": 0, "stream": True}
    body["early_exit"] = STRATEGIES["ee0"][2]
    r = httpx.post(url + "/v1/completions", json=body, timeout=60)
    chunks = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert chunks[-1] == "[DONE]"
    assert "".join(json.loads(c)["choices"][0]["text"] for c in chunks[:-1]) == reference["ee0"][0]["text"]
    spec = {"prompt": "a", "max_tokens": 4, "early_exit": STRATEGIES["spec"][2]}
    r = httpx.post(url + "/v1/completions", json=spec, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "early_exit.mode", r.text
    # greedy: Megatron's default samples, and a sampled end-of-text token ended the request at one token
    scored = {"prompts": ["a"], "tokens_to_generate": 2, "logprobs": True, "echo_prompts": True, "temperature": 0}
    r = httpx.put(url + "/api", json=scored, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs", r.text
    r = httpx.put(url + "/api", json={**scored, "echo_prompts": False}, timeout=60)  # generated tokens only
    assert r.status_code == 200 and len(r.json()["logprobs"][0]) == 2, r.text
    assert httpx.get(url + "/health").json()["running"] == 0


# ----- the batch scheduler in one process --------------------------------------------------------


class RecordingDriver:
    """An `EngineDriver` stand-in that records the batches the scheduler makes."""

    def __init__(self, engine) -> None:
        self.engine, self.calls = engine, []

    def generate(self, prompts, settings):
        self.calls.append((prompts, settings))
        return self.engine.generate(prompts, settings)

    def shutdown(self) -> None:
        pass


def test_batch_scheduler_shares_calls_and_matches_generate():
    """Equal greedy settings share a `generate` call; seeded sampling decodes alone; each job's
    tokens equal `generate` on the job alone; an engine error fails only its job."""
    from megatron.early_exit.inference import ExitPolicy, GenerationSettings
    from megatron.early_exit.inference.pipeline import PipelineEngine
    from megatron.early_exit.inference.server import BatchScheduler, Job
    from megatron.early_exit.inference.server.batch_scheduler import take_batch
    from megatron.early_exit.parallel.dims import single_process_state
    from megatron.early_exit.parallel.pipeline import stages_for
    from tests.test_inference import PROMPTS as IDS
    from tests.test_inference import make

    torch.set_num_threads(1)
    model = make("llama")
    engine = PipelineEngine(model, single_process_state(torch.device("cpu")), stages_for(model.config, 1))
    ee0 = GenerationSettings("early_exit", 5, early_exit_threshold=0.0)
    seeded = GenerationSettings("full", 5, temperature=0.9, seed=3)
    spec = GenerationSettings("self_speculative", 5)
    specs = [(IDS[:2], ee0), (IDS[2:3], GenerationSettings("full", 5)), (IDS[3:], ee0), (IDS[:1], seeded)]
    specs += [(IDS[1:2], seeded), (IDS[:1], spec)]
    done = threading.Semaphore(0)
    jobs = [Job(p, s, ExitPolicy(), sink=lambda ev: ev.kind != "delta" and done.release()) for p, s in specs]
    assert [[jobs.index(j) for j in b] for b in _batches(take_batch, jobs, 4)] == [[0, 2], [1], [3], [4], [5]]

    driver = RecordingDriver(engine)
    scheduler = BatchScheduler(driver, max_batch_size=4, max_queued=8)
    errors = []
    jobs[5].sink = lambda ev: (errors.append(ev.error), done.release()) if ev.kind == "error" else None
    for job in jobs:
        scheduler.submit(job)
    scheduler.start()
    for _ in jobs:
        assert done.acquire(timeout=60)
    scheduler.stop()
    assert [len(p) for p, _ in driver.calls] == [3, 1, 1, 1, 1]  # the last: self_speculative, refused
    for job, (prompts, s) in zip(jobs[:5], specs):
        assert [r.tokens for r in job.results] == [r.tokens for r in engine.generate(prompts, s)]
    assert isinstance(errors[0], ValueError) and "self_speculative" in str(errors[0])
    assert scheduler.load() == (0, 0)


def _batches(take, jobs, size) -> list[list]:
    queue, out = deque(jobs), []
    while queue:
        out.append(take(queue, size))
    return out

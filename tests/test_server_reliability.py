"""A server that never stalls (issue 14, items 10-12): an 8 MB prompt is refused while /health
keeps answering and memory comes back; admission answers 503 only when the queue is really
full; HEAD /health; and the server's flags, drawn by hypothesis, give a clean start or one
line naming a flag with exit code 2, never a traceback.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")
psutil = pytest.importorskip("psutil")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tests.launch import run_script  # noqa: E402
from tests.test_server import ROOT, build_checkpoint, start_server, stop_server  # noqa: E402

KEY = "reliability-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
BIG = 8 << 20  # bytes of prompt


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_checkpoint(str(tmp_path_factory.mktemp("reliability")))


@pytest.fixture(scope="module")
def server(ckpt):
    proc, url = start_server(ckpt, "--max-batch-size", "4", "--max-queued-requests", "8", "--api-key", KEY)
    yield proc, url
    stop_server(proc)


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


# Probes /health every 10 ms until stdin closes, then prints the latencies (JSON). A separate
# process, so that the test's own sending of 8 MB does not delay the probes (one GIL).
PROBE = """
import json, sys, threading, time, httpx
done = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
out = []
with httpx.Client(base_url=sys.argv[1], timeout=5) as c:
    print("ready", flush=True)
    while not done.is_set():
        t = time.perf_counter()
        assert c.get("/health").status_code == 200
        out.append(time.perf_counter() - t)
        time.sleep(0.01)
print(json.dumps(out))
"""


def health_probe(url: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", PROBE, url], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_huge_prompt_refused_while_health_answers(server):
    proc, url = server
    with httpx.Client(base_url=url, headers=AUTH, timeout=60) as c:
        for _ in range(3):  # warm up: the baseline is a server that has served
            c.put("/api", json={"prompts": ["Early exit"], "tokens_to_generate": 4})
        before = rss_mb(proc.pid)
        big = "Early exit lets easy tokens leave. " * (BIG // 35)
        # encoded here, so that the watcher in this process does not wait for json.dumps
        api = json.dumps({"prompts": [big], "tokens_to_generate": 4}).encode()
        completion = json.dumps({"prompt": big, "max_tokens": 4}).encode()
        too_large = b'{"prompt": "' + b"a" * (17 << 20) + b'"}'
        answers, probe = [], health_probe(url)
        t = time.perf_counter()
        for _ in range(2):
            answers.append(c.put("/api", content=api))
            answers.append(c.post("/v1/completions", content=completion))
        refused_s = (time.perf_counter() - t) / 4
        too_big = c.post("/v1/completions", content=too_large)
        chunked = c.post("/v1/completions", content=iter([b" " * (1 << 20)] * 17))  # no Content-Length
        latencies = json.loads(probe.communicate("", timeout=30)[0])
        after = rss_mb(proc.pid)
    for r, param in zip(answers, ["prompts[0]", "prompt"] * 2):
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text[:300]
    for r in (too_big, chunked):
        assert r.status_code == 413 and r.json()["error"]["param"] == "body"
    print(f"8 MB prompt refused in {refused_s:.3f} s; /health max {max(latencies) * 1e3:.0f} ms over "
          f"{len(latencies)} probes; RSS {before:.0f} -> {after:.0f} MB")  # fmt: skip
    assert max(latencies) < 0.2
    assert after < 1.2 * before


def test_twelve_requests_on_four_slots_and_eight_places_get_no_503(server):
    _, url = server
    for _ in range(3):
        codes = storm(url, 12, max_tokens=24)
        assert codes == [200] * 12, codes
    codes = storm(url, 20, max_tokens=200)  # 4 running + 8 waiting: the rest is really full
    print(f"12 x 3 simultaneous: 0 x 503; 20 simultaneous: {codes.count(503)} x 503")
    assert set(codes) <= {200, 503} and 1 <= codes.count(503) <= 8


def storm(url: str, n: int, max_tokens: int) -> list[int]:
    """n completions released together; their statuses."""
    barrier, codes = threading.Barrier(n), [0] * n
    body = {"prompt": "Early exit", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}

    def call(i: int) -> None:
        with httpx.Client(base_url=url, headers=AUTH, timeout=120) as c:
            barrier.wait()
            codes[i] = c.post("/v1/completions", json=body).status_code

    threads = [threading.Thread(target=call, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sorted(codes)


def test_head_health_and_the_key(server):
    _, url = server
    assert httpx.head(url + "/health").status_code == 200  # open, like GET
    assert httpx.get(url + "/v1/models").status_code == 401
    r = httpx.put(url + "/api", json={"prompts": ["a"]})
    assert r.status_code == 401 and r.json()["message"]  # Megatron's shape on /api


# ----- flags ---------------------------------------------------------------------------------


def _tool():
    path = os.path.join(ROOT, "tools", "run_text_generation_server.py")
    spec = importlib.util.spec_from_file_location("run_text_generation_server", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TOOL = _tool()
INT_FLAGS = ["--port", "--max-batch-size", "--max-queued-requests", "--max-seq-length", "--max-prompt-tokens",
             "--max-new-tokens", "--max-body-bytes", "--num-threads", "--tensor-model-parallel-size",
             "--pipeline-model-parallel-size"]  # fmt: skip
STR_FLAGS = ["--api-key", "--model-name", "--device", "--loader", "--log-level", "--host", "--load"]
ints = st.integers(-3, 5) | st.integers(-(2**40), 2**40) | st.sampled_from([0, 1, 2, 48, 65535, 65536, 1024, 1025])
words = st.sampled_from(["", " ", "cpu", "cuda", "cuda:1", "foo", "auto", "ee", "hf", "gguf", "info", "x", "-1", "1e3"])
flag_values = st.one_of(
    st.tuples(st.sampled_from(INT_FLAGS), ints.map(str) | words),
    st.tuples(st.sampled_from(STR_FLAGS), words | st.text(max_size=8)),
)


def run_validate(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            TOOL.validate(argv)
        except SystemExit as e:
            return e.code, err.getvalue()
    return 0, err.getvalue()


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(flags=st.lists(flag_values, max_size=5), with_load=st.booleans(), env_key=st.sampled_from([None, "", "k"]))
def test_server_flags_start_or_one_line(flags, with_load, env_key, monkeypatch):
    argv = (["--load", "ck"] if with_load else []) + [x for pair in flags for x in pair]
    with monkeypatch.context() as m:
        if env_key is None:
            m.delenv("EE_SERVER_API_KEY", raising=False)
        else:
            m.setenv("EE_SERVER_API_KEY", env_key)
        m.delenv("WORLD_SIZE", raising=False)
        code, err = run_validate(argv)
    if code == 0:
        assert err == ""
        return
    assert code == 2, (argv, code, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--" in lines[0], (argv, err)
    assert "Traceback" not in err


def test_server_flag_examples():
    """Cases the issue names, each a one-line error that names its flag."""
    cases = [
        (["--load", "ck", "--num-threads", "-2"], "--num-threads"),
        (["--load", "ck", "--max-prompt-tokens", "100", "--max-seq-length", "50"], "--max-prompt-tokens"),
        (["--load", "ck", "--api-key", ""], "--api-key"),
        (["--load", "ck", "--device", "foo"], "--device"),
        (["--load", "ck", "--max-batch-size", "0"], "--max-batch-size"),
    ]
    for argv, flag in cases:
        code, err = run_validate(argv)
        assert code == 2 and err.startswith("error: " + flag) and err.count("\n") == 1, (argv, err)


def run_server(*argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    script = os.path.join(ROOT, "tools", "run_text_generation_server.py")
    full_env = {**os.environ, **(env or {})}
    return run_script(script, list(argv), env=full_env, timeout=120)  # as a subprocess (tests/launch.py)


def test_server_start_errors_are_one_line(ckpt, tmp_path):
    """End to end: an empty $EE_SERVER_API_KEY, a missing --load, a --max-prompt-tokens beyond
    the model's positions (found after loading)."""
    cases = [
        (["--load", ckpt], {"EE_SERVER_API_KEY": ""}, "--api-key"),
        (["--load", str(tmp_path / "nothing")], {}, "--load"),
        (["--load", ckpt, "--max-prompt-tokens", "300"], {}, "--max-prompt-tokens"),
    ]
    for argv, env, flag in cases:
        out = run_server(*argv, "--num-threads", "1", env=env)
        assert out.returncode == 2 and out.stderr.startswith("error: " + flag), out.stderr
        assert out.stderr.count("\n") == 1 and "--load-dir" not in out.stderr, out.stderr


def test_admission_counts_free_slots_as_room():
    """Both schedulers, not started: 4 slots + 8 places take 12 one-prompt jobs; the 13th is 503."""
    from megatron.early_exit.inference import ExitPolicy, GenerationSettings
    from megatron.early_exit.inference.server import BatchScheduler, Job, QueueFull, Scheduler

    class Driver:
        engine = None

    for scheduler in (Scheduler(Driver(), 4, 64, 8), BatchScheduler(Driver(), 4, 8)):
        jobs = [Job([[1, 2]], GenerationSettings("full", 4, temperature=0.0), ExitPolicy()) for _ in range(13)]
        for job in jobs[:12]:
            scheduler.submit(job)
        with pytest.raises(QueueFull):
            scheduler.submit(jobs[12])
        assert scheduler.load() == (12, 0)

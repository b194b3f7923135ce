"""The REST server end to end: a tiny checkpoint with a real BPE tokenizer and a chat template,
served by tools/run_text_generation_server.py on a free loopback port, called with the
official `openai` client and plain HTTP. Texts must equal tools/generate.py's for the same
settings; batching, streaming, scoring, metrics, auth, limits and disconnects are checked.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
API_KEY = "test-key"
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
PROMPTS = ["Early exit lets", "The quick brown fox"]
NEW = 12


def build_checkpoint(directory) -> str:
    """A 4-layer Llama-style model with exits after layers 1-3 and a 300-token byte-level BPE."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from megatron.early_exit.checkpointing import save_checkpoint
    from megatron.early_exit.config import ModelConfig
    from megatron.early_exit.model import EarlyExitGPT
    from megatron.early_exit.tokenizer.huggingface import HuggingFaceTokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(["Early exit lets easy tokens leave early.", "The quick brown fox jumps."] * 20, trainer)
    tok_dir = os.path.join(directory, "tokenizer_src")
    os.makedirs(tok_dir)
    bpe.save(os.path.join(tok_dir, "tokenizer.json"))
    config = {"eos_token": "<|im_end|>", "bos_token": "<|im_start|>", "chat_template": CHAT_TEMPLATE}
    with open(os.path.join(tok_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    tok = HuggingFaceTokenizer(tok_dir)
    cfg = ModelConfig(
        num_layers=4, hidden_size=32, num_attention_heads=4, vocab_size=320, max_position_embeddings=256,
        normalization="RMSNorm", swiglu=True, position_embedding_type="rope", add_bias_linear=False,
        num_query_groups=2, exit_layer_nums=[1, 2, 3], use_exit_norm=True, use_exit_mlp=True,
        real_vocab_size=tok.vocab_size,
    )  # fmt: skip
    model = EarlyExitGPT(cfg)
    model.init_weights(3)
    path = os.path.join(directory, "ck")
    save_checkpoint(path, 0, model, tok)
    return path


def free_port() -> int:
    """A port free now, below the kernel's ephemeral range where it can: a port bound as 0 comes
    from that range, and so do the local ports of outgoing connections (a torchrun rendezvous,
    gloo's), one of which can take it between this check and the server's bind (seen once in CI:
    "address already in use" for a server under torchrun)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 0
    pick = random.Random(os.getpid() ^ time.time_ns())
    for _ in range(64 if low > 10_000 else 0):
        port = pick.randrange(10_000, low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(ckpt: str, *extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, os.path.join(ROOT, "tools", "run_text_generation_server.py"), "--load", ckpt]
    cmd += ["--port", str(port), "--num-threads", "1", "--log-level", "warning", *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(proc, url, lambda: proc.stdout.read())
    return proc, url


def stop_server(proc: subprocess.Popen) -> None:
    """Terminate a server started by `start_server`; kill it if it has not exited within 15 s."""
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()


def wait_healthy(proc: subprocess.Popen, url: str, output, timeout: float = 60) -> None:
    """Until GET /health answers; `output()` gives the server's output when it exits first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited:\n{output()}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"server did not come up in {timeout:g} s")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_checkpoint(str(tmp_path_factory.mktemp("server")))


@pytest.fixture(scope="module")
def server(ckpt):
    torch.set_num_threads(1)
    proc, url = start_server(ckpt, "--api-key", API_KEY, "--max-batch-size", "8", "--max-new-tokens", "240",
                             "--max-queued-requests", "32")  # fmt: skip
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


HEADERS = {"Authorization": f"Bearer {API_KEY}"}


def generate_cli(ckpt: str, prompts: list[str], *args: str) -> list[dict]:
    """tools/generate.py --json, run in this process (its own code path, without a new interpreter)."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import generate

    argv = ["--load", ckpt, "--json", "--max-new-tokens", str(NEW), *args]
    for p in prompts:
        argv += ["--prompt", p]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        generate.main(argv)
    return [json.loads(line) for line in out.getvalue().splitlines()]


STRATEGIES = {  # generate.py flags -> (PUT /api fields, OpenAI early_exit object)
    "full": (["--strategy", "full"], {"use_early_exit": False}, None),
    "ee0": (["--strategy", "early_exit", "--early-exit-thres", "0"], {"use_early_exit": True, "early_exit_thres": 0.0},
            {"mode": "early_exit", "threshold": 0.0}),
    "ee1": (["--strategy", "early_exit", "--early-exit-thres", "1"], {"use_early_exit": True, "early_exit_thres": 1.0},
            {"mode": "early_exit", "threshold": 1.0}),
    "ee_l2": (["--strategy", "early_exit", "--early-exit-thres", "0", "--exit-layers", "2"],
              {"use_early_exit": True, "early_exit_thres": 0.0, "exit_layers": [2]},
              {"mode": "early_exit", "threshold": 0.0, "exit_layers": [2]}),
    "spec": (["--strategy", "self_speculative", "--draft-exit-layer", "1"], None,
             {"mode": "self_speculative", "draft_exit_layer": 1}),
}  # fmt: skip


def put_api(url: str, **body) -> httpx.Response:
    return httpx.put(url + "/api", json=body, headers=HEADERS, timeout=60)


@pytest.mark.parametrize("name", ["full", "ee0", "ee1", "ee_l2"])
def test_put_api_equals_generate_cli(server, ckpt, name):
    flags, fields, _ = STRATEGIES[name]
    want = generate_cli(ckpt, PROMPTS, *flags, "--logprobs")
    r = put_api(server, prompts=PROMPTS, tokens_to_generate=NEW, temperature=0.0, logprobs=True, **fields)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["text"] == [w["text"] for w in want]
    assert out["exit_layers"] == [w["exit_layers"] for w in want]
    assert {"segments", "confidences", "request_time"} <= set(out) and "max_probs" not in out
    for lp, segments, w in zip(out["logprobs"], out["segments"], want):
        # EE-LLM: without the prompt echoed, one logprob per generated segment
        assert len(lp) == len(segments) == len(w["tokens"])
        assert lp == pytest.approx(w["logprobs"], abs=1e-4)
    echoed = put_api(server, prompts=PROMPTS[:1], tokens_to_generate=NEW, temperature=0, echo_prompts=True,
                     print_max_prob=True, logprobs=True, **fields).json()  # fmt: skip
    assert echoed["text"] == [PROMPTS[0] + want[0]["text"]] and echoed["max_probs"] == echoed["confidences"][:1]
    # Megatron: with the prompt, one logprob per token after the first, prompt and generation
    assert len(echoed["logprobs"][0]) == len(want[0]["tokens"]) + len(out_tokens(server, PROMPTS[0])) - 1
    assert echoed["logprobs"][0][-NEW:] == pytest.approx(want[0]["logprobs"], abs=1e-4)


def out_tokens(url: str, prompt: str) -> list:
    r = put_api(url, prompts=[prompt], tokens_to_generate=0, logprobs=True, echo_prompts=True)
    return r.json()["segments"][0]


def test_seeded_sampling_equals_generate_cli(server, ckpt):
    for prompts in (PROMPTS[:1], PROMPTS):
        want = generate_cli(ckpt, prompts, "--strategy", "full", "--temperature", "0.9", "--top-k", "40", "--seed", "7")
        out = put_api(server, prompts=prompts, tokens_to_generate=NEW, temperature=0.9, top_k=40, random_seed=7).json()
        assert out["text"] == [w["text"] for w in want]


@pytest.mark.parametrize("name", ["full", "ee0", "spec"])
def test_openai_client_completions_chat_and_streaming(server, ckpt, client, name):
    flags, _, ee = STRATEGIES[name]
    extra = {"extra_body": {"early_exit": ee}} if ee else {}
    want = generate_cli(ckpt, PROMPTS[:1], *flags)[0]
    c = client.completions.create(model="ck", prompt=PROMPTS[0], max_tokens=NEW, temperature=0, **extra)
    assert c.choices[0].text == want["text"] and c.object == "text_completion"
    assert c.usage.completion_tokens == len(want["tokens"])
    assert c.choices[0].model_extra["early_exit"]["exit_layers"] == want["exit_layers"]
    stream = client.completions.create(model="ck", prompt=PROMPTS[0], max_tokens=NEW, temperature=0, stream=True,
                                       **extra)  # fmt: skip
    chunks = list(stream)
    assert "".join(ch.choices[0].text for ch in chunks) == want["text"]
    assert chunks[-1].choices[0].finish_reason == want["finish_reason"]

    from megatron.early_exit import load_checkpoint
    from megatron.early_exit.inference.server.requests import render_chat

    _, tok = load_checkpoint(ckpt)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Early exit?"}]
    want = generate_cli(ckpt, [render_chat(tok, messages)], *flags)[0]
    chat = client.chat.completions.create(model="ck", messages=messages, max_tokens=NEW, temperature=0, **extra)
    assert chat.choices[0].message.content == want["text"] and chat.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(
        model="ck", messages=messages, max_tokens=NEW, temperature=0, stream=True, **extra
    )
    assert "".join(ch.choices[0].delta.content or "" for ch in stream) == want["text"]


def test_echo_logprobs_scores_the_prompt(server, ckpt, client):
    """lm-eval-harness's loglikelihood request: echo, max_tokens 0, logprobs."""
    from megatron.early_exit import load_checkpoint

    model, tok = load_checkpoint(ckpt)
    text = "The quick brown fox jumps over"
    ids = tok.tokenize(text)
    c = client.completions.create(model="ck", prompt=text, max_tokens=0, echo=True, logprobs=1, temperature=0)
    lp = c.choices[0].logprobs
    assert c.choices[0].text == text and "".join(lp.tokens) == text
    assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(ids)
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids])).logits[0, :, : tok.vocab_size].float(), -1)
    want = [float(ref[j - 1, ids[j]]) for j in range(1, len(ids))]
    assert lp.token_logprobs[1:] == pytest.approx(want, abs=1e-4)
    assert lp.text_offset[0] == 0 and all(len(t) == 1 for t in lp.top_logprobs[1:])
    # token-id prompts work the same way
    by_ids = client.completions.create(model="ck", prompt=ids, max_tokens=0, echo=True, logprobs=0, temperature=0)
    assert by_ids.choices[0].logprobs.token_logprobs[1:] == pytest.approx(want, abs=1e-4)


def test_concurrent_requests_batch_and_match_alone(server, ckpt):
    """Requests with different strategies arrive together, are decoded in one batch, and give
    the texts they give alone."""
    alone = {n: generate_cli(ckpt, PROMPTS, *STRATEGIES[n][0]) for n in ("full", "ee0", "ee_l2", "spec")}
    body = {"model": "ck", "max_tokens": NEW, "temperature": 0}
    jobs = []
    for n, want in alone.items():
        for i, p in enumerate(PROMPTS):
            ee = STRATEGIES[n][2]
            jobs.append(({**body, "prompt": p, **({"early_exit": ee} if ee else {})}, want[i]["text"]))
    results = [None] * len(jobs)

    def call(k):
        results[k] = httpx.post(server + "/v1/completions", json=jobs[k][0], headers=HEADERS, timeout=60)

    threads = [threading.Thread(target=call, args=(k,)) for k in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (_, want), r in zip(jobs, results):
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == want
        tele = r.json()["choices"][0]["early_exit"]  # decoding's own rate beside the request's
        assert tele["decode_tokens_per_sec"] > 0 and tele["tokens_per_sec"] > 0


def test_disconnect_frees_the_slot_and_metrics_move(server):
    before = metric(server, "ee_cancelled_requests_total")
    body = {"prompt": "Early", "max_tokens": 240, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server + "/v1/completions", json=body, headers=HEADERS, timeout=60) as r:
        assert r.status_code == 200
        next(r.iter_lines())  # the first chunk arrived: the request is running
    deadline = time.time() + 10
    while time.time() < deadline and httpx.get(server + "/health").json()["running"]:
        time.sleep(0.05)
    assert httpx.get(server + "/health").json()["running"] == 0
    assert metric(server, "ee_cancelled_requests_total") == before + 1
    generated = metric(server, "ee_generated_tokens_total")
    assert put_api(server, prompts=["a"], tokens_to_generate=3, temperature=0).status_code == 200
    assert metric(server, "ee_generated_tokens_total") == generated + 3
    text = httpx.get(server + "/metrics", headers=HEADERS).text
    for name in ("ee_requests_total", "ee_tokens_per_second", "ee_average_exit_layer", "ee_exit_tokens_total"):
        assert f"# TYPE {name}" in text


def metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics", headers=HEADERS).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_errors_name_the_field(server, client):
    cases = [
        ({"prompts": ["a"], "temperature": "hot"}, 422, "temperature"),
        ({"prompts": ["a"], "use_early_exit": "false"}, 422, "use_early_exit"),
        ({"prompts": []}, 422, "prompts"),
        ({"prompts": ["a"] * 129}, 422, "prompts"),
        ({"prompts": ["a"], "tokens_to_generate": 241}, 400, "tokens_to_generate"),
        ({"prompts": ["a"], "use_early_exit": True, "exit_layers": [7]}, 400, "exit_layers"),
        ({"prompts": ["a"], "early_exit_thres": 1.5}, 422, "early_exit_thres"),
        ({"prompts": ["a"], "top_k": 5, "top_p": 0.5}, 422, "top_p"),
        ({"prompts": [""]}, 400, "prompts"),
    ]
    for body, status, param in cases:
        r = put_api(server, **body)
        assert r.status_code == status and r.json()["error"]["param"] == param, (body, r.text)
    r = httpx.put(server + "/api", content=b"{not json", headers=HEADERS)
    assert r.status_code == 400 and r.json()["error"]["param"] == "body"
    r = httpx.put(server + "/api", json={"prompts": ["a"]}, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["param"] == "api_key"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="ck", prompt="a", max_tokens=4, extra_body={"early_exit": {"exit_layers": [9]}})
    assert e.value.body["param"] == "early_exit.exit_layers"
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.completions.create(model="ck", prompt="a", extra_body={"early_exit": {"threshhold": 0.5}})
    assert e.value.body["param"] == "early_exit.threshhold"
    assert client.models.list().data[0].id == "ck"
    assert httpx.get(server + "/health").status_code == 200  # open without the key
    assert httpx.get(server + "/v1/models").status_code == 401


def test_full_queue_answers_503(ckpt):
    proc, url = start_server(ckpt, "--max-batch-size", "1", "--max-queued-requests", "1")
    try:
        body = {"prompt": "a", "max_tokens": 200, "temperature": 0, "ignore_eos": True}
        results = []

        def call():
            results.append(httpx.post(url + "/v1/completions", json=body, timeout=60).status_code)

        threads = [threading.Thread(target=call) for _ in range(4)]
        for t in threads:
            t.start()
            time.sleep(0.05)
        for t in threads:
            t.join()
        assert sorted(results)[0] == 200 and 503 in results
        assert httpx.post(url + "/v1/completions", json={**body, "max_tokens": 2}).status_code == 200
    finally:
        stop_server(proc)


def _replay_worker(rank: int, world: int) -> dict:
    """Rank 0 schedules jobs (no HTTP) and broadcasts its engine calls; rank 1 replays them."""
    from megatron.early_exit.config import ModelConfig
    from megatron.early_exit.inference import EarlyExitEngine, GenerationSettings
    from megatron.early_exit.inference.server import EngineDriver, Job, Scheduler, follow
    from megatron.early_exit.model import EarlyExitGPT

    cfg = ModelConfig(4, 32, 4, 64, 64, exit_layer_nums=[1, 2], use_exit_norm=True)
    model = EarlyExitGPT(cfg)
    model.init_weights(5)
    engine = EarlyExitEngine(model.eval())
    driver = EngineDriver(engine)
    assert driver.broadcasting
    if rank != 0:
        ops = follow(driver)
        return {"ops": ops, "fed": list(driver.state.fed), "k": driver.state.cache.k.clone()}
    scheduler = Scheduler(driver, max_batch_size=5, capacity=40, max_queued=8)
    scheduler.start()
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10], [11, 12]]
    settings = [
        GenerationSettings("full", 6),
        GenerationSettings("early_exit", 6, early_exit_threshold=0.0),
        GenerationSettings("self_speculative", 6, draft_exit_layer=1),
        GenerationSettings("full", 6, temperature=0.9, seed=3),
        GenerationSettings("self_speculative", 4, draft_exit_layer=1),  # shares the other's rounds, stops first
    ]
    done, jobs = threading.Semaphore(0), []
    for p, s in zip(prompts, settings):
        job = Job([p], s, engine.check(s, [p]), sink=lambda ev: ev.kind in ("done", "error") and done.release())
        jobs.append(job)
        scheduler.submit(job)
    for _ in jobs:
        assert done.acquire(timeout=60)
    alone = [engine.generate([p], s)[0].tokens for p, s in zip(prompts, settings)]
    state = driver.state
    out = {"tokens": [j.results[0].tokens for j in jobs], "alone": alone, "fed": list(state.fed)}
    out["k"] = state.cache.k.clone()
    scheduler.stop()
    return out


def test_followers_replay_the_leaders_engine_calls():
    """torchrun serving without TP's collectives: 2 gloo ranks, rank 1 replays rank 0's ops and
    ends with the same cache; the scheduler's outputs equal single-request generation."""
    from tests.distributed import run_distributed

    leader, follower = run_distributed(_replay_worker, 2)
    assert leader["tokens"] == leader["alone"]
    assert follower["ops"] > 4 and follower["fed"] == leader["fed"] == [0] * 5  # every slot was reset
    assert torch.equal(follower["k"], leader["k"])


def test_interactive_cli(server):
    cli = [sys.executable, os.path.join(ROOT, "tools", "text_generation_cli.py"), server, "--api-key", API_KEY]
    run = dict(capture_output=True, text=True, cwd=ROOT, timeout=60)
    out = subprocess.run([*cli, "--early-exit-thres", "0", "--show-exits"], input="Early exit\n\n", **run)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("Early exit") and "@1" in out.stdout and "average exit layer" in out.stdout
    out = subprocess.run([*cli, "--chat", "--tokens-to-generate", "5"], input="hi\nmore\n", **run)
    assert out.returncode == 0 and "error" not in out.stdout, out.stdout + out.stderr

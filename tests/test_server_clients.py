"""Clients nobody here wrote, against a running server: EE-LLM's and Megatron's request and
error shapes, requests larger than a batch, OpenAI's streamed logprobs, multi-byte token
strings, unknown models, refused fields and logit_bias (issue 13).

One server with `--max-batch-size 4`, so that 40 prompts are split into 10 batches.
"""

from __future__ import annotations

import json

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from tests.test_server import build_checkpoint, metric, start_server, stop_server  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["Early exit lets", "The quick brown fox", "easy tokens", "jumps"]
MULTI_BYTE = "café 🙂 漢字 – naïve"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_checkpoint(str(tmp_path_factory.mktemp("clients")))


@pytest.fixture(scope="module")
def url(ckpt):
    proc, url = start_server(ckpt, "--max-batch-size", "4", "--max-new-tokens", "64", "--max-queued-requests", "4")
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)


def put(url: str, **body) -> httpx.Response:
    return httpx.put(url + "/api", json=body, timeout=120)


def post(url: str, path: str, **body) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=120)


# ----- EE-LLM and Megatron ------------------------------------------------------------------


def test_ee_llm_request_client_shape(url):
    """tools/request_client.py's body: string prompt, top_k 1 (greedy), no temperature,
    exit_layers [] (every exit), echo_prompts false with logprobs."""
    body = {"prompts": PROMPTS[0], "tokens_to_generate": 8, "top_k": 1, "logprobs": True, "random_seed": 77,
            "echo_prompts": False, "early_exit_thres": 0.8, "use_early_exit": True, "exit_layers": []}  # fmt: skip
    r = put(url, **body)
    assert r.status_code == 200, r.text
    out = r.json()
    greedy = put(url, prompts=[PROMPTS[0]], tokens_to_generate=8, temperature=0.0, use_early_exit=True,
                 early_exit_thres=0.8).json()  # fmt: skip
    assert out["text"] == greedy["text"]  # top_k 1 is greedy whatever the seed
    assert out["exit_layers"] == greedy["exit_layers"]
    # logprobs aligned with the generated segments (EE-LLM), not prompt + generation
    assert len(out["segments"][0]) == len(out["logprobs"][0]) == len(out["exit_layers"][0]) == 8
    assert all(isinstance(x, float) and x <= 0 for x in out["logprobs"][0])
    assert "".join(out["segments"][0]).startswith(out["text"][0])


def test_megatron_error_shape_on_api_only(url):
    r = put(url, prompts=["a"], tokens_to_generate=1000)
    assert r.status_code == 400
    body = r.json()
    assert body["message"] == body["error"]["message"] and "tokens_to_generate" in body["message"]
    r = put(url, prompts=["a"], temperature="hot")  # schema errors too
    assert r.status_code == 422 and "temperature" in r.json()["message"]
    r = post(url, "/v1/completions", prompt="a", max_tokens=1000)
    assert r.status_code == 400 and "message" not in r.json() and r.json()["error"]["param"] == "max_tokens"


def test_add_bos_empty_prompt_and_zero_tokens(url):
    """add_BOS prepends the tokenizer's BOS (this one has <|im_start|>); an empty prompt is
    allowed with it; tokens_to_generate 0 returns the prompt and its segments."""
    r = put(url, prompts=[""], add_BOS=True, tokens_to_generate=0, logprobs=True)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["segments"] == [["<|im_start|>"]] and out["logprobs"] == [[]] and out["text"] == [""]
    r = put(url, prompts=["Early exit"], tokens_to_generate=0, logprobs=True)
    out = r.json()
    assert out["text"] == ["Early exit"] and "".join(out["segments"][0]) == "Early exit"
    assert len(out["logprobs"][0]) == len(out["segments"][0]) - 1
    r = put(url, prompts=[""], tokens_to_generate=4)
    assert r.status_code == 400 and "add_BOS" in r.json()["message"]
    echo = put(url, prompts=["Early exit"], add_BOS=True, tokens_to_generate=3, echo_prompts=True, logprobs=True,
               temperature=0.0).json()  # fmt: skip
    assert echo["segments"][0][0] == "<|im_start|>" and len(echo["logprobs"][0]) == len(echo["segments"][0]) - 1


def test_add_bos_per_tokenizer_type():
    """Megatron prepends the end-of-document id for GPT-2 (no BOS); a tokenizer with a BOS gets it."""
    from megatron.early_exit.inference.server.requests import Context, Limits, megatron_job
    from megatron.early_exit.inference.server.schemas import MegatronRequest
    from megatron.early_exit.tokenizer import build_tokenizer

    class Engine:  # the job's model checks are not what this test is about
        def check(self, settings, prompts):
            return None

    body = MegatronRequest.model_validate({"prompts": ["", "5 6"], "add_BOS": True})
    for tok in (build_tokenizer("GPT2BPETokenizer"), build_tokenizer("NullTokenizer", vocab_size=100)):
        ctx = Context(Engine(), tok, Limits(64, 64, 128, 4), "m")
        job = megatron_job(body, ctx)
        assert tok.bos is None and [p[0] for p in job.prompts] == [tok.eod, tok.eod]
        assert job.prompts[0] == [tok.eod]


# ----- batches larger than --max-batch-size ---------------------------------------------------


def test_forty_prompts_in_one_request(url):
    prompts = [PROMPTS[i % 4] for i in range(40)]
    alone = [put(url, prompts=[p], tokens_to_generate=4, temperature=0.0).json()["text"][0] for p in PROMPTS]
    before = metric(url, "ee_generation_requests_total")
    r = put(url, prompts=prompts, tokens_to_generate=4, temperature=0.0)
    assert r.status_code == 200, r.text
    assert r.json()["text"] == [alone[i % 4] for i in range(40)]
    assert metric(url, "ee_generation_requests_total") == before + 1  # one request, though 10 batches
    r = post(url, "/v1/completions", prompt=prompts, max_tokens=4, temperature=0.0)
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == list(range(40))
    assert [c["text"] for c in choices] == [alone[i % 4] for i in range(40)]
    assert r.json()["usage"]["completion_tokens"] == 160


def test_forty_prompts_streamed(url):
    prompts = [PROMPTS[i % 4] for i in range(40)]
    r = post(url, "/v1/completions", prompt=prompts, max_tokens=3, temperature=0.0, stream=True)
    texts, finished = [""] * 40, set()
    for chunk in _chunks(r):
        for c in chunk["choices"]:
            texts[c["index"]] += c["text"]
            if c["finish_reason"]:
                finished.add(c["index"])
    assert finished == set(range(40))
    whole = post(url, "/v1/completions", prompt=prompts, max_tokens=3, temperature=0.0).json()
    assert texts == [c["text"] for c in whole["choices"]]


def _chunks(r: httpx.Response) -> list[dict]:
    assert r.status_code == 200, r.text
    lines = [x[6:] for x in r.text.split("\n\n") if x.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(x) for x in lines[:-1]]


# ----- OpenAI details -------------------------------------------------------------------------


def test_streamed_completion_logprobs_match_whole(url):
    body = {"prompt": PROMPTS[1], "max_tokens": 6, "temperature": 0.0, "logprobs": 2}
    whole = post(url, "/v1/completions", **body).json()["choices"][0]["logprobs"]
    chunks = [c for c in _chunks(post(url, "/v1/completions", **body, stream=True)) if c["choices"]]
    got = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for chunk in chunks:
        lp = chunk["choices"][0]["logprobs"]
        if chunk["choices"][0]["finish_reason"] is None:
            assert lp is not None, chunk
            for k in got:
                got[k] += lp[k]
    n = len(whole["tokens"])
    assert got["token_logprobs"][:n] == pytest.approx(whole["token_logprobs"])
    assert got["tokens"][:n] == whole["tokens"] and got["text_offset"][:n] == whole["text_offset"]
    assert all(len(t) == 2 for t in got["top_logprobs"])


def test_streamed_chat_logprobs(client):
    messages = [{"role": "user", "content": "Early exit"}]
    kw = dict(model="ck", messages=messages, max_tokens=5, temperature=0.0, logprobs=True, top_logprobs=2)
    whole = client.chat.completions.create(**kw).choices[0].logprobs.content
    streamed = []
    for chunk in client.chat.completions.create(**kw, stream=True):
        if chunk.choices and chunk.choices[0].finish_reason is None:
            assert chunk.choices[0].logprobs is not None
            streamed += chunk.choices[0].logprobs.content
    assert [e.logprob for e in streamed[: len(whole)]] == pytest.approx([e.logprob for e in whole])
    assert [e.bytes for e in streamed[: len(whole)]] == [e.bytes for e in whole]
    assert all(len(e.top_logprobs) == 2 for e in streamed)


def test_multi_byte_tokens_join_and_offsets(url):
    """Echoed prompt with emoji, CJK and accents (several tokens per character in this
    byte-level vocabulary): token strings join to the text and text_offset points at each."""
    r = post(url, "/v1/completions", prompt=MULTI_BYTE, max_tokens=6, temperature=0.0, echo=True, logprobs=0)
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    assert "".join(lp["tokens"]) == choice["text"] and choice["text"].startswith(MULTI_BYTE)
    assert lp["text_offset"] == [len("".join(lp["tokens"][:k])) for k in range(len(lp["tokens"]))]
    assert "\ufffd" not in "".join(lp["tokens"])[: len(MULTI_BYTE)]
    assert len(lp["tokens"]) > len(MULTI_BYTE)  # some characters did take several tokens
    r = post(url, "/v1/completions", prompt=MULTI_BYTE, max_tokens=6, temperature=0.0, logprobs=0)
    choice = r.json()["choices"][0]
    assert "".join(choice["logprobs"]["tokens"]) == choice["text"]
    assert choice["logprobs"]["text_offset"][0] == len(MULTI_BYTE)


def test_chat_bytes_are_the_tokens_own(url, ckpt):
    """Force the first byte of 'é' (0xC3, a partial character) with logit_bias: its `bytes`
    is [0xC3], not U+FFFD's encoding, and the tokens still join to the message."""
    from megatron.early_exit import load_checkpoint

    _, tok = load_checkpoint(ckpt, device="cpu")
    lead = tok.tok.token_to_id("Ã")  # the byte-level symbol of 0xC3
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0.0, "logprobs": True,
            "logit_bias": {str(lead): 100}}  # fmt: skip
    r = post(url, "/v1/chat/completions", **body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    content = choice["logprobs"]["content"]
    assert [e["bytes"] for e in content] == [[0xC3]] * 3
    assert "".join(e["token"] for e in content) == choice["message"]["content"]


def test_logit_bias_steers_a_greedy_choice(url, ckpt):
    from megatron.early_exit import load_checkpoint

    _, tok = load_checkpoint(ckpt, device="cpu")
    base = post(url, "/v1/completions", prompt="Early", max_tokens=1, temperature=0.0).json()["choices"][0]["text"]
    steer = next(i for i in range(40, 300) if tok.detokenize([i]) != base and tok.detokenize([i]).isalpha())
    r = post(url, "/v1/completions", prompt="Early", max_tokens=1, temperature=0.0, logit_bias={str(steer): 100})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == tok.detokenize([steer])
    r = post(url, "/v1/completions", prompt="Early", max_tokens=1, logit_bias={"99999": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias"


def test_unknown_model_and_refused_fields(url, client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="a", max_tokens=1)
    assert e.value.body["param"] == "model" and "gpt-4" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "a"}], max_tokens=1)
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    cases = [("tools", [tool]), ("response_format", {"type": "json_object"}), ("tool_choice", "auto")]
    for name, value in cases:
        r = post(url, "/v1/chat/completions", messages=[{"role": "user", "content": "a"}], **{name: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == name, r.text
    r = post(url, "/v1/completions", model="ck", prompt="a", max_tokens=1, response_format={"type": "text"})
    assert r.status_code == 200

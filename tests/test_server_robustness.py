"""Property-based robustness: hundreds of generated bad (and some good) requests against a running
server get 4xx with a JSON error naming a field, never a 5xx, and the server keeps serving.

Bodies are dictionaries over the endpoints' own field names (and some unknown ones) with
values of every JSON type, near-valid numbers included, so that both the schema and the
model-dependent checks (exit layers, lengths, batch size) are reached.
"""

from __future__ import annotations

import json

import pytest

httpx = pytest.importorskip("httpx")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tests.test_server import build_checkpoint, start_server, stop_server  # noqa: E402

API_FIELDS = [
    "prompts", "tokens_to_generate", "logprobs", "temperature", "top_k", "top_p", "add_BOS", "stop_token",
    "stop_on_eol", "random_seed", "echo_prompts", "use_early_exit", "early_exit_thres", "exit_layers",
    "print_max_prob",
]  # fmt: skip
OPENAI_FIELDS = [
    "model", "prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "n", "stream", "stop", "seed",
    "logprobs", "top_logprobs", "echo", "ignore_eos", "presence_penalty", "stream_options", "max_completion_tokens",
]  # fmt: skip
EE_FIELDS = ["mode", "threshold", "measure", "exit_layers", "min_layer", "num_draft_tokens", "draft_exit_layer", "x"]
EXAMPLES = 120  # per endpoint; with the raw bodies, ~400 requests

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-3, 300)
    | st.integers(-(2**70), 2**70)
    | st.floats(-1.0, 3.0)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from(["", "a", "Early exit", "off", "early_exit", "self_speculative", "max_prob", "user"])
    | st.text(max_size=12)
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                      max_size=3), max_leaves=8)  # fmt: skip
messages = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "robot", 3]), "content": values}), max_size=3
)
early_exit = st.dictionaries(st.sampled_from(EE_FIELDS), values, max_size=4) | values


def bodies(fields: list[str]):
    extra = {"early_exit": early_exit, "messages": messages | values}
    keyed = st.sampled_from(fields + ["early_exit", "unknown_field"])
    return st.dictionaries(keyed, values, max_size=6).flatmap(
        lambda d: st.fixed_dictionaries({k: extra.get(k, st.just(v)) for k, v in d.items()})
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ckpt = build_checkpoint(str(tmp_path_factory.mktemp("robust")))
    # small limits: the generated requests that happen to be valid decode a few tokens only
    proc, url = start_server(ckpt, "--max-new-tokens", "4", "--max-seq-length", "48", "--max-batch-size", "4")
    with httpx.Client(base_url=url, timeout=30) as c:
        yield c
    stop_server(proc)


def check(r: httpx.Response) -> None:
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        err = r.json()["error"]
        assert err["message"] and "type" in err
        if r.status_code in (400, 422):
            assert err["param"], r.text  # the field is named


FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@FUZZ
@given(body=bodies(API_FIELDS))
def test_put_api_never_5xx(server, body):
    check(server.put("/api", content=json.dumps(body)))


@FUZZ
@given(body=bodies(OPENAI_FIELDS))
def test_completions_never_5xx(server, body):
    check(server.post("/v1/completions", content=json.dumps(body)))


@FUZZ
@given(body=bodies(OPENAI_FIELDS))
def test_chat_never_5xx(server, body):
    check(server.post("/v1/chat/completions", content=json.dumps(body)))


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(raw=st.binary(max_size=40) | st.text(max_size=40).map(str.encode))
def test_raw_bodies_never_5xx(server, raw):
    for method, path in (("PUT", "/api"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions")):
        check(server.request(method, path, content=raw))


def test_good_request_after_the_storm(server):
    r = server.put("/api", json={"prompts": ["Early exit"], "tokens_to_generate": 4, "temperature": 0})
    assert r.status_code == 200 and len(r.json()["exit_layers"][0]) == 4
    r = server.post("/v1/completions", json={"prompt": "a", "max_tokens": 2, "temperature": 0, "stream": True})
    assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")

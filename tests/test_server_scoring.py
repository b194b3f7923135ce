"""Prompt scoring (echo + logprobs, lm-eval's loglikelihood) under early exit: each prompt token is
scored with the logits of the exit a token generated at that position would leave at (the
`exact` rule), and that layer is reported; in-process over HTTP, against the model's own
full-sequence forward and against decoding."""

from __future__ import annotations

import pytest
import torch

from megatron.early_exit.config import ModelConfig
from megatron.early_exit.inference import EarlyExitEngine, generate
from megatron.early_exit.inference.confidence import get_measure
from megatron.early_exit.inference.passes import ExitPolicy
from megatron.early_exit.model import EarlyExitGPT
from tests.test_server import build_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread

TEXT = "The quick brown fox jumps. Early exit lets easy tokens leave early."
LAYERS = 4
# Fp32 logprobs of one prefill against the model's plain forward: matmuls of other shapes, round-off only.
ATOL = 1e-4
MARGIN = 1e-4  # every confidence this far from the threshold: round-off cannot flip a decision


def reference(model, ids: list[int], threshold: float, allowed=(1, 2, 3)) -> tuple[list[int], list[float]]:
    """Per prompt row (all but the last): the exit the exact rule takes there, from the model's
    full-sequence forward, and the log-probability that exit gives the next prompt token."""
    with torch.no_grad():
        out = model(torch.tensor([ids]))
    conf = {n: get_measure("max_prob").from_logits(out.exit_logits[n][0].float()) for n in allowed}
    assert all((c - threshold).abs().min() > MARGIN for c in conf.values())
    layers, logprobs = [], []
    for j in range(len(ids) - 1):
        n = next((n for n in allowed if conf[n][j] >= threshold), LAYERS)
        logits = out.logits[0, j] if n == LAYERS else out.exit_logits[n][0, j]
        layers.append(n)
        logprobs.append(float(torch.log_softmax(logits.float(), -1)[ids[j + 1]]))
    return layers, logprobs


def distinct_exits(model) -> None:
    """Exits that disagree with the final head: sharper logits (embeddings x4: the random layers
    add little to them) and a temperature per exit, so each exit has its own distribution."""
    with torch.no_grad():
        model.embedding.word_embeddings.weight.mul_(4)
    for n, t in ((1, 0.3), (2, 0.5), (3, 0.8)):
        model.exits[str(n)].temperature = t


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from fastapi.testclient import TestClient

    from megatron.early_exit import load_checkpoint
    from megatron.early_exit.inference.server import Context, EngineDriver, Limits, Metrics, Scheduler, create_app

    model, tok = load_checkpoint(build_checkpoint(str(tmp_path_factory.mktemp("scoring"))))
    distinct_exits(model)
    engine = EarlyExitEngine(model, tok)
    scheduler = Scheduler(EngineDriver(engine), max_batch_size=4, capacity=96, max_queued=8)
    scheduler.start()
    client = TestClient(create_app(scheduler, Context(engine, tok, Limits(64, 16, 96, 4), "ck"), Metrics(LAYERS)))
    yield client, model, tok
    scheduler.stop()


def score(client, prompt, early_exit: dict | None, max_tokens: int = 0) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "echo": True, "logprobs": 0, "temperature": 0}
    r = client.post("/v1/completions", json={**body, "early_exit": early_exit})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


THRESHOLD = 0.9  # exit 1 takes some rows, the final head the rest (exits 2 and 3 are less sure than exit 1)


def test_openai_scoring_takes_each_tokens_exit(served):
    client, model, tok = served
    ids = tok.tokenize(TEXT)
    layers, want = reference(model, ids, THRESHOLD)
    assert set(layers) == {1, LAYERS}  # a real mix
    _, final = reference(model, ids, 1.0 + MARGIN * 2)
    assert max(abs(a - b) for a, b in zip(want, final)) > 0.1  # the exits' logprobs are not the final head's
    for policy in ({"exit_policy": "exact"}, {}):  # omitted: scoring uses exact all the same
        choice = score(client, TEXT, {"threshold": THRESHOLD, **policy})
        assert choice["logprobs"]["token_logprobs"][0] is None
        assert choice["logprobs"]["token_logprobs"][1:] == pytest.approx(want, abs=ATOL)
        assert choice["early_exit"]["prompt_exit_layers"] == [None, *layers]
    full = score(client, ids, None)  # no early_exit object: the final head, as before
    assert full["logprobs"]["token_logprobs"][1:] == pytest.approx(final, abs=ATOL)
    assert full["early_exit"]["prompt_exit_layers"] == [None] + [LAYERS] * (len(ids) - 1)
    only2, want2 = reference(model, ids, 0.3, allowed=(2,))
    choice = score(client, ids, {"threshold": 0.3, "exit_layers": [2], "exit_policy": "exact"})
    assert choice["early_exit"]["prompt_exit_layers"] == [None, *only2] and set(only2) == {2, LAYERS}
    assert choice["logprobs"]["token_logprobs"][1:] == pytest.approx(want2, abs=ATOL)
    spec = score(client, ids, {"mode": "self_speculative", "draft_exit_layer": 1})  # outputs the final head's tokens
    assert spec["logprobs"]["token_logprobs"][1:] == pytest.approx(final, abs=ATOL)
    assert spec["early_exit"]["prompt_exit_layers"] == [None] + [LAYERS] * (len(ids) - 1)


def test_scoring_agrees_with_decoding(served):
    """Decode with early exit (sampled: a random model's greedy text repeats one token), then
    score prompt + generation: from the second generated token on (the first comes from the
    prompt's pass through all layers), the same exits and the same logprobs."""
    client, model, tok = served
    ids = tok.tokenize("Early exit lets")
    gen = generate(model, tok, [ids], strategy="early_exit", early_exit_threshold=0.95, exit_policy="exact",
                   temperature=1.0, seed=3, max_new_tokens=12, ignore_eos=True, return_logprobs=True)[0]  # fmt: skip
    assert gen.exit_layers[0] == LAYERS and set(gen.exit_layers[1:]) == {1, LAYERS}
    scored = score(client, ids + gen.tokens, {"threshold": 0.95, "exit_policy": "exact"})
    k = len(ids)
    assert scored["early_exit"]["prompt_exit_layers"][k + 1 :] == gen.exit_layers[1:]
    assert scored["logprobs"]["token_logprobs"][k + 1 :] == pytest.approx(gen.logprobs[1:], abs=ATOL)


def test_put_api_scoring_reports_the_layers(served):
    client, model, tok = served
    ids = tok.tokenize(TEXT)
    layers, want = reference(model, ids, THRESHOLD)
    body = {"prompts": [TEXT], "tokens_to_generate": 0, "logprobs": True, "use_early_exit": True,
            "early_exit_thres": THRESHOLD, "exit_policy": "exact"}  # fmt: skip
    r = client.put("/api", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["logprobs"][0] == pytest.approx(want, abs=ATOL)  # Megatron's: from the second token
    assert r.json()["prompt_exit_layers"] == [layers]
    r = client.put("/api", json={**body, "exit_policy": "cost_aware"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "exit_policy"
    assert "cost_aware conflicts with prompt scoring" in r.json()["error"]["message"]
    r = client.put("/api", json={**body, "logprobs": False, "exit_policy": "cost_aware"})  # nothing scored: fine
    assert r.status_code == 200, r.text


def test_cost_aware_scoring_is_refused(served):
    client, _, _ = served
    body = {"prompt": TEXT, "max_tokens": 0, "echo": True, "logprobs": 0,
            "early_exit": {"threshold": THRESHOLD, "exit_policy": "cost_aware"}}  # fmt: skip
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "early_exit.exit_policy" and "give early_exit.exit_policy exact" in err["message"]
    r = client.post("/v1/completions", json={**body, "echo": False, "max_tokens": 2})  # no scoring: decodes
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("variant", ["exit_block", "learned_backbone_probe"])
def test_engine_scores_block_exits_and_probe_measures(variant):
    """The engine's scoring pass on exits with their own transformer block (their own KV cache)
    and with the learned measure on backbone probes, against the model's full-sequence forward."""
    torch.manual_seed(0)
    extra = {"use_exit_block": True} if variant == "exit_block" else {
        "use_exit_confidence_head": True, "exit_confidence_input": "backbone"}  # fmt: skip
    cfg = ModelConfig(num_layers=LAYERS, hidden_size=32, num_attention_heads=4, vocab_size=64,
                      max_position_embeddings=64, exit_layer_nums=[1, 2, 3], use_exit_norm=True, **extra)  # fmt: skip
    model = EarlyExitGPT(cfg).eval()
    model.init_weights(5)
    distinct_exits(model)
    ids = torch.randint(0, 64, (20,)).tolist()
    measure = "max_prob" if variant == "exit_block" else "learned"
    with torch.no_grad():
        out = model(torch.tensor([ids]))
        if measure == "learned":
            conf = {n: torch.sigmoid(model.exits[str(n)].confidence_logit(model.exits[str(n)].probe_input(h)))
                    for n, h in _backbone_states(model, ids).items()}  # fmt: skip
        else:
            conf = {n: get_measure("max_prob").from_logits(out.exit_logits[n][0].float()) for n in (1, 2, 3)}
    values = conf[1].sort().values
    threshold = float(values[9:11].mean())  # halfway between exit 1's two middle confidences: it takes half the rows
    assert all((c - threshold).abs().min() > 1e-6 for c in conf.values())
    engine = EarlyExitEngine(model, packed_weights=False)
    state = engine.new_state(1, 32)
    got = engine.score(state, {0: ids}, ExitPolicy((1, 2, 3), threshold, measure))
    want = [next((n for n in (1, 2, 3) if conf[n][j] >= threshold), LAYERS) for j in range(len(ids))]
    assert got.row_exit_layer[0] == want and len(set(want)) >= 2
    rows = [out.logits[0, j] if n == LAYERS else out.exit_logits[n][0, j] for j, n in enumerate(want)]
    assert float((got.all_logits[0] - torch.stack(rows).float()).abs().max()) < ATOL


def _backbone_states(model, ids: list[int]) -> dict[int, torch.Tensor]:
    """Each exit's backbone input [s, h] (the hidden state after its layer) from a plain forward."""
    h, rotary = model.embed_input(torch.tensor([ids]), torch.arange(len(ids))[None], None)
    _, exit_inputs = model.run_layers(h, rotary, frozenset())
    return {n: x[0] for n, x in exit_inputs}


def test_values_that_were_silently_ignored_are_400s(served):
    """Found while doing the above: each was accepted and then changed nothing."""
    client, model, tok = served
    body = {"prompt": TEXT, "max_tokens": 0, "echo": True, "logprobs": 0, "stream": True}
    r = client.post("/v1/completions", json=body)  # the scores were never sent
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream", r.text
    assert client.post("/v1/completions", json={**body, "logprobs": None}).status_code == 200  # echo alone streams
    ee = {"prompt": TEXT, "max_tokens": 2, "early_exit": {"threshold": 0.0, "min_layer": 4}}
    r = client.post("/v1/completions", json=ee)  # every exit below layer 4: decoded as full
    assert r.status_code == 400 and r.json()["error"]["param"] == "early_exit.min_layer", r.text
    assert r.json()["error"]["message"].startswith("min_exit_layer 4: no allowed exit at or above it")
    ee["early_exit"]["min_layer"] = 3
    assert client.post("/v1/completions", json=ee).json()["choices"][0]["early_exit"]["exit_layers"] == [LAYERS, 3]
    api = {"prompts": [TEXT], "tokens_to_generate": 2, "stop_token": tok.vocab_size}  # never generated: never stops
    r = client.put("/api", json=api)
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop_token", r.text
    assert f"[{tok.vocab_size}] are not token ids of this model (0..{tok.vocab_size - 1})" in r.json()["message"]
    assert client.put("/api", json={**api, "stop_token": tok.vocab_size - 1}).status_code == 200

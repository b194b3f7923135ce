"""The server's `exit_policy` (OpenAI `early_exit` object and PUT /api) and `"threshold": "auto"`
(the checkpoint's calibrated per-exit thresholds), in-process over HTTP."""

import json
import os

import pytest

from megatron.early_exit.inference import EarlyExitEngine, GenerationSettings, generate
from tests.test_server import build_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread

NEW = 6
CALIBRATED = {"thresholds": {"1": 1.0, "2": 0.0, "3": 1.0}, "measure": "max_prob", "delta": 0.1, "epsilon": 0.1}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """The same checkpoint twice: without calibrated thresholds, and with (only exit 2 fires, always)."""
    from megatron.early_exit.checkpointing import THRESHOLDS_FILE, resolve_checkpoint_dir

    plain = build_checkpoint(str(tmp_path_factory.mktemp("plain")))
    calibrated = build_checkpoint(str(tmp_path_factory.mktemp("calibrated")))
    with open(os.path.join(resolve_checkpoint_dir(calibrated), THRESHOLDS_FILE), "w") as f:
        json.dump(CALIBRATED, f)
    return plain, calibrated


def serve(ckpt):
    """(TestClient, model, tokenizer, scheduler) of an in-process server."""
    from fastapi.testclient import TestClient

    from megatron.early_exit import load_checkpoint
    from megatron.early_exit.inference import EarlyExitEngine
    from megatron.early_exit.inference.server import Context, EngineDriver, Limits, Metrics, Scheduler, create_app

    model, tok = load_checkpoint(ckpt)
    engine = EarlyExitEngine(model, tok)
    scheduler = Scheduler(EngineDriver(engine), max_batch_size=4, capacity=64, max_queued=8)
    scheduler.start()
    ctx = Context(engine, tok, Limits(48, 16, 64, 4), "ck")
    return TestClient(create_app(scheduler, ctx, Metrics(model.config.num_layers))), model, tok, scheduler


def completion(client, ee: dict):
    return client.post("/v1/completions", json={"prompt": "Early exit", "max_tokens": NEW, "temperature": 0,
                                                "early_exit": ee})  # fmt: skip


def test_exit_policy_accepted_and_validated(ckpts):
    client, model, tok, scheduler = serve(ckpts[0])
    try:
        want = generate(model, tok, [tok.tokenize("Early exit")], strategy="early_exit", early_exit_threshold=0.0,
                        exit_layers=[2], max_new_tokens=NEW, exit_policy="exact")[0]  # fmt: skip
        for policy in ("exact", "cost_aware"):  # batch 1, every check fires: every leaver pays
            r = completion(client, {"threshold": 0.0, "exit_layers": [2], "exit_policy": policy})
            assert r.status_code == 200, r.text
            choice = r.json()["choices"][0]
            assert choice["text"] == want.text and choice["early_exit"]["exit_layers"] == want.exit_layers
        r = completion(client, {"threshold": 0.5, "exit_policy": "fastest"})
        assert r.status_code == 400
        err = r.json()["error"]
        assert err["param"] == "early_exit.exit_policy" and "exact, cost_aware" in err["message"]
        r = client.put("/api", json={"prompts": ["Early exit"], "tokens_to_generate": NEW, "temperature": 0.0,
                                     "use_early_exit": True, "early_exit_thres": 0.0, "exit_layers": [2],
                                     "exit_policy": "exact"})  # fmt: skip
        assert r.status_code == 200, r.text
        assert r.json()["text"][0] == want.text
        r = client.put(
            "/api", json={"prompts": ["a"], "tokens_to_generate": 4, "use_early_exit": True, "exit_policy": 3}
        )
        assert r.status_code == 422 and "exit_policy" in r.json()["error"]["message"]
        r = client.put(
            "/api", json={"prompts": ["a"], "tokens_to_generate": 4, "use_early_exit": True, "exit_policy": "nope"}
        )
        assert r.status_code == 400 and r.json()["error"]["param"] == "exit_policy"
    finally:
        scheduler.stop()


def test_threshold_auto_uses_the_calibrated_thresholds(ckpts):
    client, model, tok, scheduler = serve(ckpts[1])
    try:
        r = completion(client, {"threshold": "auto", "exit_policy": "exact"})
        assert r.status_code == 200, r.text
        layers = r.json()["choices"][0]["early_exit"]["exit_layers"]
        assert layers == [4] + [2] * (NEW - 1)  # only exit 2's calibrated threshold is below 1.0 (it is 0.0)
        s = GenerationSettings(strategy="early_exit", max_new_tokens=NEW, exit_thresholds={1: 1.0, 2: 0.0, 3: 1.0},
                               exit_policy="exact")  # fmt: skip
        want = EarlyExitEngine(model, tok).generate([tok.tokenize("Early exit")], s)[0]
        assert r.json()["choices"][0]["text"] == want.text and want.exit_layers == layers
        r = client.put("/api", json={"prompts": ["Early exit"], "tokens_to_generate": NEW, "temperature": 0.0,
                                     "use_early_exit": True, "early_exit_thres": "auto"})  # fmt: skip
        assert r.status_code == 200 and r.json()["text"][0] == want.text
        r = completion(client, {"threshold": "auto", "measure": "entropy"})
        assert r.status_code == 400 and "measure 'max_prob'" in r.json()["error"]["message"]
        r = completion(client, {"threshold": "high"})
        assert r.status_code == 422 and '"auto"' in r.json()["error"]["message"]
    finally:
        scheduler.stop()


def test_threshold_auto_without_calibration_is_a_400(ckpts):
    client, _, _, scheduler = serve(ckpts[0])
    try:
        r = completion(client, {"threshold": "auto"})
        assert r.status_code == 400
        err = r.json()["error"]
        assert err["param"] == "early_exit.threshold" and "no calibrated thresholds" in err["message"]
        r = client.put(
            "/api", json={"prompts": ["a"], "tokens_to_generate": 4, "use_early_exit": True, "early_exit_thres": "auto"}
        )
        assert r.status_code == 400 and r.json()["error"]["param"] == "early_exit_thres"
    finally:
        scheduler.stop()


def test_exit_vocabulary_accepted_and_validated(ckpts):
    """`early_exit.exit_vocabulary` (and the Megatron body's `exit_vocabulary`): "full" and "auto"
    decode as before on a checkpoint without a draft vocabulary; "draft" there, or a name that is
    none of the three, is a 400 naming the field."""
    client, model, tok, scheduler = serve(ckpts[0])
    try:
        want = generate(model, tok, [tok.tokenize("Early exit")], strategy="early_exit", early_exit_threshold=0.0,
                        exit_layers=[2], max_new_tokens=NEW, exit_policy="exact")[0]  # fmt: skip
        for vocab in ("full", "auto"):
            r = completion(client, {"threshold": 0.0, "exit_layers": [2], "exit_policy": "exact",
                                    "exit_vocabulary": vocab})  # fmt: skip
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == want.text
        for vocab, says in (("draft", "has no draft vocabulary"), ("small", "auto, draft, full")):
            r = completion(client, {"threshold": 0.0, "exit_vocabulary": vocab})
            assert r.status_code == 400, r.text
            err = r.json()["error"]
            assert err["param"] == "early_exit.exit_vocabulary" and says in err["message"]
        body = {"prompts": ["a"], "tokens_to_generate": 4, "use_early_exit": True, "early_exit_thres": 0.0}
        r = client.put("/api", json={**body, "exit_vocabulary": "draft"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "exit_vocabulary"
        assert client.put("/api", json={**body, "exit_vocabulary": "full"}).status_code == 200
    finally:
        scheduler.stop()

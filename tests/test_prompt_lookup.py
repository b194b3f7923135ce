"""Drafts from the context (`prompt_lookup_max`, `inference/lookup.py`): the proposal itself,
lossless decoding with it beside the exits (fp32, batch 1 and 4, on a model whose exits always
agree and one whose exits never do) and without them (a model with no exits), the controller
weighing it against the exits, its costs, and the settings, the sweep and the OpenAI endpoint
that ask for it."""

import csv
import json
import os

import pytest
import torch

from megatron.early_exit.config import ModelConfig
from megatron.early_exit.inference import EarlyExitEngine, GenerationSettings, generate
from megatron.early_exit.inference.lookup import LOOKUP, as_text, confidences, propose
from megatron.early_exit.inference.strategies.draft_control import (
    MAX_DRAFT,
    ROW_SHARE,
    DraftController,
    DraftCosts,
    costs_from_config,
)
from megatron.early_exit.model import EarlyExitGPT
from tests.test_dynamic_speculation import build
from tests.test_inference import naive_greedy

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread

# Prompts with repeats (proposals from the prompt) and without (only the generated text can match).
PROMPTS = [[1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 2], [7, 8, 9, 7, 8, 9, 7], [9, 10, 11, 12, 13, 14, 15], [3]]
NEW = 40


def test_propose_takes_the_longest_suffix_and_its_latest_earlier_occurrence():
    ctx = [5, 1, 2, 9, 1, 2, 7, 3, 1, 2]
    # "1 2" occurs at 1 and 4 (and as the suffix itself): the first, followed by 9, 1, 2, ...
    assert propose(ctx, 2, 3) == ([9, 1, 2], 2)
    assert propose(ctx, 3, 3) == ([9, 1, 2], 2)  # "3 1 2" occurs nowhere earlier: n = 2
    assert propose([5, 1, 2, 9, 3, 1, 2, 7, 3, 1, 2], 3, 2) == ([7, 3], 3)  # the longest match wins
    assert propose(ctx, 1, 2) == ([9, 1], 1)  # "2" first occurred at 2
    assert propose([8, 4, 5, 8], 2, 10) == ([4, 5, 8], 1)  # the continuation runs to the end of the context
    assert propose([4, 6, 8], 3, 4) == ([], 0)  # no repeat
    assert propose([4], 3, 4) == ([], 0) and propose(ctx, 2, 0) == ([], 0)
    assert propose([6, 6, 6, 6], 3, 4) == ([6], 3)  # an occurrence may overlap the suffix
    big = [49151, 70000, 49151]  # ids past the basic plane and past SmolLM2's vocabulary
    assert propose(big, 2, 2, as_text(big)) == ([70000, 49151], 1)
    assert confidences(1, 3, 2) == [0.25, 0.375] and confidences(3, 3, 3) == [0.75, 0.875, 0.875]
    assert confidences(2, 3, 0) == []


@pytest.fixture(scope="module", params=["good", "bad"])
def case(request):
    model = build(request.param == "good")
    return request.param, model, [naive_greedy(model, p, NEW) for p in PROMPTS]


@pytest.mark.parametrize("batch", [1, 4])
def test_lookup_drafts_stay_lossless_and_are_taken(case, batch):
    kind, model, ref = case
    res = generate(
        model, None, PROMPTS[:batch], strategy="self_speculative", max_new_tokens=NEW, ignore_eos=True,
        prompt_lookup_max=3,
    )  # fmt: skip
    assert [r.tokens for r in res] == ref[:batch]  # every kept token is the final head's (fp32)
    r = res[0]
    # these tiny models fall into loops, which the context predicts: lookup rounds are chosen and pay
    assert r.stats["draft_exits"].get(LOOKUP, 0) >= 5, r.stats["draft_exits"]
    assert r.stats["acceptance_rate"] > 0.5
    assert LOOKUP in r.exit_layers  # accepted lookup drafts are recorded as drafted before any layer
    assert sum(k for k in r.stats["draft_lengths"].values()) < NEW  # fewer rounds than tokens


def test_without_the_setting_no_lookup_round_runs(case):
    kind, model, ref = case
    (r,) = generate(model, None, PROMPTS[:1], strategy="self_speculative", max_new_tokens=NEW, ignore_eos=True)
    assert r.tokens == ref[0] and LOOKUP not in r.stats["draft_exits"] and LOOKUP not in r.exit_layers


def costs(lookup_row: float = 0.01) -> DraftCosts:
    return DraftCosts({2: 0.3, LOOKUP: 0.0}, {2: 0.02, LOOKUP: lookup_row}, {2: 1.05, LOOKUP: 1.1})


def observe_lookup(ctl: DraftController, n: int, accepted: int, rounds: int) -> None:
    """`rounds` context rounds of 4 drafts at match length n (max 3), `accepted` of them kept."""
    for _ in range(rounds):
        ctl.update(LOOKUP, [(confidences(n, 3, 4), accepted)])


def test_controller_drafts_from_the_context_where_its_proposals_pay():
    ctl = DraftController(costs(), agreement={2: 0.3})  # exit 2 does not pay at 30%
    lengths = list(range(1, MAX_DRAFT + 1))
    assert ctl.plan([2], lengths).exit is None  # no proposal: a plain round
    observe_lookup(ctl, 3, 4, 30)  # long matches: their four drafts kept
    observe_lookup(ctl, 3, 0, 10)  # ... but the first rejected in a quarter of the rounds
    observe_lookup(ctl, 1, 0, 30)  # one-token matches: rejected
    long = confidences(3, 3, 6)
    first, after = ctl.draft_ok(LOOKUP, long[0]), ctl.draft_ok(LOOKUP, long[1])
    assert 0.65 < first < 0.8 and after > 0.95  # a span, once begun, runs on: its own bin
    plan = ctl.plan([2], lengths, lookup=[long])
    assert plan.exit == LOOKUP and plan.length == 6 and plan.rate > 2.5
    kept = 1 + sum(first * after**j for j in range(6))  # 1 + P(first kept) + P(first two kept) + ...
    assert plan.rate == pytest.approx(kept / costs().round_time(LOOKUP, 6))
    assert ctl.plan([2], lengths, lookup=[confidences(1, 3, 6)]).exit is None  # the short match does not pay
    assert ctl.plan([2], lengths, lookup=[[]]).exit is None  # no proposal
    # at batch 2, a sequence without a proposal gains one token: the pair's mean prices the round
    pair = ctl.plan([2], lengths, batch=2, lookup=[long, []])
    assert pair.exit == LOOKUP and pair.rate == pytest.approx((1.0 + kept) / 2 / costs().round_time(LOOKUP, 6))
    # the early stop weighs each further draft at its own bin (a continuation), not the exits' rate
    plan = ctl.plan([2], lengths, lookup=[confidences(3, 3, 8)])
    assert ctl.keep_drafting(plan, long[:3], long[3])
    short = confidences(1, 3, 3)
    assert not ctl.keep_drafting(plan, short[:2], short[2])  # after a one-token match's first draft: stop


def test_lookup_is_never_explored_and_is_priced_only_where_asked():
    ctl = DraftController(costs(), explore_share=1.0)  # exploration due every round or two
    plans = [ctl.plan([2], [1, 2, 3]) for _ in range(20)]  # no proposals passed
    assert all(p.exit != LOOKUP for p in plans)
    plain = DraftController(DraftCosts({2: 0.3}, {2: 0.02}))
    assert plain.plan([2], [1, 2], lookup=[(0.75, 4)]).exit != LOOKUP  # costs without the source
    plain.costs = costs()  # a later request asks for it: it starts fresh (Beta(1, 1))
    assert LOOKUP in plain.stats and plain.acceptance(LOOKUP) == 0.5


def test_costs_price_lookup_rows_through_every_layer():
    cfg = ModelConfig(
        num_layers=12, hidden_size=384, num_attention_heads=6, vocab_size=8064, max_position_embeddings=256,
        exit_layer_nums=[3, 6], swiglu=True, normalization="RMSNorm",
    )  # fmt: skip
    c = costs_from_config(cfg, {3: 3, 6: 6}, lookup=True)
    assert c.draft[LOOKUP] == 0.0
    assert c.row[LOOKUP] > c.row[3] > c.row[6]  # a context draft's row runs every layer and the head
    assert c.row[LOOKUP] < ROW_SHARE + 1e-9  # ... at ROW_SHARE of a full step at most
    assert LOOKUP not in costs_from_config(cfg, {3: 3, 6: 6}).draft


def test_timed_costs_include_lookup_rounds():
    from megatron.early_exit.inference.strategies.draft_costs import measure_draft_costs

    engine = EarlyExitEngine(build(False))
    c, t = measure_draft_costs(engine, 1, 24, repeats=2, lookup=True)
    assert set(c.draft) == {1, 3, LOOKUP} and c.draft[LOOKUP] == 0.0
    assert c.base[LOOKUP] >= 1.0 and c.row[LOOKUP] >= 0.0
    assert {"round 0/1", "round 0/4"} <= set(t) and t["round 0/4"] > 0
    c, t = measure_draft_costs(engine, 2, 24, repeats=1)
    assert LOOKUP not in c.draft and not any(k.startswith("round 0/") for k in t)


def without_exits() -> EarlyExitGPT:
    """A 4-layer model with no exits at all (what an imported checkpoint is)."""
    cfg = ModelConfig(
        num_layers=4, hidden_size=32, num_attention_heads=4, vocab_size=64, max_position_embeddings=128,
        normalization="RMSNorm", swiglu=True, position_embedding_type="rope", add_bias_linear=False,
    )  # fmt: skip
    model = EarlyExitGPT(cfg)
    model.init_weights(3)
    return model.eval()


@pytest.mark.parametrize("batch", [1, 4])
def test_a_model_without_exits_drafts_from_the_context_alone(batch):
    from megatron.early_exit.inference.strategies.draft_costs import measure_draft_costs

    model = without_exits()
    ref = [naive_greedy(model, p, NEW) for p in PROMPTS[:batch]]
    res = generate(
        model, None, PROMPTS[:batch], strategy="self_speculative", max_new_tokens=NEW, ignore_eos=True,
        prompt_lookup_max=3,
    )  # fmt: skip
    assert [r.tokens for r in res] == ref  # lossless (fp32): every kept token is the final head's
    r = res[0]
    assert set(r.stats["draft_exits"]) == {LOOKUP} and r.stats["draft_exits"][LOOKUP] >= 2  # rounds that paid
    assert set(r.exit_layers) == {LOOKUP, model.config.num_layers}  # drafted and kept, or the final head's own
    assert sum(r.stats["draft_lengths"].values()) < NEW
    engine = EarlyExitEngine(model)  # its timed costs: a context round and the plain step only
    c, t = measure_draft_costs(engine, batch, 24, repeats=1, lookup=True)
    assert set(c.draft) == {LOOKUP} and c.base[LOOKUP] >= 1.0 and set(t) == {"round 0/1", "round 0/4"}
    for kw, match in (
        ({}, "self_speculative needs a model with exits \\(or prompt_lookup_max"),
        ({"prompt_lookup_max": 2, "draft_exit_layer": None}, "draft_exit_layer: None is not an exit of this model"),
    ):
        with pytest.raises(ValueError, match=match):
            engine.generate([[1, 2]], GenerationSettings("self_speculative", 2, **kw))


def test_bad_lookup_settings_are_named():
    model = build(True)
    for kw, match in (
        ({"prompt_lookup_max": -1}, "prompt_lookup_max must be an integer >= 0"),
        ({"prompt_lookup_max": True}, "prompt_lookup_max must be an integer >= 0"),
        ({"prompt_lookup_max": 2, "strategy": "full"}, "prompt_lookup_max: drafts from the context need"),
        ({"prompt_lookup_max": 2, "num_draft_tokens": 2, "draft_exit_layer": 1}, "prompt_lookup_max: drafts"),
    ):
        kw = {"strategy": "self_speculative", **kw}
        with pytest.raises(ValueError, match=match):
            EarlyExitEngine(model).generate([[1, 2]], GenerationSettings(max_new_tokens=2, **kw))


def test_ee_sweep_reports_lookup_in_a_row_of_its_own(tmp_path):
    from tests.test_ee_sweep import main, sweep_inputs

    row = {"abstract": "Early exit. Early exit. Early exit.", "challenge": "a", "approach": "b", "outcome": "c"}
    ck, data = sweep_inputs(tmp_path, [row])
    out = tmp_path / "out"
    main(["--load", ck, "--data", data, "--output", str(out), "--thresholds", "1.0",
          "--max-new-tokens", "6", "--batch-size", "1", "--cost-steps", "2", "--self-speculative",
          "--prompt-lookup", "3"])  # fmt: skip
    with open(out / "self_speculative.csv") as f:
        exits, lookup = list(csv.DictReader(f))
    assert exits["setting"] == "self_speculative auto"
    assert lookup["setting"] == "self_speculative auto, prompt lookup 3 (not early exit)"
    assert lookup["identical_to_full"] == "True"  # fp32: lossless
    assert set(json.loads(lookup["draft_exits"])) <= {"0", "1"} and "0" in json.loads(lookup["draft_costs"])
    with pytest.raises(SystemExit):
        main(["--load", ck, "--prompt-lookup", "3"])  # needs --self-speculative


def test_ee_sweep_on_a_model_without_exits_reports_the_context_row_alone(tmp_path, capsys):
    from tests.test_ee_sweep import main, sweep_inputs, tiny_gpt2_checkpoint

    row = {"abstract": "Early exit. Early exit. Early exit.", "challenge": "a", "approach": "b", "outcome": "c"}
    _, data = sweep_inputs(tmp_path, [row])
    ck = tmp_path / "plain"
    tiny_gpt2_checkpoint(ck, exit_layer_nums=[], use_exit_norm=False)
    argv = ["--load", str(ck), "--data", data, "--thresholds", "1.0", "--max-new-tokens", "6", "--batch-size", "1",
            "--cost-steps", "2", "--self-speculative"]  # fmt: skip
    main([*argv, "--output", str(tmp_path / "out"), "--prompt-lookup", "3"])
    with open(tmp_path / "out" / "self_speculative.csv") as f:
        (lookup,) = list(csv.DictReader(f))
    assert lookup["setting"] == "self_speculative auto, prompt lookup 3 (not early exit)"
    assert lookup["identical_to_full"] == "True" and set(json.loads(lookup["draft_exits"])) <= {"0"}
    with pytest.raises(SystemExit) as e:
        main([*argv, "--output", str(tmp_path / "out2")])  # nothing to draft from
    assert e.value.code == 2 and "has no exit to draft from; add --prompt-lookup N" in capsys.readouterr().err


def test_openai_early_exit_object_takes_prompt_lookup_max(tmp_path):
    from tests.test_server import build_checkpoint
    from tests.test_server_exit_policy import serve

    client, model, tok, scheduler = serve(build_checkpoint(str(tmp_path / "ck")))
    try:
        prompt = "one two one two one two one"
        want = generate(model, tok, [tok.tokenize(prompt)], max_new_tokens=16)[0]
        body = {"prompt": prompt, "max_tokens": 16, "temperature": 0,
                "early_exit": {"mode": "self_speculative", "prompt_lookup_max": 3}}  # fmt: skip
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["text"] == want.text  # lossless (fp32)
        assert choice["early_exit"]["exit_layers"].count(LOOKUP) >= 3  # the model repeats itself: drafts kept
        r = client.post("/v1/completions", json={**body, "early_exit": {"prompt_lookup_max": -1}})
        assert r.status_code == 422 and r.json()["error"]["param"] == "early_exit.prompt_lookup_max"
        r = client.post("/v1/completions", json={**body, "early_exit": {"mode": "early_exit", "prompt_lookup_max": 2}})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "early_exit.prompt_lookup_max"
        assert client.post("/v1/completions", json=body).status_code == 200  # still serving
    finally:
        scheduler.stop()


def test_lookup_rounds_run_in_bf16_too():
    model = build(True).to(torch.bfloat16)
    (r,) = generate(model, None, PROMPTS[:1], strategy="self_speculative", max_new_tokens=16, ignore_eos=True,
                    prompt_lookup_max=2)  # fmt: skip
    assert len(r.tokens) == 16 and r.stats["draft_exits"].get(LOOKUP, 0) >= 1


def test_the_replay_checks_context_drafts_against_the_summary():
    """`benchmarks/draft_policy.py`: a context round drafts the proposal and keeps its agreeing prefix
    of the summary plus one; with exits that never agree, the controller with the context takes it."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "draft_policy.py")
    spec = importlib.util.spec_from_file_location("draft_policy", path)
    dp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dp)
    prompt, summary = [1, 2, 3, 4, 5, 6, 1, 2], [3, 4, 5, 6, 9]  # the summary copies "3 4 5 6" after "1 2"
    paths = [([[False]] * 5, [[0.5]] * 5, prompt, summary)]
    c = DraftCosts({1: 0.3, LOOKUP: 0.0}, {1: 0.02, LOOKUP: 0.05}, {1: 1.0, LOOKUP: 1.1})
    got = dp.replay(paths, [1], c, dp.context_policy(2, 4))
    # one round: "3 4 5 6" proposed (limited so the final head's token fits) and kept, then 9
    assert got == {"rate": pytest.approx(5 / (1.1 + 4 * 0.05)), "tokens/round": 5.0, "drafts/round": 4.0, "plain": 0.0}
    got = dp.replay(paths, [1], c, dp.context_policy(2, 2))
    # "3 4" kept, then 5; then "4 5" first occurs at 3: "6" proposed (one left before the last) and kept, then 9
    want = {"rate": pytest.approx(5 / (2 * 1.1 + 3 * 0.05)), "tokens/round": 2.5, "drafts/round": 1.5, "plain": 0.0}
    assert got == want
    ctl = dp.controller_policy([1], c, None, True, lookup=2)
    got = dp.replay(paths * 20, [1], c, ctl)
    assert got["rate"] > 1.5 and got["drafts/round"] > 1.0  # it learns that the context's drafts pay

"""The certified int8 argmax (inference/greedy_head.py) gives exactly torch.argmax of the fp32
logits, on random and adversarial inputs, and greedy decoding with it gives the same tokens.

No tolerances on tokens: they must be equal. The error bound is checked against the real
error of the int8 product (it must never be exceeded)."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from megatron.early_exit.config import ModelConfig
from megatron.early_exit.inference import EarlyExitEngine, ExitPolicy, GenerationSettings
from megatron.early_exit.inference import greedy_head as gh
from megatron.early_exit.model import EarlyExitGPT

pytestmark = pytest.mark.skipif(not gh.available(), reason="this torch build lacks the int8 kernel")


def weights(v=2048, k=64, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(v, k, generator=g) * 0.05).to(dtype)


def plain(weight):
    return lambda h: F.linear(h, weight).float()


def check(weight, h):
    """certified_argmax(h) against torch.argmax(F.linear(h, W)); returns the tokens."""
    tokens, logits = gh.certified_argmax(h, weight, gh.quantize(weight), plain(weight))
    want = F.linear(h, weight).float().argmax(1)
    assert torch.equal(tokens, want), (tokens, want)
    return tokens, logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_random_inputs_give_the_fp32_argmax_and_the_bound_holds(dtype):
    weight = weights(dtype=dtype)
    head = gh.quantize(weight)
    g = torch.Generator().manual_seed(1)
    for trial in range(40):
        rows = 1 if trial % 2 else 5
        h = (torch.randn(rows, 64, generator=g) * (0.1 + trial)).to(dtype)
        check(weight, h)
        approx = torch._weight_int8pack_mm(h.to(torch.bfloat16), head.q, head.scales).float()
        err = (F.linear(h.double(), weight.double()) - approx.double()).abs()  # (A, V) vs exact products
        assert (err < gh.error_bound(h, approx, head)).all()


def test_ties_and_near_ties_follow_torch_argmax():
    weight = weights()
    h = torch.randn(3, 64, generator=torch.Generator().manual_seed(2))
    top = int(F.linear(h[:1], weight).argmax())
    tie = weight.clone()
    tie[5] = tie[top]  # an exact tie with a lower index: torch.argmax takes the lower one
    tokens, _ = check(tie, h[:1])
    assert int(tokens[0]) == min(5, top)
    near = weight.clone()
    near[7] = near[top] * (1 + 2**-22)  # a few ulps apart: decided by the full product
    check(near, h)
    equal = torch.zeros(16, 64)  # every logit 0: the first row
    assert int(check(equal, h[:1])[0][0]) == 0


def test_huge_and_non_finite_inputs():
    weight = weights()
    h = torch.randn(2, 64, generator=torch.Generator().manual_seed(3))
    check(weight, h * 1e30)  # logits ~1e30: finite, bound scales with them
    check(weight, h * 1e37)  # overflows to inf in fp32: the full product decides, as torch does
    bad = h.clone()
    bad[1, 3] = float("nan")
    check(weight, bad)
    spiky = h.clone()
    spiky[:, 0] = 1e4  # one massive activation (as LLM hidden states have)
    check(weight, spiky)


def test_the_int8_copy_follows_weight_updates():
    weight = weights(v=256)
    first = gh.int8_head(weight)
    assert gh.int8_head(weight) is first
    with torch.no_grad():
        weight.mul_(2.0)
    assert gh.int8_head(weight) is not first and gh.int8_head(weight).scales[0] != first.scales[0]
    assert gh.int8_head(weight, 100).q.shape == (100, 64)  # the real vocabulary only


def test_bad_head_name_is_one_clear_error():
    with pytest.raises(ValueError, match="head: unknown head 'fast'"):
        EarlyExitEngine(tiny(), head="fast")


def tiny():
    cfg = ModelConfig(num_layers=3, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
                      vocab_size=512, max_position_embeddings=96, normalization="RMSNorm", swiglu=True,
                      position_embedding_type="rope", add_bias_linear=False, exit_layer_nums=[1, 2],
                      use_exit_norm=True, use_exit_mlp=True)  # fmt: skip
    model = EarlyExitGPT(cfg)
    model.init_weights(0)
    return model.eval()


PROMPTS = [[5, 17, 300, 42], [9, 8, 7], [100, 200, 300, 400, 500, 1], [3]]


def spy(monkeypatch) -> list:
    """Count certified_argmax calls (the int8 head really runs, or really does not)."""
    calls, real = [], gh.certified_argmax
    monkeypatch.setattr(gh, "certified_argmax", lambda *a: calls.append(1) or real(*a))
    return calls


@pytest.mark.parametrize("strategy", ["full", "early_exit"])
def test_greedy_tokens_equal_the_full_head(monkeypatch, strategy):
    model = tiny()
    # early_exit at threshold 0: the prefill's token from the final head, the others from exit 1
    s = GenerationSettings(strategy=strategy, max_new_tokens=24, ignore_eos=True, early_exit_threshold=0.0,
                           exit_policy="exact", measure="max_prob", exit_layers=(1,))  # fmt: skip
    want = EarlyExitEngine(model, head="full").generate(PROMPTS, s)
    calls = spy(monkeypatch)
    engine = EarlyExitEngine(model, head="int8")
    got = engine.generate(PROMPTS, s)
    assert calls  # the int8 head decided the final head's tokens
    for r, w in zip(got, want):
        assert r.tokens == w.tokens and r.exit_layers == w.exit_layers
        assert r.confidences == pytest.approx(w.confidences, rel=0.1)  # from int8 logits: telemetry
    assert engine.passes.argmax_head == "full"  # reset for the server's own step calls
    if strategy == "early_exit":
        assert {n for r in got for n in r.exit_layers} == {1, 3}


def test_logprobs_and_sampling_keep_the_full_logits(monkeypatch):
    model = tiny()
    calls = spy(monkeypatch)
    engine = EarlyExitEngine(model, head="int8")
    with_lp = engine.generate(PROMPTS, GenerationSettings(max_new_tokens=8, return_logprobs=True, ignore_eos=True))
    engine.generate(PROMPTS, GenerationSettings(max_new_tokens=8, temperature=0.7, seed=1, ignore_eos=True))
    assert not calls
    want = EarlyExitEngine(model, head="full").generate(PROMPTS, GenerationSettings(max_new_tokens=8,
                                                        return_logprobs=True, ignore_eos=True))  # fmt: skip
    assert [r.logprobs for r in with_lp] == [r.logprobs for r in want]


def test_auto_is_off_for_small_heads_and_the_env_var_forces_it(monkeypatch):
    model = tiny()
    calls = spy(monkeypatch)
    EarlyExitEngine(model).generate(PROMPTS[:1], GenerationSettings(max_new_tokens=4))
    assert not calls  # 512 x 64 is far below MIN_ELEMENTS
    monkeypatch.setenv(gh.ENV, "int8")
    EarlyExitEngine(model).generate(PROMPTS[:1], GenerationSettings(max_new_tokens=4))
    assert calls
    monkeypatch.setenv(gh.ENV, "bogus")
    with pytest.raises(ValueError, match="EE_GREEDY_HEAD"):
        EarlyExitEngine(model).generate(PROMPTS[:1], GenerationSettings(max_new_tokens=4))


@pytest.mark.parametrize("faster", ["int8", "full"])
def test_auto_takes_the_head_timed_faster(monkeypatch, faster):
    """Where 'auto' would take the int8 head (here: any size) and the clock may decide, full decoding
    is timed once per engine with either head and the faster kept (the int8 head's steps leave the
    native loop); where decisions must not depend on the clock, the size rule alone. Tokens equal
    the full head's either way, and the timing leaves the engine as it found it."""
    from megatron.early_exit.inference import engine as engine_mod

    model = tiny()
    monkeypatch.setattr(gh, "MIN_ELEMENTS", 0)
    timed, real = [], engine_mod.best_times

    def fake(fns, *args, **kwargs):
        timed.append(sorted(fns))
        real(fns, *args, **kwargs)  # both really decode
        return {"int8": 1.0 if faster == "int8" else 2.0, "full": 1.5}

    monkeypatch.setattr(engine_mod, "best_times", fake)
    assert EarlyExitEngine(model).chosen_head() == "auto" and not timed  # EE_EXIT_COSTS=parameters: the rule
    monkeypatch.setenv("EE_EXIT_COSTS", "measured")
    s = GenerationSettings(max_new_tokens=12, ignore_eos=True)
    want = EarlyExitEngine(model, head="full").generate(PROMPTS, s)
    engine = EarlyExitEngine(model)
    assert engine.chosen_head() == faster and timed == [["full", "int8"]]
    calls = spy(monkeypatch)
    got = engine.generate(PROMPTS, s)
    engine.generate(PROMPTS[:1], s)
    assert timed == [["full", "int8"]]  # once per engine
    assert bool(calls) == (faster == "int8")
    assert [r.tokens for r in got] == [r.tokens for r in want]
    assert engine.passes.argmax_head == "full"
    monkeypatch.setenv(gh.ENV, "full")  # the environment still forces a head
    assert EarlyExitEngine(model).chosen_head() == "auto" and len(timed) == 1


def drafting(good: bool):
    """tiny() with exits that draft well (good: layers 2-3 add nothing and exit 1 reads the final
    norm on the tied head, so drafts agree) or with random untied exits (drafts rarely agree)."""
    cfg = ModelConfig(num_layers=3, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
                      vocab_size=512, max_position_embeddings=96, normalization="RMSNorm", swiglu=True,
                      position_embedding_type="rope", add_bias_linear=False, exit_layer_nums=[1, 2],
                      use_exit_norm=True, untie_exit_output_weights=not good)  # fmt: skip
    model = EarlyExitGPT(cfg)
    model.init_weights(0)
    with torch.no_grad():
        for i in (1, 2) if good else ():
            model.decoder.layers[str(i)].self_attention.linear_proj.weight.zero_()
            model.decoder.layers[str(i)].mlp.linear_fc2.weight.zero_()
        if good:
            model.exits["1"].norm.load_state_dict(model.decoder.final_layernorm.state_dict())
    return model.eval()


@pytest.mark.parametrize("good", [True, False])
@pytest.mark.parametrize("batch", [1, 4])
def test_self_speculation_with_the_int8_head_equals_full_greedy(monkeypatch, good, batch):
    """Lossless with the int8 head on the verify pass (drafted rows) and on plain rounds: the
    same tokens as full greedy decoding with the full head, and the int8 head really decided
    (certified) tokens of both kinds of round."""
    from megatron.early_exit.inference.passes import Passes

    model, prompts = drafting(good), PROMPTS[:batch]
    full = GenerationSettings(strategy="full", max_new_tokens=24, ignore_eos=True)
    want = [r.tokens for r in EarlyExitEngine(model, head="full").generate(prompts, full)]
    s = GenerationSettings(strategy="self_speculative", max_new_tokens=24, ignore_eos=True)
    assert [r.tokens for r in EarlyExitEngine(model, head="full").generate(prompts, s)] == want
    rows, real = [], Passes.final_row_tokens
    monkeypatch.setattr(Passes, "final_row_tokens", lambda self, r, x, out: rows.append(1) or real(self, r, x, out))
    wins, certified = [], gh.certified
    monkeypatch.setattr(gh, "certified", lambda *a: wins.append(certified(*a)) or wins[-1])
    engine = EarlyExitEngine(model, head="int8")
    got = engine.generate(prompts, s)
    assert [r.tokens for r in got] == want
    assert sum(int(w.sum()) for w in wins) > 10  # tokens the int8 head certified (no full-product fallback)
    plain = sum(r.stats["draft_lengths"].get(0, 0) for r in got)
    assert rows if good else plain > 0  # verify passes where drafts agree; plain rounds where they do not
    if not good:  # (whose tries read the exits on the way: no verify pass) a fixed draft's verify passes
        fixed = replace(s, draft_exit_layer=1, num_draft_tokens=2)
        assert [r.tokens for r in engine.generate(prompts, fixed)] == want and rows
    assert engine.passes.argmax_head == "full"


def serve_jobs(engine, jobs) -> None:
    """Run `jobs` together through the server's continuous-batching scheduler; wait for all."""
    import threading

    from megatron.early_exit.inference.server import EngineDriver, Scheduler

    done = threading.Semaphore(0)
    scheduler = Scheduler(EngineDriver(engine), max_batch_size=8, capacity=64, max_queued=8)
    for job in jobs:
        job.sink = lambda event: done.release() if event.kind in ("done", "error") else None
    scheduler.start()
    try:
        scheduler.submit(*jobs)
        for _ in jobs:
            assert done.acquire(timeout=120)
    finally:
        scheduler.stop()


def test_server_greedy_steps_take_the_int8_head_and_keep_their_tokens(monkeypatch):
    """The server's greedy requests (full, early_exit sharing a pass, self_speculative rounds)
    decode the same tokens with the int8 head as `generate` with the full head; a request with
    log-probabilities, top alternatives or sampling in the same pass keeps the full logits."""
    from megatron.early_exit.inference.server import Job

    model = drafting(True)
    greedy = [GenerationSettings(strategy=k, max_new_tokens=12, ignore_eos=True, early_exit_threshold=0.9,
                                 exit_policy="exact") for k in ("full", "early_exit", "self_speculative")]  # fmt: skip
    want = [EarlyExitEngine(model, head="full").generate(PROMPTS[:2], s) for s in greedy]
    engine = EarlyExitEngine(model, head="int8")
    calls = spy(monkeypatch)
    jobs = [Job([list(p) for p in PROMPTS[:2]], s, engine.check(s, PROMPTS[:2])) for s in greedy]
    serve_jobs(engine, jobs)
    for job, w in zip(jobs, want):
        assert [r.tokens for r in job.results] == [r.tokens for r in w]
        assert [r.exit_layers for r in job.results] == [r.exit_layers for r in w]
    assert len(calls) >= 12  # the int8 head decided the steps (prefills keep the full head)
    calls.clear()
    s = greedy[0]
    mixed = [Job([PROMPTS[0]], s, ExitPolicy(), top_logprobs=2), Job([PROMPTS[1]], s, ExitPolicy())]
    serve_jobs(engine, mixed)
    assert not calls  # one pass for both: the top alternatives need the logits
    assert [mixed[0].results[0].tokens, mixed[1].results[0].tokens] == [r.tokens for r in want[0]]
    assert all(len(t) == 2 for t in mixed[0].token_top[0])

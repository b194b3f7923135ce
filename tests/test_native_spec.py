"""A self-speculative round's drafts and verify pass one after the other (`native_spec.spec_round`):
the same drafts, kept tokens, exit layers, confidences, acceptance counts, K/V and fill counts as
the round through `Passes.native_drafts_of` and `EarlyExitEngine.verify` (the same native calls,
so bit for bit in fp32 and bf16), at one sequence and several, with fixed and dynamic drafting;
greedy self-speculation through it equals full greedy decoding (fp32); where it does not apply
(alternative drafts, switched off) nothing is done and the round runs as before. One sequence's
rounds in one native call (`SelfSpeculative.native_run`, `native.spec_rounds`): the same results,
telemetry, controller decisions and state as those rounds one by one, stops mid-round included.
"""

import pytest
import torch

from megatron.early_exit.inference import EarlyExitEngine, GenerationSettings, native
from megatron.early_exit.inference.passes import Passes
from tests.test_native_drafts import build
from tests.test_native_loop import assert_same_results, assert_same_state

needs_native = pytest.mark.skipif(not native.available(), reason="no native kernel here (no C compiler)")

PROMPTS = [[5, 17, 33, 2, 9, 41, 7], [11, 3, 60, 25, 8], [4, 4, 90, 13, 27, 6, 50, 21, 3]]


def generated(model, prompts, settings, on: bool, monkeypatch, rounds: bool = False):
    """(results, the decode state, verify passes made by `spec_round`, by `EarlyExitEngine.verify`)
    of one self-speculative `generate` with `Passes.native_spec` on or off (and one sequence's
    rounds in one call, `Passes.native_spec_rounds`, as `rounds` says)."""
    from megatron.early_exit.inference.strategies import self_speculative

    engine = EarlyExitEngine(model, linear_kernel="native")
    monkeypatch.setattr(Passes, "native_spec", on)
    monkeypatch.setattr(Passes, "native_spec_rounds", rounds)
    states, fused, separate = [], [], []
    real_state, real_round, real_verify = engine.new_state, self_speculative.spec_round, engine.verify

    def spec_round(*a, **k):
        made = real_round(*a, **k)
        fused.append(made is not None and made[1] is not None)
        return made

    monkeypatch.setattr(engine, "new_state", lambda *a, **k: states.append(real_state(*a, **k)) or states[-1])
    monkeypatch.setattr(self_speculative, "spec_round", spec_round)
    monkeypatch.setattr(engine, "verify", lambda *a, **k: separate.append(1) or real_verify(*a, **k))
    results = engine.generate(prompts, settings)
    monkeypatch.setattr(self_speculative, "spec_round", real_round)
    return results, states[0], sum(fused), len(separate)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("dynamic", [False, True])
def test_fused_rounds_equal_the_separate_calls(dtype, batch, dynamic, monkeypatch):
    model = build(dtype)
    kw = {} if dynamic else {"num_draft_tokens": 4, "draft_exit_layer": 1}
    s = GenerationSettings("self_speculative", 24, ignore_eos=True, **kw)
    want, want_state, none, separate = generated(model, PROMPTS[:batch], s, False, monkeypatch)
    got, got_state, fused, left = generated(model, PROMPTS[:batch], s, True, monkeypatch)
    assert none == 0 and separate > 0 and fused > 0, (none, separate, fused)
    assert fused + left == separate or dynamic  # fixed rounds: each verified once, fused or (last ones) not
    assert_same_results(want, got)
    for x, y in zip(want, got, strict=True):
        assert x.stats["drafted"] == y.stats["drafted"] and x.stats["accepted"] == y.stats["accepted"]
    assert_same_state(want_state, got_state)


@needs_native
def test_fused_rounds_equal_full_greedy_decoding(monkeypatch):
    """Lossless: fp32 self-speculation through fused rounds makes full greedy decoding's tokens."""
    model = build(torch.float32)
    s = GenerationSettings("self_speculative", 30, ignore_eos=True, num_draft_tokens=5, draft_exit_layer=1)
    got, _, fused, _ = generated(model, PROMPTS, s, True, monkeypatch)
    full = EarlyExitEngine(model, linear_kernel="native").generate(PROMPTS, GenerationSettings(max_new_tokens=30))
    assert fused > 0
    assert [r.tokens for r in got] == [r.tokens for r in full]


@needs_native
def test_where_fused_rounds_do_not_apply_nothing_is_done(monkeypatch):
    """Alternative drafts (a verify pass of branches) and the switch off: no fused round."""
    model = build(torch.float32)
    fixed = {"ignore_eos": True, "num_draft_tokens": 3, "draft_exit_layer": 1}
    s = GenerationSettings("self_speculative", 12, draft_alternatives=True, **fixed)
    _, _, fused, separate = generated(model, PROMPTS[:2], s, True, monkeypatch)
    assert fused == 0 and separate > 0
    s = GenerationSettings("self_speculative", 12, **fixed)
    _, _, fused, separate = generated(model, PROMPTS[:2], s, False, monkeypatch)
    assert fused == 0 and separate > 0


@needs_native
def test_drafts_whose_verify_pass_is_not_native_are_verified_the_usual_way(monkeypatch):
    """Where the verify pass would not run natively at the row count the drafts made
    (`VerifyPlan.takes`), the drafts come back alone and the strategy verifies them (here through
    the general pass: `verify_pending` asks the same): the same tokens and state as the separate calls."""
    from megatron.early_exit.inference.passes import VerifyPlan

    model = build(torch.float32)
    s = GenerationSettings("self_speculative", 16, ignore_eos=True, num_draft_tokens=4, draft_exit_layer=1)
    want, want_state, _, _ = generated(model, PROMPTS, s, False, monkeypatch)
    monkeypatch.setattr(VerifyPlan, "takes", lambda self, passes, rows, dtype: False)
    got, got_state, fused, separate = generated(model, PROMPTS, s, True, monkeypatch)
    assert fused == 0 and separate > 0
    assert_same_results(want, got)
    assert_same_state(want_state, got_state)


@needs_native
def test_plain_rounds_in_a_batch_run_at_once_with_the_same_choices(monkeypatch):
    """Dynamic self-speculation at 3 sequences on a model none of whose exits pays (the controller
    plans plain rounds): the plain rounds before an exit is due a try run at once in the native loop
    (`SelfSpeculative.plain_run`, runs of up to `MAX_PLAIN_RUN` steps), with the tokens of full
    greedy decoding (fp32) and every choice the controller makes a round at a time (the same
    rounds per draft length and exit, drafts and acceptances: nothing it weighs changes in a run)."""
    from megatron.early_exit.inference.strategies import draft_control, self_speculative

    model = build(torch.float32)
    s = GenerationSettings("self_speculative", 40, ignore_eos=True)
    caps, real = [], self_speculative.native_rounds
    monkeypatch.setattr(self_speculative, "native_rounds", lambda *a: caps.append(a[5]) or real(*a))
    seen = {}
    for run in (1, draft_control.MAX_PLAIN_RUN):
        monkeypatch.setattr(draft_control, "MAX_PLAIN_RUN", run)
        caps.clear()
        seen[run] = (EarlyExitEngine(model, linear_kernel="native").generate(PROMPTS, s), list(caps))
    (one, none), (runs, made) = seen[1], seen[draft_control.MAX_PLAIN_RUN]
    assert none == [] and made and max(made) > 1, made
    greedy = GenerationSettings(max_new_tokens=40, ignore_eos=True)
    full = EarlyExitEngine(model, linear_kernel="native").generate(PROMPTS, greedy)
    assert [r.tokens for r in runs] == [r.tokens for r in one] == [r.tokens for r in full]
    keys = ("drafted", "accepted", "draft_exits", "draft_lengths", "plain_share")
    assert [{k: r.stats[k] for k in keys} for r in runs] == [{k: r.stats[k] for k in keys} for r in one]
    assert runs[0].stats["plain_share"] > 0.5


@needs_native
def test_a_verify_plan_looks_its_kernels_up_once_and_its_hooks_every_time(monkeypatch):
    """`VerifyPlan.takes`: the layers' and the final head's kernels at a row count are looked up
    once (`Passes.vocab_native` asked once per row count), the final norm's forward hooks every
    time: one set in the middle of a decode turns the native verify pass off until it is removed."""
    model = build(torch.float32)
    engine = EarlyExitEngine(model, linear_kernel="native")
    state = engine.new_state(1, 32)
    engine.prefill(state, {0: PROMPTS[0]})
    asked = []
    real = Passes.vocab_native
    monkeypatch.setattr(Passes, "vocab_native", lambda self, *a: asked.append(a[0]) or real(self, *a))
    with engine.packed:
        plan = engine.passes.verify_plan(state, 1)
        assert all(plan.takes(engine.passes, rows, torch.float32) for rows in (3, 3, 5, 3))
        assert asked == [3, 5]
        hook = model.decoder.final_layernorm.register_forward_hook(lambda *_: None)
        assert not plan.takes(engine.passes, 3, torch.float32)
        hook.remove()
        assert plan.takes(engine.passes, 3, torch.float32) and asked == [3, 5]


def looped(model, prompt, settings, rounds: bool, monkeypatch):
    """(result, decode state, [rounds made by each `native.spec_rounds` call]) of one sequence's
    self-speculative `generate` with `Passes.native_spec_rounds` as `rounds` says."""
    calls, real = [], native.spec_rounds
    monkeypatch.setattr(native, "spec_rounds", lambda *a: (lambda made: calls.append(made[0]) or made)(real(*a)))
    results, state, _, _ = generated(model, [prompt], settings, True, monkeypatch, rounds=rounds)
    monkeypatch.setattr(native, "spec_rounds", real)
    return results[0], state, calls


def varied(dtype, agree: bool = False):
    """`build`'s model with its matrices 20 times larger, whose greedy tokens vary (`build`'s
    repeat one token); with `agree`, exit 1 mostly agrees with the final head (its norm and head
    the final ones, the deeper layers' outputs scaled down): the controller keeps drafting from it."""
    model = build(torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(20.0)
        if agree:
            for layer in list(model.decoder.layers.values())[1:]:
                layer.self_attention.linear_proj.weight.mul_(0.02)
                layer.mlp.linear_fc2.weight.mul_(0.02)
            model.exits["1"].norm.weight.copy_(model.decoder.final_layernorm.weight)
            model.exits["1"].output_layer.weight.copy_(model.embedding.word_embeddings.weight)
            vocab = model.calibrated_thresholds["draft_vocabulary"]
            vocab["tokens"] = list(range(model.config.vocab_size))  # every token a draft can be
    return model.to(dtype)


STATS = ("drafted", "accepted", "draft_exits", "draft_lengths", "draft_rounds", "plain_share")


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("ends", ["length", "stop"])
def test_rounds_in_one_call_equal_the_rounds_one_by_one(dtype, dynamic, ends, monkeypatch):
    """Every result, token's exit layer and confidence (bit for bit), count, telemetry record and
    K/V of one sequence's rounds in one native call equal those rounds' one at a time, with fixed
    drafting and the controller's (its decisions made once a round either way: the same rounds per
    exit and length); a sequence ending inside a round (its length, or a stop token that a kept
    draft is) ends there; fp32 is full greedy decoding's output."""
    model = varied(dtype, agree=dynamic)
    kw = {} if dynamic else {"num_draft_tokens": 4, "draft_exit_layer": 1}
    full = EarlyExitEngine(model, linear_kernel="native")
    for prompt in PROMPTS:
        greedy = full.generate([prompt], GenerationSettings(max_new_tokens=30, ignore_eos=True))[0].tokens
        first = next(i for i in range(12, 30) if greedy[i] not in greedy[:i])  # a token new there
        stop = {"stop_token_ids": (greedy[first],)} if ends == "stop" else {}
        s = GenerationSettings("self_speculative", 30 if ends == "stop" else 23, ignore_eos=True, **stop, **kw)
        want, want_state, none = looped(model, prompt, s, False, monkeypatch)
        got, got_state, calls = looped(model, prompt, s, True, monkeypatch)
        assert none == [] and calls and max(calls) > 1, (none, calls)  # rounds on in one call
        assert_same_results([want], [got])
        assert {k: want.stats[k] for k in STATS} == {k: got.stats[k] for k in STATS}
        assert_same_state(want_state, got_state)
        end = first + 1 if ends == "stop" else 23
        assert got.finish_reason == ("stop" if ends == "stop" else "length") and len(got.tokens) == end
        if dtype == torch.float32:
            assert got.tokens == greedy[:end]


@needs_native
def test_rounds_in_one_call_leave_where_the_loop_does_not_apply(monkeypatch):
    """Several sequences, alternative drafts, log-probabilities: no call of `native.spec_rounds`
    (their rounds as before)."""
    model = build(torch.float32)
    fixed = {"ignore_eos": True, "num_draft_tokens": 3, "draft_exit_layer": 1}
    for prompts, kw in (
        (PROMPTS, {}),
        (PROMPTS[:1], {"draft_alternatives": True}),
        (PROMPTS[:1], {"return_logprobs": True}),
    ):
        calls, real = [], native.spec_rounds
        monkeypatch.setattr(native, "spec_rounds", lambda *a, calls=calls, real=real: calls.append(1) or real(*a))
        s = GenerationSettings("self_speculative", 12, **fixed, **kw)
        results, _, _, _ = generated(model, prompts, s, True, monkeypatch, rounds=True)
        monkeypatch.setattr(native, "spec_rounds", real)
        assert calls == [] and all(len(r.tokens) == 12 for r in results), kw


@needs_native
def test_an_error_in_the_loops_callback_leaves_a_whole_state(monkeypatch):
    """An exception raised while `native.spec_rounds` asks Python (here `Acceptance.append` on the
    9th token) ends the loop after that round and reaches the caller; the decode state then holds
    whole rounds alone: every layer filled up to the sequence's fed position."""
    from megatron.early_exit.inference.acceptance import Acceptance

    model = varied(torch.float32)
    s = GenerationSettings("self_speculative", 24, ignore_eos=True, num_draft_tokens=4, draft_exit_layer=1)
    real, seen = Acceptance.append, []

    def append(self, r, *a):
        if len(r.tokens) == 9:
            raise RuntimeError("a callback failed")
        return real(self, r, *a)

    monkeypatch.setattr(Acceptance, "append", append)
    monkeypatch.setattr(native, "spec_rounds", lambda *a, real=native.spec_rounds: seen.append(1) or real(*a))
    engine = EarlyExitEngine(model, linear_kernel="native")
    monkeypatch.setattr(Passes, "native_spec_rounds", True)
    states, new_state = [], engine.new_state
    monkeypatch.setattr(engine, "new_state", lambda *a, **k: states.append(new_state(*a, **k)) or states[-1])
    with pytest.raises(RuntimeError, match="a callback failed"):
        engine.generate(PROMPTS[:1], s)
    state = states[0]
    assert seen and state.fed[0] > len(PROMPTS[0])  # the loop had made rounds when it failed
    assert (state.cache.filled[:, 0] == state.fed[0]).all()


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_draft_costs_time_the_loops_rounds_and_leave_the_state_whole(dtype, monkeypatch):
    """At one sequence `measure_draft_costs` prices rounds as the native loop runs them
    (`draft_costs.loop_timed`: ROUNDS_A_CALL rounds of a fixed plan in one call, UNIT_RUN plain
    steps in one call as the unit), fits the costs from them, and each timed call leaves the decode
    state as it found it; at two sequences (no loop) the rounds are timed through `run_plan`."""
    from megatron.early_exit.inference.strategies import draft_costs as dc
    from megatron.early_exit.inference.strategies.draft_control import UNIT_RUN, Plan
    from megatron.early_exit.inference.strategies.self_speculative import NEXT_PLAN

    monkeypatch.setattr(Passes, "native_spec_rounds", True)
    engine = EarlyExitEngine(varied(dtype), linear_kernel="native")
    prompt = PROMPTS[2]
    state = engine.new_state(1, len(prompt) + dc.ROUNDS_A_CALL * 5 + UNIT_RUN + 12)
    with engine.packed:
        engine.prefill(state, {0: prompt})
    fed, filled = state.fed[0], state.cache.filled.copy()
    k = state.cache.k[:, 0, :, :fed].clone()  # every layer's keys of the prompt
    made = {}
    for name, plan in (("a", Plan(1, 4, 1.0)), ("b", Plan(1, 1, 1.0)), ("plain", None)):
        dc.loop_timed(engine, state, prompt, fed, plan, made, name)()
        assert state.fed[0] == fed and (state.cache.filled == filled).all()
        assert torch.equal(state.cache.k[:, 0, :, :fed], k) and NEXT_PLAN not in state.memo
    assert made == {"a": dc.ROUNDS_A_CALL, "b": dc.ROUNDS_A_CALL, "plain": UNIT_RUN}
    costs, t = dc.measure_draft_costs(engine, 1, 9, repeats=1)
    exits = engine.draft_exits()
    assert {f"loop {n}/{g}" for n in exits for g in dc.LENGTHS} <= set(t) and all(v > 0 for v in t.values())
    assert costs == dc.costs_of(t, exits)
    # the fit reads the loop's rounds where they were timed: the same drafts, rows and base whatever
    # the rounds timed through `run_plan` read (those price the alternatives' rows alone). Two fits
    # compared instead, with and without the loop's, were equal once under load, both at their bounds.
    other = dc.costs_of({k: 99.0 if k.startswith("round") else v for k, v in t.items()}, exits)
    assert (other.draft, other.row, other.base) == (costs.draft, costs.row, costs.base)
    monkeypatch.setattr(Passes, "native_spec_rounds", False)  # the loop off: rounds through `run_plan` alone
    assert not any(k.startswith("loop") for k in dc.measure_draft_costs(engine, 1, 9, repeats=1)[1])
    monkeypatch.setattr(Passes, "native_spec_rounds", True)
    assert not any(k.startswith("loop") for k in dc.measure_draft_costs(engine, 2, 9, repeats=1)[1])

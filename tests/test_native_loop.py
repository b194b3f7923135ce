"""Greedy rounds in one native call (`native_loop.native_rounds`, `ee_decode`): full decoding and
exact early exit with learned checks give the same tokens, exit layers, confidences, stops, K/V,
fill counts and pending rows as the same steps through `Passes.run` one at a time (the same native
calls in the same order, so bit for bit in fp32 and bf16), at one sequence and several of
different lengths, with pending rows joining at the layers where they start and more of them than
the loop first takes (`LoopPlan.more_rows`); where it does not apply (sampling, log-probabilities,
cost_aware at several sequences, profiling, switched off) nothing is done and the steps run as
before.
"""

import contextlib
from dataclasses import replace

import pytest
import torch

from megatron.early_exit.inference import EarlyExitEngine, GenerationSettings, kernels, native, native_loop

needs_native = pytest.mark.skipif(not native.available(), reason="no native kernel here (no C compiler)")

PROMPTS = [[5, 17, 33, 2, 9, 41, 7], [11, 3, 60, 25, 8], [4, 4, 90, 13, 27, 6, 50, 21, 3]]
DRAFT_VOCAB = list(range(0, 96, 2)) + [1, 3, 7, 11]


def build(dtype, hidden: int = 0, mlp: bool = False):
    """4 layers (head dim 16), norm-only exits at 1 and 2 on untied heads with learned probes
    (linear, or an MLP of `hidden`), drawn so that their scores spread around 0: at threshold 0.5
    some tokens leave at each exit and some go through; a draft vocabulary in the record. `mlp`:
    each exit an MLP sub-block and its norm (SmolLM2's EE-Tuning exits), its probe on the backbone row."""
    from megatron.early_exit.config import ModelConfig
    from megatron.early_exit.model import EarlyExitGPT

    cfg = ModelConfig(
        num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
        vocab_size=96, max_position_embeddings=512, normalization="RMSNorm", swiglu=True,
        position_embedding_type="rope", add_bias_linear=False, exit_layer_nums=[1, 2], use_exit_norm=True,
        untie_exit_output_weights=True, use_exit_confidence_head=True, use_exit_mlp=mlp,
        exit_confidence_input="backbone" if mlp else "exit", exit_confidence_hidden_size=hidden,
    )  # fmt: skip
    model = EarlyExitGPT(cfg)
    model.init_weights(11)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n in ("1", "2"):
            for p in model.exits[n].confidence.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if p.dim() > 1 else 0.1))
    model.calibrated_thresholds = {"thresholds": {1: 1.0, 2: 1.0}, "draft_vocabulary": {"tokens": DRAFT_VOCAB}}
    return model.to(dtype).eval()


@contextlib.contextmanager
def loop_calls():
    """Each `native.decode` call's (steps made, rows wanted) while inside, in order."""
    calls, real = [], native_loop.native.decode

    def counting(*a, **k):
        calls.append(real(*a, **k))
        return calls[-1]

    native_loop.native.decode = counting
    try:
        yield calls
    finally:
        native_loop.native.decode = real


def decoded(engine, prompts, settings, on: bool):
    """(results, the decode state) of one `generate` with the native loop on or off, and the
    steps the loop made (each feeding every sequence still going; 0 where it did not run)."""
    engine.passes.native_loop = on
    states, real_state = [], engine.new_state

    def capture(*a, **k):
        states.append(real_state(*a, **k))
        return states[-1]

    engine.new_state = capture
    try:
        with loop_calls() as calls:
            results = engine.generate(prompts, settings)
    finally:
        del engine.new_state
    return results, states[0], sum(made for made, _ in calls)


def assert_same_state(a, b):
    """The same fill counts and fed positions, and bit for bit the same K/V at every filled
    position and pending row at every position some layer still waits for."""
    assert a.fed == b.fed
    assert (a.cache.filled == b.cache.filled).all()
    layers, batch = a.cache.filled.shape
    for i in range(layers):
        for s in range(batch):
            f = int(a.cache.filled[i, s])
            assert torch.equal(a.cache.k[i, s, :, :f], b.cache.k[i, s, :, :f]), (i, s)
            assert torch.equal(a.cache.v[i, s, :, :f], b.cache.v[i, s, :, :f]), (i, s)
    for s in range(batch):
        lo = int(a.cache.filled[-1, s])
        assert torch.equal(a.pending[s, lo : a.fed[s]], b.pending[s, lo : b.fed[s]]), s


def assert_same_results(a, b):
    for x, y in zip(a, b, strict=True):
        assert x.tokens == y.tokens
        assert x.exit_layers == y.exit_layers
        assert x.confidences == y.confidences  # floats made by the same calls: equal, not close
        assert (x.finish_reason, x.stopped_by) == (y.finish_reason, y.stopped_by)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden", [0, 24])  # a linear probe, an MLP probe (in the layer's last region)
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("vocab", ["draft", "full"])
@pytest.mark.parametrize("mlp", [False, True])
def test_native_rounds_equal_the_steps_one_by_one(dtype, hidden, batch, vocab, mlp):
    engine = EarlyExitEngine(build(dtype, hidden, mlp), linear_kernel="native")
    prompts = PROMPTS[:batch]
    for threshold in (1.0, 0.5):
        s = GenerationSettings("early_exit", 30, early_exit_threshold=threshold, exit_policy="exact",
                               ignore_eos=True, exit_vocabulary=vocab)  # fmt: skip
        want, steps, none = decoded(engine, prompts, s, False)
        got, loop, tokens = decoded(engine, prompts, s, True)
        assert none == 0 and tokens == 29  # every step after the prefill's token in the loop
        assert_same_results(want, got)
        assert_same_state(steps, loop)
        layers = [e for r in got for e in r.exit_layers]
        if threshold < 1.0:  # tokens left at each exit and went through: pending rows joined at both depths
            assert ({4} if mlp else {1, 2, 4}) <= set(layers) and len(set(layers)) > 1, layers
        else:
            assert set(layers) == {4}


@needs_native
def test_full_decoding_and_stops_in_the_loop():
    """Full decoding's rounds (no exit evaluated), each sequence stopping at its own stop token or
    length inside the loop: the same results as step by step."""
    engine = EarlyExitEngine(build(torch.float32), linear_kernel="native")
    plain = engine.generate(PROMPTS, GenerationSettings(max_new_tokens=12, ignore_eos=True))
    stop = plain[1].tokens[4]  # the second sequence stops at its fifth token, the others where it comes
    s = GenerationSettings(max_new_tokens=12, stop_token_ids=(stop,), ignore_eos=True)
    want, steps, _ = decoded(engine, PROMPTS, s, False)
    got, loop, tokens = decoded(engine, PROMPTS, s, True)
    assert tokens == max(len(r.tokens) - 1 for r in got) and len(got[1].tokens) <= 5  # all but the prefill's
    assert got[1].finish_reason == "stop"
    assert_same_results(want, got)
    assert_same_state(steps, loop)


@needs_native
def test_pending_rows_beyond_the_first_cap_raise_it():
    """One sequence leaving at exit 1 step after step: its pending rows pile up above exit 1, and a
    token that goes through takes them all in one layer call, more rows than the loop's first cap
    (the batch's 1): the loop hands back, checks the kernels at the new count, raises its cap and goes
    on, with the step-by-step results. The cap rises through the new count's kernel bucket at once
    (`kernels.bucket_top`), so once per bucket, not once per row (one native call more a step)."""
    engine = EarlyExitEngine(build(torch.float32), linear_kernel="native")
    s = GenerationSettings("early_exit", 40, exit_thresholds={1: 0.3, 2: 0.99}, exit_policy="exact",
                           ignore_eos=True, early_exit_threshold=1.0)  # fmt: skip
    caps = []
    real = native_loop.LoopPlan.more_rows

    def spy(self, wanted, linear):
        caps.append(wanted)
        return real(self, wanted, linear)

    native_loop.LoopPlan.more_rows = spy
    try:
        want, steps, _ = decoded(engine, PROMPTS[:1], s, False)
        got, loop, tokens = decoded(engine, PROMPTS[:1], s, True)
    finally:
        native_loop.LoopPlan.more_rows = real
    assert tokens == 39 and caps and max(caps) > 2, caps
    assert len(caps) == len({kernels.bucket_top(c) for c in caps}) <= 6, caps  # a bucket once: 1, 4, 8, 16, 64
    assert_same_results(want, got)
    assert_same_state(steps, loop)


@needs_native
def test_where_the_loop_does_not_apply_nothing_is_done():
    engine = EarlyExitEngine(build(torch.float32), linear_kernel="native")
    cases = [
        GenerationSettings(max_new_tokens=6, temperature=0.8, seed=1),  # sampling
        GenerationSettings(max_new_tokens=6, return_logprobs=True),  # log-probabilities
        GenerationSettings("early_exit", 6, early_exit_threshold=0.5, exit_policy="cost_aware"),  # its decider
        GenerationSettings(max_new_tokens=6, profile=True),  # profiled steps
    ]
    for s in cases:
        results, _, tokens = decoded(engine, PROMPTS, s, True)
        assert tokens == 0 and all(len(r.tokens) == 6 for r in results), s
    results, _, tokens = decoded(engine, PROMPTS[:1], cases[2], True)  # cost_aware at one sequence: exact's
    assert tokens == 5
    results, _, tokens = decoded(engine, PROMPTS, GenerationSettings(max_new_tokens=6), False)  # switched off
    assert tokens == 0


@needs_native
def test_full_decoding_in_the_loop_equals_the_modules_greedy_loop():
    """fp32: the loop's full decoding gives the tokens of the modules' own greedy loop (no cache)."""
    from tests.test_dynamic_speculation import NEW
    from tests.test_dynamic_speculation import PROMPTS as prompts
    from tests.test_dynamic_speculation import build as built
    from tests.test_inference import naive_greedy

    model = built(True)
    want = [naive_greedy(model, p, NEW) for p in prompts]
    got, _, steps = decoded(EarlyExitEngine(model, linear_kernel="native"), prompts,
                            GenerationSettings(max_new_tokens=NEW, ignore_eos=True), True)  # fmt: skip
    assert steps == NEW - 1 and [r.tokens for r in got] == want


@needs_native
def test_cost_aware_with_no_exit_to_evaluate_runs_in_the_loop():
    """cost_aware at threshold 1.0 (every exit off: no window, no decider) at 3 sequences: full
    decoding's steps, all in the loop (they had run step by step through `Passes.run`), the tokens
    of full decoding."""
    engine = EarlyExitEngine(build(torch.float32), linear_kernel="native")
    s = GenerationSettings("early_exit", 14, early_exit_threshold=1.0, exit_policy="cost_aware", ignore_eos=True)
    got, _, steps = decoded(engine, PROMPTS, s, True)
    want, _, _ = decoded(engine, PROMPTS, GenerationSettings(max_new_tokens=14, ignore_eos=True), False)
    assert steps == 13 and [r.tokens for r in got] == [r.tokens for r in want]


@needs_native
@pytest.mark.parametrize("mode", ["paused", "free", "on", "on leaving"])
@pytest.mark.parametrize("fixed", [False, True])
def test_cost_aware_windows_in_the_loop_equal_their_steps(mode, fixed, monkeypatch):
    """cost_aware at 3 sequences with its clock's every window PAUSED (full decoding's passes,
    filling nothing since nothing leaves), FREE (every firing row leaves) or ON (the decider's
    verdicts; memory-bound costs: its checks skip, every REFRESH-th pass evaluates them; "on
    leaving": compute-bound costs, under which firing rows leave, so that later passes hold pending
    rows and their checks see several rows a sequence), under the clock or a `FixedMode` (the
    benchmark's held modes): the loop runs every step (each charged to the window's track), at each
    exit asking the decider whether to evaluate and whether firing rows leave, with the tokens,
    exit layers and confidences of the same windows step by step, the track's pass counts equal,
    and the decider's records of every evaluation (`ExitDecider.record`), skip counts and chances
    equal to those its checks made step by step."""
    from megatron.early_exit.inference import exit_clock
    from megatron.early_exit.inference.exit_decision import ExitDecider
    from tests.test_exit_policy import COMPUTE_BOUND, MEMORY_BOUND

    SKIPPING = replace(MEMORY_BOUND, probe=0.5)  # noqa: N806 (leaving saves nothing; a check costs)

    want_mode = {"paused": exit_clock.PAUSED, "free": exit_clock.FREE}.get(mode, exit_clock.ON)
    monkeypatch.setattr(exit_clock, "WINDOW", 4)
    monkeypatch.setattr(exit_clock.Track, "next_mode", lambda self: want_mode)
    s = GenerationSettings("early_exit", 14, early_exit_threshold=0.5, exit_policy="cost_aware", ignore_eos=True)
    seen = {}
    for on in (False, True):
        engine = EarlyExitEngine(build(torch.float32), linear_kernel="native")
        decider = engine.passes.exit_decider = ExitDecider(SKIPPING if mode == "on" else COMPUTE_BOUND)
        if fixed:
            decider.clock = exit_clock.FixedMode(want_mode)
        else:
            decider.clock = exit_clock.ExitClock()
            decider.clock.tracks[(engine.check(s, PROMPTS), 3)] = exit_clock.Track(mode=want_mode)
        results, _, steps = decoded(engine, PROMPTS, s, on)
        (track,) = decider.clock.tracks.values()
        records = (dict(decider.evaluated), dict(decider.rows_fired), dict(decider.rows_seen), set(decider.fired))
        records += (dict(decider.skipped), dict(decider.chance))
        seen[on] = (results, steps, list(track.by_mode), records)
    (want, none, by_mode, records), (got, steps, by_mode_loop, records_loop) = seen[False], seen[True]
    assert none == 0 and by_mode == by_mode_loop and by_mode[want_mode] == 13
    assert steps == 13
    assert_same_results(want, got)
    assert records == records_loop
    layers = {e for r in got for e in r.exit_layers[1:]}
    want_layers = {"paused": {4}, "free": {1, 2, 4}, "on": {4}, "on leaving": {1, 2, 4}}[mode]
    assert layers == want_layers, layers
    if mode == "on":  # skipped, then evaluated on a refresh
        assert records[4] and records[0], records


@needs_native
@pytest.mark.parametrize("policy", ["exact", "cost_aware"])
def test_greedy_steps_one_at_a_time_in_the_loop(policy):
    """A server's greedy steps (`EarlyExitEngine.decode_one_token` with `argmax`: one step of
    the sequences running, requests coming and going between steps) run in the loop
    (`native_loop.step_once`; cost_aware: its clock's on window, here held by a `FixedMode`) with
    the tokens, exit layers, confidences, acceptance order and K/V of the steps through
    `Passes.run`; a sequence joins after the first steps."""
    from megatron.early_exit.inference import exit_clock
    from megatron.early_exit.inference.exit_decision import ExitDecider
    from tests.test_exit_policy import COMPUTE_BOUND

    s = GenerationSettings("early_exit", 14, early_exit_threshold=0.5, exit_policy=policy)
    seen = {}
    for on in (False, True):
        engine = EarlyExitEngine(build(torch.float32), linear_kernel="native")
        engine.passes.native_loop = on
        decider = engine.passes.exit_decider = ExitDecider(COMPUTE_BOUND)
        decider.clock = exit_clock.FixedMode(exit_clock.ON)
        pol, state = engine.check(s, PROMPTS), engine.new_state(3, 64)
        engine.prefill(state, {0: PROMPTS[0], 1: PROMPTS[1]})
        last, steps = {0: 7, 1: 8}, []
        with loop_calls() as loop:
            for i in range(12):
                if i == 4:  # a request joins
                    engine.prefill(state, {2: PROMPTS[2]})
                    last[2] = 9
                out = engine.decode_one_token(state, last, pol, argmax=True)
                tokens = engine.acceptance.choose(out, out.order(), s, None)  # greedy: the argmax or the logits'
                steps.append([(b, t, out.exit_layer[b], out.confidence[b]) for b, t in zip(out.order(), tokens)])
                last = dict(zip(out.order(), tokens))
        seen[on] = (steps, state, sum(made for made, _ in loop))  # steps the loop made
    (want, want_state, none), (got, got_state, calls) = seen[False], seen[True]
    assert none == 0 and calls == 12
    assert got == want
    assert_same_state(want_state, got_state)
    assert {e for step in got for _, _, e, _ in step} == {1, 2, 4}


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["free", "on"])
def test_max_prob_windows_in_the_loop_leave_where_the_steps_do(dtype, mode):
    """cost_aware with max_prob checks (a vocabulary check: the exit's head on every new row, its
    max-probability the confidence, its argmax a leaver's token; `ExitDecider` asked as for a
    learned check) at 3 sequences, the window held free or on: every step in the loop, the tokens,
    exit layers and the decider's records of the steps through `Passes.run`; the confidences within
    round-off (the loop's head folds the exit's norm into its product, the steps' norm the rows
    first and take torch's softmax: another summation order, ~5e-7 here)."""
    from megatron.early_exit.inference import exit_clock
    from megatron.early_exit.inference.exit_decision import ExitDecider
    from tests.test_exit_policy import COMPUTE_BOUND

    def model():  # sharper exits than the random init's near-uniform ones: max-probabilities spread over 0-1
        made = build(dtype)
        with torch.no_grad():
            for n, k in (("1", 30.0), ("2", 40.0)):
                made.exits[n].output_layer.weight.mul_(k)
        return made

    s = GenerationSettings("early_exit", 14, early_exit_threshold=0.4, measure="max_prob", exit_policy="cost_aware",
                           ignore_eos=True)  # fmt: skip
    seen = {}
    for on in (False, True):
        engine = EarlyExitEngine(model(), linear_kernel="native")
        decider = engine.passes.exit_decider = ExitDecider(COMPUTE_BOUND)
        decider.clock = exit_clock.FixedMode(exit_clock.FREE if mode == "free" else exit_clock.ON)
        results, _, steps = decoded(engine, PROMPTS, s, on)
        records = (dict(decider.evaluated), dict(decider.rows_fired), dict(decider.rows_seen), dict(decider.skipped))
        seen[on] = (results, steps, records)
    (want, none, records), (got, steps, records_loop) = seen[False], seen[True]
    assert none == 0 and steps == 13
    for x, y in zip(want, got, strict=True):
        assert x.tokens == y.tokens and x.exit_layers == y.exit_layers
        assert x.confidences == pytest.approx(y.confidences, rel=1e-5, abs=1e-6)
    assert records == records_loop
    assert {e for r in got for e in r.exit_layers[1:]} == {1, 2, 4}


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", ["draft", "full"])
def test_observed_steps_in_the_loop_read_the_exits_tokens(dtype, vocab):
    """A plain step that reads an exit's greedy token on the way (`ExitPolicy.observe`: a
    self-speculative plain round's, `Plan.observe`) runs in the loop (`step_once`: a vocabulary
    check whose bound no row reaches, its token and max-probability in `native.Seen`) with the
    final head's tokens and K/V of the step through `Passes.run`, and the same guesses: the
    exit's token over the draft vocabulary where the passes draft onto one, else the whole; its
    max-probability within round-off (the loop's head is the native kernel, the step's the head's
    own: `native_loop.takes_head`), one sequence or three, joining and leaving."""
    from megatron.early_exit.inference.strategies.self_speculative import observing

    seen = {}
    for on in (False, True):
        model = build(dtype)
        if vocab == "full":  # no draft vocabulary; 90 real tokens of the 96 rows (padding never a guess)
            model.calibrated_thresholds = {"thresholds": {1: 1.0, 2: 1.0}}
            model.config.real_vocab_size = 90
        engine = EarlyExitEngine(model, linear_kernel="native")
        engine.passes.native_loop = on
        assert (engine.passes.draft_vocab is not None) == (vocab == "draft")
        state = engine.new_state(3, 64)
        engine.prefill(state, {0: PROMPTS[0], 1: PROMPTS[1]})
        last, steps, guesses = {0: 7, 1: 8}, [], []
        with loop_calls() as loop:
            for i in range(10):
                if i == 3:  # a request joins
                    engine.prefill(state, {2: PROMPTS[2]})
                    last[2] = 9
                if i == 7:  # and one leaves
                    del last[0]
                exit_n = 1 + i % 2
                with engine.packed:  # the engine's kernels (here the native one, forced), as in `generate`
                    out = native_loop.step_once(engine, state, last, observing(exit_n)) if on else None
                if out is None:
                    out = engine.decode_one_token(state, last, observing(exit_n))
                tokens = {b: out.argmax[b] if b in out.argmax else int(out.logits[b].argmax()) for b in last}
                steps.append(sorted((b, t, out.exit_layer[b]) for b, t in tokens.items()))
                guesses.append({b: out.guesses[b] for b in sorted(out.guesses)})
                last = tokens
        seen[on] = (steps, guesses, state, sum(made for made, _ in loop))
    (want, want_guess, want_state, none), (got, got_guess, got_state, calls) = seen[False], seen[True]
    assert none == 0 and calls == 10
    assert got == want
    assert_same_state(want_state, got_state)
    for w, g, step in zip(want_guess, got_guess, got, strict=True):
        assert list(w) == list(g) == [b for b, _, _ in step]  # a guess for every sequence of the step
        for b in w:
            assert g[b][:2] == w[b][:2], (b, g[b], w[b])  # the exit and its token
            # max-probability: the two heads' logits differ by round-off (bf16 outputs: its rounding)
            assert g[b][2] == pytest.approx(w[b][2], abs=1e-5 if dtype == torch.float32 else 2e-2)
    guessed = {t for step in got_guess for _, t, _ in step.values()}
    assert guessed <= (set(DRAFT_VOCAB) if vocab == "draft" else set(range(90)))

"""A self-speculative round's drafts in one native call (`Passes.native_drafts`, `ee_drafts`):
the decode steps that draft from a norm-only exit onto its draft vocabulary, run without
returning to Python between them, give the same drafts, confidences, K/V, pending rows and fill
counts as those steps one by one (the same native calls, so bit for bit in fp32 and bf16), for
one sequence and for several side by side (`Passes.native_drafts_of`);
the controller's early stop is asked after each draft, or applied in the loop from its numbers;
and where they cannot run there, nothing
is done and the draft loop runs the steps itself. Self-speculation with them stays equal to
full greedy decoding (fp32).
"""

import pytest
import torch

from megatron.early_exit.inference import EarlyExitEngine, ExitPolicy, GenerationSettings, native
from megatron.early_exit.inference.passes import Passes
from megatron.early_exit.inference.strategies import self_speculative

needs_native = pytest.mark.skipif(not native.available(), reason="no native kernel here (no C compiler)")

PROMPTS = [[5, 17, 33, 2, 9, 41, 7], [11, 3, 60, 25, 8]]
DRAFT_VOCAB = list(range(0, 96, 2)) + [1, 3, 7, 11]  # some odd tokens too: ids not a plain stride


def build(dtype, block: bool = False):
    """4 layers (head dim 16: the kernels' vector paths), norm-only exits at 1 and 2 on untied heads
    (or, with `block`, a transformer block in each), a draft vocabulary in its calibration record."""
    from megatron.early_exit.config import ModelConfig
    from megatron.early_exit.model import EarlyExitGPT

    cfg = ModelConfig(
        num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
        vocab_size=96, max_position_embeddings=512, normalization="RMSNorm", swiglu=True,
        position_embedding_type="rope", add_bias_linear=False, exit_layer_nums=[1, 2], use_exit_norm=True,
        untie_exit_output_weights=True, use_exit_block=block,
    )  # fmt: skip
    model = EarlyExitGPT(cfg)
    model.init_weights(11)
    model.calibrated_thresholds = {"thresholds": {1: 1.0, 2: 1.0}, "draft_vocabulary": {"tokens": DRAFT_VOCAB}}
    return model.to(dtype).eval()


def mixed_norm():
    """A bf16 model whose exit 1 norm's gain stayed fp32 (`ee_drafts` reads the gain in the rows' dtype)."""
    model = build(torch.bfloat16)
    norm = model.exits["1"].norm
    norm.weight = torch.nn.Parameter(norm.weight.detach().float())
    return model


def prefilled(engine, capacity: int = 32):
    state = engine.new_state(len(PROMPTS), capacity)
    engine.prefill(state, dict(enumerate(PROMPTS)))
    return state


def stepped_drafts(engine, state, b: int, token: int, n: int, cap: int) -> tuple[list[int], list[float]]:
    """The drafts as the draft loop's decode steps make them, one step at a time."""
    tokens, confs = [], []
    for _ in range(cap):
        out = engine.decode_one_token(state, {b: token}, ExitPolicy(force=n))
        token = out.argmax[b]
        tokens.append(token)
        confs.append(out.confidence[b])
    return tokens, confs


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("b", [0, 1])  # the batch's first or second cache slot
@pytest.mark.parametrize("feed_last", [False, True])
def test_native_drafts_equal_the_draft_steps_bit_for_bit(dtype, n, b, feed_last):
    """Five drafts; with `feed_last` the last one fed below the exit in the same call, and the
    verify pass then feeds nothing (it starts where the drafts' rows are pending) against the
    steps' verify feeding it: the same K/V, pending rows, fill counts and verify logits."""
    model = build(dtype)
    engine = EarlyExitEngine(model, linear_kernel="native")
    assert engine.passes.draft_vocab is not None
    steps, native_state = prefilled(engine), prefilled(engine)
    with engine.packed:
        want = stepped_drafts(engine, steps, b, 4, n, 5)
        got = engine.passes.native_drafts(native_state, b, 4, n, 5, feed_last=feed_last)
        assert got is not None and got[0] == want[0] and got[1] == want[1]  # the same floats
        assert set(got[0]) <= set(DRAFT_VOCAB) and all(0.0 < c <= 1.0 for c in got[1])
        fed = [len(PROMPTS[0]) + 5 * (b == 0), len(PROMPTS[1]) + 5 * (b == 1)]
        fed[b] += feed_last
        assert native_state.fed == fed
        if not feed_last:
            assert steps.fed == fed and (native_state.cache.filled == steps.cache.filled).all()
            assert torch.equal(native_state.cache.k, steps.cache.k) and torch.equal(native_state.cache.v, steps.cache.v)
            assert torch.equal(native_state.pending, steps.pending)  # the exit's hidden states: the verify's input
        # the verify pass that follows gives the same logits, K/V and fill counts either way
        want_out = engine.verify(steps, {b: [got[0][-1]]})
        got_out = engine.verify(native_state, {b: []} if feed_last else {b: [got[0][-1]]})
    assert len(got_out.all_logits[b]) == len(want_out.all_logits[b]) == 6
    for x, y in zip(want_out.all_logits[b], got_out.all_logits[b]):
        assert torch.equal(x, y)
    assert got_out.all_tokens[b] == want_out.all_tokens[b] and native_state.fed == steps.fed
    assert (native_state.cache.filled == steps.cache.filled).all()
    assert torch.equal(native_state.cache.k, steps.cache.k) and torch.equal(native_state.cache.v, steps.cache.v)


@needs_native
def test_drafts_across_the_end_of_the_rotary_tables_read_the_angles_of_their_positions():
    """The rotary tables are made for positions below a power of two (256 first) and again larger
    where a pass reaches past them: drafts at positions 251-255 and the last one fed at 256 give the
    steps' K/V, not angles read past a table's end."""
    engine = EarlyExitEngine(build(torch.float32), linear_kernel="native")
    prompt = [(5 * j + 1) % 96 for j in range(251)]
    states = []
    for _ in range(2):
        state = engine.new_state(1, 270)
        engine.prefill(state, {0: prompt})
        states.append(state)
    engine.passes.rope_tables = None  # made again for the prefill's positions alone (< 256)
    engine.passes.rotary_tables(251)
    with engine.packed:
        got = engine.passes.native_drafts(states[0], 0, 4, 1, 5, feed_last=True)
        want = stepped_drafts(engine, states[1], 0, 4, 1, 5)
        engine.decode_one_token(states[1], {0: want[0][-1]}, ExitPolicy(force=1))  # the last draft fed, as feed_last
    assert got[0] == want[0] and states[0].fed == states[1].fed == [257]
    assert torch.equal(states[0].cache.k[:1], states[1].cache.k[:1])  # layer 0: what exit 1 reads below it
    assert torch.equal(states[0].pending[0, 251:257], states[1].pending[0, 251:257])


@needs_native
def test_the_early_stop_is_asked_after_each_draft_and_its_errors_come_through():
    engine = EarlyExitEngine(build(torch.float32), linear_kernel="native")
    asked = []
    state = prefilled(engine)
    with engine.packed:
        got = engine.passes.native_drafts(state, 0, 4, 1, 6, lambda j, c: asked.append((j, c)) or j < 2)
    assert len(got[0]) == 3 and [j for j, _ in asked] == [0, 1, 2]
    assert [c for _, c in asked] == pytest.approx(got[1], rel=1e-6)  # the C float, as Python reads it
    assert state.fed[0] == len(PROMPTS[0]) + 3 and (state.cache.filled[:1, 0] == len(PROMPTS[0]) + 3).all()

    def broken(j, c):
        raise KeyError("controller")

    with engine.packed, pytest.raises(KeyError, match="controller"):
        engine.passes.native_drafts(prefilled(engine), 0, 4, 1, 6, broken)


def keeps(stop: native.EarlyStop, confs: list[float]) -> bool:
    """Whether a sequence whose drafts have confidences `confs` drafts another under `stop`'s
    numbers: the rule `ee_drafts` applies, written out (the reference its loop is held to)."""
    bins, chance = len(stop.ok), 1.0
    for conf in confs:
        chance *= stop.ok[min(int(conf * bins), bins - 1)]
    return chance * stop.accept >= stop.bar


@needs_native
def test_the_early_stops_numbers_in_the_loop_stop_where_asking_would():
    """`native.EarlyStop` (the controller's rule applied inside `ee_drafts`, no call back into
    Python) stops each sequence's drafts after the same draft as asking `keeps` after each,
    at bars that stop them early, late and never; the same drafts, K/V and fill counts."""
    engine = EarlyExitEngine(build(torch.float32), linear_kernel="native")
    ok = [0.9, 0.7, 0.5, 0.45, 0.4, 0.35, 0.3, 0.25]  # this tiny model's confidences sit in the low bins
    made = []
    for bar in (0.75, 0.5, 0.3, 0.05, 0.0):
        stop = native.EarlyStop(bar, 0.8, ok)
        seen = {0: [], 1: []}

        def ask(b, j, c, stop=stop, seen=seen):
            seen[b].append(c)
            return keeps(stop, seen[b])

        states = [prefilled(engine), prefilled(engine)]
        with engine.packed:
            got = engine.passes.native_drafts_of(states[0], {0: 4, 1: 9}, 1, {0: 7, 1: 6}, stop, feed_last=True)
            want = engine.passes.native_drafts_of(states[1], {0: 4, 1: 9}, 1, {0: 7, 1: 6}, ask, feed_last=True)
        assert got == want and states[0].fed == states[1].fed
        assert (states[0].cache.filled == states[1].cache.filled).all()
        assert torch.equal(states[0].cache.k, states[1].cache.k)
        made.append([len(got[b][0]) for b in (0, 1)])
    assert made[-1] == [7, 6] and min(made[0]) == 1 and len({tuple(m) for m in made}) >= 3  # early, late, never


@needs_native
def test_where_they_cannot_run_in_one_call_nothing_is_done():
    model = build(torch.float32)
    cases = {
        "no draft vocabulary": EarlyExitEngine(model, linear_kernel="native", draft_vocabulary=False),
        "another kernel": EarlyExitEngine(model, linear_kernel="plain"),
        "a block in the exit": EarlyExitEngine(build(torch.float32, block=True), linear_kernel="native"),
        "an exit norm of another dtype": EarlyExitEngine(mixed_norm(), linear_kernel="native"),
    }
    for why, engine in cases.items():
        state = prefilled(engine)
        before = (list(state.fed), state.cache.filled.copy(), state.cache.k.clone())
        with engine.packed:
            assert engine.passes.native_drafts(state, 0, 4, 1, 4) is None, why
        assert state.fed == before[0] and (state.cache.filled == before[1]).all()
        assert torch.equal(state.cache.k, before[2])
    engine = EarlyExitEngine(model, linear_kernel="native")
    state = prefilled(engine)
    with engine.packed:
        engine.decode_one_token(state, {0: 4}, ExitPolicy(force=1))  # token 4's row pending above exit 1
        assert engine.passes.native_drafts(state, 0, 6, 2, 3) is None  # exit 2 is above rows still pending
        assert engine.passes.native_drafts(state, 0, 6, 1, 40) is None  # past the cache's capacity
        for switch, on in (("profile", True), ("native_drafting", False)):  # profiled steps; switched off
            setattr(engine.passes, switch, on)
            assert engine.passes.native_drafts(state, 0, 6, 1, 3) is None, switch
            setattr(engine.passes, switch, not on)
        assert engine.passes.native_drafts(state, 0, 6, 1, 3) is not None  # below exit 1 nothing is pending
    for module in (model.embedding, model.embedding.word_embeddings, next(model.decoder.layers.children())):
        hook = module.register_forward_hook(lambda *_: None)  # after the state's draft plan was made
        before = (list(state.fed), state.cache.filled.copy())
        with engine.packed:
            assert engine.passes.native_drafts(state, 0, 6, 1, 3) is None, type(module).__name__
        assert state.fed == before[0] and (state.cache.filled == before[1]).all()
        hook.remove()
    with engine.packed:
        assert engine.passes.native_drafts(state, 0, 6, 1, 3) is not None


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_self_speculation_drafts_in_one_call_and_equals_full_greedy(dtype, monkeypatch):
    """Batch 1: every draft phase runs in one native call (none falls back); the tokens equal
    full greedy decoding's in fp32, and in both dtypes equal those of the draft loop's own steps.
    (Each round's drafts through `native_drafts`: its verify pass apart, not `native_spec`'s.)"""
    monkeypatch.setattr(Passes, "native_spec", False)
    model = build(dtype)
    engine = EarlyExitEngine(model, linear_kernel="native")
    full = engine.generate(PROMPTS[:1], GenerationSettings(max_new_tokens=20, ignore_eos=True))[0].tokens
    made = []
    real = self_speculative.native_drafts

    def drafting(engine, state, running, last, caps, plan, ctl):  # a round that drafts (not a plain one)
        out = real(engine, state, running, last, caps, plan, ctl)
        if max(caps.values()) > 0 and plan.exit is not None:
            made.append(out)
        return out

    monkeypatch.setattr(self_speculative, "native_drafts", drafting)
    outs = {}
    for settings in (
        GenerationSettings("self_speculative", 20, ignore_eos=True),  # the controller's plans, early stop
        GenerationSettings("self_speculative", 20, ignore_eos=True, draft_exit_layer=1, num_draft_tokens=3),
    ):
        made.clear()
        outs[settings.num_draft_tokens] = engine.generate(PROMPTS[:1], settings)[0]
        assert made and all(m is not None for m in made)
    monkeypatch.setattr(self_speculative, "native_drafts", lambda *a: None)  # the draft loop's own steps
    loop = engine.generate(PROMPTS[:1], GenerationSettings("self_speculative", 20, ignore_eos=True, draft_exit_layer=1,
                                                           num_draft_tokens=3))[0]  # fmt: skip
    assert outs[3].tokens == loop.tokens and outs[3].stats["accepted"] == loop.stats["accepted"]
    if dtype == torch.float32:
        assert all(r.tokens == full for r in outs.values())


PROMPTS3 = [[5, 17, 33, 2, 9, 41, 7], [11, 3, 60, 25, 8], [40, 2, 2, 19, 77, 31, 6, 50, 12]]


def stepped_batch(engine, state, tokens: dict, n: int, caps: dict, stop: dict) -> dict:
    """The drafts of several sequences as the draft loop's decode steps make them: each step feeds
    every sequence still drafting together; sequence b stops after draft stop[b] (its early stop)."""
    last, budget, made = dict(tokens), dict(caps), {b: ([], []) for b in tokens}
    for j in range(max(caps.values())):
        feed = {b: last[b] for b in tokens if budget[b] > j}
        if not feed:
            break
        out = engine.decode_one_token(state, feed, ExitPolicy(force=n))
        for b in feed:
            last[b] = out.argmax[b]
            made[b][0].append(last[b])
            made[b][1].append(out.confidence[b])
            if j == stop.get(b):
                budget[b] = j + 1
    return made


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("feed_last", [False, True])
def test_drafts_of_several_sequences_in_one_call_equal_their_draft_steps(dtype, feed_last):
    """Three sequences at different positions (each row its own keys), caps 5 / 3 / 4 and sequence
    2 stopped after its second draft: each step's rows go together and shrink as sequences stop,
    with the steps' drafts, confidences, K/V, pending rows and fill counts; the verify pass that
    follows gives the same logits either way."""
    model = build(dtype)
    engine = EarlyExitEngine(model, linear_kernel="native")
    states = []
    for _ in range(2):
        state = engine.new_state(3, 32)
        engine.prefill(state, dict(enumerate(PROMPTS3)))
        states.append(state)
    steps, native_state = states
    tokens, caps, stop = {0: 4, 1: 9, 2: 30}, {0: 5, 1: 3, 2: 4}, {2: 1}
    asked = []

    def keep(b, j, c):
        asked.append((b, j))
        return j != stop.get(b)

    with engine.packed:
        want = stepped_batch(engine, steps, tokens, 1, caps, stop)
        got = engine.passes.native_drafts_of(native_state, tokens, 1, caps, keep, feed_last=feed_last)
        assert got is not None and set(got) == {0, 1, 2}
        for b in tokens:
            assert got[b][0] == want[b][0] and got[b][1] == want[b][1], b  # the same floats
        assert [len(got[b][0]) for b in range(3)] == [5, 3, 2]
        assert sorted(asked) == [(b, j) for b in range(3) for j in range(len(got[b][0]))]  # after every draft
        fed = [len(p) + len(got[b][0]) + feed_last for b, p in enumerate(PROMPTS3)]
        assert native_state.fed == fed
        if not feed_last:
            assert steps.fed == fed and (native_state.cache.filled == steps.cache.filled).all()
            assert torch.equal(native_state.cache.k, steps.cache.k) and torch.equal(native_state.cache.v, steps.cache.v)
            assert torch.equal(native_state.pending, steps.pending)
        want_out = engine.verify(steps, {b: [got[b][0][-1]] for b in tokens})
        got_out = engine.verify(native_state, {b: [] if feed_last else [got[b][0][-1]] for b in tokens})
    for b in tokens:
        assert len(got_out.all_logits[b]) == len(want_out.all_logits[b]) == len(got[b][0]) + 1
        for x, y in zip(want_out.all_logits[b], got_out.all_logits[b]):
            assert torch.equal(x, y)
    assert native_state.fed == steps.fed and (native_state.cache.filled == steps.cache.filled).all()
    real = slice(0, steps.cache.capacity)  # not the scratch position, where the steps' padded rows wrote
    assert torch.equal(native_state.cache.k[..., real, :], steps.cache.k[..., real, :])
    assert torch.equal(native_state.cache.v[..., real, :], steps.cache.v[..., real, :])


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_self_speculation_at_batch_three_drafts_in_one_call_and_equals_full_greedy(dtype, monkeypatch):
    """Batch 3 (prompts of 7, 5 and 9 tokens): every drafting round's drafts come from one native
    call; the tokens equal full greedy decoding's in fp32, and in both dtypes the draft loop's own.
    (Each round's drafts through `native_drafts`: its verify pass apart, not `native_spec`'s.)"""
    monkeypatch.setattr(Passes, "native_spec", False)
    model = build(dtype)
    engine = EarlyExitEngine(model, linear_kernel="native")
    settings = GenerationSettings("self_speculative", 16, ignore_eos=True, draft_exit_layer=1, num_draft_tokens=3)
    full = [r.tokens for r in engine.generate(PROMPTS3, GenerationSettings(max_new_tokens=16, ignore_eos=True))]
    made, real = [], self_speculative.native_drafts

    def drafting(engine, state, running, last, caps, plan, ctl):
        out = real(engine, state, running, last, caps, plan, ctl)
        if max(caps.values()) > 0:  # a round with tokens left to draft (at the end none are)
            made.append((len(running), out is not None))
        return out

    monkeypatch.setattr(self_speculative, "native_drafts", drafting)
    got = [r.tokens for r in engine.generate(PROMPTS3, settings)]
    assert made and all(ok for _, ok in made) and max(n for n, _ in made) == 3
    monkeypatch.setattr(self_speculative, "native_drafts", lambda *a: None)  # the draft loop's own steps
    loop = [r.tokens for r in engine.generate(PROMPTS3, settings)]
    assert got == loop
    if dtype == torch.float32:
        assert got == full


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 3])
def test_a_verify_pass_of_pending_rows_alone_equals_the_general_pass(dtype, batch, monkeypatch):
    """After drafts fed below their exit (`feed_last`), the verify pass feeds no token: its rows go
    straight from the pending rows through the layers above the exit and the final head
    (`Passes.verify_pending`), with the general pass's logits, tokens, K/V and fill counts (the
    engine with `fast` off takes the general pass)."""
    model = build(dtype)
    prompts = PROMPTS3[:batch]
    tokens, caps = dict(list({0: 4, 1: 9, 2: 30}.items())[:batch]), dict(list({0: 5, 1: 3, 2: 4}.items())[:batch])
    took = []
    outs, states = [], []
    for fast in (True, False):
        engine = EarlyExitEngine(model, linear_kernel="native")
        real = engine.passes.verify_pending
        monkeypatch.setattr(engine.passes, "verify_pending", lambda *a, real=real: took.append(real(*a)) or took[-1])
        state = engine.new_state(batch, 32)
        engine.prefill(state, dict(enumerate(prompts)))
        with engine.packed:
            made = engine.passes.native_drafts_of(state, tokens, 1, caps, feed_last=True)
            assert made is not None and all(len(made[b][0]) == caps[b] for b in tokens)
            engine.passes.fast = fast
            outs.append(engine.verify(state, {b: [] for b in tokens}))
        states.append(state)
    assert took == [True, False]  # the pending rows' own pass, then (fast off) none
    (got, want), (s_got, s_want) = outs, states
    for b in tokens:
        assert got.all_tokens[b] == want.all_tokens[b] and len(got.all_tokens[b]) == caps[b] + 1
        for x, y in zip(got.all_logits[b], want.all_logits[b], strict=True):
            assert torch.equal(x, y)
        assert torch.equal(got.logits[b], want.logits[b]) and got.argmax[b] == want.argmax[b]
        assert got.exit_layer[b] == want.exit_layer[b] == 4 and got.confidence[b] == want.confidence[b]
    assert s_got.fed == s_want.fed and (s_got.cache.filled == s_want.cache.filled).all()
    real = slice(0, s_want.cache.capacity)  # not the scratch position, where the general pass's padding wrote
    assert torch.equal(s_got.cache.k[..., real, :], s_want.cache.k[..., real, :])
    assert torch.equal(s_got.cache.v[..., real, :], s_want.cache.v[..., real, :])

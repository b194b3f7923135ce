"""The cost model's arithmetic on synthetic costs, its measurement on a tiny model, and the
default-measure rule (learned where the exits carry confidence probes, else max_prob)."""

import statistics
from dataclasses import replace

import pytest
import torch

from megatron.early_exit.config import ModelConfig
from megatron.early_exit.inference import EarlyExitEngine, GenerationSettings
from megatron.early_exit.inference import cost_model as cm
from megatron.early_exit.inference.passes import Rows
from megatron.early_exit.inference.server.schemas import EarlyExitOptions
from megatron.early_exit.inference.settings import GenerationResult
from megatron.early_exit.model import EarlyExitGPT

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def synthetic() -> cm.DecodeCosts:
    """10 layers, one exit after 4 of them; round numbers so each step's cost is checkable by hand."""
    return cm.DecodeCosts(
        num_layers=10, depth={4: 4}, layer=1.0, fixed=2.0, head=1.0,
        probe={4: 0.1}, vocab={4: 0.5}, project={4: 0.3}, row=0.05, pend=0.2,
    )  # fmt: skip


def test_fill_rows_counts_the_layers_pending_positions_catch_up():
    reached = []
    assert cm.fill_rows(reached, 4) == [0] * 4
    assert cm.fill_rows(reached, 10) == [0] * 4 + [1] * 6  # the exited position runs layers 4..9
    assert cm.fill_rows(reached, 4) == [0] * 4 and reached == [10, 10, 4]


def test_ideal_speedup_of_a_known_distribution():
    costs = synthetic()
    # The first token comes from the prefill; then exit 4, the final head, exit 4, exit 4.
    run = [GenerationResult(prompt_tokens=[1], exit_layers=[10, 4, 10, 4, 4])]
    # learned: a step leaving at 4 costs 2 + 4 + 0.1 + 0.3 = 6.4; the step that goes deep costs
    # 2 + 10 layers + 6 pending layers of one row, 0.2 each, + a non-firing probe 0.1 + the head 1 = 14.3.
    assert cm.predict(run, costs, [4], needs_vocab=False) == pytest.approx(3 * 6.4 + 14.3)
    # max_prob: every check costs the projection, 0.5, fired or not.
    assert cm.predict(run, costs, [4], needs_vocab=True) == pytest.approx(3 * 6.5 + 14.7)
    full = 4 * (2 + 10 + 1)
    assert cm.ideal_speedup([run], costs, [4], False) == pytest.approx(full / 33.5)
    assert cm.ideal_speedup([run], costs, [4], False, prefill_s=10.0) == pytest.approx((full + 10) / 43.5)
    assert cm.ideal_speedup([run], costs, [], True) == pytest.approx(full / cm.predict(run, costs, [], True))


def test_ideal_speedup_against_full_decodings_own_lengths_at_batch_2():
    costs = synthetic()
    # One batch of two sequences; early exit: every decode step leaves at 4 (6.4 each, as above),
    # the second sequence ends after 2 tokens, the first after 4: 3 steps, 6 tokens.
    run = [GenerationResult(prompt_tokens=[1], exit_layers=[10, 4, 4, 4]),
           GenerationResult(prompt_tokens=[2], exit_layers=[10, 4])]  # fmt: skip
    # Full decoding of the same prompts ended both sequences after 3 tokens: 2 steps of 13, 6 tokens.
    full = [GenerationResult(prompt_tokens=[1], exit_layers=[10] * 3),
            GenerationResult(prompt_tokens=[2], exit_layers=[10] * 3)]  # fmt: skip
    assert cm.ideal_speedup([run], costs, [4], False, full=[full]) == pytest.approx((6 / 19.2) / (6 / 26))
    # Against the run's own lengths decoded in full (3 steps of 13, the last two for one row):
    assert cm.ideal_speedup([run], costs, [4], False) == pytest.approx(39 / 19.2)


def test_explain_prices_each_timed_step_by_its_kind():
    costs = synthetic()
    run = [GenerationResult(prompt_tokens=[1], exit_layers=[10, 4, 10, 4, 4])]
    steps = cm.predicted_steps(run, costs, [4], needs_vocab=False)
    assert steps == [("exit 4", pytest.approx(6.4)), ("full depth + fill", pytest.approx(14.3)),
                     ("exit 4", pytest.approx(6.4)), ("exit 4", pytest.approx(6.4))]  # fmt: skip
    kinds = cm.explain([(run, [7.0, 15.0, 6.0, 6.5])], costs, [4], False)
    assert set(kinds) == {"exit 4", "full depth + fill"}
    assert kinds["exit 4"].steps == 3 and kinds["exit 4"].measured == pytest.approx(19.5)
    assert kinds["exit 4"].predicted == pytest.approx(3 * 6.4)
    assert (kinds["full depth + fill"].measured, kinds["full depth + fill"].predicted) == (15.0, pytest.approx(14.3))
    with pytest.raises(ValueError, match="3 timed decode steps for 4"):
        cm.explain([(run, [1.0, 1.0, 1.0])], costs, [4], False)


def test_step_clock_times_each_decode_step_of_a_generate_call():
    model = EarlyExitGPT(ModelConfig(num_layers=2, hidden_size=16, num_attention_heads=2, vocab_size=32,
                                     max_position_embeddings=32, exit_layer_nums=[1]))  # fmt: skip
    model.init_weights(0)
    engine = EarlyExitEngine(model)
    with cm.StepClock(engine) as clock:
        res = engine.generate([[1, 2, 3]], GenerationSettings(max_new_tokens=5, ignore_eos=True))
    assert len(clock.seconds) == len(res[0].exit_layers) - 1 == 4 and min(clock.seconds) > 0
    assert "decode_one_token" not in vars(engine)  # the method again once the clock is left
    engine.generate([[1, 2, 3]], GenerationSettings(max_new_tokens=2))
    assert len(clock.seconds) == 4


def test_a_replayed_step_computes_the_same_step_each_time():
    """`fill_time` times one step again and again from a saved state: after a step whose tokens
    left at exit 1, a full step fills their pending rows, and every replay gives the same logits
    and fill counts as decoding it once from scratch."""
    import torch

    from megatron.early_exit.inference.passes import ExitPolicy

    model = EarlyExitGPT(ModelConfig(num_layers=3, hidden_size=16, num_attention_heads=2, vocab_size=32,
                                     max_position_embeddings=32, exit_layer_nums=[1]))  # fmt: skip
    model.init_weights(0)
    engine = EarlyExitEngine(model)
    prompts, leave, full = [[1, 2, 3], [4, 5]], ExitPolicy(threshold=0.0, allowed=(1,), mode="exact"), ExitPolicy()
    step = cm.replayed_step(engine, prompts, leave, full)
    once = engine.new_state(2, 8)
    engine.prefill(once, dict(enumerate(prompts)))
    assert set(engine.decode_one_token(once, {0: 1, 1: 1}, leave).exit_layer.values()) == {1}
    expected = engine.decode_one_token(once, {0: 1, 1: 1}, full)
    for _ in range(3):
        out = step()
        assert set(out.exit_layer.values()) == {3}
        for b in (0, 1):
            torch.testing.assert_close(out.logits[b], expected.logits[b], rtol=0, atol=0)
    assert all(t >= 0.0 for t in cm.fill_time(engine, prompts, leave, steps=2, repeats=1, rows=(1, 2)))


def test_several_pending_rows_cost_a_pending_layer_and_a_row_each_beyond_the_first():
    costs = synthetic()
    assert costs.fill([0, 0, 1, 2, 3]) == pytest.approx(3 * 0.2 + (0 + 1 + 2) * 0.05)
    # what a filling pass pays once (`pend_pass`), and nothing where no layer fills
    passing = replace(costs, pend_pass=0.7)
    assert passing.fill([0, 0, 1, 2, 3]) == pytest.approx(0.7 + 3 * 0.2 + 3 * 0.05)
    assert passing.fill([0, 0, 0]) == passing.fill([]) == 0.0
    # Two tokens leave at 4, then one goes deep: layers 4..9 each fill 2 pending rows, 0.2 + 0.05.
    run = [GenerationResult(prompt_tokens=[1], exit_layers=[10, 4, 4, 10])]
    assert cm.predict(run, costs, [4], needs_vocab=False) == pytest.approx(2 * 6.4 + 2 + 10 + 6 * 0.25 + 0.1 + 1)
    # In a batch, rows are padded to the longest: the other sequence's one pending row rides along.
    batch = [run[0], GenerationResult([1], exit_layers=[10, 10, 4, 10])]
    assert cm.predict(batch, costs, [4], False) == pytest.approx(
        (2 + 10 + 0.4 + 1) + 6.4 + (2 + 10 + 6 * 0.25 + 0.1 + 1)
    )
    # The native loop runs each sequence's own rows (no padding): 3 rows over the 2 sequences the
    # fill was timed at, 1.5 a sequence a layer; one row alone, half of one row per sequence
    loop = replace(costs, padded=False, batch=2)
    assert cm.predict(batch, loop, [4], False) == pytest.approx(
        (2 + 10 + 0.4 + 1) + 6.4 + (2 + 10 + 6 * (0.2 + 0.5 * 0.05) + 0.1 + 1)
    )
    assert loop.fill_layer(0.5) == pytest.approx(0.5 * 0.2)


def test_a_batch_step_costs_its_deepest_sequence():
    costs = synthetic()
    # Step 1: one sequence leaves at 4, the other goes on: 10 layers, one check that fires, the head.
    batch = [GenerationResult([1], exit_layers=[10, 4]), GenerationResult([1], exit_layers=[10, 10])]
    assert cm.predict(batch, costs, [4], False) == pytest.approx(2 + 10 + 0.4 + 1)
    # Every sequence gone at 4: no head, no deeper layers; a sequence that stopped drops out.
    batch = [GenerationResult([1], exit_layers=[10, 4, 4]), GenerationResult([1], exit_layers=[10, 4])]
    assert cm.predict(batch, costs, [4], False) == pytest.approx(2 * 6.4)
    assert cm.predicted_step(costs, "exit 4", True) == pytest.approx(6.5)
    assert cm.predicted_step(costs, "full", True) == pytest.approx(13.0)


def test_the_weight_cache_reads_from_memory_by_the_bytes_read_since():
    cache = cm.WeightCache(10)  # in the cache up to a stack distance of 5 bytes, from memory from 15
    assert cache.read("a", 4) == 1.0  # first read: from memory
    assert cache.read("b", 4) == 1.0
    assert cache.read("a", 4) == pytest.approx(0.3)  # b and a itself since a was read: 8 bytes
    assert cache.read("c", 4) == 1.0
    assert cache.read("b", 4) == pytest.approx(0.7)  # a, c and b itself: 12 bytes
    assert cache.read("b", 4) == 0.0  # read again at once: 4
    assert cache.read("c", 40) == 1.0  # b and c itself: 44 bytes
    off = cm.WeightCache(0)  # no regime modelled: every read from the cache
    assert not any(off.read(name, 1e9) for name in "aba")


def with_cache() -> cm.DecodeCosts:
    """`synthetic()` with weights: a layer reads 1 byte, the head 8, exit 4's own projection 2, in a
    cache of 12 bytes (reads from memory in part from a stack distance of 6 bytes, all from 18);
    from memory a layer costs 0.5 more, the head 1, the projection 0.2."""
    return replace(
        synthetic(), cache_bytes=12.0, cold={"layer": 0.5, "head": 1.0, "project/4": 0.2},
        reads={"layer": ("layer", 1.0), "head": ("final", 8.0), "project/4": ("exit4", 2.0)},
    )  # fmt: skip


def test_steps_pay_for_weights_the_cache_no_longer_holds():
    costs = with_cache()
    # Full decoding reads 10 layers and the head every step, 18 bytes: all of it from memory.
    assert cm.predicted_step(costs, "full", True) == pytest.approx(2 + 10 * 1.5 + 1 + 1)
    assert costs.streamed("layer") == 1.5 and costs.streamed("project/4") == pytest.approx(0.5)
    # Every token leaving at 4 reads 4 layers and the exit's projection, 6 bytes: all in the cache.
    assert cm.predicted_step(costs, "exit 4", False) == pytest.approx(6.4)
    # A run that mixes them, followed from the prefill (every layer, then the head, read):
    run = [GenerationResult(prompt_tokens=[1], exit_layers=[10, 4, 10, 4, 4])]
    step1 = 6.4 + 4 * 0.5 + 0.2  # layer 0 last read 18 bytes ago; the projection never read
    step2 = 14.3 + 6 * 0.5 + 1.0  # layers 0-3 and the projection since: 6 bytes (cache); layers 4-9 and the head: 20
    step3 = 6.4 + 4 * 0.5 + 0.2  # layers 4-9 and the head since: all of exit 4's reads from memory again
    step4 = 6.4  # right after step 3's own reads: all in the cache
    assert cm.predict(run, costs, [4], needs_vocab=False) == pytest.approx(step1 + step2 + step3 + step4)
    # Capacity 0: the regime is not modelled and every piece costs what it was timed at.
    assert cm.predict(run, replace(costs, cache_bytes=0.0), [4], False) == pytest.approx(3 * 6.4 + 14.3)
    # A smaller cache (8 bytes: in part from 4 bytes on): every token leaving at 4 now reads a
    # quarter of its layers and projection from memory (6 bytes of stack distance).
    assert cm.predicted_step(replace(costs, cache_bytes=8.0), "exit 4", False) == pytest.approx(
        6.4 + 0.25 * (4 * 0.5 + 0.2)
    )


def test_the_cache_size_comes_from_linux_or_the_environment(monkeypatch):
    monkeypatch.delenv("EE_CACHE_BYTES", raising=False)
    assert cm.last_level_cache_bytes(torch.device("meta")) == 0  # only a CPU's cache is modelled
    assert cm.last_level_cache_bytes(torch.device("cpu")) >= 0
    monkeypatch.setenv("EE_CACHE_BYTES", "4e6")
    assert cm.last_level_cache_bytes(torch.device("cpu")) == 4_000_000
    monkeypatch.setenv("EE_CACHE_BYTES", "lots")
    with pytest.raises(ValueError, match="EE_CACHE_BYTES='lots'"):
        cm.last_level_cache_bytes(torch.device("cpu"))


def test_fit_line_recovers_slope_and_intercept():
    assert cm.fit_line([(30, 3.5), (8, 1.3), (15, 2.0)]) == pytest.approx((0.1, 0.5))


def test_fit_layer_keeps_layers_and_the_fixed_cost_positive():
    assert cm.fit_layer([(12, 3.5), (3, 1.25), (6, 2.0)], 9.9) == pytest.approx((0.25, 0.5))
    # a negative intercept (host noise): the line through the origin
    layer, fixed = cm.fit_layer([(12, 2.4), (3, 0.3), (6, 0.9)], 9.9)
    assert fixed == 0.0 and layer == pytest.approx((12 * 2.4 + 3 * 0.3 + 6 * 0.9) / (144 + 9 + 36))
    # layers that come out free (a host slower while the shallow settings were timed): the layer
    # timed alone, the rest of full decoding's step fixed
    assert cm.fit_layer([(12, 1.0), (3, 2.0), (6, 3.0)], 0.05) == pytest.approx((0.05, 0.4))
    assert cm.fit_layer([(12, 1.0)], 0.05) == pytest.approx((0.05, 0.4))  # no exits


def tiny(probes: bool, **exits) -> EarlyExitGPT:
    cfg = ModelConfig(
        num_layers=4, hidden_size=32, num_attention_heads=4, vocab_size=64, max_position_embeddings=64,
        exit_layer_nums=[1, 2], use_exit_norm=True, use_exit_confidence_head=probes, **exits,
    )  # fmt: skip
    model = EarlyExitGPT(cfg)
    model.init_weights(0)
    return model.eval()


def test_measure_costs_on_a_tiny_model():
    engine = EarlyExitEngine(tiny(probes=True))
    costs, measured = cm.measure_costs(engine, [[1, 2, 3], [4, 5, 6]], steps=2, repeats=1)
    assert set(measured) == {"full", "exit 1", "exit 2"}
    assert set(costs.probe) == set(costs.vocab) == set(costs.project) == {1, 2}
    assert costs.batch == 2 and costs.head > 0 and costs.layer_direct > 0 and costs.row >= 0
    # The fit goes through full decoding and the exits: its prediction is finite for each.
    assert all(abs(cm.predicted_step(costs, name, False)) < float("inf") for name in measured)


def test_a_check_in_a_step_is_timed_where_it_does_not_fire(monkeypatch):
    """`check_in_step` replays full-depth steps with every probe's check allowed at `NEVER`, under
    exact and cost_aware, and returns each mode's median difference per exit and its error; steps
    replayed with a check that fires are refused (what it times would then not be a check that does
    not fire), and a model without probes has nothing to time."""
    engine = EarlyExitEngine(tiny(probes=True))
    seen = []
    real = engine.decode_one_token
    monkeypatch.setattr(
        engine, "decode_one_token", lambda state, batch, policy: seen.append(policy) or real(state, batch, policy)
    )
    out = cm.check_in_step(engine, [[1, 2, 3], [4, 5, 6]], rounds=3)
    assert out.keys() == {"exact", "cost_aware"}
    assert all(abs(t) < 1.0 and e >= 0.0 for t, e in out.values())
    timed = [q for q in seen if q.allowed]
    assert {(q.allowed, q.threshold, q.measure, q.mode) for q in timed} == {
        ((1, 2), cm.NEVER, "learned", "exact"),
        ((1, 2), cm.NEVER, "learned", "cost_aware"),
    }
    assert len(timed) == 2 * (8 + 3)  # warm-up and rounds, each mode
    monkeypatch.setattr(cm, "NEVER", 0.0)  # every check fires
    with pytest.raises(RuntimeError, match="a learned check fired"):
        cm.check_in_step(engine, [[1, 2, 3]], rounds=1)
    assert cm.check_in_step(EarlyExitEngine(tiny(probes=False)), [[1, 2, 3]], rounds=1) == {}


@pytest.mark.parametrize("cached", [False, True])
def test_the_fit_prices_each_timed_setting_in_its_own_cache_regime(monkeypatch, cached):
    """With a cache of 2.4 of the tiny model's layers (~60 KB: a step leaving at exit 1 reads one
    layer and the head, ~33 KB, mostly from the cache; full decoding ~108 KB, all from memory),
    reading weights from memory is timed (a cost per byte, `memory_time`), each piece pays it for
    its bytes, and the fit subtracts each setting's regime; a least-squares line with an intercept
    leaves residuals that sum to zero, so the settings' predictions, regime included, sum to their
    measured times."""
    engine = EarlyExitEngine(tiny(probes=True))
    layer_bytes = sum(w.numel() * 4 for w in engine.model.decoder.layers["0"].parameters())
    cache_bytes = int(2.4 * layer_bytes) if cached else 0
    monkeypatch.setenv("EE_CACHE_BYTES", str(cache_bytes))
    costs, measured = cm.measure_costs(engine, [[1, 2, 3], [4, 5, 6]], steps=2, repeats=1)
    assert costs.cache_bytes == float(cache_bytes)
    assert set(costs.reads) == {"layer", "head", "project/1", "project/2"}
    assert costs.reads["layer"][1] == layer_bytes
    assert set(costs.cold) == (set(costs.reads) if cached else set())
    assert all(t >= 0 for t in costs.cold.values())
    if costs.cold:  # one cost per byte for every piece
        per_byte = {round(costs.cold[k] / size, 15) for k, (_, size) in costs.reads.items()}
        assert len(per_byte) == 1
    predicted = sum(cm.predicted_step(costs, name, False) for name in measured)
    # (where host noise made the fit fall back, `fit_layer`: a line through the origin, fixed 0, or
    # the layer timed alone, there is no such identity)
    if costs.fixed > 0 and costs.layer != costs.layer_direct:
        assert predicted == pytest.approx(sum(measured.values()), rel=1e-9)


def test_best_times_can_time_a_function_right_after_a_call_of_its_own():
    """`warm` functions run once more right before each timed call (the pieces: with their weights
    in the cache, not as the function before them left it); the others once a round."""
    calls, ticks = [], iter(range(1000))
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    best = cm.best_times(fns, torch.device("cpu"), repeats=2, clock=lambda: float(next(ticks)), warm=("b",))
    assert calls == ["a", "b"] + ["a", "b", "b"] * 2  # warm-up, then per round: a timed, b untimed + timed
    assert best == {"a": 1.0, "b": 1.0}  # each timed call spans one tick: the untimed call is outside it


def test_the_memory_timing_runs_its_reference_before_and_after_its_rounds(monkeypatch):
    """`memory_time` pairs a step after itself with the same step after a full-depth one; the
    host-speed reference (a full-depth step of another state) runs before the rounds and after
    them, never between: run after every round, it made the steps it was meant to leave alone
    read a third to a half of their difference. The result is the median difference."""
    calls, now = [], [0.0]
    policy = cm.ExitPolicy(threshold=0.0, allowed=(1,))

    def replayed(engine, prompts, first, then, times=1):
        name = "step" if then is policy else "deep"

        def run():  # a step right after a full-depth one takes 4, after anything else 1; full depth 5
            now[0] += 5.0 if name == "deep" else 4.0 if calls and calls[-1] == "deep" else 1.0
            calls.append(name)

        return run

    monkeypatch.setattr(cm, "replayed_step", replayed)
    monkeypatch.setattr(cm, "tick", lambda device: now[0])
    engine = type("Engine", (), {"device": torch.device("cpu")})()
    seconds = cm.memory_time(engine, [[1]], policy, steps=2, repeats=2, reference=lambda: calls.append("ref"))
    assert seconds == 3.0  # 4 after a full-depth step against 1 after itself
    assert calls[:3] == ["step", "deep", "ref"] and calls[-1] == "ref"  # warm-up, the reference, ..., the reference
    assert calls[3:-1] == ["step", "step", "deep", "step"] * 4  # 4 rounds, no reference between them


def test_every_measurement_is_put_at_one_host_speed(monkeypatch):
    """Each measurement of `measure_costs` runs the same full-depth step (`ReferenceStep`) in its
    own rounds, and its times are divided by that step's median time there over its median time in
    `step_times`: a host running the pieces at half speed, the memory timing at a third and the
    pending rows at a quarter and the checks in a step at a fifth (what they read scaled up, and the
    reference's times with them) gives the pieces, the cost per byte, the pending costs and the
    checks' cost in a step as timed at `step_times`' speed."""
    engine = EarlyExitEngine(tiny(probes=True))
    layer_bytes = sum(w.numel() * 4 for w in engine.model.decoder.layers["0"].parameters())
    monkeypatch.setenv("EE_CACHE_BYTES", str(int(2.4 * layer_bytes)))  # a regime to time
    names = ("piece_times", "memory_time", "fill_time", "check_in_step")
    kinds = {"piece_times": "pieces", "memory_time": "memory", "fill_time": "fill", "check_in_step": "checks"}
    real, seen, refs = {n: getattr(cm, n) for n in names}, {}, []
    real_ref = cm.ReferenceStep

    class Ref(real_ref):  # the measure's ReferenceStep, kept to read its times
        def __init__(self, *args):
            super().__init__(*args)
            refs.append(self)

    def slowed(name, factor):
        def run(*args, **kwargs):
            out = seen[name] = real[name](*args, **kwargs)
            seen.setdefault(f"{name} calls", []).append(out)
            times = refs[0].times[kinds[name]]
            times[:] = [factor * t for t in times]
            if name == "piece_times":
                return {k: factor * t for k, t in out.items()}
            if name == "check_in_step":
                return {k: (factor * t, factor * e) for k, (t, e) in out.items()}
            return [factor * t for t in out] if name == "fill_time" else factor * out

        return run

    monkeypatch.setattr(cm, "ReferenceStep", Ref)
    for name, factor in zip(names, (2.0, 3.0, 4.0, 5.0)):
        monkeypatch.setattr(cm, name, slowed(name, factor))
    costs, measured = cm.measure_costs(engine, [[1, 2, 3], [4, 5, 6]], steps=2, repeats=1, check_rounds=2)
    times, median = refs[0].times, statistics.median
    assert set(measured) == {"full", "exit 1", "exit 2"}
    assert len(times["steps"]) == len(times["pieces"]) == 2 * (1 + 1)  # steps calls a round, a warm-up round
    assert times.keys() == {"steps", "pieces", "memory", "fill", "checks"}
    for name in ("pieces", "memory", "fill", "checks"):  # (each read as its factor, within these few tiny steps' noise)
        assert costs.host[name] == pytest.approx(median(times[name]) / median(times["steps"]), rel=1e-12)
    pieces, speed = seen["piece_times"], costs.host["pieces"]
    assert costs.head == pytest.approx(2.0 * pieces["head"] / speed, rel=1e-12)
    assert costs.probe[1] == pytest.approx(2.0 * pieces["probe/1"] / speed, rel=1e-12)
    checks = seen["check_in_step"]
    assert costs.check_step.keys() == checks.keys() == {"exact", "cost_aware"}
    for mode, (t, e) in checks.items():
        assert costs.check_step[mode] == pytest.approx(5.0 * t / costs.host["checks"], rel=1e-12)
        assert costs.check_step_error[mode] == pytest.approx(5.0 * e / costs.host["checks"], rel=1e-12)
    # a fill behind each exit (one pending row in the layers above it), read at a quarter speed: the
    # line through them gives a layer's and a filling pass's shares, or the first exit's per layer
    above = [4 - engine.passes.depth(n) for n in (1, 2)]
    ones, speed = [4.0 * out[0] for out in seen["fill_time calls"]], costs.host["fill"]
    assert len(ones) == 2
    slope, intercept = cm.fit_line(list(zip(above, ones)))
    if slope <= 0 or intercept < 0 or intercept > ones[0]:
        assert (costs.pend, costs.pend_pass) == (pytest.approx(ones[0] / speed / above[0], rel=1e-12), 0.0)
    else:
        assert costs.pend == pytest.approx(slope / speed, rel=1e-12)
        assert costs.pend_pass == pytest.approx(intercept / speed, rel=1e-12)
    if costs.cold:  # the cost per byte: the memory timing over its speed
        per_byte = {costs.cold[k] / size for k, (_, size) in costs.reads.items()}
        assert max(per_byte) == pytest.approx(min(per_byte), rel=1e-12)


@pytest.mark.parametrize("probe_input", ["backbone", "exit"])
def test_exits_with_a_block_of_their_own_are_timed_on_their_newest_position(probe_input):
    """A block exit's pieces run its block over each sequence's newest position, over the K/V of
    the ones before it (as when it fires a token after it last did), not over zero positions
    (every call after the first would find its cache full) nor over the whole prompt again."""
    engine = EarlyExitEngine(tiny(True, use_exit_block=True, exit_confidence_input=probe_input))
    prompts = [[1, 2, 3, 4, 5], [6, 7, 8]]
    costs, measured = cm.measure_costs(engine, prompts, steps=2, repeats=1)
    assert set(measured) == {"full", "exit 1", "exit 2"} and set(costs.vocab) == set(costs.probe) == {1, 2}
    assert set(costs.fire_hidden) == ({1, 2} if probe_input == "backbone" else set())  # else the probe pays it
    p = engine.passes
    state = engine.new_state(2, 8)
    engine.prefill(state, dict(enumerate(prompts)))
    rows = Rows([0, 1], [5, 3], [1, 1], torch.zeros(2, 1, 32))  # a block exit reads its recorded inputs alone
    for n in (1, 2):
        head = p.model.exits[str(n)]
        whole = p.exit_hidden(state, n, head, rows, [0, 1])  # the block over every prompt position
        newest = cm.newest_row(p, state, n)(lambda n=n, h=head: p.exit_hidden(state, n, h, rows, [0, 1]))
        for _ in range(2):  # timed again and again: one position each time
            # fp32; the newest position attends over cached K/V instead of in-pass ones: same sums, reordered
            torch.testing.assert_close(newest(), whole, rtol=1e-5, atol=1e-5)
            assert list(state.exit_cache.filled[p.block_slots[n], :2]) == [5, 3]


@pytest.mark.parametrize("probes, want", [(True, "learned"), (False, "max_prob")])
def test_default_measure_follows_the_probes(probes, want):
    engine = EarlyExitEngine(tiny(probes))
    assert engine.check(GenerationSettings(strategy="early_exit"), [[1, 2]]).measure == want
    for explicit in ("max_prob", "entropy"):  # an explicit measure always wins
        assert engine.check(GenerationSettings(strategy="early_exit", measure=explicit), [[1, 2]]).measure == explicit


def test_default_measure_in_generate_and_the_server():
    engine = EarlyExitEngine(tiny(probes=True))
    res = engine.generate([[1, 2, 3]], GenerationSettings(strategy="early_exit", early_exit_threshold=0.0))
    assert res[0].exit_layers[1:] == [1] * (len(res[0].exit_layers) - 1)  # learned at 0.0 fires at the first exit
    assert EarlyExitOptions().measure is None  # the server leaves the choice to the engine
    assert EarlyExitOptions(measure="max_prob").measure == "max_prob"


def test_regrouping_simulation_prices_passes_by_the_rows_they_run():
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "regrouping.py")
    spec = importlib.util.spec_from_file_location("regrouping", path)
    sim = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sim)
    # Every token leaves after 1 of 3 layers: a pass of 2 rows runs 1 layer, a + 2b, for 2 tokens.
    assert sim.simulate([1, 3], [1.0, 0.0], 2, 5, 0.25) == pytest.approx(1.5 / 2)
    assert sim.simulate([1, 3], [0.0, 1.0], 2, 5, 0.25) == pytest.approx(3 * 1.5 / 2)  # every token deep
    # Half the tokens go deep: parking the deep row where the other leaves (a rule no pass of 2
    # rows satisfies, until it has waited 9 passes) makes the batch slower than lock step.
    mixed = [sim.simulate([1, 3], [0.5, 0.5], 2, 40, 0.0, rule, seed=3) for rule in (None, (3, 9))]
    assert mixed[1] > mixed[0]  # parked rows wait, the batch ends with its slowest sequence


def test_rounds_are_priced_in_cpu_seconds_on_one_thread_and_by_the_wall_clock_on_more():
    import time

    import torch

    cpu, threads = torch.device("cpu"), torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert cm.work_clock(cpu) is time.process_time  # robust to a shared machine
        torch.set_num_threads(2)
        assert cm.work_clock(cpu) is time.perf_counter  # CPU time would count the threads' spinning
    finally:
        torch.set_num_threads(threads)
    assert cm.cpu_clock(cpu) is time.process_time


def test_pending_costs_split_a_fill_into_its_layers_and_its_pass(monkeypatch):
    """A fill behind each exit of a 4-layer model (exits 1 and 2: 3 and 2 layers above) priced
    a + b x layers gives b per layer and a once per filling pass; where the line makes a pass cost
    less than nothing (noise), the first exit's seconds per layer, no pass term."""
    engine = EarlyExitEngine(tiny(probes=True))
    policies = {n: engine.check(s, [[1, 2, 3]]) for n, s in cm.exit_settings(engine, None).items() if n != "full"}
    policies = {int(k.split()[1]): v for k, v in policies.items()}
    depth = {n: engine.passes.depth(n) for n in (1, 2)}

    class Ref:
        def timed(self, name, calls=1):
            return lambda: None

        def speed(self, name):
            return 2.0  # the host at half speed while filling: every figure divided by 2

    def fake(per_pass, per_layer, per_row):
        def fill_time(engine, prompts, policy, steps, repeats, rows, reference=None):
            n = next(k for k, v in policies.items() if v is policy)
            above = 4 - depth[n]
            return [per_pass + per_layer * above + (k - 1) * per_row * above for k in rows]

        return fill_time

    monkeypatch.setattr(cm, "fill_time", fake(0.6, 0.2, 0.05))
    pend, pend_pass, row, table = cm.pending_costs(engine, [[1, 2, 3]], policies, 2, 1, 4, Ref())
    assert (pend, pend_pass, row) == (pytest.approx(0.1), pytest.approx(0.3), pytest.approx(0.025))
    # a layer's seconds at each timed row count, the pass's share out: on the line here
    assert [k for k, _ in table] == [1, 5, *cm.FILL_ROWS]
    assert [t for _, t in table] == [pytest.approx(0.1 + (k - 1) * 0.025) for k, _ in table]
    monkeypatch.setattr(cm, "fill_time", fake(-0.3, 0.4, 0.05))  # a line below zero at no layer: noise
    pend, pend_pass, *_ = cm.pending_costs(engine, [[1, 2, 3]], policies, 2, 1, 4, Ref())
    above = 4 - depth[1]
    assert (pend, pend_pass) == (pytest.approx((-0.3 + 0.4 * above) / above / 2), 0.0)


def test_retime_prices_a_row_at_the_hosts_speed_then(monkeypatch):
    """`retime` takes the step timings again with the reference step in their rounds: a host now
    running that step 2x as slow as when the pieces were timed scales every piece 2x, and the
    layer and fixed cost are fitted again from the new steps (here a host that slowed the layers
    3x and the fixed cost 1.5x: the line through the settings' steps recovers both exactly)."""
    engine = EarlyExitEngine(tiny(probes=True))
    prompts = [[1, 2, 3], [4, 5, 6]]
    costs, _ = cm.measure_costs(engine, prompts, steps=2, repeats=1)
    assert costs.reference > 0
    slow = replace(cm.scaled(costs, 2.0), layer=3 * costs.layer_direct, fixed=1.5e-3)

    class Ref:
        def __init__(self, engine, prompts):
            self.times = {}

        def timed(self, name, calls=1):
            return lambda: self.times.setdefault(name, []).append(2.0 * costs.reference)

    def step_times(engine, prompts, settings, steps, repeats, reference):
        reference()
        assert set(settings) == {"full", "exit 1", "exit 2"}
        return {name: cm.predicted_step(slow, name, False) for name in settings}  # probes: learned, no vocab

    monkeypatch.setattr(cm, "ReferenceStep", Ref)
    monkeypatch.setattr(cm, "step_times", step_times)
    now = cm.retime(engine, prompts, costs, steps=2, repeats=1)
    assert now.host["retimed"] == pytest.approx(2.0, rel=1e-12)
    assert now.reference == pytest.approx(2.0 * costs.reference, rel=1e-12)
    assert now.head == pytest.approx(2.0 * costs.head, rel=1e-12)
    assert now.probe[2] == pytest.approx(2.0 * costs.probe[2], rel=1e-12)
    assert now.pend == pytest.approx(2.0 * costs.pend, rel=1e-12)
    assert now.layer == pytest.approx(3 * costs.layer_direct, rel=1e-9)
    assert now.fixed == pytest.approx(1.5e-3, rel=1e-9)
    assert (costs.layer, costs.head) != (now.layer, now.head)  # the costs measured at the start are left as they were


def test_retime_with_a_pool_fits_through_the_medians_of_every_timing(monkeypatch):
    """With a `StepPool`, `retime` fits the layer and fixed cost through each setting's median over
    every timing pooled so far, each put at the base host speed and the median taken back to the
    speed now: three timings at host speeds 1, 2 and 1.5, one of them off by a third, price the
    row as the two that agree (the slope and intercept of the line they lie on, at 1.5x)."""
    engine = EarlyExitEngine(tiny(probes=True))
    prompts = [[1, 2, 3], [4, 5, 6]]
    costs, measured = cm.measure_costs(engine, prompts, steps=2, repeats=1)
    # the timed pieces none, not this host's: the fit subtracts them at the host's speed from steps
    # timed a third long, so the layer read off by a third of their spread between the steps (2e-3
    # relative on a loaded host, past the tolerance); without them the steps are the line's alone
    pieces = ("probe", "vocab", "project", "draft", "fire_hidden", "probe_exit", "check_step", "check_step_error")
    costs = replace(costs, head=0.0, **{k: dict.fromkeys(getattr(costs, k), 0.0) for k in pieces})
    line = replace(costs, layer=2e-3, fixed=1e-3)
    true = {name: cm.predicted_step(line, name, False) for name in measured}  # probes: learned, no vocab
    pool = cm.StepPool(true)  # the first timing, at the base speed
    speed = {"now": 2.0}

    class Ref:
        def __init__(self, engine, prompts):
            self.times = {}

        def timed(self, name, calls=1):
            return lambda: self.times.setdefault(name, []).append(speed["now"] * costs.reference)

    def step_times(engine, prompts, settings, steps, repeats, reference):
        reference()
        off = 4 / 3 if speed["now"] == 2.0 else 1.0  # the second timing: every step a third long
        return {name: speed["now"] * off * t for name, t in true.items()}

    monkeypatch.setattr(cm, "ReferenceStep", Ref)
    monkeypatch.setattr(cm, "step_times", step_times)
    alone = cm.retime(engine, prompts, costs, steps=2, repeats=1)
    # its own timing, off by a third: the line through its steps, a third long at 2x
    assert alone.layer == pytest.approx(2.0 * 4 / 3 * 2e-3, rel=1e-9)
    cm.retime(engine, prompts, costs, steps=2, repeats=1, pool=pool)  # median of two: halfway
    speed["now"] = 1.5
    now = cm.retime(engine, prompts, costs, steps=2, repeats=1, pool=pool)
    assert len(pool.rows) == 3
    assert now.host["retimed"] == pytest.approx(1.5, rel=1e-12)
    assert (now.layer, now.fixed) == (pytest.approx(1.5 * 2e-3, rel=1e-9), pytest.approx(1.5e-3, rel=1e-9))


def two_exits() -> cm.DecodeCosts:
    """10 layers, exits after 2 and 5; a layer reads 1 byte, the final head 8, each exit's projection 2;
    a cache of 30 bytes, held in full up to 15 (no cold pieces: every piece at its timed cost)."""
    return cm.DecodeCosts(
        cache_bytes=30.0,
        num_layers=10, depth={2: 2, 5: 5}, layer=9.9, fixed=9.9, head=1.0, probe={2: 0.1, 5: 0.1},
        vocab={2: 0.5, 5: 0.5}, project={2: 0.3, 5: 0.3}, layer_direct=0.7,
        reads={"layer": ("layer", 1.0), "head": ("final", 8.0), "project/2": ("p2", 2.0), "project/5": ("p5", 2.0)},
    )  # fmt: skip


@pytest.mark.parametrize("excess", [0.0, 0.3, 3.3])
def test_full_decodings_steps_above_the_exits_line_stream_their_reads_beyond_the_deepest_exits(excess):
    """Exit steps on a line (2 + 1 a layer, then the probe and the leavers' projection); full
    decoding's step `excess` above it. Within STREAM_EXCESS of its 15 (0.3: 2%) one line through
    all three; beyond it (3.3: 22%) the exits' line, and the excess spread over the full step's
    bytes beyond the exit-5 step's (18 - 7): each step pays for its own reads beyond 7 bytes."""
    measured = {"exit 2": 2 + 2 + 0.4, "exit 5": 2 + 5 + 0.4, "full": 2 + 10 + 1 + excess}
    costs = cm.fit_steps(two_exits(), measured, {2: False, 5: False})
    if excess < cm.STREAM_EXCESS * measured["full"]:
        assert costs.stream == 0.0 and costs.hot_bytes == 0.0
        assert (costs.layer, costs.fixed) == pytest.approx(
            cm.fit_line([(10, 12 + excess), (2, 4), (5, 7)]), rel=1e-9
        )  # fmt: skip
    else:
        assert (costs.layer, costs.fixed) == pytest.approx((1.0, 2.0), rel=1e-9)
        assert costs.hot_bytes == 7.0 and costs.stream == pytest.approx(3.3 / 11)
        for name in measured:  # the exits' line, and full decoding's own time
            assert cm.predicted_step(costs, name, False) == pytest.approx(measured[name], rel=1e-9)
        # a step leaving at 5 after a check at 2 that did not fire reads what the exit-5 step does:
        # nothing streams; a full step under max_prob reads both exits' projections too (22 bytes)
        assert costs.step([5], (2, 5), False) == pytest.approx(7.5)
        assert costs.step([10], (2, 5), True) == pytest.approx(2 + 10 + 1 + 0.5 + 0.5 + 3.3 / 11 * (22 - 7))
        assert cm.scaled(costs, 2.0).stream == pytest.approx(2 * costs.stream)  # seconds a byte: the host's speed


def test_a_deeper_exits_steps_that_stream_leave_the_line_to_the_shallower_exits():
    """Exits after 2, 4 and 7 of 10 layers (steps reading 4, 6 and 9 bytes; full decoding 18): the
    cache keeps 7.5 bytes from step to step, so the exit-7 step streams 1.5 of its bytes and full
    decoding 10.5, at 0.5 s a byte. The fit finds the line through exits 2 and 4, and 7.5 and 0.5
    from the two steps above it: every step priced at its time, where one line through the three
    exits (the only fit before) priced the exit-2 and exit-4 steps off."""
    costs = replace(
        two_exits(), depth={2: 2, 4: 4, 7: 7}, probe=dict.fromkeys((2, 4, 7), 0.1),
        vocab=dict.fromkeys((2, 4, 7), 0.5), project=dict.fromkeys((2, 4, 7), 0.3),
        reads={"layer": ("layer", 1.0), "head": ("final", 8.0), **{f"project/{n}": (f"p{n}", 2.0) for n in (2, 4, 7)}},
    )  # fmt: skip
    measured = {
        "exit 2": 2 + 2 + 0.4,
        "exit 4": 2 + 4 + 0.4,
        "exit 7": 2 + 7 + 0.4 + 0.5 * 1.5,
        "full": 13 + 0.5 * 10.5,
    }
    needs = {2: False, 4: False, 7: False}
    fit = cm.fit_steps(costs, measured, needs)
    assert (fit.layer, fit.fixed, fit.stream, fit.hot_bytes) == pytest.approx((1.0, 2.0, 0.5, 7.5), rel=1e-9)
    for name in measured:
        assert cm.predicted_step(fit, name, False) == pytest.approx(measured[name], rel=1e-9)
    rest = replace(costs, layer=0.0, fixed=0.0)
    point = {n: (costs.depth[n], measured[f"exit {n}"] - cm.predicted_step(rest, f"exit {n}", False)) for n in needs}
    full_read = costs.walk(*cm.setting_step(costs, "full"), True)[1]
    fits = cm.stream_fits(costs, rest, measured, needs, point, cm.exit_reads(costs, needs), full_read, 0.0)
    assert len(fits) == 2 and fits[0][0] < 1e-20 < fits[1][0]  # the line through 2 and 4; through all three
    one_line = fits[1][1]
    assert (
        one_line.hot_bytes == 9.0 and abs(cm.predicted_step(one_line, "exit 2", False) / measured["exit 2"] - 1) > 0.02
    )


def test_the_bytes_a_cache_keeps_stay_between_the_line_and_the_streaming_steps():
    """`stream_line`: one streaming step, the line's deepest step's bytes; two on a line through
    (8, 0) and (12, 2), 8 bytes; a line that would hold fewer bytes than the line's deepest step
    reads (or more than the first streaming step), those bytes, stream through the points."""
    assert cm.stream_line([(18.0, 2.2)], 7.0) == pytest.approx((0.2, 7.0))
    assert cm.stream_line([(10.0, 1.0), (12.0, 2.0)], 6.0) == pytest.approx((0.5, 8.0))
    stream, hot = cm.stream_line([(10.0, 4.0), (12.0, 5.0)], 9.0)  # the line's zero at 2: below 9
    assert hot == 9.0 and stream == pytest.approx((1 * 4 + 3 * 5) / (1 + 9))


def test_one_exit_no_weights_read_or_a_cache_that_holds_the_full_step_fit_one_line():
    """One exit gives no line of its own, a model whose reads are unknown no bytes, and a full step
    that reads no more than the cache holds in full (18 bytes of 36) or no cache regime (0 bytes:
    EE_CACHE_BYTES=0, a GPU) cannot stream: no `stream`."""
    one = replace(two_exits(), depth={2: 2})
    measured = {"exit 2": 4.4, "full": 20.0}
    assert cm.fit_steps(one, measured, {2: False}).stream == 0.0
    measured["exit 5"] = 7.4
    assert cm.fit_steps(two_exits(), measured, {2: False, 5: False}).stream > 0  # 18 bytes of 30
    assert cm.fit_steps(replace(two_exits(), reads={}), measured, {2: False, 5: False}).stream == 0.0
    assert cm.fit_steps(replace(two_exits(), cache_bytes=36.0), measured, {2: False, 5: False}).stream == 0.0
    assert cm.fit_steps(replace(two_exits(), cache_bytes=0.0), measured, {2: False, 5: False}).stream == 0.0


def test_a_line_may_start_below_zero_by_no_more_than_the_layers_the_cache_holds():
    """Steps that each read more than the cache holds, part of which it keeps for the next step,
    pay for fewer than their layers: a negative intercept stands where it is at most `held`
    layers (and the shallowest point's), else the line goes through the origin as before."""
    points = [(8, 1.4), (15, 3.0), (22, 4.5)]  # slope ~0.221, intercept ~-0.36: 1.6 layers
    layer, fixed = cm.fit_line(points)
    assert fixed < 0 and cm.fit_layer(points, 9.9, held=4.7) == pytest.approx((layer, fixed))
    through = sum(x * y for x, y in points) / sum(x * x for x, _ in points)
    assert cm.fit_layer(points, 9.9, held=1.0) == pytest.approx((through, 0.0))  # more than the cache holds
    assert cm.fit_layer(points, 9.9) == pytest.approx((through, 0.0))  # nothing held: as before
    deep = [(1, 0.01), (3, 0.9), (5, 1.9)]  # intercept -0.44: below the shallowest step's one layer
    assert cm.fit_layer(deep, 9.9, held=10.0)[1] == 0.0


def test_the_cache_holds_layers_only_between_steps_that_each_read_more_than_it():
    """`cache_held`: the exit-2 step reads 2 layers and its projection, 4 bytes. A cache of 3
    bytes holds 3 layers' worth between such steps, and the fit keeps the line's intercept of -1
    (every step priced at its time); a cache of 30 holds the exits' steps' reads (the intercept is
    noise: through the origin), none (0) no regime."""
    measured = {"exit 2": -1 + 2 + 0.4, "exit 5": -1 + 5 + 0.4, "full": -1 + 10 + 1}
    needs = {2: False, 5: False}
    small, none = replace(two_exits(), cache_bytes=3.0), replace(two_exits(), cache_bytes=0.0)
    assert cm.cache_held(small, cm.exit_reads(small, needs)) == pytest.approx(3.0)
    assert cm.cache_held(two_exits(), cm.exit_reads(two_exits(), needs)) == 0.0
    assert cm.cache_held(none, cm.exit_reads(none, needs)) == 0.0
    held = cm.fit_steps(replace(two_exits(), cache_bytes=3.0), measured, needs)
    assert (held.layer, held.fixed, held.stream) == pytest.approx((1.0, -1.0, 0.0), rel=1e-9)
    for name in measured:
        assert cm.predicted_step(held, name, False) == pytest.approx(measured[name], rel=1e-9)
    origin = cm.fit_steps(two_exits(), measured, needs)  # the exits' line (full decoding streams), at 0
    assert origin.fixed == 0.0 and origin.layer == pytest.approx((2 * 1 + 5 * 4) / (4 + 25)) and origin.stream > 0


def test_a_fill_of_many_rows_is_priced_from_the_timed_row_counts():
    """`DecodeCosts.fill_layer`: between timed row counts on their segment, past the last at the
    last segment's slope; a layer whose rows cost twice as much past 9 (products leaving a kernel's
    bucket) prices 33 rows at the table's 1.5, where the line through 1 and 5 said 0.9; no table:
    `pend` + (k - 1) `row`."""
    table = ((1, 0.1), (5, 0.2), (9, 0.3), (17, 0.7), (33, 1.5))
    costs = cm.DecodeCosts(4, {1: 1}, 1e-3, 0.0, 1e-3, pend=0.1, row=0.025, fill_rows=table)
    assert [costs.fill_layer(k) for k in (1, 3, 9, 13, 33, 41)] == [
        pytest.approx(x) for x in (0.1, 0.15, 0.3, 0.5, 1.5, 1.9)
    ]
    assert costs.fill((0, 33, 33)) == pytest.approx(2 * 1.5)  # two layers filling, no pass term here
    assert replace(costs, fill_rows=()).fill_layer(33) == pytest.approx(0.1 + 32 * 0.025)
    assert cm.scaled(costs, 2.0).fill_layer(13) == pytest.approx(1.0)


def test_a_steps_deeper_layers_are_priced_over_the_sequences_still_going():
    """`DecodeCosts.layers_over`: at batch 4, three sequences leaving at exit 2 of 10 layers and
    one going on: 2 layers over 4 sequences' rows, 8 over one's (`layer_rows`: a layer over 1 of
    the 4 at 0.4 of one over all); counts between the timed ones on their line; every sequence at
    one depth, or no table, every layer at the batch's rows. `layer_shares` keeps the shares rising
    and at most 1 (timing noise may not make fewer rows dearer)."""
    costs = cm.DecodeCosts(10, {2: 2}, 1.0, 0.0, 0.0, batch=4, layer_rows=((1, 0.4), (2, 0.6), (4, 1.0)))
    assert costs.layers_over([2, 2, 2, 10], 10) == pytest.approx(2 * 1.0 + 8 * 0.4)
    assert costs.layers_over([2, 2, 10, 10], 10) == pytest.approx(2 * 1.0 + 8 * 0.6)
    assert costs.layers_over([2, 10, 10, 10], 10) == pytest.approx(2 * 1.0 + 8 * 0.8)
    assert costs.layers_over([10] * 4, 10) == costs.layers_over([2] * 4, 10) * 5 == pytest.approx(10.0)
    assert replace(costs, layer_rows=()).layers_over([2, 2, 2, 10], 10) == pytest.approx(10.0)
    assert cm.predicted_step(costs, "full", True) == pytest.approx(10.0)
    pieces = {"layer/1": 0.5, "layer/2": 0.45, "layer/4": 1.0, "layer": 9.0}
    assert cm.layer_shares(pieces, 4) == ((1, 0.5), (2, 0.5), (4, 1.0))
    assert cm.layer_shares({"layer/1": 0.5}, 4) == ()

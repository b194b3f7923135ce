"""Strategies with rounds of their own (self_speculative) under the server's continuous batching:
greedy requests whose settings differ only in where each sequence stops share one round
(`scheduler.round_groups`), every sequence stops by its own settings, and the tokens stay full
greedy decoding's (fp32)."""

import threading

import pytest

from megatron.early_exit.config import ModelConfig
from megatron.early_exit.inference import EarlyExitEngine, GenerationSettings
from megatron.early_exit.inference.server import EngineDriver, Job, Scheduler
from megatron.early_exit.inference.server.scheduler import round_groups
from megatron.early_exit.inference.strategies.base import PER_SEQUENCE, round_key
from megatron.early_exit.model import EarlyExitGPT
from tests.test_dynamic_speculation import build
from tests.test_inference import naive_greedy

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread

PROMPTS = [[1, 2, 3], [4, 5, 6, 7], [9, 10], [11, 12, 13]]
NEW = 24


class Recording(EngineDriver):
    """The engine driver, recording each round's slots and whether they carried per-slot settings."""

    def __init__(self, engine) -> None:
        super().__init__(engine)
        self.rounds: list[tuple[list[int], bool]] = []

    def round(self, slots, results, settings, counts, slot_settings=None):
        self.rounds.append((list(slots), slot_settings is not None))
        return super().round(slots, results, settings, counts, slot_settings)


def first_new(tokens: list[int], start: int) -> int | None:
    """The first index >= start whose token did not occur before it (a stop token that stops
    there), or None where the sequence repeats what it had."""
    return next((i for i in range(start, len(tokens)) if tokens[i] not in tokens[:i]), None)


def spec(n: int, **kw) -> GenerationSettings:
    return GenerationSettings("self_speculative", n, **{"ignore_eos": True, **kw})


def random_model() -> EarlyExitGPT:
    """4 layers, exits at 1 and 2, random weights: its exits agree with the final head now and then."""
    model = EarlyExitGPT(ModelConfig(4, 32, 4, 64, 64, exit_layer_nums=[1, 2], use_exit_norm=True))
    model.init_weights(5)
    return model.eval()


@pytest.mark.parametrize("kind", ["random", "agree", "disagree"])
def test_self_speculative_requests_share_rounds_and_stay_lossless(kind):
    model = random_model() if kind == "random" else build(kind == "agree")
    engine = EarlyExitEngine(model)
    ref = [naive_greedy(model, p, NEW) for p in PROMPTS]
    stop_at = first_new(ref[1], 1)  # the random model's second answer changes token at 7
    assert (stop_at is not None) == (kind == "random")
    settings = [
        spec(NEW),
        spec(NEW, stop_token_ids=(ref[1][stop_at],) if stop_at else ()),  # stops early, by its own stop token
        spec(10, seed=7),  # a shorter request: its own length
        spec(NEW, prompt_lookup_max=3),  # a setting the round reads: a round of its own
    ]
    driver = Recording(engine)
    scheduler = Scheduler(driver, max_batch_size=4, capacity=64, max_queued=8)
    done, jobs = threading.Semaphore(0), []
    for p, s in zip(PROMPTS, settings):
        jobs.append(Job([p], s, engine.check(s, [p]), sink=lambda ev: ev.kind in ("done", "error") and done.release()))
    scheduler.submit(*jobs)  # queued together: admitted in one iteration
    scheduler.start()
    try:
        for _ in jobs:
            assert done.acquire(timeout=60)
    finally:
        scheduler.stop()
    got = [j.results[0] for j in jobs]
    assert got[0].tokens == ref[0] and got[3].tokens == ref[3]  # every kept token is the final head's (fp32)
    if stop_at:
        assert got[1].tokens == ref[1][: stop_at + 1] and got[1].finish_reason == "stop"
        assert got[1].stopped_by == ref[1][stop_at]
    else:
        assert got[1].tokens == ref[1] and got[1].finish_reason == "length"
    assert got[2].tokens == ref[2][:10] and got[2].finish_reason == "length"
    # slots 0-2 share rounds (per-slot settings passed along); slot 3 never shares one
    assert driver.rounds[0] == ([0, 1, 2], True) and ([3], False) in driver.rounds
    assert all(3 not in slots or slots == [3] for slots, _ in driver.rounds)
    assert all(set(slots) <= {0, 1, 2} for slots, per_slot in driver.rounds if per_slot)
    assert len(driver.rounds) < sum(len(r.tokens) for r in got)  # one call for several sequences a step
    for job in jobs:  # each job's own telemetry: its drafted / accepted counts
        drafted, accepted = job.counts[0][:2]
        assert 0 <= accepted <= drafted
        # its decoding's own rate: the tokens after the prefill's first over the seconds after it
        st, n = job.results[0].stats, len(job.results[0].tokens)
        assert job.started < job.prefilled < job.finished
        assert st["prefill_s"] == pytest.approx(job.prefilled - job.started)
        assert st["decode_tokens_per_sec"] == pytest.approx((n - 1) / (job.finished - job.prefilled))
        assert st["tokens_per_sec"] == pytest.approx(n / (job.finished - job.started))
    if kind == "agree":  # drafts taken: fewer shared rounds than tokens of the longest sequence
        assert jobs[0].counts[0][1] > 0
        assert sum(per_slot for _, per_slot in driver.rounds) < NEW - 1


def job(s: GenerationSettings) -> Job:
    return Job([[1]], s, None)


def test_round_groups_share_only_what_one_sequence_reads_alone():
    a, b = job(spec(8)), job(spec(16, stop_token_ids=(3,), seed=1, stop_strings=("x",), ignore_eos=False))
    c = job(spec(8, draft_exit_layer=1))  # the round's plan differs
    d = job(spec(8, num_draft_tokens=2))
    e = job(GenerationSettings("self_speculative", 8, temperature=0.7))  # sampled: a generator of its own
    f = job(GenerationSettings("self_speculative", 8, temperature=0.7))
    g = job(spec(32))
    groups = round_groups([a, b, c, d, e, f, g])
    assert [[id(j) for j in grp] for grp in groups] == [[id(a), id(b), id(g)], [id(c)], [id(d)], [id(e)], [id(f)]]
    assert round_key(a.settings) == round_key(g.settings) != round_key(c.settings)
    assert set(PER_SEQUENCE) == {"max_new_tokens", "seed", "stop_token_ids", "stop_strings", "ignore_eos"}


def test_the_server_times_round_costs_at_every_batch_bucket_before_serving(monkeypatch):
    """Continuous batching runs self-speculative rounds at every size up to the batch: their costs are
    timed at start-up (`EarlyExitEngine.draft_costs`), not in the first round of each size."""
    from megatron.early_exit.inference.strategies import self_speculative

    engine = EarlyExitEngine(build(True))
    assert engine.draft_costs(5) == []  # the suite prices from parameter counts: nothing to time
    monkeypatch.setenv("EE_EXIT_COSTS", "measured")
    timed = []
    real = self_speculative.measure_draft_costs
    spy = lambda e, b, c, **kw: timed.append(b) or real(e, b, c, **kw)  # noqa: E731
    monkeypatch.setattr(self_speculative, "measure_draft_costs", spy)
    assert engine.draft_costs(5) == [1, 8] and timed == [1, 8]  # the ends timed, the buckets between priced
    assert engine.draft_costs(5) == [1, 8] and timed == [1, 8]  # kept: timed once per engine
    costs = {b: self_speculative.draft_costs_for(engine, b, 64) for b in (1, 2, 4, 8)}
    assert timed == [1, 8]  # 2 and 4 held: no round stops to time them
    for n in costs[1].draft:  # on the line in log2(batch): 2 a third of the way, 4 two thirds
        for field in ("draft", "row", "base"):
            lo, mid, hi = (getattr(costs[b], field)[n] for b in (1, 4, 8))
            assert mid == pytest.approx(lo + 2 / 3 * (hi - lo), rel=1e-12, abs=1e-12)
            assert getattr(costs[2], field)[n] == pytest.approx(lo + 1 / 3 * (hi - lo), rel=1e-12, abs=1e-12)
    assert EarlyExitEngine(random_model()).draft_costs(1, context=16) == [1]

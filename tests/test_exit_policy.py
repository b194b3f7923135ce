"""Cost-aware exits (`exit_policy`): leave only where the pass's saving beats the leavers' later
recompute, skip exits whose chance of paying is below the check's cost; `exact` unchanged.

Costs are fixed (`passes.exit_decider = ExitDecider(costs)`) so that decisions do not depend on
this machine's clock; the expected tokens come from an uncached model (`model(ids).exit_logits`)
and the rule written out again here, not from the engine.
"""

import functools
from dataclasses import replace

import pytest
import torch

from megatron.early_exit.inference import EarlyExitEngine, ExitPolicy, GenerationSettings, native
from megatron.early_exit.inference.confidence import MEASURES, Measure, register_measure
from megatron.early_exit.inference.cost_model import DecodeCosts
from megatron.early_exit.inference.exit_decision import (
    CHEAP,
    REFRESH,
    ExitCosts,
    ExitDecider,
    measure_exit_costs,
    refresh_every,
)
from megatron.early_exit.inference.passes import Rows
from tests.test_inference import make

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread

PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15], [3]]
NEW = 8
# Memory-bound: a layer costs 1.0 for any few rows, a row 0.01, a recomputed row as much.
MEMORY_BOUND = ExitCosts(layer_fixed=1.0, layer_row=0.01, row=0.01, head=1.0, vocab=0.0, probe=0.0)
# Compute-bound: each row costs more than its later recompute, so any leaver pays.
COMPUTE_BOUND = ExitCosts(layer_fixed=0.0, layer_row=1.0, row=0.1, head=0.5, vocab=0.0, probe=0.0)


def engine_with(model, costs: ExitCosts) -> EarlyExitEngine:
    engine = EarlyExitEngine(model)
    engine.passes.exit_decider = ExitDecider(costs)
    return engine


def run(engine, prompts, **kw):
    s = GenerationSettings(strategy="early_exit", max_new_tokens=NEW, ignore_eos=True, **kw)
    out = engine.generate(prompts, s)
    return [r.tokens for r in out], [r.exit_layers for r in out]


@pytest.fixture(scope="module")
def model():
    return make("llama")


@pytest.fixture
def even_token():
    """A measure that fires for some rows and not others: confidence 1 where the exit's greedy
    token is not a multiple of 5 (on this model: some passes where all fire, some split)."""
    register_measure(Measure("not_fifth", from_logits=lambda logits: (logits.argmax(-1) % 5 != 0).float()))
    yield "not_fifth"
    MEASURES.pop("not_fifth")


@torch.no_grad()
def expected_all_or_nothing(model, prompts, exits, fires):
    """Greedy decoding where, at each exit in turn, the live sequences leave together if every one
    of them fires (`fires(logits [V]) -> bool`), else all go deeper; uncached model, no engine."""
    ids = [list(p) for p in prompts]
    tokens, layers = [[] for _ in prompts], [[] for _ in prompts]
    for step in range(NEW):
        outs = [model(torch.tensor([x])) for x in ids]
        heads = [(n, [o.exit_logits[n][0, -1] for o in outs]) for n in exits] if step else []  # prefill: no exits
        heads.append((model.config.num_layers, [o.logits[0, -1] for o in outs]))
        for n, logits in heads:
            if n == model.config.num_layers or all(fires(x) for x in logits):
                for b, x in enumerate(logits):
                    tokens[b].append(int(x.argmax()))
                    layers[b].append(n)
                    ids[b].append(tokens[b][-1])
                break
    return tokens, layers


def test_threshold_one_under_cost_aware_equals_full_decoding(model):
    engine = EarlyExitEngine(model)  # costs measured on this machine: the rule never runs at 1.0
    full = engine.generate(PROMPTS, GenerationSettings(strategy="full", max_new_tokens=NEW, ignore_eos=True))
    tokens, layers = run(engine, PROMPTS, early_exit_threshold=1.0, exit_policy="cost_aware")
    assert tokens == [r.tokens for r in full]
    assert layers == [[4] * NEW] * len(PROMPTS)


def test_batch_one_every_check_firing_equals_exact(model):
    """At batch 1 a pass that ends at the first exit saves its remaining layers: every leaver pays."""
    for prompt in PROMPTS:
        exact = run(engine_with(model, MEMORY_BOUND), [prompt], early_exit_threshold=0.0, exit_policy="exact")
        aware = run(engine_with(model, MEMORY_BOUND), [prompt], early_exit_threshold=0.0, exit_policy="cost_aware")
        assert aware == exact
        assert aware[1][0] == [4] + [1] * (NEW - 1)


def test_batch_four_memory_bound_lets_all_or_none_leave(model, even_token):
    exits = [2, 3]
    kw = dict(early_exit_threshold=0.5, measure=even_token, exit_layers=tuple(exits))
    tokens, layers = run(engine_with(model, MEMORY_BOUND), PROMPTS, exit_policy="cost_aware", **kw)
    want = expected_all_or_nothing(model, PROMPTS, exits, lambda x: int(x.argmax()) % 5 != 0)
    assert {2, 4} <= {x for seq in want[1] for x in seq}  # passes that ended at exit 2, and some that did not
    assert (tokens, layers) == want
    for step in range(NEW):  # every pass ended at one depth for every sequence
        assert len({layers[b][step] for b in range(len(PROMPTS))}) == 1
    # exact lets the firing rows leave alone: the test's measure does split the batch
    _, exact_layers = run(engine_with(model, MEMORY_BOUND), PROMPTS, exit_policy="exact", **kw)
    assert any(len({exact_layers[b][t] for b in range(len(PROMPTS))}) > 1 for t in range(NEW))


def test_compute_bound_lets_a_subset_leave_as_exact_does(model, even_token):
    """Where a row costs more than its later recompute, leaving pays for any subset: cost_aware = exact."""
    kw = dict(early_exit_threshold=0.5, measure=even_token, exit_layers=(2, 3))
    exact = run(engine_with(model, COMPUTE_BOUND), PROMPTS, exit_policy="exact", **kw)
    assert run(engine_with(model, COMPUTE_BOUND), PROMPTS, exit_policy="cost_aware", **kw) == exact


def test_exact_is_unchanged_by_costs(model):
    """`exact` evaluates every allowed exit for every row whatever the costs say."""
    kw = dict(early_exit_threshold=0.0, exit_layers=(2,), exit_policy="exact")
    costly = ExitCosts(1.0, 0.01, 100.0, 1.0, 1e9, 1e9)  # nothing would pay
    assert run(engine_with(model, costly), PROMPTS, **kw) == run(engine_with(model, MEMORY_BOUND), PROMPTS, **kw)
    assert run(engine_with(model, costly), PROMPTS, **kw)[1] == [[4] + [2] * (NEW - 1)] * len(PROMPTS)


def test_a_check_dearer_than_its_saving_is_skipped(model):
    """Threshold 0 would always fire, but the check costs more than the pass could save: the exit
    is not evaluated (full decoding's tokens) until the REFRESH-th pass looks again."""
    costly_check = ExitCosts(1.0, 0.01, 0.01, 1.0, vocab=1e6, probe=1e6)
    engine = engine_with(model, costly_check)
    full = engine.generate(PROMPTS[:1], GenerationSettings(strategy="full", max_new_tokens=NEW, ignore_eos=True))
    tokens, layers = run(engine, PROMPTS[:1], early_exit_threshold=0.0, exit_layers=(1,), measure="max_prob")
    assert tokens == [full[0].tokens] and layers == [[4] * NEW]
    decider = engine.passes.exit_decider
    assert decider.skipped[(1, "max_prob", 0.0, 1)] == NEW - 1  # one skip per decode step


def test_a_cheap_check_skipped_comes_back_sooner():
    """A skipped exit is evaluated again every REFRESH-th pass where its check costs at least
    CHEAP of its saving (or leaving saves nothing); a cheaper one proportionally sooner, at least
    every 2nd pass; the decider keeps the spacing per key and counts its skips against it."""
    assert refresh_every(1.0, 2.0) == refresh_every(CHEAP * 2.0, 2.0) == REFRESH
    assert refresh_every(0.01, 0.0) == refresh_every(0.01, -1.0) == REFRESH
    assert refresh_every(0.028, 1.0) == 4  # the CPU reference's exit 3 at batch 1: ceil(32 * 0.028 / 0.25)
    assert refresh_every(1e-6, 1.0) == 2
    decider = ExitDecider(ExitCosts(1.0, 0.01, 0.01, 0.0, vocab=0.3, probe=0.01))
    decider.every[("k",)] = 4
    assert [decider.skip(("k",)) for _ in range(8)] == [False, False, False, True] * 2
    assert [decider.skip(("other",)) for _ in range(REFRESH)] == [False] * (REFRESH - 1) + [True]


def test_the_chance_of_paying_falls_and_recovers(model):
    """The running chance: misses lower it (the mean of the outcomes and a prior 1.0) until the
    exit is skipped; a refresh evaluation that pays raises it again until it is evaluated every pass."""
    engine = engine_with(model, ExitCosts(1.0, 0.01, 0.01, 0.0, vocab=0.3, probe=0.3))
    p, decider = engine.passes, engine.passes.exit_decider
    from megatron.early_exit.inference.passes import ExitPolicy, Rows

    rows = Rows([0, 1], [0, 0], [1, 1], torch.zeros(2, 1, 32))
    policy = ExitPolicy((2,), 0.5, "max_prob", mode="cost_aware")
    key, saving = (2, "max_prob", 0.5, 2), decider.net_saving(p, 2, rows, [0, 1], "max_prob")
    assert saving == pytest.approx(2 * (1.0 + 0.02) - 2 * 2 * 0.01)  # 2 layers left, 2 rows recomputed later
    misses = 0
    while decider.worth_checking(p, 2, rows, [0, 1], policy):
        assert decider.choose(p, 2, [0], rows, [0, 1], policy) == []  # one of two rows: nobody leaves
        misses += 1
        assert decider.chance[key] == pytest.approx(1 / (misses + 1))  # the prior 1.0 and `misses` zeros
    assert misses == 6  # 2.0 / 6 > 0.3 >= 2.0 / 7: skipped after saving/check evaluations
    skips = 1 + sum(not decider.worth_checking(p, 2, rows, [0, 1], policy) for _ in range(REFRESH - 1))
    assert skips == REFRESH - 1  # ... and the REFRESH-th pass evaluates
    assert decider.choose(p, 2, [0, 1], rows, [0, 1], policy) == [0, 1]  # the refresh finds every row firing
    assert decider.chance[key] == pytest.approx(2 / 8)  # the mean of the prior, 6 misses and this one
    for _ in range(20):  # every row fires from now on: the chance climbs back
        assert decider.choose(p, 2, [0, 1], rows, [0, 1], policy) == [0, 1]
    assert decider.worth_checking(p, 2, rows, [0, 1], policy)


def test_the_running_chance_becomes_an_exponential_average():
    """Outcome k enters with weight 1/(k+1) until that falls to 1 - DECAY, then with 1 - DECAY; the
    shared firing rate counts rows the same way (the prior: one fired row; the past decays by
    DECAY from the 1/(1 - DECAY)-th evaluation on)."""
    from megatron.early_exit.inference.exit_decision import DECAY
    from megatron.early_exit.inference.passes import ExitPolicy

    decider, policy = ExitDecider(MEMORY_BOUND), ExitPolicy((2,), 0.5, "max_prob", mode="cost_aware")
    want, fired, rows = 1.0, 1.0, 1.0
    for k in range(1, 30):
        paid = k % 3 == 0
        decider.record(2, policy, 4, 4 if paid else k % 2, paid)
        weight = max(1 / (k + 1), 1 - DECAY)
        want = (1 - weight) * want + weight * paid
        past = DECAY if k > 10 else 1.0
        fired, rows = past * fired + (4 if paid else k % 2), past * rows + 4
        assert decider.chance[(2, "max_prob", 0.5, 4)] == pytest.approx(want, abs=1e-12)
        assert decider.firing_rate((2, "max_prob", 0.5)) == pytest.approx(fired / rows, abs=1e-12)
    assert decider.seen[(2, "max_prob", 0.5, 4)] == 29 and (2, "max_prob", 0.5, 1) not in decider.chance


def test_a_new_pass_size_starts_from_the_largest_smaller_ones_chance_and_the_firing_rate():
    from megatron.early_exit.inference.passes import ExitPolicy

    decider, policy = ExitDecider(MEMORY_BOUND), ExitPolicy((2,), 0.5, "max_prob", mode="cost_aware")
    assert decider.chance_of((2, "max_prob", 0.5, 4)) == 1.0  # nothing seen: optimistic
    for _ in range(3):
        decider.record(2, policy, 2, 1, False)  # pass size 2, one of two rows fires: chance 1/4
    assert decider.firing_rate((2, "max_prob", 0.5)) == pytest.approx(4 / 7)  # the prior row and 3 of 6
    decider.record(2, policy, 5, 5, True)  # pass size 5, first evaluation: size 2's chance as its prior
    assert decider.chance[(2, "max_prob", 0.5, 5)] == pytest.approx(0.5 * 0.25 + 0.5)  # prior 1/4, one hit, weight 1/2
    assert decider.firing_rate((2, "max_prob", 0.5)) == pytest.approx(9 / 12)
    assert decider.chance_of((2, "max_prob", 0.5, 4)) == pytest.approx(0.25)  # from size 2, not 5
    assert decider.chance_of((2, "max_prob", 0.5, 16)) == pytest.approx(0.625)  # from size 5
    assert decider.chance_of((2, "max_prob", 0.5, 1)) == pytest.approx(0.75)  # no smaller size: the rate's bound
    assert decider.chance_of((2, "max_prob", 0.5, 2), alone=True) == pytest.approx(0.25)  # min(1/4, 2 * 3/4)
    assert decider.chance_of((3, "max_prob", 0.5, 4)) == 1.0 and decider.chance_of((2, "max_prob", 0.9, 4)) == 1.0


# A vocabulary check costs 0.3 whatever the rows; leaving at exit 2 of 4 saves ~3.0 at any size.
CHECKED = ExitCosts(1.0, 0.01, 0.01, 1.0, vocab=0.3, probe=0.3)


def pass_of(k: int):
    return Rows(list(range(k)), [0] * k, [1] * k, torch.zeros(k, 1, 32)), list(range(k))


def test_rows_that_do_not_fire_at_one_size_skip_the_exit_at_new_sizes(model):
    """After one evaluation of 16 rows none of which fires, the shared rate (1/17) prices every
    size's chance: 16 is skipped from then on (the per-size mean alone needed 9 misses), and
    sizes never evaluated (15, a shrinking server pass; 1) are skipped at once."""
    from megatron.early_exit.inference.passes import ExitPolicy

    engine = engine_with(model, CHECKED)
    p, decider = engine.passes, engine.passes.exit_decider
    policy = ExitPolicy((2,), 0.5, "max_prob", mode="cost_aware")
    rows, cand = pass_of(16)
    assert decider.net_saving(p, 2, rows, cand, "max_prob") == pytest.approx(2 * 1.16 + 1.0 - 16 * 2 * 0.01)
    assert decider.worth_checking(p, 2, rows, cand, policy)  # nothing seen: evaluated
    assert decider.choose(p, 2, [], rows, cand, policy) == []
    assert decider.chance[(2, "max_prob", 0.5, 16)] == pytest.approx(0.5)  # the size's own mean: not yet
    assert not decider.worth_checking(p, 2, rows, cand, policy)  # 3.0 / 17 < 0.3
    for k in (15, 1):
        assert not decider.worth_checking(p, 2, *pass_of(k), policy)
    assert set(decider.seen) == {(2, "max_prob", 0.5, 16)}


def test_a_size_whose_rows_fire_keeps_being_evaluated(model):
    """Every row of a 16-row pass fires, every time: the whole pass leaves at exit 2 each time, the
    exit is evaluated at every pass (no skip), and a new size (15) is evaluated too."""
    from megatron.early_exit.inference.passes import ExitPolicy

    engine = engine_with(model, CHECKED)
    p, decider = engine.passes, engine.passes.exit_decider
    policy = ExitPolicy((2,), 0.5, "max_prob", mode="cost_aware")
    rows, cand = pass_of(16)
    for _ in range(3 * REFRESH):
        assert decider.worth_checking(p, 2, rows, cand, policy)
        assert decider.choose(p, 2, cand, rows, cand, policy) == cand
    assert decider.firing_rate((2, "max_prob", 0.5)) == 1.0 and decider.chance[(2, "max_prob", 0.5, 16)] == 1.0
    assert decider.skipped == {}
    assert decider.worth_checking(p, 2, *pass_of(15), policy)


def test_a_server_like_shrinking_batch_reuses_what_the_larger_one_learned(model):
    """Decoding 4 sequences where max_prob 0.9 never fires, then 3 on the same engine: the exit is
    evaluated at size 4 until the rows' firing rate (1/13 after 3 passes) prices it below its check,
    and never at size 3 (before the shared rate, size 3 started again from 1.0); tokens as full."""
    engine = engine_with(model, CHECKED)
    kw = dict(early_exit_threshold=0.9, measure="max_prob", exit_layers=(2,), exit_policy="cost_aware")
    for prompts in (PROMPTS, PROMPTS[:3]):
        full = engine.generate(prompts, GenerationSettings(strategy="full", max_new_tokens=NEW, ignore_eos=True))
        assert run(engine, prompts, **kw) == ([r.tokens for r in full], [[4] * NEW] * len(prompts))
    _, exact_layers = run(engine_with(model, CHECKED), PROMPTS, **{**kw, "exit_policy": "exact"})
    assert exact_layers == [[4] * NEW] * len(PROMPTS)  # no row ever fires at 0.9 on this model
    decider = engine.passes.exit_decider
    assert decider.seen == {(2, "max_prob", 0.9, 4): 3}
    assert decider.skipped == {(2, "max_prob", 0.9, 4): NEW - 1 - 3, (2, "max_prob", 0.9, 3): NEW - 1}
    assert decider.firing_rate((2, "max_prob", 0.9)) == pytest.approx(1 / 13)


def test_a_check_is_priced_at_the_pass_size(model):
    """A vocabulary check of 4 rows costs 4x one row's here: with the same chance and saving, the
    pass of one sequence evaluates the exit, the pass of four skips it."""
    costs = ExitCosts(1.0, 0.0, 0.0, 0.0, vocab=0.5, probe=0.5, vocab_row=0.5)
    assert costs.check(True, 1) == 0.5 and costs.check(True, 4) == 2.0 and costs.check(False, 4) == 0.5
    engine = engine_with(model, costs)
    p, decider = engine.passes, engine.passes.exit_decider
    from megatron.early_exit.inference.passes import ExitPolicy, Rows

    policy = ExitPolicy((2,), 0.5, "max_prob", mode="cost_aware")
    one, four = (Rows(list(range(a)), [0] * a, [1] * a, torch.zeros(a, 1, 32)) for a in (1, 4))
    assert decider.net_saving(p, 2, one, [0], "max_prob") == decider.net_saving(p, 2, four, [0, 1, 2, 3], "max_prob")
    assert decider.net_saving(p, 2, four, [0, 1, 2, 3], "max_prob") == pytest.approx(2.0)  # 2 layers of a = 1
    assert decider.worth_checking(p, 2, one, [0], policy)  # 2.0 > 0.5
    assert not decider.worth_checking(p, 2, four, [0, 1, 2, 3], policy)  # 2.0 <= 2.0: a tie is skipped


def test_a_run_of_leaving_tokens_pays_for_the_pass_that_fills_it_once(model):
    """`ExitCosts.fill`: the pass that fills pending rows pays its own work once. A token leaving
    from a sequence that holds no pending row starts such a run and is charged it; one from a
    sequence that holds some already is not (the fill comes anyway). At batch 1, exit 1 of 4
    layers, max_prob at threshold 0 (always fires), memory-bound costs: leaving saves 3 layers
    and the head, 3 x 1.01 + 1.0, less 3 recomputed rows, 0.03: a net 4.0."""
    from megatron.early_exit.inference.passes import ExitPolicy

    aware = ExitPolicy(allowed=(1,), threshold=0.0, mode="cost_aware")
    exact, full = replace(aware, mode="exact"), ExitPolicy()
    dear, cheap = replace(MEMORY_BOUND, fill=5.0), replace(MEMORY_BOUND, fill=3.0)
    for costs, starts in ((dear, False), (cheap, True)):
        engine = engine_with(model, costs)
        state = engine.new_state(1, 32)
        engine.prefill(state, {0: PROMPTS[0]})
        depths = []
        for t, policy in enumerate((aware, exact, aware, aware, full, aware)):
            depths.append(engine.decode_one_token(state, {0: 3 + t}, policy).exit_layer[0])
        # dear: a fresh start does not pay (4.0 < 5.0), leaving while rows are pending does;
        # cheap: every leave pays (4.0 > 3.0)
        assert depths == ([1, 1, 1, 1, 4, 1] if starts else [4, 1, 1, 1, 4, 4])
        decider = engine.passes.exit_decider
        rows = Rows([0], [0], [1], torch.zeros(1, 1, 32))
        saving = functools.partial(decider.net_saving, engine.passes, 1, rows, [0], "max_prob")
        assert saving() == pytest.approx(4.0) and saving(fresh=True) == pytest.approx(4.0 - costs.fill)


def test_the_fill_probe_fills_one_pending_row_and_keeps_the_running_pass_state(model):
    """`fill_probes`: the timed step with a pending row fills it above the exit's depth (every
    layer then holds positions 0 .. FILL_CONTEXT, the plain step's 0 .. FILL_CONTEXT - 1), of one
    sequence and of each of `batch` sequences, through `Passes.run`; the timing runs inside a
    running pass's check (`time_exit_costs`): that pass's own state is left as it was, and the
    costs price a fill of several sequences no lower than of one."""
    from megatron.early_exit.inference import exit_decision
    from megatron.early_exit.inference import passes as passes_module

    passes = EarlyExitEngine(model).passes
    fns, states = exit_decision.cost_probes(passes, 2), []
    real = passes_module.Passes.run
    n = exit_decision.FILL_CONTEXT

    def run(self, state, *a, **k):
        states.append(state)
        return real(self, state, *a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(passes_module.Passes, "run", run)
        for name, seqs in (("", 1), ("/2", 2)):
            fns["plain" + name]()
            plain = states[-1].cache.filled[:, :seqs].tolist()
            fns["fill" + name]()
            assert plain == [[n + 1] * seqs] * 4 and states[-1].cache.filled[:, :seqs].tolist() == [[n + 2] * seqs] * 4
            assert states[-1].fed[:seqs] == [n + 2] * seqs
    sentinel = object()
    passes.branch = passes.scaled = passes.layer_scores = passes.holding = sentinel
    costs = exit_decision.time_exit_costs(passes, 2, 1)
    assert passes.branch is passes.scaled is passes.layer_scores is passes.holding is sentinel
    assert costs.fill_of(2) >= costs.fill_of(1) == costs.fill >= 0 and costs.fill_of(0) == 0.0


def test_costs_from_the_cost_model_and_measured():
    c = DecodeCosts(num_layers=4, depth={1: 1}, layer=1.0, fixed=0.5, head=2.0, vocab={1: 0.3}, project={1: 2.0},
                    probe={1: 0.05}, row=0.4, batch=4)  # fmt: skip
    assert ExitCosts.from_cost_model(c) == ExitCosts(0.6, 0.1, 0.1, 2.0, 0.3, 0.05)
    # A pending layer dearer than a row (the general path's work): a recomputed row costs its share.
    assert ExitCosts.from_cost_model(replace(c, pend=2.0)) == ExitCosts(0.6, 0.1, 0.5, 2.0, 0.3, 0.05)
    # Weights from memory cost more (`cost_model.WeightCache`): the policy takes a layer and the head
    # as they cost streamed (+0.5 and +1.0), as in a decode deeper than the cache holds.
    reads = {"layer": ("l", 1.0), "head": ("h", 1.0)}
    cold = replace(c, cold={"layer": 0.5, "head": 1.0}, reads=reads, cache_bytes=1.0)
    assert ExitCosts.from_cost_model(cold) == ExitCosts(1.1, 0.1, 0.1, 3.0, 0.3, 0.05)
    # what a filling pass pays once (`pending_costs`' intercept) is the policy's `fill`
    assert ExitCosts.from_cost_model(replace(c, pend_pass=0.7)) == ExitCosts(0.6, 0.1, 0.1, 2.0, 0.3, 0.05, fill=0.7)
    # a pass filling the rows of 3 sequences pays the fill and two more sequences' share of it
    filling = ExitCosts(0.6, 0.1, 0.1, 2.0, 0.3, 0.05, fill=0.7, fill_seq=0.2)
    assert filling.fill_of(3) == pytest.approx(1.1) and filling.fill_of(1) == 0.7 and filling.fill_of(0) == 0.0
    measured = measure_exit_costs(EarlyExitEngine(make("llama")).passes, batch=4, repeats=1)
    assert measured.layer_fixed > 0 and measured.row >= measured.layer_row >= 0 and measured.vocab > 0
    assert measured.fill >= 0


def test_implausible_timings_are_taken_again_then_replaced(monkeypatch):
    """Timings that price a recomputed row above a layer over one row (a neighbour's burst) would
    keep every batch-1 row from leaving: they are taken again, and after MEASURE_TRIES such
    timings the parameter counts decide, with a warning."""
    from megatron.early_exit.inference import exit_decision

    passes = EarlyExitEngine(make("llama")).passes
    bad, good = ExitCosts(0.1, 0.2, 0.5, 1.0, 1.0, 0.1), ExitCosts(1.0, 0.2, 0.5, 1.0, 1.0, 0.1)
    assert not exit_decision.plausible(bad) and exit_decision.plausible(good)
    # a batch-1 row leaving at exit 1 saves (layers left) x (layer(1) - row): -0.2 a layer under
    # `bad`, +0.7 under `good`
    rows = Rows([0], [0], [1], torch.zeros(1, 1, 32))
    assert ExitDecider(bad).net_saving(passes, 1, rows, [0], "learned") < 0
    assert ExitDecider(good).net_saving(passes, 1, rows, [0], "learned") > 0
    timings = iter([bad, bad, bad] + [good] * 3)  # the first median implausible, the second not
    monkeypatch.setattr(exit_decision, "time_exit_costs", lambda *a: next(timings))
    assert exit_decision.measure_exit_costs(passes) == good
    # each cost the median of TIMINGS timings: one burst among three is dropped
    burst = ExitCosts(0.1, 0.3, 0.9, 2.0, 1.0, 0.3)
    timings = iter([good, burst, ExitCosts(1.2, 0.1, 0.4, 1.1, 1.0, 0.2)])
    assert exit_decision.measure_exit_costs(passes) == ExitCosts(1.0, 0.2, 0.5, 1.1, 1.0, 0.2)
    monkeypatch.setattr(exit_decision, "time_exit_costs", lambda *a: bad)
    with pytest.warns(RuntimeWarning, match="priced a recomputed row above a layer"):
        assert exit_decision.measure_exit_costs(passes) == ExitCosts.from_parameters(passes)


def test_bad_exit_policy_raises(model):
    with pytest.raises(ValueError, match="exit_policy must be one of exact, cost_aware, got 'fast'"):
        run(EarlyExitEngine(model), PROMPTS[:1], exit_policy="fast")


def test_exit_costs_source_follows_the_environment(monkeypatch):
    """EE_EXIT_COSTS=parameters (the suite's setting) gives the parameter-count costs, so decisions
    never depend on timings; a bad value names the variable."""
    from megatron.early_exit.inference import exit_decision

    passes = EarlyExitEngine(make("llama")).passes
    monkeypatch.setenv("EE_EXIT_COSTS", "parameters")
    assert ExitDecider().costs_for(passes) == ExitCosts.from_parameters(passes)
    monkeypatch.setenv("EE_EXIT_COSTS", "timed")
    with pytest.raises(ValueError, match="EE_EXIT_COSTS='timed'"):
        exit_decision.costs_from_parameters()


def test_an_engine_makes_its_exit_costs_once(monkeypatch, model):
    """`exit_costs()` (a server calls it at start-up) makes the decider's costs; a later cost_aware
    request uses them, not new ones."""
    monkeypatch.setenv("EE_EXIT_COSTS", "parameters")
    engine = EarlyExitEngine(model)
    costs = engine.exit_costs()
    assert costs == ExitCosts.from_parameters(engine.passes) and engine.passes.exit_decider.costs is costs
    run(engine, PROMPTS[:2], early_exit_threshold=0.5, exit_policy="cost_aware")
    assert engine.passes.exit_decider.costs is costs and engine.exit_costs() is costs


@pytest.mark.skipif(not native.available(), reason="no native kernel here (no C compiler)")
def test_one_sequence_with_native_learned_checks_takes_exacts_decisions():
    """`Passes.solo_policy`: a cost_aware pass of one sequence whose exits are all learned checks on
    the native kernel runs exact's decisions (the same tokens, exits and confidences as exact, and
    no decider made: no costs measured, no clock); two sequences, a max_prob check, checks through
    the probe modules, a forced or observed exit, or `solo_exact` off keep cost_aware's decider."""
    from tests.test_lean import make as probed

    model = probed()
    learned = dict(strategy="early_exit", max_new_tokens=12, ignore_eos=True, measure="learned")

    def generate(prompts, mode, measure="learned", solo=True, fused=True):
        engine = EarlyExitEngine(model)
        engine.passes.solo_exact, engine.passes.fused_checks = solo, fused
        s = GenerationSettings(**{**learned, "measure": measure}, early_exit_threshold=0.5, exit_policy=mode)
        out = engine.generate(prompts, s)
        return [(r.tokens, r.exit_layers, r.confidences) for r in out], engine

    with torch.no_grad():
        exact, _ = generate(PROMPTS[:1], "exact")
        got, engine = generate(PROMPTS[:1], "cost_aware")
        assert got == exact
        assert len(set(exact[0][1])) > 1  # tokens left at an exit and at the final head
        assert getattr(engine.passes, "exit_decider", None) is None
        for kw in (dict(solo=False), dict(measure="max_prob"), dict(fused=False)):
            _, engine = generate(PROMPTS[:1], "cost_aware", **kw)
            assert engine.passes.exit_decider is not None, kw
        _, engine = generate(PROMPTS[:2], "cost_aware")
        assert engine.passes.exit_decider is not None
    p, state = engine.passes, engine.new_state(1, 16)
    policy = ExitPolicy(allowed=(1, 2, 3), threshold=0.5, measure="learned", mode="cost_aware")
    assert p.solo_policy(state, {0: [1]}, policy) == replace(policy, mode="exact")
    for kept in (replace(policy, force=1), replace(policy, observe=(2,)), replace(policy, mode="exact")):
        assert p.solo_policy(state, {0: [1]}, kept) is kept
    assert p.solo_policy(state, {0: [1], 1: [2]}, policy) is policy

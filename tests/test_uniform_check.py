"""The learned check of uniform decode steps in one call (`inference/uniform_check.py`) against
the general path (`Passes.check_exit`): the same operations and the same decider calls, so the
same logits bit for bit, the same exits, the same K/V and, under cost_aware, the same counts in
the decider (which checks ran, which were skipped, what fired); and it stands aside wherever the
general path does not take the fused check with a shared norm."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron.early_exit.inference import EarlyExitEngine, ExitPolicy, passes, uniform_check
from megatron.early_exit.inference.exit_decision import REFRESH
from tests.test_fast_path import filled_kv, greedy_steps
from tests.test_lean import PROMPTS, assert_same_steps, make

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread

DECIDER = ("chance", "seen", "skipped", "rows_fired", "rows_seen", "evaluated", "version")


@torch.no_grad()
def decode(model, prompts, policies, uniform: bool, monkeypatch, steps: int):
    """Greedy decode steps; (trace with logits, state, decider, calls of `UniformCheck`)."""
    calls = [0]

    def counting(real):
        def counted(self, state, rows, out, *due):
            calls[0] += 1
            return real(self, state, rows, out, *due)

        return counted

    with monkeypatch.context() as m:
        for kind in (uniform_check.UniformCheck, uniform_check.PlannedCheck):
            m.setattr(kind, "__call__", counting(kind.__call__))
        if not uniform:  # every exit through `check_exit`
            m.setattr(passes, "uniform_checks", lambda p, s, policy, by_depth: dict.fromkeys(p.exits))
        engine = EarlyExitEngine(model)
        trace, state = greedy_steps(engine, prompts, policies, steps, logits=True)
    return trace, state, getattr(engine.passes, "exit_decider", None), calls[0]


def same_as_general_path(model, prompts, policies, monkeypatch, cost_aware: bool, mark=lambda path: None):
    """Decode `policies` on the general path, then with the uniform checks (`mark(path)` before
    each): the uniform checks ran, the same steps with the same logits, the same K/V, some tokens
    left early and, under cost_aware, the same decider counts. Returns the general path's decider."""
    mark("general")
    ref, s_ref, d_ref, n_ref = decode(model, prompts, policies, False, monkeypatch, len(policies))
    mark("uniform")
    got, s_got, d_got, n_got = decode(model, prompts, policies, True, monkeypatch, len(policies))
    assert n_ref == 0 and n_got > 0
    assert_same_steps(ref, got, s_ref, s_got)
    for a, b in zip(filled_kv(s_got), filled_kv(s_ref)):
        assert torch.equal(a, b)
    assert len({e for _, exits, _ in ref for e in exits.values()}) > 1  # some tokens left early
    if cost_aware:
        for name in DECIDER:
            assert getattr(d_got, name) == getattr(d_ref, name), name
    return d_ref


@pytest.mark.parametrize("mode", ["exact", "cost_aware"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 4])
def test_uniform_checks_equal_the_general_path(mode, dtype, batch, monkeypatch):
    model, prompts = make(dtype), PROMPTS[batch]
    # the decider's own counts at batch 1 too: a pass of one sequence with native learned checks
    # would take exact's decisions (`Passes.solo_policy`, tested in test_exit_policy.py)
    monkeypatch.setattr(passes.Passes, "solo_exact", False)
    learned = dict(allowed=(1, 2, 3), measure="learned", mode=mode)
    # Thresholds where rows leave at different exits (pending rows recomputed in later steps),
    # then a long run where checks hardly fire: cost_aware learns to skip them and looks again
    # between skips (every REFRESH-th pass, sooner for a check this cheap against its saving).
    policies = [ExitPolicy(threshold=0.5, **learned), ExitPolicy(threshold=0.3, **learned)] * 3
    policies += [ExitPolicy(threshold=0.999, **learned)] * (2 * REFRESH + 8)
    d_ref = same_as_general_path(model, prompts, policies, monkeypatch, mode == "cost_aware")
    if mode == "cost_aware":
        hardly = sum(v for k, v in d_ref.seen.items() if k[2] == 0.999)  # evaluations at 0.999
        assert any(d_ref.skipped.values()) and hardly < (2 * REFRESH + 8) * 3  # some were skipped


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 4])
def test_planned_checks_equal_the_general_path_and_let_skipped_exits_be_run_through(dtype, batch, monkeypatch):
    """A max_prob check under cost_aware (`PlannedCheck`): where it is due, the general path's
    check (the same logits bit for bit, exits, K/V and decider counts); where cost_aware will skip
    it, the step's layers run on through its depth: fewer runs of layers than when every step
    stopped at every exit to ask."""
    model, prompts = make(dtype), PROMPTS[batch]
    max_prob = dict(allowed=(1, 2, 3), measure="max_prob", mode="cost_aware")
    policies = [ExitPolicy(threshold=0.0, **max_prob), ExitPolicy(threshold=0.02, **max_prob)] * 3
    policies += [ExitPolicy(threshold=0.999, **max_prob)] * (2 * REFRESH + 8)
    runs, path = {"uniform": 0, "general": 0}, ["general"]
    real = passes.Passes.decode_layers

    def decode_layers(self, *args, **kwargs):
        runs[path[0]] += 1
        return real(self, *args, **kwargs)

    monkeypatch.setattr(passes.Passes, "decode_layers", decode_layers)
    d_ref = same_as_general_path(model, prompts, policies, monkeypatch, True, mark=lambda p: path.__setitem__(0, p))
    assert any(d_ref.skipped.values())
    # the long run at 0.999: three stops (depths 1, 2, 3) and the last layer a step before, one run
    # of layers where all three checks are skipped
    assert runs["uniform"] < runs["general"] - 2 * REFRESH


def test_it_applies_only_where_the_general_path_takes_the_fused_check():
    """None (the general path) for a vocabulary measure, fused checks off, profiling, a probe
    reading a LayerNorm, and an exit whose threshold never fires; a forced exit has its
    `DraftCheck` (not under profiling)."""
    learned = ExitPolicy(allowed=(1, 2, 3), threshold=0.5, measure="learned")

    def checks(model, policy, **passes_settings):
        engine = EarlyExitEngine(model)
        p = engine.passes
        for k, v in passes_settings.items():
            setattr(p, k, v)
        state = engine.new_state(1, 8)
        return uniform_check.uniform_checks(p, state, policy, p.exits_by_depth(policy))

    model = make()
    made = checks(model, learned)
    assert set(made) == {1, 2, 3} and all(isinstance(c, uniform_check.UniformCheck) for c in made.values())
    assert set(checks(model, dataclasses.replace(learned, measure="max_prob")).values()) == {None}
    planned = checks(model, dataclasses.replace(learned, measure="max_prob", mode="cost_aware"))  # planned only
    assert set(planned) == {1, 2, 3} and all(type(c) is uniform_check.PlannedCheck for c in planned.values())
    assert set(checks(model, dataclasses.replace(learned, mode="cost_aware"), fused_checks=False).values()) != {None}
    assert isinstance(checks(model, dataclasses.replace(learned, force=2))[2], uniform_check.DraftCheck)
    assert checks(model, dataclasses.replace(learned, force=2), profile=True)[2] is None
    assert set(checks(model, learned, fused_checks=False).values()) == {None}
    assert set(checks(model, learned, profile=True).values()) == {None}
    per_exit = checks(model, dataclasses.replace(learned, per_exit=((2, 1.0),)))
    assert 2 not in per_exit and made.keys() - per_exit.keys() == {2}  # not evaluated at all
    layer_norm = make(normalization="LayerNorm")
    assert set(checks(layer_norm, learned).values()) == {None}


def test_a_long_lived_state_keeps_the_latest_policies_only():
    """A server decodes every request in one state: policies with thresholds of their own come and
    go, and the checks kept for them stay KEPT_POLICIES at most (the latest), each made again
    when its policy comes back."""
    engine = EarlyExitEngine(make())
    p, state = engine.passes, engine.new_state(1, 8)

    def checks(threshold):
        policy = ExitPolicy(allowed=(1, 2, 3), threshold=threshold, measure="learned")
        return uniform_check.uniform_checks(p, state, policy, p.exits_by_depth(policy))

    first = checks(0.5)
    assert checks(0.5) is first  # made once while kept
    for j in range(3 * uniform_check.KEPT_POLICIES):
        checks(0.6 + j * 1e-3)
    assert len(state.memo[("uniform checks",)]) == uniform_check.KEPT_POLICIES
    again = checks(0.5)
    assert again is not first and again.keys() == first.keys()


def test_a_finished_decode_state_is_freed_without_the_garbage_collector():
    """A decode state keeps its uniform checks; they must not keep it (a cycle would hold a
    finished decode's caches until the collector's next full pass)."""
    import gc
    import weakref

    engine = EarlyExitEngine(make())
    policy = ExitPolicy(allowed=(1, 2, 3), threshold=0.5, measure="learned")
    state = engine.new_state(1, 8)
    checks = uniform_check.uniform_checks(engine.passes, state, policy, engine.passes.exits_by_depth(policy))
    assert any(c is not None for c in checks.values())
    gone = weakref.ref(state)
    gc.disable()
    try:
        del state, checks
        assert gone() is None
    finally:
        gc.enable()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("draft_vocab", [False, True])
@pytest.mark.parametrize("exit_mlp", [False, True])
def test_a_draft_check_gives_the_general_paths_numbers(dtype, draft_vocab, exit_mlp, monkeypatch):
    """Self-speculative draft steps (a forced exit) through `DraftCheck`, the exit's RMSNorm as
    `lean.rms_norm` and the draft projection on the lean kernels, against the general path with
    modules throughout (`check_exit`, `head.hidden`, `head.project_onto`; lean layers off, which
    give the modules' numbers bit for bit): the same logits, confidences and exits bit for bit,
    with a draft vocabulary and without, for a norm-only exit and one with an MLP (module path)."""
    model = make(dtype, use_exit_mlp=exit_mlp)
    with torch.no_grad():  # gains away from 1, where products with them round
        for name, w in model.named_parameters():
            if "norm" in name:
                w.copy_(torch.rand(w.shape, generator=torch.Generator().manual_seed(len(name))) + 0.5)
    policies = [ExitPolicy(force=2), ExitPolicy(force=2), ExitPolicy(force=3), ExitPolicy()]
    calls = [0]
    real = uniform_check.DraftCheck.__call__

    def counted(self, state, rows, out, *due):
        calls[0] += 1
        return real(self, state, rows, out, *due)

    @torch.no_grad()
    def run(general: bool):
        engine = EarlyExitEngine(model)
        p = engine.passes
        if draft_vocab:
            p.draft_vocab = torch.tensor([0, 3, 4, 9, 17, 30, 31, 50, 64, 77, 95])
        if general:
            p.lean = False
            p.profile = True  # no `DraftCheck`: `check_exit` for the forced exit
        prompts = PROMPTS[4]
        state = engine.new_state(len(prompts), max(map(len, prompts)) + 14)
        out = engine.prefill(state, dict(enumerate(prompts)))
        trace = []
        for j in range(12):
            tokens = {b: int(out.logits[b].argmax()) for b in range(len(prompts))}
            out = engine.decode_one_token(state, tokens, policies[j % len(policies)])
            trace.append(
                (tokens, dict(out.exit_layer), dict(out.confidence), {b: v.clone() for b, v in out.logits.items()})
            )
        return trace

    ref = run(general=True)
    with monkeypatch.context() as m:
        m.setattr(uniform_check.DraftCheck, "__call__", counted)
        got = run(general=False)
    assert calls[0] > 0
    for (t_ref, e_ref, c_ref, l_ref), (t_got, e_got, c_got, l_got) in zip(ref, got, strict=True):
        assert t_got == t_ref and e_got == e_ref and c_got == c_ref
        for b in l_ref:
            assert torch.equal(l_got[b], l_ref[b])
    drafted = [e for _, exits, _, _ in ref for e in exits.values()]
    assert drafted.count(2) >= 8 and drafted.count(3) >= 4  # the forced exits drafted
    if draft_vocab:  # drafts over the draft vocabulary alone
        assert all(
            int(v.argmax()) in {0, 3, 4, 9, 17, 30, 31, 50, 64, 77, 95}
            for _, e, _, logits in ref
            for b, v in logits.items()
            if e[b] < 4
        )

"""The fused learned check (`inference/fused_check.py`): the probe's logit with the norm folded into
its first weight equals the modules' (norm, then probe), and decoding through it gives the tokens,
exit layers and confidences of the modules' path; a probe that cannot be folded keeps that path."""

from __future__ import annotations

import math

import pytest
import torch

from megatron.early_exit.inference import EarlyExitEngine, GenerationSettings, lean
from megatron.early_exit.inference.fused_check import folded_probe, logit_threshold, sigmoid
from tests.test_add_exits import _model
from tests.test_inference import PROMPTS, naive_greedy

pytestmark = pytest.mark.usefixtures("one_thread")
NEW = 6


def _probe_model(llama: bool, k: int, probe_input: str, exit_mlp: bool = False, seed: int = 5):
    """A 3-layer model, exits 1 and 2, norm-only exits (an MLP too with `exit_mlp`), a linear
    (k = 0) or MLP probe; the probe and norm weights scaled up from their starting values, so
    that the norm's gain and shift matter and the probes fire for some tokens only."""
    model = _model(False, llama=llama, exits=(1, 2), use_exit_norm=True, use_exit_mlp=exit_mlp,
                   use_exit_confidence_head=True, exit_confidence_hidden_size=k,
                   exit_confidence_input=probe_input)  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.exits.named_parameters():
            if "confidence" in name or "norm" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.5)
    return model


def _module_logit(head, x: torch.Tensor) -> torch.Tensor:
    """The probe's logit [A] through the modules: backbone rows x [A, h] -> norm -> probe."""
    return head.confidence_logit(head.probe_input(x[:, None]))[:, 0]


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("probe_input", ["exit", "backbone"])
@pytest.mark.parametrize("k", [0, 16])
@pytest.mark.parametrize("llama", [True, False], ids=["RMSNorm", "LayerNorm"])
def test_fused_logit_equals_the_modules(llama, k, probe_input, batch):
    """fp32: the same sums in another order (the gain applied to W instead of x, the norm's scale
    after the product instead of before, the last bias added in double): each a dot product of
    h = 32 terms of magnitude <= ~5, whose fp32 round-off is <= h * 2^-24 * sum|terms| ~ 1e-5 in
    the worst case, ~1e-6 in practice; 2e-5 absolute (+ 1e-5 relative) allows it and nothing more:
    a gain, shift or eps left out moves these logits by 1e-2 or more (checked below)."""
    model = _probe_model(llama, k, probe_input)
    x = torch.randn(batch, 32, generator=torch.Generator().manual_seed(2)) * 3  # (A, h) backbone rows
    with torch.no_grad():
        for n in ("1", "2"):
            head, folded = model.exits[n], folded_probe(model.exits[n])
            want, got = _module_logit(head, x), folded.logit(x)
            assert got.dtype == torch.float32 and got.shape == (batch,)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)
            if llama:  # from the RMSNorm's rows before its gain, as a decode step shares them with the next layer,
                # as floats less the last bias (one row: a dot product, more: mv)
                scores = folded.scores_of_scaled(lean.scaled_rows(x, folded.norm_eps))
                assert len(scores) == batch
                last = head.confidence.bias if k == 0 else head.confidence.fc_out.bias
                assert folded.shift == float(last[0])
                got = torch.tensor([z + folded.shift for z in scores], dtype=torch.float64)
                torch.testing.assert_close(got, want.double(), rtol=1e-5, atol=2e-5)
            no_norm_weights = head.confidence(torch.nn.functional.normalize(x, dim=-1) * math.sqrt(32))[:, 0]
            assert (no_norm_weights - want).abs().max() > 1e-2, "the norm's weights must matter here"


def test_bf16_model_checks_in_fp32():
    """A bf16 model: the check converts the row once and runs in fp32 on fp32 folded copies, so it
    is at least as accurate as the modules' bf16 path; the two differ by that path's bf16 rounding
    (8 significant bits, relative 2^-8 per rounding, a few roundings on the way): within 0.1 of
    logits of magnitude ~1-5, and the fused one within 2e-5 of the modules' in fp32."""
    model = _probe_model(True, 16, "exit")
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(3)) * 3
    with torch.no_grad():
        exact = _module_logit(model.exits["1"], x)
        model = model.to(torch.bfloat16)
        xb = x.bfloat16()
        got, bf16 = folded_probe(model.exits["1"]).logit(xb), _module_logit(model.exits["1"], xb).float()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, bf16, rtol=0.0, atol=0.1)
    # the fused check on bf16-rounded inputs vs fp32 modules on the same rounded values:
    with torch.no_grad():
        ref32 = _module_logit(model.float().exits["1"], xb.float())
    torch.testing.assert_close(got, ref32, rtol=1e-5, atol=2e-5)
    assert (exact - ref32).abs().max() > 0  # the bf16 weights did round


def test_folded_copy_is_remade_when_a_weight_changes():
    """An in-place change of the norm's gain (or the probe's weight) remakes the folded copy;
    a replaced probe module is folded anew."""
    model = _probe_model(True, 16, "backbone")
    head, x = model.exits["1"], torch.randn(2, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        before = folded_probe(head).logit(x)
        head.confidence_norm.weight.mul_(2.0)
        torch.testing.assert_close(folded_probe(head).logit(x), _module_logit(head, x), rtol=1e-5, atol=2e-5)
        head.confidence.fc_in.weight.mul_(-1.0)
        torch.testing.assert_close(folded_probe(head).logit(x), _module_logit(head, x), rtol=1e-5, atol=2e-5)
        head.confidence = torch.nn.Linear(32, 1)
        torch.testing.assert_close(folded_probe(head).logit(x), _module_logit(head, x), rtol=1e-5, atol=2e-5)
    assert (before - _module_logit(head, x)).abs().max() > 1e-2


def test_one_engine_decodes_with_weights_changed_between_calls():
    """The engine looks each folded probe up once per decode state (`DecodeState.memo`): a
    weight changed between two `generate` calls is seen by the second, as on a new engine."""
    model = _probe_model(True, 16, "backbone")
    engine = EarlyExitEngine(model, None)
    settings = GenerationSettings(strategy="early_exit", max_new_tokens=NEW, early_exit_threshold=0.5,
                                  measure="learned", exit_policy="exact")  # fmt: skip
    before = engine.generate([PROMPTS[0]], settings)[0].exit_layers
    with torch.no_grad():
        model.exits["1"].confidence.fc_out.bias.add_(-100.0 if 1 in before else 100.0)  # never / always fires
    after = engine.generate([PROMPTS[0]], settings)[0]
    assert after.exit_layers != before
    assert after.tokens == EarlyExitEngine(model, None).generate([PROMPTS[0]], settings)[0].tokens
    assert (1 in after.exit_layers) == (1 not in before)


def test_sigmoid_of_a_float():
    """A leaver's confidence: torch's sigmoid to double precision, and no overflow at any logit
    (a threshold of 0 lets logits of any size fire)."""
    for z in (-30.0, -2.5, 0.0, 0.7, 12.0):
        assert sigmoid(z) == pytest.approx(torch.sigmoid(torch.tensor(z, dtype=torch.float64)).item(), rel=1e-12)
    assert sigmoid(-1e6) == 0.0 and sigmoid(1e6) == 1.0


def test_logit_threshold():
    """sigmoid(z) >= t exactly where z >= logit(t); 0 fires always, 1 never."""
    for t in (0.1, 0.5, 0.8, 0.999):
        assert torch.sigmoid(torch.tensor(logit_threshold(t), dtype=torch.float64)).item() == pytest.approx(t)
    assert logit_threshold(0.0) == -math.inf and logit_threshold(1.0) == math.inf


def _decode(model, prompts, threshold: float, fused: bool):
    engine = EarlyExitEngine(model, None)
    engine.passes.fused_checks = fused
    settings = GenerationSettings(strategy="early_exit", max_new_tokens=NEW, early_exit_threshold=threshold,
                                  measure="learned", exit_policy="exact")  # fmt: skip
    return engine.generate(prompts, settings)


CASES = [(True, 0, "exit"), (True, 16, "backbone"), (False, 16, "exit"), (False, 0, "backbone")]


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("llama,k,probe_input", CASES)
def test_decoding_equals_the_module_path(llama, k, probe_input, batch):
    """exit_policy exact, measure learned: at several thresholds the fused check gives the module
    path's tokens, exit layers and confidences (fp32 round-off: 1e-5 relative); some tokens leave
    early and some do not, so both the firing and the non-firing side are exercised."""
    model = _probe_model(llama, k, probe_input)
    groups = [[p] for p in PROMPTS] if batch == 1 else [PROMPTS]
    early = late = 0
    for threshold in (0.2, 0.5, 0.8):
        for prompts in groups:
            fused, plain = _decode(model, prompts, threshold, True), _decode(model, prompts, threshold, False)
            assert [r.tokens for r in fused] == [r.tokens for r in plain]
            assert [r.exit_layers for r in fused] == [r.exit_layers for r in plain]
            for f, p in zip(fused, plain):
                assert f.confidences == pytest.approx(p.confidences, rel=1e-5)
                early += sum(e < 3 for e in f.exit_layers)
                late += sum(e == 3 for e in f.exit_layers)
    assert early > 0 and late > 0


@pytest.mark.parametrize("llama,k,probe_input", CASES[:2])
def test_threshold_one_is_full_decoding(llama, k, probe_input):
    model = _probe_model(llama, k, probe_input)
    ref = [naive_greedy(model, p, NEW) for p in PROMPTS]
    res = _decode(model, PROMPTS, 1.0, True)
    assert [r.tokens for r in res] == ref and all(set(r.exit_layers) == {3} for r in res)


def test_a_probe_on_an_exit_mlp_keeps_the_module_path():
    """A probe reading an exit with an MLP cannot be folded: `folded_probe` says so, and decoding
    still works through the modules (same tokens as with the fused checks switched off)."""
    model = _probe_model(True, 16, "exit", exit_mlp=True)
    assert folded_probe(model.exits["1"]) is None
    backbone = _probe_model(True, 16, "backbone", exit_mlp=True)  # reading the backbone: folds
    assert folded_probe(backbone.exits["1"]) is not None
    for threshold in (0.5, 1.0):
        fused, plain = _decode(model, PROMPTS, threshold, True), _decode(model, PROMPTS, threshold, False)
        assert [r.tokens for r in fused] == [r.tokens for r in plain]
        assert [r.exit_layers for r in fused] == [r.exit_layers for r in plain]
    assert [r.tokens for r in _decode(model, PROMPTS, 1.0, True)] == [naive_greedy(model, p, NEW) for p in PROMPTS]


@pytest.mark.parametrize("k", [0, 16])
def test_a_decode_steps_rmsnorm_check_runs_in_one_native_call(k, monkeypatch):
    """Where the native kernel is built, a uniform decode step's RMSNorm probe check is
    `native.Probe` (`Passes.shared_norm_scores`), and so is a general pass's (a fill's, on its
    newest rows), and decoding through it gives the module path's tokens, exit layers and
    confidences (the leavers' norm and projection in one native call); where it is not, the
    torch check runs (the same test, no calls)."""
    from megatron.early_exit.inference import native
    from megatron.early_exit.inference.passes import Passes

    calls, general = [], []
    real = native.Probe.__call__
    monkeypatch.setattr(native.Probe, "__call__", lambda self, x: calls.append(x.shape) or real(self, x))
    real_scores = Passes.folded_scores

    def spy(self, folded, rows, cand):  # a general pass's check (a fill: several rows per sequence)
        before = len(calls)
        made = real_scores(self, folded, rows, cand)
        if rows.x.shape[1] > 1:
            general.append(len(calls) - before)
        return made

    monkeypatch.setattr(Passes, "folded_scores", spy)
    model = _probe_model(True, k, "backbone", seed={0: 1, 16: 11}[k])  # seeds whose tokens fill pending rows
    for prompts, threshold in [(p, t) for p in ([PROMPTS[0]], PROMPTS) for t in (0.5, 0.9, 0.95)]:
        fused, plain = _decode(model, prompts, threshold, True), _decode(model, prompts, threshold, False)
        assert [r.tokens for r in fused] == [r.tokens for r in plain]
        assert [r.exit_layers for r in fused] == [r.exit_layers for r in plain]
        for f, p in zip(fused, plain):  # leavers' logits by the native head, the norm folded in
            assert f.confidences == pytest.approx(p.confidences, rel=1e-5)
    assert general  # fills checked exits on the general path
    if native.available():
        assert len(calls) >= NEW and all(1 <= s[0] <= len(PROMPTS) for s in calls)
        assert all(c == 1 for c in general)  # there too, the newest rows' check in one native call
    else:
        assert not calls

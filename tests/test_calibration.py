"""Calibrated thresholds (CALM / Learn-Then-Test): p-values, the guarantee over random splits,
the tool writing into the checkpoint, and `--early-exit-thres auto` decoding with them."""

import importlib.util
import json
import math
import os
from dataclasses import replace

import pytest
import torch

from megatron.early_exit import load_checkpoint
from megatron.early_exit.checkpointing import save_checkpoint
from megatron.early_exit.config import ModelConfig
from megatron.early_exit.inference import EarlyExitEngine, GenerationSettings
from megatron.early_exit.inference.calibration import (
    ExitScores,
    binomial_cdf,
    calibrate,
    check_splits,
    chunk_losses,
    draft_vocabulary,
    exit_shares,
    hoeffding_bentkus_p_value,
    p_value,
    single_exit_ceilings,
    teacher_forced_scores,
    threshold_path,
    wsr_p_value,
)
from megatron.early_exit.model import EarlyExitGPT
from megatron.early_exit.tokenizer import build_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DELTA, EPSILON, SPLITS = 0.05, 0.1, 20


def tiny_model(seed: int = 0) -> EarlyExitGPT:
    # init std 0.1: exits agree with the final head on 35-62% of random tokens, and confident
    # tokens agree more often, so calibrated thresholds let ~10% of tokens exit
    cfg = ModelConfig(num_layers=4, hidden_size=32, num_attention_heads=4, vocab_size=64, max_position_embeddings=64,
                      init_method_std=0.1, exit_layer_nums=[1, 2, 3], use_exit_norm=True)  # fmt: skip
    model = EarlyExitGPT(cfg)
    model.init_weights(seed)
    return model.eval()


@pytest.fixture(scope="module")
def scores():
    chunks = torch.randint(0, 64, (400, 32), generator=torch.Generator().manual_seed(1))
    return teacher_forced_scores(tiny_model(), chunks, "max_prob", batch_size=50)


def test_binomial_cdf_and_hoeffding_bentkus_p_value():
    assert binomial_cdf(2, 10, 0.3) == pytest.approx(0.3827827864, rel=1e-9)  # scipy.stats.binom.cdf(2, 10, .3)
    assert binomial_cdf(10, 10, 0.3) == 1.0 and binomial_cdf(-1, 10, 0.3) == 0.0
    # R_hat = 0 over 100 chunks: Hoeffding gives (1 - delta)^n, Bentkus e times that
    assert hoeffding_bentkus_p_value(0.0, 100, 0.05) == pytest.approx(0.95**100, rel=1e-9)
    # the smaller bound wins (values from scipy.stats.binom): Hoeffding exp(-n kl(R_hat || delta)) here ...
    assert hoeffding_bentkus_p_value(0.03, 100, 0.05) == pytest.approx(0.6135892441, rel=1e-9)
    # ... Bentkus e * P(Bin(400, .05) <= 8) there (Hoeffding: 0.00777)
    assert hoeffding_bentkus_p_value(0.02, 400, 0.05) == pytest.approx(0.0046653093254, rel=1e-9)
    assert binomial_cdf(8, 400, 0.05) == pytest.approx(0.0046653093254 / math.e, rel=1e-9)
    assert hoeffding_bentkus_p_value(0.06, 100, 0.05) == 1.0  # above delta: no evidence at all


def test_wsr_p_value_by_hand_and_its_errors():
    # all losses 0: every bet is the cap 1 (the running variance only shrinks), so the wealth is
    # (1 + delta)^n and p = 1.05^-10; Hoeffding-Bentkus gives 0.95^10 on the same losses
    assert wsr_p_value(torch.zeros(10), 0.05, 0.1) == pytest.approx(1.05**-10, rel=1e-12)
    assert p_value("hb", torch.zeros(10), 0.05, 0.1) == pytest.approx(0.95**10, rel=1e-12)
    assert wsr_p_value(torch.ones(50), 0.05, 0.1) == 1.0  # all wrong: the wealth only shrinks
    with pytest.raises(ValueError, match="--bound must be one of hb, wsr, got 'ltt'"):
        p_value("ltt", torch.zeros(10), 0.05, 0.1)


def _chunk_risks(n: int, risk: float, tokens: int, draws: int, seed: int) -> torch.Tensor:
    """[draws, n] chunk losses: the share of `tokens` i.i.d. Bernoulli(risk) tokens in each chunk."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(draws, n, tokens, generator=gen) < risk).float().mean(-1)


@pytest.mark.parametrize("tokens", [1, 32])
def test_wsr_rejects_a_true_null_at_most_epsilon_of_the_time(tokens):
    """Losses whose true risk is exactly delta (the hardest null), 1000 draws of 200 chunks:
    p <= epsilon in at most epsilon of them (plus 3 binomial standard errors: 0.028)."""
    risks = _chunk_risks(200, DELTA, tokens, 1000, seed=tokens)
    rejected = sum(wsr_p_value(r, DELTA, EPSILON) <= EPSILON for r in risks)
    # measured: 92 (Bernoulli tokens: WSR is near-exact there), 0 (32-token chunks)
    assert rejected <= 1000 * EPSILON + 3 * (1000 * EPSILON * (1 - EPSILON)) ** 0.5, rejected


def test_wsr_is_tighter_than_hoeffding_bentkus_on_low_variance_chunks():
    """200 chunks of 32 tokens at true risk 0.035 (chunk losses vary little): WSR proves risk <=
    0.05 in most draws, Hoeffding-Bentkus (which assumes the worst variance) in few."""
    risks = _chunk_risks(200, 0.035, 32, 100, seed=7)
    wsr = [wsr_p_value(r, DELTA, EPSILON) for r in risks]
    hb = [p_value("hb", r, DELTA, EPSILON) for r in risks]
    assert sum(p <= EPSILON for p in wsr) >= 70, wsr  # measured: 86
    assert sum(p <= EPSILON for p in hb) <= 30, hb  # measured: 0
    assert sum(w < h for w, h in zip(wsr, hb)) >= 90  # measured: 100


def test_threshold_paths_go_from_never_to_always(scores):
    path = threshold_path(scores, 3, "quantile", 11)
    assert torch.all(path[0] == 1.0) and torch.all(path[1:].diff(dim=0) <= 0)
    risk, share = chunk_losses(scores, path[0])
    assert risk.sum() == 0 and share.sum() == 0
    risk, share = chunk_losses(scores, path[-1])  # every token leaves at exit 1
    assert share.mean() == 1.0 and risk.mean() == pytest.approx(1 - scores.agree[..., 0].float().mean().item())
    assert torch.allclose(threshold_path(None, 3, "shared", 5)[:, 1], torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))


def test_precision_path_by_hand():
    """One exit, 10 tokens by confidence: A A W A A W A W A W (A agrees with the final head). The
    disagreement among the k most confident runs 0, 0, 1/3, 1/4, 1/5, 1/3, 2/7, 3/8, 1/3, 2/5; at
    risk r the path's threshold is the confidence of the last k whose disagreement is <= r. A
    second exit that always agrees fires on every token once r > 0; one that never agrees never."""
    agree = torch.tensor([1, 1, 0, 1, 1, 0, 1, 0, 1, 0], dtype=torch.bool)
    conf = torch.linspace(1.0, 0.1, 10)
    s = ExitScores([1, 2, 3], torch.stack([conf, conf, conf], -1).view(2, 5, 3),
                   torch.stack([agree, torch.ones(10, dtype=torch.bool), torch.zeros(10, dtype=torch.bool)], -1)
                   .view(2, 5, 3))  # fmt: skip
    path = threshold_path(s, 3, "precision", 11)  # risks (j / 10)^2: 0, .01, .04, .09, .16, .25, .36, .49, ...
    assert torch.all(path[0] == 1.0)  # row 0: nothing leaves
    assert path[1:6, 0].tolist() == pytest.approx([0.9, 0.9, 0.9, 0.9, 0.6])  # r .01-.16: k = 2; r .25: k = 5
    assert path[6:, 0].tolist() == pytest.approx([0.2, 0.1, 0.1, 0.1, 0.1])  # r .36: k = 9; r >= .49: all 10
    assert path[1:, 1].tolist() == pytest.approx([0.1] * 10)  # always agrees: every token from the first step
    assert path[:, 2].tolist() == [1.0] * 10 + [pytest.approx(0.1)]  # never agrees: only at risk 1.0
    assert torch.all(path.diff(dim=0) <= 0)  # conservative to aggressive
    with pytest.raises(ValueError, match="--path must be quantile, shared or precision, got 'median'"):
        threshold_path(s, 3, "median", 11)


def test_precision_path_keeps_the_guarantee_and_lets_more_out(scores):
    """The same 20 random halves as below with the precision path: at most epsilon of them exceed
    delta, and on these exits (agreement 35-62%, the first the worst) more tokens leave than on
    the quantile path, whose common share is held back by the worst exit."""
    exceed, shares, quantile = 0, [], []
    for seed in range(SPLITS):
        order = torch.randperm(400, generator=torch.Generator().manual_seed(100 + seed))
        calib, test = scores.select(order[:200]), scores.select(order[200:])
        for path, into in (("precision", shares), ("quantile", quantile)):
            cal = calibrate(calib, DELTA, EPSILON, path=path, seed=seed)
            risk, share = chunk_losses(test, torch.tensor(cal.thresholds))
            into.append(float(share.mean()))
            exceed += int(path == "precision" and risk.mean() > DELTA)
    assert exceed <= EPSILON * SPLITS, exceed  # measured: 0 of 20 (mean disagreement 0.031, max 0.043)
    assert sum(shares) > sum(quantile), (shares, quantile)  # measured: 25.2% exit (22.3-27.5%) against 16.1%


def test_guarantee_holds_over_random_splits(scores):
    """20 random calibration/test halves: the realised test disagreement exceeds delta in at most
    epsilon of them, while thresholds let tokens exit; a naive choice (largest path entry whose
    calibration disagreement is <= delta) fails the same check, so the check can fail."""
    exceed, naive_exceed, shares = 0, 0, []
    for seed in range(SPLITS):
        order = torch.randperm(400, generator=torch.Generator().manual_seed(100 + seed))
        calib, test = scores.select(order[:200]), scores.select(order[200:])
        cal = calibrate(calib, DELTA, EPSILON, path="quantile", seed=seed)
        risk, share = chunk_losses(test, torch.tensor(cal.thresholds))
        exceed += int(risk.mean() > DELTA)
        shares.append(float(share.mean()))
        assert cal.lambda_index > 0 and cal.p_value <= EPSILON
        path = threshold_path(calib, 3, "quantile", 101)
        ok = [j for j in range(101) if chunk_losses(calib, path[j])[0].mean() <= DELTA]
        naive_exceed += int(chunk_losses(test, path[max(ok)])[0].mean() > DELTA)
    assert exceed <= EPSILON * SPLITS, exceed  # measured: 0 of 20 (disagreement 0.031 on average; HB: 0.014)
    assert min(shares) > 0.03 and sum(shares) / SPLITS > 0.05, shares  # measured: 13.7-17.5% exit (HB: 8.8-11.7%)
    assert naive_exceed > EPSILON * SPLITS, naive_exceed  # measured: 5 of 20


@pytest.mark.parametrize("bound", ["wsr", "hb"])
def test_check_splits_holds_and_lets_tokens_leave(scores, bound):
    """check_splits: 20 random calibration/test halves; the realised test disagreement exceeds
    delta in at most epsilon of them, and the thresholds are not trivial (tokens leave)."""
    check = check_splits(scores, DELTA, EPSILON, SPLITS, test_fraction=0.5, seed=100, bound=bound)
    assert len(check.splits) == SPLITS and check.exits == [1, 2, 3]
    # measured: 0 of 20 for both (max disagreement WSR 0.037, HB 0.019)
    assert check.violations <= EPSILON * SPLITS and check.holds, check.violations
    for r in check.splits:
        assert r.lambda_index > 0 and min(r.thresholds) < 1.0
        assert len(r.exit_shares) == 3 and 0.0 <= sum(r.exit_shares) <= 1.0
    mean_share = sum(sum(r.exit_shares) for r in check.splits) / SPLITS
    assert mean_share > 0.05, mean_share  # measured: WSR 15.4% (13.8-17.4% per split), HB 10.0% (8.9-11.5%)
    d = check.as_dict()
    assert d["violations"] == check.violations and d["num_splits"] == SPLITS and len(d["splits"]) == SPLITS
    # split 0 by hand: same permutation, calibrate on the other half, disagreement on the test half
    order = torch.randperm(400, generator=torch.Generator().manual_seed(100))
    calib, test = scores.select(order[200:]), scores.select(order[:200])
    cal = calibrate(calib, DELTA, EPSILON, seed=100, bound=bound)
    risk, share = chunk_losses(test, torch.tensor(cal.thresholds))
    assert check.splits[0].thresholds == cal.thresholds
    assert check.splits[0].test_risk == pytest.approx(float(risk.mean()), abs=1e-7)
    assert sum(check.splits[0].exit_shares) == pytest.approx(float(share.mean()), abs=1e-6)


def test_check_splits_catches_a_choice_without_the_guarantee(scores, monkeypatch):
    """The check can fail: with calibration replaced by the naive choice (the most aggressive path
    entry whose calibration disagreement is <= delta), more than epsilon of the splits exceed delta."""
    from megatron.early_exit.inference import calibration as module

    def naive(calib, delta, epsilon, path, steps, fit_fraction, seed, bound):
        thresholds = threshold_path(calib, 3, "quantile", 101)
        j = max(j for j in range(101) if chunk_losses(calib, thresholds[j])[0].mean() <= delta)
        return module.Calibration(calib.exits, thresholds[j].tolist(), j, 0.0, 0.0, 0.0, 0, 0)

    monkeypatch.setattr(module, "calibrate", naive)
    check = check_splits(scores, DELTA, EPSILON, SPLITS, seed=100)
    assert check.violations > EPSILON * SPLITS and not check.holds, check.violations  # measured: 5 of 20


def test_exit_shares_count_the_first_exit_that_fires(scores):
    thresholds = torch.tensor([1.0, 0.0, 0.0])  # exit 1 never fires; exit 2 always does first
    assert exit_shares(scores, thresholds) == [0.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="--check-splits must be >= 1"):
        check_splits(scores, DELTA, EPSILON, 0)
    with pytest.raises(ValueError, match="test fraction 1.0 leaves no chunks"):
        check_splits(scores, DELTA, EPSILON, 2, test_fraction=1.0)


def test_single_exit_ceilings_by_hand():
    """10 tokens at one exit, 6 agree; by confidence: A A W A A W A W A W (A agrees, W does not).
    delta 0.1 (one wrong token of 10): oracle 6/10 + 0.1; ranked: the first 5 hold 1 wrong token."""
    agree = torch.tensor([1, 1, 0, 1, 1, 0, 1, 0, 1, 0], dtype=torch.bool)
    conf = torch.linspace(1.0, 0.1, 10)
    s = ExitScores([3], conf.view(2, 5, 1), agree.view(2, 5, 1))
    assert single_exit_ceilings(s, 0, 0.1) == pytest.approx((0.7, 0.5))
    assert single_exit_ceilings(s, 0, 0.0) == pytest.approx((0.6, 0.2))
    reversed_ = ExitScores([3], conf.flip(0).view(2, 5, 1), agree.view(2, 5, 1))  # the least sure first: W
    assert single_exit_ceilings(reversed_, 0, 0.0) == pytest.approx((0.6, 0.0))


def _tool(name: str, path: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tool_writes_thresholds_that_generate_auto_uses(tmp_path, capsys):
    ckpt = tmp_path / "ck"
    save_checkpoint(str(ckpt), 0, tiny_model(), build_tokenizer("NullTokenizer", vocab_size=63))
    gen = torch.Generator().manual_seed(2)
    texts = [" ".join(map(str, torch.randint(0, 63, (96,), generator=gen).tolist())) for _ in range(120)]
    (tmp_path / "held_out.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    argv = f"--load {ckpt} --delta {DELTA} --epsilon {EPSILON} --input {tmp_path / 'held_out.jsonl'} --seq-length 32"
    capsys.readouterr()
    tool = _tool("calibrate_thresholds", "tools/eval/calibrate_thresholds.py")
    tool.main([*argv.split(), "--check-splits", "4", "--draft-vocab-coverage", "0.8"])
    printed = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in printed[1:6]] == [f"split {i:>3}" for i in range(4)] + ["split check"]
    assert "random calibration/test splits" in printed[5] and "epsilon 0.1:" in printed[5]
    record = json.loads((ckpt / "iter_0000000" / "early_exit_thresholds.json").read_text())
    check = record["split_check"]
    assert check["num_splits"] == 4 and len(check["splits"]) == 4 and check["test_fraction"] == 0.5
    assert check["violations"] == sum(s["test_risk"] > DELTA for s in check["splits"])
    assert f"{check['violations']} of 4 random calibration/test splits" in printed[5]
    assert record["delta"] == DELTA and record["epsilon"] == EPSILON and record["measure"] == "max_prob"
    assert record["bound"] == "wsr" and record["method"].startswith("Waudby-Smith-Ramdas betting p-values")
    assert record["calibration_data"]["num_chunks"] == 256 and record["lambda_index"] > 0
    card = (ckpt / "iter_0000000" / "README.md").read_text()
    assert "Calibrated early-exit thresholds" in card and "held_out.jsonl" in card
    assert f"- checked over random splits: {check['violations']} of 4 random calibration/test splits" in card
    model, tok = load_checkpoint(str(ckpt))
    assert model.calibrated_thresholds["thresholds"] == {int(k): v for k, v in record["thresholds"].items()}
    agreement = model.calibrated_thresholds["agreement"]  # self-speculation's warm start
    assert sorted(agreement) == record["exits"] and all(0.0 <= v <= 1.0 for v in agreement.values())
    assert "top-1 agreement with the final head" in card
    # the draft vocabulary: a random tiny model's top-1 tokens spread wide (80% of them: 25 of 64)
    drafts = record["draft_vocabulary"]
    assert drafts["coverage"] >= 0.8 and drafts["target"] == 0.8 and drafts["num_tokens"] == 256 * 32
    assert drafts["tokens"] == sorted(drafts["tokens"]) and len(drafts["tokens"]) <= 32
    assert f"draft vocabulary: {len(drafts['tokens'])} of 64 tokens make up" in printed[6]
    assert f"self-speculative drafts project onto {len(drafts['tokens'])} tokens" in card
    assert model.calibrated_thresholds["draft_vocabulary"]["tokens"] == drafts["tokens"]
    assert record["exit_vocabulary"] == "full"  # max_prob decides on the whole vocabulary: agreement as it is
    assert EarlyExitEngine(model).passes.draft_vocab.tolist() == drafts["tokens"]
    capsys.readouterr()
    _tool("generate", "tools/generate.py").main(
        ["--load", str(ckpt), "--prompt", "1 2 3 4", "--early-exit-thres", "auto", "--max-new-tokens", "24", "--json"]
    )
    out = json.loads(capsys.readouterr().out)
    assert len(out["tokens"]) == 24 and set(out["exit_layers"]) <= {1, 2, 3, 4}
    # the engine honours per-exit thresholds: only exit 2 may fire, and it always does (the first
    # token comes from the prompt's pass through the whole model)
    engine = EarlyExitEngine(model, tok)
    s = GenerationSettings(strategy="early_exit", max_new_tokens=8, exit_thresholds={1: 1.0, 2: 0.0, 3: 1.0})
    assert engine.generate([[1, 2, 3]], s)[0].exit_layers == [4] + [2] * 7


def test_learned_scores_read_what_the_probe_reads():
    """--measure learned: exit-mode probes score the exit's hidden state, backbone-mode probes
    their own norm of the backbone state at the exit's depth (as training and decoding do)."""
    chunks = torch.randint(0, 64, (6, 16), generator=torch.Generator().manual_seed(4))
    for mode in ("exit", "backbone"):
        cfg = ModelConfig(num_layers=4, hidden_size=32, num_attention_heads=4, vocab_size=64,
                          max_position_embeddings=64, init_method_std=0.1, exit_layer_nums=[1, 3], use_exit_norm=True,
                          use_exit_mlp=True, use_exit_confidence_head=True, exit_confidence_input=mode)  # fmt: skip
        model = EarlyExitGPT(cfg)
        model.init_weights(5)
        model.eval()
        got = teacher_forced_scores(model, chunks, "learned", batch_size=4).confidence  # (C, L, E)
        with torch.no_grad():
            h, rotary = model.embed_input(chunks, None, None)
            _, inputs = model.run_layers(h, rotary)
            for e, (n, x) in enumerate(inputs):
                head = model.exits[str(n)]
                probe_in = head.confidence_norm(x) if mode == "backbone" else head.hidden(x, rotary)
                want = torch.sigmoid(head.confidence(probe_in).squeeze(-1))
                assert torch.allclose(got[..., e], want, rtol=1e-6, atol=1e-7), (mode, n)
                assert got[..., e].std() > 1e-3  # the probe's score varies with its input


def test_draft_vocabulary_is_the_fewest_most_frequent_final_tokens():
    final = torch.tensor([[5, 5, 5, 5, 2, 2, 2, 9, 9, 1], [5, 5, 2, 9, 7, 7, 3, 3, 3, 3]])  # 20 tokens
    s = ExitScores([1], torch.zeros(2, 10, 1), torch.zeros(2, 10, 1, dtype=torch.bool), final)
    # counts: 5 x6, 2 x4, 3 x4, 9 x3, 7 x2, 1 x1; ties by the lower id (2 before 3)
    assert draft_vocabulary(s, 20, 0.3)["tokens"] == [5]
    d = draft_vocabulary(s, 20, 0.5)
    assert d == {"tokens": [2, 5], "coverage": 0.5, "target": 0.5, "num_tokens": 20}
    assert draft_vocabulary(s, 20, 0.51)["tokens"] == [2, 3, 5]
    assert draft_vocabulary(s, 20, 1.0)["tokens"] == [1, 2, 3, 5, 7, 9]
    assert draft_vocabulary(s, 10, 1.0) is None  # 6 of 10: over half the vocabulary saves too little
    with pytest.raises(ValueError, match="coverage must be in"):
        draft_vocabulary(s, 20, 0.0)
    with pytest.raises(ValueError, match="needs the final head's tokens"):
        draft_vocabulary(ExitScores([1], s.confidence, s.agree), 20, 0.5)


def test_teacher_forced_scores_record_the_final_heads_tokens(scores):
    chunks = torch.randint(0, 64, (400, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = tiny_model()(chunks[:3]).logits.argmax(-1)
    assert torch.equal(scores.final[:3], want) and scores.select(torch.tensor([2])).final.shape == (1, 32)


@pytest.mark.parametrize("measure", ["max_prob", "learned"])
def test_forced_steps_reproduce_the_engines_early_exit_tokens(measure):
    """An early-exit decoding's own output, teacher-forced, gives back every one of its decode
    steps' tokens (K/V-correct decoding sees the full model's hidden states given its prefix),
    and as many leaving tokens; on full decoding's output the share that the same decisions
    keep is below 1 and is what `step_agreement` reads."""
    from megatron.early_exit.inference.calibration import forced_steps, step_agreement

    cfg = ModelConfig(num_layers=4, hidden_size=32, num_attention_heads=4, vocab_size=64, max_position_embeddings=96,
                      init_method_std=0.1, exit_layer_nums=[1, 2], use_exit_norm=True,
                      use_exit_confidence_head=measure == "learned", exit_confidence_input="backbone")  # fmt: skip
    model = EarlyExitGPT(cfg)
    model.init_weights(3)
    if measure == "learned":  # probes that vary with their input (zero-initialised last layers say 0.5 everywhere)
        with torch.no_grad():
            for head in model.exits.values():
                torch.nn.init.normal_(head.confidence.weight, std=2.0, generator=torch.Generator().manual_seed(7))
    model.eval()
    tok = build_tokenizer("NullTokenizer", vocab_size=64)
    engine = EarlyExitEngine(model, tok)
    prompts = [[int(t) for t in torch.randint(0, 64, (9 + 3 * i,), generator=torch.Generator().manual_seed(i))]
               for i in range(3)]  # fmt: skip
    new = dict(max_new_tokens=24, ignore_eos=True)
    full = [r.tokens for r in engine.generate(prompts, GenerationSettings(**new))]
    steps = forced_steps(model, prompts, full, measure)
    assert steps.target.shape == (3 * 23,) and steps.confidence.shape == (3 * 23, 2)
    assert torch.equal(steps.final, steps.target)  # fp32: the final head's tokens are full decoding's
    threshold = float(steps.confidence[:, 0].median())  # about half the steps leave at the first exit
    s = GenerationSettings(strategy="early_exit", early_exit_threshold=threshold, measure=measure,
                           exit_policy="exact", **new)  # fmt: skip
    policy = engine.check(s, prompts)
    on_full, left_full = step_agreement(steps, policy)
    assert 0.3 < left_full < 0.9 and on_full < 1.0
    fires = steps.confidence >= threshold  # (N, 2): exit 1 decides where it fires, else exit 2 where it does
    chosen = torch.where(fires[:, 0], steps.tokens[:, 0], steps.tokens[:, 1])
    wrong = fires.any(-1) & (chosen != steps.target)
    assert on_full == pytest.approx(1.0 - wrong.double().mean().item(), abs=1e-12)
    runs = engine.generate(prompts, s)
    ee = [r.tokens for r in runs]
    assert ee != full
    own = forced_steps(model, prompts, ee, measure)
    agreement, left = step_agreement(own, policy)
    assert agreement == 1.0
    leaving = [layer < cfg.num_layers for r in runs for layer in r.exit_layers[1:]]
    assert left == pytest.approx(sum(leaving) / len(leaving), abs=1e-9)
    never = replace(policy, threshold=1.0, per_exit=())
    assert step_agreement(own, never) == (1.0, 0.0)  # the final head's steps are full decoding's own


def _answers_and_steps(num: int = 24):
    """A tiny model's full greedy answers of unequal length to `num` prompts, teacher-forced."""
    from megatron.early_exit.inference.calibration import forced_steps

    model, tok = tiny_model(), build_tokenizer("NullTokenizer", vocab_size=63)
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 63, (6 + i % 5,), generator=gen).tolist() for i in range(num)]
    settings = GenerationSettings(max_new_tokens=16, ignore_eos=True)
    outputs = [r.tokens for r in EarlyExitEngine(model, tok).generate(prompts, settings)]
    outputs = [out[: 2 + i % 13] for i, out in enumerate(outputs)]  # 1 to 13 decode steps each
    outputs[3] = outputs[3][:1]  # an answer without a decode step: no unit
    return model, prompts, outputs, forced_steps(model, prompts, outputs, "max_prob")


def test_generation_scores_make_one_unit_an_answer_and_agree_with_step_agreement():
    """One chunk an answer (padding masked): pooled over the answers' steps, the chunk losses and
    exit shares are `step_agreement`'s disagreement and leaving share at the same thresholds;
    each chunk's loss is its own steps' share; padding never reaches a quantile or a count."""
    from megatron.early_exit.inference.calibration import generation_scores, step_agreement
    from megatron.early_exit.inference.passes import ExitPolicy

    _, _, outputs, steps = _answers_and_steps()
    lengths = [len(o) - 1 for o in outputs]
    scores = generation_scores(steps, lengths)
    assert scores.confidence.shape[:2] == (23, 13) and scores.mask.sum() == steps.target.numel() == sum(lengths)
    th = torch.tensor([float(steps.confidence[:, i].median()) for i in range(3)])
    risks, shares = chunk_losses(scores, th)
    n = scores.mask.sum(-1).double()
    policy = ExitPolicy((1, 2, 3), 1.0, "max_prob", per_exit=tuple(zip((1, 2, 3), th.tolist())))
    agreement, left = step_agreement(steps, policy)
    assert float((risks.double() * n).sum() / n.sum()) == pytest.approx(1.0 - agreement, abs=1e-6)
    assert float((shares.double() * n).sum() / n.sum()) == pytest.approx(left, abs=1e-6)
    assert sum(exit_shares(scores, th)) == pytest.approx(left, abs=1e-6)
    first = next(i for i, k in enumerate(lengths) if k > 1)  # the first answer's own steps, by hand
    k = lengths[first]
    fire = steps.confidence[:k] >= th
    chosen = (fire & (fire.cumsum(-1) == 1) & (steps.tokens[:k] != steps.target[:k, None])).any(-1)
    assert float(risks[0]) == pytest.approx(chosen.double().mean().item(), abs=1e-6)
    padded = replace(scores, confidence=torch.where(scores.mask[..., None], scores.confidence, torch.tensor(9.0)))
    assert torch.equal(threshold_path(padded, 3, "quantile", 11), threshold_path(scores, 3, "quantile", 11))
    assert draft_vocabulary(padded, 64, 1.0)["num_tokens"] == sum(lengths)
    with pytest.raises(ValueError, match="decode steps in the lengths"):
        generation_scores(steps, lengths[:-1])


def test_tool_calibrates_on_the_models_own_answers(tmp_path, capsys):
    """--prompts: the model answers each prompt (full greedy), the answers are the units, and the
    record's risk is the tested answers' mean disagreement at the chosen thresholds."""
    from megatron.early_exit.inference.calibration import forced_steps, generation_scores

    ckpt = tmp_path / "ck"
    model, tok = tiny_model(), build_tokenizer("NullTokenizer", vocab_size=63)
    save_checkpoint(str(ckpt), 0, model, tok)
    gen = torch.Generator().manual_seed(2)
    texts = [" ".join(map(str, torch.randint(0, 63, (8,), generator=gen).tolist())) for _ in range(40)]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": t, "paper": "p"}) + "\n" for t in texts))
    tool = _tool("calibrate_thresholds", "tools/eval/calibrate_thresholds.py")
    argv = f"--load {ckpt} --delta 0.3 --epsilon {EPSILON} --prompts {path} --num-prompts 32 --max-new-tokens 12"
    tool.main(argv.split())
    record = json.loads((ckpt / "iter_0000000" / "early_exit_thresholds.json").read_text())
    prompts = [tok.tokenize(t) for t in texts[:32]]  # answered as the tool does: up to 12 tokens or the end token
    outputs = [r.tokens for r in EarlyExitEngine(model, tok).generate(prompts, GenerationSettings(max_new_tokens=12))]
    lengths = [len(o) - 1 for o in outputs]
    units, steps = sum(n > 0 for n in lengths), sum(lengths)
    assert 20 <= units < 32 and steps < 32 * 11  # some answers end early (the random model's end token)
    data = record["calibration_data"]
    assert data["chunk_length"] == "one answer" and data["num_chunks"] == units and data["decode_steps"] == steps
    assert record["num_fit_chunks"] + record["num_test_chunks"] == units and record["lambda_index"] > 0
    scores = generation_scores(forced_steps(model, prompts, outputs, "max_prob"), lengths)
    order = torch.randperm(units, generator=torch.Generator().manual_seed(1234))  # the tool's split (--seed)
    test = scores.select(order[record["num_fit_chunks"] :])
    risk, _ = chunk_losses(test, torch.tensor([record["thresholds"][str(e)] for e in record["exits"]]))
    assert record["risk"] == pytest.approx(float(risk.mean()), abs=1e-6) and record["risk"] <= 0.3
    card = (ckpt / "iter_0000000" / "README.md").read_text()
    assert f"{units} answers, {steps} decode steps (one answer a unit)" in card and "given the same prefix" in card
    path.write_text('{"text": "1 2"}\n')
    with pytest.raises(ValueError, match=r'prompts.jsonl:1: needs a JSON object with a non-empty "prompt"'):
        tool.run(tool.build_parser().parse_args(argv.split()))
    with pytest.raises(ValueError, match="give exactly one of --data-path PREFIX, --input F.jsonl and --prompts"):
        tool.run(tool.build_parser().parse_args([*argv.split(), "--input", str(path)]))

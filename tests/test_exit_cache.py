"""EE-Tuning from cached activations equals EE-Tuning through the frozen backbone (fp32)."""

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from megatron.early_exit.arguments import parse_args
from megatron.early_exit.checkpointing import save_checkpoint
from megatron.early_exit.config import ModelConfig
from megatron.early_exit.model import EarlyExitGPT
from megatron.early_exit.tokenizer import build_tokenizer
from megatron.early_exit.training.cached_tuning import CachedTuner, cached_losses, candidate_set
from megatron.early_exit.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 64
SHAPES = {
    # GPT-2 style, norm + MLP exits with confidence probes
    "mlp": dict(exit_layer_nums=[1, 3], use_exit_norm=True, use_exit_mlp=True, use_exit_confidence_head=True),
    # Llama style (RoPE), exits with a whole transformer block: they attend over the cached sequence
    "block": dict(
        exit_layer_nums=[2],
        use_exit_norm=True,
        use_exit_block=True,
        normalization="RMSNorm",
        swiglu=True,
        position_embedding_type="rope",
        add_bias_linear=False,
        num_query_groups=2,
    ),  # fmt: skip
}
TUNE = (
    "--tune-exit --micro-batch-size 2 --global-batch-size 4 --seq-length 16 --train-iters 3 --eval-iters 1 "
    "--lr 1e-3 --clip-grad 0 --log-interval 1 --eval-interval 0 --seed 3 --device cpu"
).split()


def _tool():
    path = os.path.join(ROOT, "tools", "checkpoint", "cache_exit_activations.py")
    spec = importlib.util.spec_from_file_location("cache_exit_activations", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_checkpoint(path, shape: str, seed: int = 0, **extra) -> str:
    # init std 0.3: peaked teacher distributions, so kd is a real loss (with 0.02 it is ~1e-4)
    cfg = ModelConfig(num_layers=4, hidden_size=32, num_attention_heads=4, vocab_size=VOCAB, max_position_embeddings=16,
                      init_method_std=0.3, **{**SHAPES[shape], **extra})  # fmt: skip
    model = EarlyExitGPT(cfg)
    model.init_weights(seed)
    save_checkpoint(str(path), 0, model, build_tokenizer("NullTokenizer", vocab_size=VOCAB - 1))
    return str(path)


def make_cache(ckpt: str, out, top_k: int = VOCAB, samples: int = 4) -> str:
    argv = f"--load {ckpt} --mock-data --output {out} --seq-length 16 --num-samples {samples} --num-valid-samples 4 "
    argv += f"--top-k {top_k} --dtype fp32 --seed 3 --micro-batch-size 3 --no-progress-bar"
    _tool().main(argv.split())
    return str(out)


def exit_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module", params=sorted(SHAPES))
def setup(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    ckpt = make_checkpoint(root / "ck", request.param)
    return request.param, ckpt, make_cache(ckpt, root / "cache")


@pytest.mark.parametrize("loss_type", ["ce", "kd", "ce+kd"])
def test_cached_tuning_equals_tuning_through_backbone(setup, loss_type):
    _, ckpt, cache = setup
    common = [*TUNE, "--load", ckpt, "--exit-loss-type", loss_type]
    live = Trainer(parse_args([*common, "--mock-data"]))
    cached = CachedTuner(parse_args([*common, "--exit-activation-cache", cache]))
    a, b = live.train_step(), cached.train_step()
    exits = live.config.exit_layer_nums
    for n in exits:
        # fp32, same inputs: the two paths differ only in matmul batching (round-off)
        assert b[f"exit_{n} loss"] == pytest.approx(a[f"exit_{n} loss"], rel=1e-6, abs=1e-6)
        if "kd" in loss_type:
            assert b[f"exit_{n} kd loss"] == pytest.approx(a[f"exit_{n} kd loss"], rel=1e-5, abs=1e-6)
    assert a[f"exit_{exits[0]} loss"] > 1.0  # a real loss, not an empty batch
    ga, gb = exit_grads(live.model), exit_grads(cached.model)
    assert sorted(ga) == sorted(gb) and all(n.startswith("exits.") for n in ga) and len(ga) >= 6
    for name in ga:
        assert torch.allclose(gb[name], ga[name], rtol=1e-5, atol=1e-7), name  # measured: <= 7e-7 relative
        assert ga[name].abs().sum() > 0, name


def test_cached_tuning_runs_epochs_and_validation_is_full_vocabulary(setup, tmp_path):
    _, ckpt, cache = setup
    argv = [*TUNE, "--load", ckpt, "--exit-activation-cache", cache, "--exit-loss-type", "ce+kd", "--save",
            str(tmp_path / "tuned"), "--train-iters", "6", "--exit-candidate-vocab", "8", "--lr", "1e-2"]  # fmt: skip
    tuner = CachedTuner(parse_args(argv))
    before = tuner.evaluate()
    state = tuner.run()  # 6 iterations over a 4-sequence cache: 6 epochs
    after = tuner.evaluate()
    assert state.consumed_train_samples == 24 and os.path.isdir(state.checkpoint)
    n = tuner.config.exit_layer_nums[0]
    assert after[f"exit_{n} loss"] < before[f"exit_{n} loss"]
    assert {f"exit_{n} loss", f"exit_{n} kd loss", f"exit_{n} agreement"} <= set(after)


def test_candidate_set_of_the_whole_vocabulary_is_the_full_softmax(setup):
    """N >= V - |P| negatives: the columns are the vocabulary once (the batch's labels and top-k,
    then every other id), no correction: same loss, same gradients as the whole vocabulary."""
    _, ckpt, cache = setup
    tuner = CachedTuner(parse_args([*TUNE, "--load", ckpt, "--exit-activation-cache", cache]))
    batch = tuner.train_cache.batch([0, 1, 2])
    batch["topk_ids"], batch["topk_logprobs"] = batch["topk_ids"][..., :4], batch["topk_logprobs"][..., :4]
    weights = {n: 1.0 for n in tuner.config.exit_layer_nums}
    cols = candidate_set(batch["labels"], batch["topk_ids"], VOCAB, VOCAB, torch.Generator().manual_seed(0))
    assert cols.bias is None and sorted(cols.ids.tolist()) == list(range(VOCAB))
    results = []
    for c in (None, cols):
        tuner.model.zero_grad()
        total, parts = cached_losses(tuner.model, batch, weights, "ce+kd", 2.0, c)
        total.backward()
        results.append((total.item(), parts, exit_grads(tuner.model)))
    (full, p_full, g_full), (cand, p_cand, g_cand) = results
    assert cand == pytest.approx(full, rel=1e-6) and full > 1.0
    for k in p_full:
        assert float(p_cand[k]) == pytest.approx(float(p_full[k]), rel=1e-5, abs=1e-7), k
    for name in g_full:
        assert torch.allclose(g_cand[name], g_full[name], rtol=1e-5, atol=1e-7), name


def test_candidate_set_is_the_union_of_positives_and_distinct_negatives():
    """Duplicates (a label in its own top-k, ids shared by tokens) appear once; the negatives
    are drawn outside the positives, each with correction -log(m / (V - |P|))."""
    labels = torch.tensor([[5, 5, 7, 9]])
    topk = torch.tensor([[[5, 1], [1, 2], [7, 5], [3, 1]]])  # label 5 in its top-k, 1 and 5 repeated
    cols = candidate_set(labels, topk, 20, 6, torch.Generator().manual_seed(0))
    assert cols.ids[: cols.num_positives].tolist() == [1, 2, 3, 5, 7, 9]
    negatives = cols.ids[cols.num_positives :].tolist()
    assert len(negatives) == 6 and len(set(cols.ids.tolist())) == 12 and not set(negatives) & {1, 2, 3, 5, 7, 9}
    assert torch.equal(cols.ids[cols.label_col], labels) and torch.equal(cols.ids[cols.topk_col], topk)
    assert torch.equal(cols.bias[:6], torch.zeros(6))
    assert torch.allclose(cols.bias[6:], torch.tensor(-math.log(6 / 14)))  # 14 ids outside P: +0.847
    # more negatives asked than ids outside P: all of them, no correction
    every = candidate_set(labels, topk, 20, 100, torch.Generator().manual_seed(0))
    assert every.bias is None and sorted(every.ids.tolist()) == list(range(20))


def _reference_losses(model, batch, cols, loss_type, kd_t):
    """The candidate-set objective spelled out token by token from the full-vocabulary logits:
    log Z_t = log(sum_{j in P} e^{z_j} + (V - |P|) / m * sum_{j in negatives} e^{z_j})."""
    positives, negatives = cols.ids[: cols.num_positives], cols.ids[cols.num_positives :]
    scale = (VOCAB - positives.numel()) / negatives.numel()
    rotary = model.rotary(torch.arange(16)[None]) if model.rotary is not None else None
    total = 0.0
    for n in model.exit_layer_numbers:
        head = model.exits[str(n)]
        logits = head.project(head.hidden(batch["hidden"][n].float(), rotary), model.tied_output_weight())
        per_token, mask = [], batch["loss_mask"].flatten()
        for t, z in enumerate(logits.reshape(-1, VOCAB)):
            b, s = divmod(t, 16)
            log_z = lambda zz: torch.log(zz[positives].exp().sum() + scale * zz[negatives].exp().sum())  # noqa: E731
            ce = log_z(z) - z[batch["labels"][b, s]]
            q = torch.softmax(batch["topk_logprobs"][b, s] / kd_t, -1)
            student = z[batch["topk_ids"][b, s]] / kd_t - log_z(z / kd_t)
            kd = (q * (q.log() - student)).sum() * kd_t**2
            per_token.append(ce * ("ce" in loss_type.split("+")) + kd * ("kd" in loss_type))
        total = total + (torch.stack(per_token) * mask).sum() / mask.sum()
    return total


@pytest.mark.parametrize("loss_type,kd_t", [("ce+kd", 1.0), ("kd", 2.0), ("ce", 1.0)])
def test_candidate_set_loss_equals_the_reference(setup, loss_type, kd_t):
    """fp32: the one-matmul candidate objective = the per-token reference (loss and every exit
    gradient); they differ only in summation order (tolerance 1e-5 relative)."""
    _, ckpt, cache = setup
    tuner = CachedTuner(parse_args([*TUNE, "--load", ckpt, "--exit-activation-cache", cache]))
    model, batch = tuner.model, tuner.train_cache.batch([0, 1])
    batch["topk_ids"], batch["topk_logprobs"] = batch["topk_ids"][..., :3], batch["topk_logprobs"][..., :3]
    cols = candidate_set(batch["labels"], batch["topk_ids"], VOCAB, 8, torch.Generator().manual_seed(1))
    assert cols.bias is not None and cols.num_positives + 8 < VOCAB  # a real sample, not the vocabulary
    model.zero_grad()
    want = _reference_losses(model, batch, cols, loss_type, kd_t)
    want.backward()
    g_want = exit_grads(model)
    model.zero_grad()
    no_probes = {n: 1.0 for n in model.exit_layer_numbers}
    got, parts = cached_losses(model, batch, no_probes, loss_type, kd_t, cols)
    probes = sum(float(v) for k, v in parts.items() if "confidence" in k)
    assert float(got.detach()) - probes == pytest.approx(float(want), rel=1e-5) and float(want.detach()) > 0.5
    got.backward()
    for name, g in g_want.items():
        assert torch.allclose(model.get_parameter(name).grad, g, rtol=1e-5, atol=1e-7), name


def test_candidate_rows_from_the_frozen_weight_copy(setup):
    """Under bf16 autocast the columns' rows come from one bf16 copy of the frozen tied weight,
    equal to casting the gathered rows; the exits share one gather per micro-batch, remade
    when the weight changes in place; agreement is "the cached top-1 has the exit's max logit"."""
    from megatron.early_exit.training import cached_tuning as ct

    _, ckpt, cache = setup
    tuner = CachedTuner(parse_args([*TUNE, "--load", ckpt, "--exit-activation-cache", cache]))
    batch, model = tuner.train_cache.batch([0, 1]), tuner.model
    n = tuner.config.exit_layer_nums[0]
    head = model.exits[str(n)]
    hidden = head.hidden(batch["hidden"][n], model.rotary(torch.arange(16)[None]) if model.rotary else None)
    cols = candidate_set(batch["labels"], batch["topk_ids"][..., :3], VOCAB, 8, torch.Generator().manual_seed(0))
    weight = head.output_weight(model.tied_output_weight())
    weight.requires_grad_(False)  # frozen, as in tuning (the backbone's tied embedding)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ct.exit_logits(model, head, hidden, cols)
        assert torch.equal(got, torch.matmul(hidden, weight[cols.ids].t()))  # autocast casts the fp32 rows
        rows = cols.rows(weight, torch.bfloat16)
        assert rows.dtype == torch.bfloat16 and cols.rows(weight, torch.bfloat16) is rows
        with torch.no_grad():
            weight.mul_(2.0)
        assert torch.equal(cols.rows(weight, torch.bfloat16), weight[cols.ids].to(torch.bfloat16))
    z = got.float() + cols.bias
    assert torch.equal(cols.raw_max(z), got.float().amax(-1))  # the correction taken back out


def test_mismatched_cache_is_refused(setup, tmp_path):
    shape, ckpt, cache = setup
    other = make_checkpoint(tmp_path / "other", "block" if shape == "mlp" else "mlp", seed=0)
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "pretrain_early_exit_gpt.py"), *TUNE, "--load", other,
         "--exit-activation-cache", cache],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"--exit-activation-cache {cache}" in proc.stderr and "do not match" in proc.stderr
    # same exits, other backbone weights: the fingerprint differs
    reseeded = make_checkpoint(tmp_path / "reseeded", shape, seed=1)
    with pytest.raises(ValueError, match="made from another model"):
        CachedTuner(parse_args([*TUNE, "--load", reseeded, "--exit-activation-cache", cache]))
    for extra, message in ((["--mock-data"], "needs --exit-activation-cache"), ([], "must be >= 1")):
        args = [*TUNE, "--load", ckpt, *extra, "--exit-candidate-vocab", "0" if not extra else "8"]
        with pytest.raises(ValueError, match=message):
            CachedTuner(parse_args(args + ([] if extra else ["--exit-activation-cache", cache])))
    manifest = json.load(open(os.path.join(cache, "manifest.json")))
    assert manifest["top_k"] == VOCAB and manifest["num_sequences"] == {"train": 4, "valid": 4}


def test_one_cache_tunes_heads_of_any_structure(setup, tmp_path):
    """The fingerprint covers the backbone, not the heads: the same backbone with other exit
    heads (block and probe toggled, norm-only) tunes from the cache; a cache written with the
    first format's fingerprint (which hashed the head fields) is still accepted."""
    from megatron.early_exit.training import exit_cache

    shape, ckpt, cache = setup
    block = not SHAPES[shape].get("use_exit_block", False)
    heads = {**SHAPES[shape], "use_exit_mlp": False, "use_exit_confidence_head": True,
             "exit_confidence_input": "backbone", "use_exit_block": block}  # fmt: skip
    other = make_checkpoint(tmp_path / "other_heads", "mlp", seed=0, **heads)
    tuner = CachedTuner(parse_args([*TUNE, "--load", other, "--exit-activation-cache", cache]))
    assert tuner.config.use_exit_block == heads["use_exit_block"]
    from megatron.early_exit import checkpointing

    same = CachedTuner(parse_args([*TUNE, "--load", ckpt, "--exit-activation-cache", cache]))
    weights = checkpointing.read_weights(same.meta.directory)
    new, legacy = (exit_cache.backbone_fingerprint(same.config, weights, legacy=v) for v in (False, True))
    assert new != legacy and json.load(open(os.path.join(cache, "manifest.json")))["fingerprint"] == new
    old = tmp_path / "old_cache"
    shutil.copytree(cache, old)
    manifest = json.load(open(old / "manifest.json"))
    json.dump({**manifest, "fingerprint": legacy}, open(old / "manifest.json", "w"))
    CachedTuner(parse_args([*TUNE, "--load", ckpt, "--exit-activation-cache", str(old)]))
    json.dump({**manifest, "fingerprint": "0" * 64}, open(old / "manifest.json", "w"))
    with pytest.raises(ValueError, match="made from another model"):
        CachedTuner(parse_args([*TUNE, "--load", ckpt, "--exit-activation-cache", str(old)]))


def test_cached_tuning_resumes_exactly(setup, tmp_path):
    """Stop at iteration 3 of 6 and resume: same losses as one uninterrupted run (epochs are
    seeded permutations, negatives seeded by iteration, optimizer state restored)."""
    _, ckpt, cache = setup
    base = [*TUNE, "--exit-activation-cache", cache, "--exit-candidate-vocab", "8", "--train-iters", "6"]
    whole = CachedTuner(parse_args([*base, "--load", ckpt])).run().history
    CachedTuner(parse_args([*base, "--load", ckpt, "--save", str(tmp_path / "a"), "--exit-interval", "3"])).run()
    rest = CachedTuner(parse_args([*base, "--load", str(tmp_path / "a"), "--save", str(tmp_path / "b")])).run().history
    assert [h["iteration"] for h in rest] == [4, 5, 6]
    for a, b in zip(whole[3:], rest):
        assert b == pytest.approx(a, rel=1e-6), (a, b)


@torch.no_grad()
def _backbone_probe_loss(tuner, n: int, micro_batches) -> float:
    """BCE of confidence(confidence_norm(cached input)) against "exit's top-1 == cached final
    top-1", averaged over the micro-batches as the trainer logs it (GPT-2 style: no rotary)."""
    head, total = tuner.model.exits[str(n)], 0.0
    for rows in micro_batches:
        batch = tuner.train_cache.batch(rows)
        x = batch["hidden"][n].float()
        logits = head.project(head.hidden(x), tuner.model.tied_output_weight())
        agree = (logits.argmax(-1) == batch["topk_ids"][..., 0]).float()
        bce = F.binary_cross_entropy_with_logits(
            head.confidence(head.confidence_norm(x)).squeeze(-1), agree, reduction="none"
        )
        mask = batch["loss_mask"].float()
        total += float((bce * mask).sum() / mask.sum()) / len(micro_batches)
    return total


def test_cached_tuning_trains_backbone_probes_as_tuning_through_the_backbone(tmp_path):
    """--exit-confidence-input backbone: the cache holds each exit's input, which is the backbone
    state the probe reads, so the first step's probe loss and every exit gradient (the probe's
    norm included) equal tuning through the frozen backbone."""
    ckpt = make_checkpoint(tmp_path / "ck", "mlp", exit_confidence_input="backbone")
    cache = make_cache(ckpt, tmp_path / "cache")
    common = [*TUNE, "--load", ckpt, "--exit-loss-type", "ce+kd"]
    live = Trainer(parse_args([*common, "--mock-data"]))
    cached = CachedTuner(parse_args([*common, "--exit-activation-cache", cache]))
    assert live.model.exits["1"].probe_reads_backbone and cached.model.exits["1"].probe_reads_backbone
    by_hand = {n: _backbone_probe_loss(cached, n, [[0, 1], [2, 3]]) for n in (1, 3)}
    a, b = live.train_step(), cached.train_step()
    for n in live.config.exit_layer_nums:
        assert a[f"exit_{n} confidence loss"] > 0.1  # a real loss
        assert b[f"exit_{n} confidence loss"] == pytest.approx(by_hand[n], rel=1e-6)
        for key in (f"exit_{n} loss", f"exit_{n} confidence loss", f"exit_{n} agreement"):
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-6), key
    ga, gb = exit_grads(live.model), exit_grads(cached.model)
    assert sorted(ga) == sorted(gb) and all(n.startswith("exits.") for n in ga)
    assert {f"exits.{n}.confidence_norm.weight" for n in (1, 3)} <= set(ga)
    for name in ga:
        assert torch.allclose(gb[name], ga[name], rtol=1e-5, atol=1e-7), name
        assert ga[name].abs().sum() > 0, name


def test_cached_tuner_uses_fused_adamw_with_the_foreach_update(setup):
    """The cached tuner steps torch's fused AdamW (one kernel); the update is foreach AdamW's."""
    import argparse

    from megatron.early_exit.training.optimizer import build_optimizer

    _, ckpt, cache = setup
    tuner = CachedTuner(parse_args([*TUNE, "--load", ckpt, "--exit-activation-cache", cache]))
    assert tuner.optimizer.defaults["fused"] and not Trainer.fused_optimizer
    args = argparse.Namespace(lr=1e-2, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8, weight_decay=0.1)
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    start = [p.detach().clone() for p in models[0].parameters()]
    opts = [build_optimizer(models[0], args), build_optimizer(models[1], args, fused=True)]
    assert not opts[0].defaults["fused"] and opts[1].defaults["fused"]
    for step in range(3):
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(step))
        for model, opt in zip(models, opts):
            opt.zero_grad()
            model(x).pow(2).sum().backward()
            opt.step()
    for a, b, a0 in zip(models[0].parameters(), models[1].parameters(), start):
        # fp32: the two kernels order the same update differently (sqrt(v), bias corrections, the
        # division by sqrt(v) + eps); where a gradient is near eps the ratio is ill-conditioned and
        # an AMD EPYC (Zen 5) moved a weight by 4.8e-7 in three steps (an Intel Xeon by < 1e-7).
        # A wrong lr, beta or decay moves weights by ~1e-3 (three steps of lr 1e-2, below): 2e-6 keeps that visible.
        assert torch.allclose(a, b, rtol=1e-6, atol=2e-6)
        assert (a - a0).abs().max() > 1e-3  # three steps at lr 1e-2 moved every parameter


def test_confidence_only_tuning_trains_the_probes_alone_as_through_the_backbone(tmp_path):
    """--tune-exit-confidence-only: the probes learn while their exits stay as loaded, so the
    agreement they learn stays put. One cached step equals one step through the frozen backbone
    (probe loss and every gradient, fp32 round-off as above), only probe parameters have
    gradients, and after a run every other parameter is the checkpoint's, bit for bit."""
    ckpt = make_checkpoint(tmp_path / "ck", "mlp", exit_confidence_hidden_size=8)
    cache = make_cache(ckpt, tmp_path / "cache")
    common = [*TUNE, "--load", ckpt, "--exit-loss-type", "kd", "--tune-exit-confidence-only"]
    live = Trainer(parse_args([*common, "--mock-data"]))
    cached = CachedTuner(parse_args([*common, "--exit-activation-cache", cache]))
    a, b = live.train_step(), cached.train_step()
    for n in live.config.exit_layer_nums:
        assert a[f"exit_{n} confidence loss"] > 0.1  # a real loss
        for key in (f"exit_{n} confidence loss", f"exit_{n} agreement"):
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-6), key
        assert f"exit_{n} kd loss" not in b  # no exit loss is made where no exit trains
    ga, gb = exit_grads(live.model), exit_grads(cached.model)
    probes = {
        f"exits.{n}.confidence.{leaf}"
        for n in (1, 3)
        for leaf in ("fc_in.weight", "fc_in.bias", "fc_out.weight", "fc_out.bias")
    }
    assert set(ga) == set(gb) == probes
    for name in ga:
        assert torch.allclose(gb[name], ga[name], rtol=1e-5, atol=1e-7), name
        assert ga[name].abs().sum() > 0, name
    loaded = {k: v.clone() for k, v in Trainer(parse_args([*common, "--mock-data"])).model.state_dict().items()}
    argv = [*common, "--exit-activation-cache", cache, "--train-iters", "12", "--lr", "1e-2"]
    tuner = CachedTuner(parse_args(argv))
    first = tuner.train_step()
    for _ in range(11):
        last = tuner.train_step()
    assert last["exit_1 confidence loss"] < first["exit_1 confidence loss"]
    tuned = tuner.model.state_dict()
    assert {k for k in tuned if not torch.equal(tuned[k], loaded[k])} == probes  # the layers it loaded, the exits
    assert tuner.evaluate()["exit_1 loss"] > 0  # validation still reports the exits' own losses


def test_confidence_only_tuning_errors(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ck", "block")  # exits without probes
    with pytest.raises(ValueError, match="--tune-exit-confidence-only: the exits in --load have no confidence"):
        Trainer(parse_args([*TUNE, "--load", ckpt, "--mock-data", "--tune-exit-confidence-only"]))
    argv = [a for a in TUNE if a != "--tune-exit"]
    with pytest.raises(ValueError, match="--tune-exit-confidence-only needs --tune-exit"):
        Trainer(parse_args([*argv, "--load", ckpt, "--mock-data", "--tune-exit-confidence-only"]))

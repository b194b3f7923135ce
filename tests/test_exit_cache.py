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
from megatron.early_exit.training.cached_tuning import CachedTuner, cached_losses, candidate_columns, sample_negatives
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


def test_candidate_columns_of_the_whole_vocabulary_are_the_full_softmax(setup):
    """N = V negatives: every token's columns are the vocabulary once (its label and top-k
    kept, their repeats among the negatives dropped, correction log 1 = 0): same loss, same gradients."""
    _, ckpt, cache = setup
    tuner = CachedTuner(parse_args([*TUNE, "--load", ckpt, "--exit-activation-cache", cache]))
    batch = tuner.train_cache.batch([0, 1, 2])
    batch["topk_ids"], batch["topk_logprobs"] = batch["topk_ids"][..., :4], batch["topk_logprobs"][..., :4]
    weights = {n: 1.0 for n in tuner.config.exit_layer_nums}
    results = []
    for negatives in (None, sample_negatives(VOCAB, VOCAB, torch.Generator().manual_seed(0))):
        tuner.model.zero_grad()
        total, parts = cached_losses(tuner.model, batch, weights, "ce+kd", 2.0, negatives)
        total.backward()
        results.append((total.item(), parts, exit_grads(tuner.model)))
    (full, p_full, g_full), (cand, p_cand, g_cand) = results
    assert cand == pytest.approx(full, rel=1e-6) and full > 1.0
    for k in p_full:
        assert float(p_cand[k]) == pytest.approx(float(p_full[k]), rel=1e-5, abs=1e-7), k
    for name in g_full:
        assert torch.allclose(g_cand[name], g_full[name], rtol=1e-5, atol=1e-7), name


def test_candidate_columns_with_sampled_negatives(setup):
    _, ckpt, cache = setup
    tuner = CachedTuner(parse_args([*TUNE, "--load", ckpt, "--exit-activation-cache", cache]))
    batch = tuner.train_cache.batch([0, 1])
    n = tuner.config.exit_layer_nums[0]
    head = tuner.model.exits[str(n)]
    hidden = head.hidden(batch["hidden"][n], tuner.model.rotary(torch.arange(16)[None]) if tuner.model.rotary else None)
    labels, topk = batch["labels"], batch["topk_ids"][..., :3]
    negatives = sample_negatives(VOCAB, 8, torch.Generator().manual_seed(0))
    cols = candidate_columns(tuner.model, head, hidden, labels, topk, negatives)
    assert cols.logits.shape == (2, 16, 1 + 3 + 8) and torch.equal(cols.token_of(cols.label_col), labels)
    assert torch.equal(cols.col_ids.gather(-1, cols.topk_col), topk)
    finite = cols.bias[..., 4:][torch.isfinite(cols.bias[..., 4:])]
    assert torch.allclose(finite, torch.tensor(-math.log(8 / VOCAB)))  # sampled: -log(N/V) = 2.079
    # each token id appears at most once among a token's finite columns
    ids = torch.where(torch.isfinite(cols.bias), cols.col_ids, -1 - torch.arange(12))
    assert all(len(set(row.tolist())) == 12 for row in ids.view(-1, 12))


def test_candidate_columns_token_of_and_frozen_weight_copy(setup):
    """token_of maps every column (own and shared) to its token id without the [b, s, C] id
    table; under bf16 autocast the columns come from one bf16 copy of the frozen tied weight,
    equal to casting the gathered rows (the old way), and the copy is remade when the weight
    changes in place."""
    from megatron.early_exit.training import cached_tuning as ct

    _, ckpt, cache = setup
    tuner = CachedTuner(parse_args([*TUNE, "--load", ckpt, "--exit-activation-cache", cache]))
    batch, model = tuner.train_cache.batch([0, 1]), tuner.model
    n = tuner.config.exit_layer_nums[0]
    head = model.exits[str(n)]
    hidden = head.hidden(batch["hidden"][n], model.rotary(torch.arange(16)[None]) if model.rotary else None)
    labels, topk = batch["labels"], batch["topk_ids"][..., :3]
    negatives = sample_negatives(VOCAB, 8, torch.Generator().manual_seed(0))
    weight = ct._exit_weight(model, head)
    weight.requires_grad_(False)  # frozen, as in tuning (the backbone's tied embedding)
    cols = candidate_columns(model, head, hidden, labels, topk, negatives)
    every = torch.arange(12).expand(2, 16, 12)
    assert torch.equal(torch.stack([cols.token_of(every[..., c]) for c in range(12)], -1), cols.col_ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = candidate_columns(model, head, hidden, labels, topk, negatives).logits
        pos_ids = torch.cat([labels.unsqueeze(-1), topk], -1)
        pos = torch.einsum("bsh,bsph->bsp", hidden, weight[pos_ids])  # autocast casts the fp32 rows
        want = torch.cat([pos, torch.matmul(hidden, weight[negatives].t())], -1)
        assert torch.equal(got, want)
        copy = ct._weight_in(weight, torch.bfloat16)
        assert copy.dtype == torch.bfloat16 and ct._weight_in(weight, torch.bfloat16) is copy
        with torch.no_grad():
            weight.mul_(2.0)
        assert torch.equal(ct._weight_in(weight, torch.bfloat16), weight.to(torch.bfloat16))


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

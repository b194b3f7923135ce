"""Early-exit generation: equality with full decoding where promised, exact KV, per-sequence exits."""

import json
import os
import subprocess
import sys

import pytest
import torch

from megatron.early_exit.config import ModelConfig
from megatron.early_exit.inference import EarlyExitEngine, GenerationSettings, generate
from megatron.early_exit.model import EarlyExitGPT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLAMA = dict(
    normalization="RMSNorm",
    swiglu=True,
    position_embedding_type="rope",
    add_bias_linear=False,
    num_query_groups=2,
    untie_embeddings_and_output_weights=True,
)
GPT2 = dict()
PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15], [3]]


def make(family, seed=3):
    cfg = ModelConfig(
        num_layers=4,
        hidden_size=32,
        num_attention_heads=4,
        vocab_size=64,
        max_position_embeddings=64,
        exit_layer_nums=[1, 2, 3],
        use_exit_norm=True,
        use_exit_mlp=True,
        **family,
    )
    model = EarlyExitGPT(cfg)
    model.init_weights(seed)
    return model.eval()


@torch.no_grad()
def naive_greedy(model, prompt, n):
    """Full forward over the growing sequence, no cache: the reference."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


@pytest.fixture(scope="module", params=[LLAMA, GPT2], ids=["llama", "gpt2"])
def model_and_ref(request):
    model = make(request.param)
    return model, [naive_greedy(model, p, 12) for p in PROMPTS]


@pytest.mark.parametrize("batch", [1, 4])
def test_lossless_strategies_equal_full_greedy(model_and_ref, batch):
    model, ref = model_and_ref
    prompts, ref = PROMPTS[:batch], ref[:batch]
    assert [r.tokens for r in generate(model, None, prompts, strategy="full", max_new_tokens=12)] == ref
    ee = generate(model, None, prompts, strategy="early_exit", early_exit_threshold=1.0, max_new_tokens=12)
    assert [r.tokens for r in ee] == ref and all(set(r.exit_layers) == {4} for r in ee)
    for draft in (1, 3):
        ss = generate(
            model,
            None,
            prompts,
            strategy="self_speculative",
            max_new_tokens=12,
            draft_exit_layer=draft,
            num_draft_tokens=3,
        )
        assert [r.tokens for r in ss] == ref
        assert 0.0 <= ss[0].stats["acceptance_rate"] <= 1.0


def test_threshold_zero_takes_the_first_allowed_exit(model_and_ref):
    model, _ = model_and_ref
    res = generate(model, None, PROMPTS, strategy="early_exit", early_exit_threshold=0.0, max_new_tokens=6)
    for r in res:  # the first token comes from the prefill, which never exits
        assert r.exit_layers[0] == 4 and set(r.exit_layers[1:]) == {1}
    res = generate(
        model, None, PROMPTS, strategy="early_exit", early_exit_threshold=0.0, max_new_tokens=6, exit_layers=(2, 3)
    )
    assert all(set(r.exit_layers[1:]) == {2} for r in res)
    res = generate(
        model, None, PROMPTS, strategy="early_exit", early_exit_threshold=0.0, max_new_tokens=6, min_exit_layer=3
    )
    assert all(set(r.exit_layers[1:]) == {3} for r in res)


@torch.no_grad()
def full_kv(model, ids):
    """K/V of every layer for `ids`, from the plain model: [(k, v)] with k [T, ng, hd] after RoPE."""
    out, h = [], model.embedding(ids, torch.arange(ids.shape[1])[None])
    rot = model.rotary(torch.arange(ids.shape[1])[None]) if model.rotary is not None else None
    from megatron.early_exit.model.rotary import apply_rotary

    for i in range(model.config.num_layers):
        layer = model.decoder.layers[str(i)]
        _, k, _v = layer.self_attention.split_qkv(layer.input_layernorm(h))
        if rot is not None:
            k = apply_rotary(k, *rot)
        out.append((k[0].transpose(0, 1), _v[0].transpose(0, 1)))
        h = layer(h, rot)
    return out


def test_kv_after_early_exits_and_a_deep_token_equals_the_full_models(model_and_ref):
    model, _ = model_and_ref
    engine = EarlyExitEngine(model)
    s = GenerationSettings(strategy="early_exit", max_new_tokens=8)
    st = engine._new_state([PROMPTS[0], PROMPTS[2]], s)
    seqs = [0, 1]
    out = engine._pass(seqs, {0: PROMPTS[0], 1: PROMPTS[2]}, st, [], 1.0, "max_prob")  # prefill
    tokens = {b: [int(out.token_logits[b].argmax())] for b in seqs}
    for _ in range(3):  # three tokens that exit at layer 1 (only sequence 0) or 2
        out = engine._pass(seqs, {b: [tokens[b][-1]] for b in seqs}, st, [1, 2], 0.0, "max_prob")
        assert out.exit_layer == {0: 1, 1: 1}
        for b in seqs:
            tokens[b].append(int(out.token_logits[b].argmax()))
    cache = st["cache"]
    assert cache.filled[:, 0].tolist() == [8, 5, 5, 5]  # deeper layers lack the exited tokens' K/V
    out = engine._pass(seqs, {b: [tokens[b][-1]] for b in seqs}, st, [], 1.0, "max_prob")  # a deep token
    assert out.exit_layer == {0: 4, 1: 4}
    for b, prompt in ((0, PROMPTS[0]), (1, PROMPTS[2])):
        ids = torch.tensor([prompt + tokens[b]])
        length = ids.shape[1]
        assert cache.filled[:, b].tolist() == [length] * 4
        for layer, (k, v) in enumerate(full_kv(model, ids)):
            # fp32: the recomputed rows went through the same ops in a different batching.
            torch.testing.assert_close(cache.k[layer, b, :length], k, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(cache.v[layer, b, :length], v, rtol=1e-5, atol=1e-5)


def test_per_sequence_decisions_equal_decoding_alone():
    model = make(LLAMA, seed=5)
    engine = EarlyExitEngine(model)
    # Exit 2's confidence for each prompt's first decoded token (the prefill's greedy token fed back).
    with torch.no_grad():
        first = [naive_greedy(model, p, 1) for p in PROMPTS]
        conf = [
            float(model(torch.tensor([p + f])).exit_logits[2][0, -1].softmax(-1).max()) for p, f in zip(PROMPTS, first)
        ]
    mid = (min(conf) + max(conf)) / 2  # some sequences exit at the first step, the others go on
    s = GenerationSettings(strategy="early_exit", early_exit_threshold=mid, exit_layers=(2,), max_new_tokens=10)
    batched = engine.generate(PROMPTS, s)
    assert {r.exit_layers[1] for r in batched} == {2, 4}  # both decisions in one batched step
    for p, r in zip(PROMPTS, batched):
        alone = engine.generate([p], s)[0]
        assert r.tokens == alone.tokens and r.exit_layers == alone.exit_layers
        assert r.confidences == pytest.approx(alone.confidences, rel=1e-5)


def test_stops_and_sampling(model_and_ref):
    model, ref = model_and_ref
    stop = ref[0][3]
    res = generate(model, None, PROMPTS[:2], strategy="full", max_new_tokens=12, stop_token_ids=(stop,))
    assert res[0].tokens == ref[0][: ref[0].index(stop) + 1] and res[0].finish_reason == "stop"
    assert len(res[1].tokens) in (12, ref[1].index(stop) + 1 if stop in ref[1] else 12)
    a = generate(model, None, PROMPTS, strategy="full", max_new_tokens=8, temperature=1.0, top_k=10, top_p=0.9, seed=7)
    b = generate(model, None, PROMPTS, strategy="full", max_new_tokens=8, temperature=1.0, top_k=10, top_p=0.9, seed=7)
    assert [r.tokens for r in a] == [r.tokens for r in b]
    assert all(len(r.tokens) == 8 and r.finish_reason == "length" for r in a)
    lp = generate(model, None, PROMPTS[:1], strategy="full", max_new_tokens=3, return_logprobs=True)[0]
    assert len(lp.logprobs) == 3 and all(x <= 0 for x in lp.logprobs)


def test_bad_settings_raise():
    model = make(GPT2)
    with pytest.raises(ValueError, match="exit_layers"):
        generate(model, None, PROMPTS, strategy="early_exit", exit_layers=(5,))
    with pytest.raises(ValueError, match="strategy"):
        generate(model, None, PROMPTS, strategy="turbo")
    with pytest.raises(ValueError, match="learned"):
        generate(model, None, PROMPTS, strategy="early_exit", measure="learned")
    with pytest.raises(ValueError, match="greedy"):
        generate(model, None, PROMPTS, strategy="self_speculative", temperature=0.7)


def test_generate_cli_json(tmp_path):
    train = [
        sys.executable,
        os.path.join(ROOT, "pretrain_early_exit_gpt.py"),
        "--mock-data",
        "--tokenizer-type",
        "NullTokenizer",
        "--vocab-size",
        "64",
        "--num-layers",
        "3",
        "--hidden-size",
        "32",
        "--num-attention-heads",
        "4",
        "--seq-length",
        "32",
        "--micro-batch-size",
        "2",
        "--train-iters",
        "3",
        "--lr",
        "1e-3",
        "--exit-layer-nums",
        "1",
        "2",
        "--use-exit-norm",
        "--save",
        str(tmp_path / "ck"),
        "--eval-interval",
        "0",
    ]
    assert subprocess.run(train, capture_output=True, cwd=ROOT).returncode == 0
    cmd = [
        sys.executable,
        os.path.join(ROOT, "tools", "generate.py"),
        "--load",
        str(tmp_path / "ck"),
        "--prompt",
        "1 2 3",
        "--prompt",
        "5 6",
        "--strategy",
        "early_exit",
        "--early-exit-thres",
        "0",
        "--max-new-tokens",
        "5",
        "--json",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert {"text", "tokens", "exit_layers", "confidences", "tokens_per_sec"} <= set(row)
        assert len(row["tokens"]) == 5 and row["exit_layers"][1:] == [1, 1, 1, 1]
    bad = subprocess.run([*cmd[:4], "--prompt", "1", "--exit-layers", "7"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "exit_layers" in bad.stderr and "Traceback" not in bad.stderr

"""Early-exit generation: equality with full decoding where promised, exact KV recomputation,
per-sequence exits, stops, sampling, telemetry and the generate CLI.

Random tiny models rarely reach a confidence threshold, so the exit path is made
deterministic: threshold 0.0 (always exit), exit_layers restrictions, thresholds placed
between observed confidences, or a confidence probe whose bias forces the decision.
"""

import json
import os

import pytest
import torch

from megatron.early_exit.config import ModelConfig
from megatron.early_exit.inference import EarlyExitEngine, ExitPolicy, GenerationSettings, generate
from megatron.early_exit.model import EarlyExitGPT
from megatron.early_exit.model.rotary import apply_rotary
from tests.launch import run_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXITS = dict(exit_layer_nums=[1, 2, 3], use_exit_norm=True, use_exit_mlp=True)
FAMILIES = {
    # GQA + RoPE + SwiGLU + RMSNorm, untied output (Llama style)
    "llama": dict(
        normalization="RMSNorm",
        swiglu=True,
        position_embedding_type="rope",
        add_bias_linear=False,
        num_query_groups=2,
        untie_embeddings_and_output_weights=True,
        **EXITS,
    ),
    # LayerNorm + GELU + learned positions + biases, tied (GPT-2 style)
    "gpt2": dict(**EXITS),
    # exits before their layer, each with its own transformer block (own KV cache), own output
    # weights, a temperature and a confidence probe
    "pre_exit_block": dict(
        normalization="RMSNorm",
        swiglu=True,
        position_embedding_type="rope",
        add_bias_linear=False,
        num_query_groups=1,
        exit_layer_nums=[1, 3],
        pre_exit=True,
        use_exit_block=True,
        use_exit_norm=True,
        untie_exit_output_weights=True,
        exit_layer_temperature=[1.5, 0.8],
        use_exit_confidence_head=True,
    ),
}
PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15], [3]]
NEW = 10


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def make(family: str, seed: int = 3) -> EarlyExitGPT:
    cfg = ModelConfig(num_layers=4, hidden_size=32, num_attention_heads=4, vocab_size=64, max_position_embeddings=64)
    cfg = ModelConfig(**{**cfg.to_dict(), **FAMILIES[family]})
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


@pytest.fixture(scope="module", params=list(FAMILIES))
def model_and_ref(request):
    model = make(request.param)
    return model, [naive_greedy(model, p, NEW) for p in PROMPTS]


def tokens(results):
    return [r.tokens for r in results]


@pytest.mark.parametrize("batch", [1, 4])
def test_lossless_strategies_equal_full_greedy(model_and_ref, batch):
    model, ref = model_and_ref
    prompts, ref = PROMPTS[:batch], ref[:batch]
    assert tokens(generate(model, None, prompts, strategy="full", max_new_tokens=NEW)) == ref
    ee = generate(model, None, prompts, strategy="early_exit", early_exit_threshold=1.0, max_new_tokens=NEW)
    assert tokens(ee) == ref and all(set(r.exit_layers) == {4} for r in ee)
    for draft in model.config.exit_layer_nums:
        for k in (1, 3):
            ss = generate(
                model,
                None,
                prompts,
                strategy="self_speculative",
                max_new_tokens=NEW,
                draft_exit_layer=draft,
                num_draft_tokens=k,
            )
            assert tokens(ss) == ref, (draft, k)
            assert all(0.0 <= r.stats["acceptance_rate"] <= 1.0 for r in ss)
            assert all(set(r.exit_layers) <= {draft, 4} for r in ss)


def test_threshold_zero_takes_the_first_allowed_exit(model_and_ref):
    model, _ = model_and_ref
    exits = model.config.exit_layer_nums
    for kw, first in (({}, exits[0]), ({"exit_layers": exits[1:]}, exits[1]), ({"min_exit_layer": 3}, 3)):
        for measure in ("max_prob", "top2_margin", "entropy"):
            res = generate(
                model,
                None,
                PROMPTS,
                strategy="early_exit",
                early_exit_threshold=0.0,
                max_new_tokens=5,
                measure=measure,
                **kw,
            )
            for r in res:  # the first token comes from the prefill, which never exits
                assert r.exit_layers == [4] + [first] * 4
                assert all(0.0 <= c <= 1.0 for c in r.confidences)


@torch.no_grad()
def reference_token(model, ids, layer, with_confidence=False):
    """The token the head at `layer` gives after `ids` (and its max probability), from a plain
    forward without a cache."""
    out = model(torch.tensor([ids]))
    logits = out.logits if layer == model.config.num_layers else out.exit_logits[layer]
    probs = logits[0, -1].softmax(-1)
    return (int(probs.argmax()), float(probs.max())) if with_confidence else int(probs.argmax())


def test_mixed_exits_match_an_uncached_model(model_and_ref):
    """Whatever exits fire, each token equals what its head gives on the whole prefix computed
    from scratch: the recomputed K/V (and exit blocks' own caches) are exact."""
    model, ref = model_and_ref
    exits = model.config.exit_layer_nums
    with torch.no_grad():  # thresholds between the confidences the exits show on the reference text
        out = model(torch.tensor([PROMPTS[2] + ref[2]]))
        conf = torch.cat([out.exit_logits[n][0].softmax(-1).max(-1).values for n in exits])
    mixed = 0
    for q in (0.3, 0.5, 0.7):
        thr = float(conf.quantile(q))
        res = generate(model, None, PROMPTS, strategy="early_exit", early_exit_threshold=thr, max_new_tokens=NEW,
                       measure="max_prob", exit_policy="exact")  # fmt: skip
        # exact: per-sequence exits whatever this machine's costs (cost_aware soon skips checks that do not pay)
        for p, r in zip(PROMPTS, res):
            for j, (tok, layer) in enumerate(zip(r.tokens, r.exit_layers)):
                want, prob = reference_token(model, p + r.tokens[:j], layer, with_confidence=True)
                assert tok == want and r.confidences[j] == pytest.approx(prob, rel=1e-4)
            mixed += len(set(r.exit_layers)) > 1
    assert mixed > 0  # some sequence had both early-exited and full-depth tokens


@torch.no_grad()
def full_kv(model, ids):
    """K/V of every layer for `ids` from the plain model: [(k, v)] each [ng, T, hd], after RoPE."""
    pos = torch.arange(ids.shape[1])[None]
    h = model.embedding(ids, pos)
    rot = model.rotary(pos) if model.rotary is not None else None
    out = []
    for i in range(model.config.num_layers):
        layer = model.decoder.layers[str(i)]
        _, k, v = layer.self_attention.split_qkv(layer.input_layernorm(h))
        if rot is not None:
            k = apply_rotary(k, *rot)
        out.append((k[0], v[0]))
        h = layer(h, rot)
    return out


def test_kv_after_early_exits_and_a_deep_token_equals_the_full_models(model_and_ref):
    model, _ = model_and_ref
    engine = EarlyExitEngine(model)
    first, second = model.config.exit_layer_nums[:2]
    prompts = {0: PROMPTS[0], 1: PROMPTS[2]}
    state = engine.new_state(2, 32)
    out = engine.prefill(state, prompts)
    toks = {b: [int(out.logits[b].argmax())] for b in prompts}
    # Sequence 0 exits at the first exit three times, sequence 1 at the second one.
    for _ in range(3):
        for b, n in ((0, first), (1, second)):
            out = engine.decode_one_token(state, {b: toks[b][-1]}, ExitPolicy((n,), 0.0))
            assert out.exit_layer == {b: n}
            toks[b].append(int(out.logits[b].argmax()))
    behind = [len(prompts[0]) + 3] * engine.depth(first) + [len(prompts[0])] * (4 - engine.depth(first))
    assert state.cache.filled[:, 0].tolist() == behind  # deeper layers lack the exited tokens' K/V
    out = engine.decode_one_token(state, {b: t[-1] for b, t in toks.items()}, ExitPolicy())  # a deep token each
    assert out.exit_layer == {0: 4, 1: 4}
    for b in prompts:
        ids = torch.tensor([prompts[b] + toks[b]])
        length = ids.shape[1]
        assert state.cache.filled[:, b].tolist() == [length] * 4
        for layer, (k, v) in enumerate(full_kv(model, ids)):
            # fp32; the recomputed rows went through the same ops in a different batching.
            torch.testing.assert_close(state.cache.k[layer, b, :, :length], k, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(state.cache.v[layer, b, :, :length], v, rtol=1e-5, atol=1e-5)
        assert int(out.logits[b].argmax()) == reference_token(model, prompts[b] + toks[b], 4)


def test_per_sequence_decisions_equal_decoding_alone():
    model = make("llama", seed=5)
    engine = EarlyExitEngine(model)
    # Exit 2's confidence for each prompt's first decoded token (the prefill's greedy token fed back).
    with torch.no_grad():
        first = [naive_greedy(model, p, 1) for p in PROMPTS]
        conf = [
            float(model(torch.tensor([p + f])).exit_logits[2][0, -1].softmax(-1).max()) for p, f in zip(PROMPTS, first)
        ]
    mid = (sorted(conf)[1] + sorted(conf)[2]) / 2  # two sequences exit at the first step, two go on
    s = GenerationSettings(
        strategy="early_exit", early_exit_threshold=mid, exit_layers=(2,), max_new_tokens=NEW, exit_policy="exact"
    )  # exact: per-sequence decisions (cost_aware lets a batch leave all together or not at all)
    batched = engine.generate(PROMPTS, s)
    assert {r.exit_layers[1] for r in batched} == {2, 4}  # both decisions in one batched step
    for p, r in zip(PROMPTS, batched):
        alone = engine.generate([p], s)[0]
        assert r.tokens == alone.tokens and r.exit_layers == alone.exit_layers
        assert r.confidences == pytest.approx(alone.confidences, rel=1e-4)


def test_learned_measure_uses_the_probe():
    model = make("pre_exit_block")
    ref = [naive_greedy(model, p, 6) for p in PROMPTS]
    probe = model.exits["1"].confidence
    with torch.no_grad():
        probe.weight.zero_()
        probe.bias.fill_(-10.0)  # sure it disagrees: never exits
        for exit3 in (-10.0, 10.0):
            model.exits["3"].confidence.weight.zero_()
            model.exits["3"].confidence.bias.fill_(exit3)
            res = generate(model, None, PROMPTS, strategy="early_exit", measure="learned", max_new_tokens=6)
            if exit3 < 0:
                assert tokens(res) == ref and all(set(r.exit_layers) == {4} for r in res)
            else:
                assert all(r.exit_layers[1:] == [3] * 5 for r in res)
                assert all(c == pytest.approx(torch.sigmoid(torch.tensor(10.0)).item()) for c in res[0].confidences[1:])
    with pytest.raises(ValueError, match="learned"):
        generate(make("gpt2"), None, PROMPTS, strategy="early_exit", measure="learned")


class LetterTokenizer:
    """Token i is the letter chr(97 + i % 26); the end-of-document id is chosen per test."""

    def __init__(self, eod: int) -> None:
        self.eod, self.bos = eod, None

    def tokenize(self, text):
        return [ord(c) - 97 for c in text]

    def detokenize(self, ids):
        return "".join(chr(97 + i % 26) for i in ids)


def test_stops_end_sequences_independently(model_and_ref):
    model, ref = model_and_ref
    stop = ref[0][3]
    res = generate(model, None, PROMPTS, strategy="full", max_new_tokens=NEW, stop_token_ids=(stop,))
    for r, want in zip(res, ref):
        n = want.index(stop) + 1 if stop in want else NEW
        assert r.tokens == want[:n]
        assert r.finish_reason == ("stop" if stop in want else "length")
    # EOS from the tokenizer, and the text without it; ignore_eos decodes on.
    n = ref[0].index(stop) + 1
    res = generate(model, LetterTokenizer(eod=stop), PROMPTS[:1], max_new_tokens=NEW)[0]
    assert res.tokens == ref[0][:n] and res.stopped_by == stop and len(res.text) == n - 1
    res = generate(model, LetterTokenizer(eod=stop), PROMPTS[:1], max_new_tokens=NEW, ignore_eos=True)[0]
    assert res.tokens == ref[0] and res.finish_reason == "length"
    # A stop string spanning tokens 2-3 of sequence 0: the text is cut before it.
    tok = LetterTokenizer(eod=63)
    text = tok.detokenize(ref[0])
    s = text[2:4]
    res = generate(
        model, tok, PROMPTS, strategy="early_exit", early_exit_threshold=1.0, max_new_tokens=NEW, stop_strings=(s,)
    )
    assert res[0].finish_reason == "stop" and res[0].text == text[: text.index(s)]
    assert res[0].tokens == ref[0][: len(res[0].tokens)] and len(res[0].tokens) <= 4
    for r, want in zip(res[1:], ref[1:]):
        assert r.tokens == want[: len(r.tokens)] and (r.finish_reason == "stop") == (s in tok.detokenize(r.tokens))
    # max_new_tokens per call; 0 gives nothing
    assert all(len(r.tokens) == 3 for r in generate(model, None, PROMPTS, max_new_tokens=3))
    assert tokens(generate(model, None, PROMPTS, max_new_tokens=0)) == [[]] * 4


def test_sampling_is_seeded_and_filters(model_and_ref):
    model, ref = model_and_ref
    kw = dict(strategy="early_exit", early_exit_threshold=0.0, exit_layers=(3,), max_new_tokens=8, temperature=1.0)
    a = generate(model, None, PROMPTS, top_k=10, top_p=0.9, seed=7, **kw)
    b = generate(model, None, PROMPTS, top_k=10, top_p=0.9, seed=7, **kw)
    assert tokens(a) == tokens(b) and all(len(r.tokens) == 8 for r in a)
    c = generate(model, None, PROMPTS, strategy="full", max_new_tokens=NEW, temperature=5.0, seed=1)
    d = generate(model, None, PROMPTS, strategy="full", max_new_tokens=NEW, temperature=5.0, seed=2)
    assert tokens(c) != tokens(d)
    for filt in ({"top_k": 1}, {"top_p": 1e-6}):  # one token left: sampling is greedy
        res = generate(model, None, PROMPTS, strategy="full", max_new_tokens=NEW, temperature=0.7, seed=3, **filt)
        assert tokens(res) == ref


def test_logprobs_and_telemetry(model_and_ref):
    model, ref = model_and_ref
    res = generate(model, None, PROMPTS, max_new_tokens=4, return_logprobs=True)
    with torch.no_grad():
        for p, r in zip(PROMPTS, res):
            ids = p + r.tokens
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
            want = [float(logp[len(p) - 1 + j, t]) for j, t in enumerate(r.tokens)]
            assert r.logprobs == pytest.approx(want, abs=1e-4)
    res = generate(
        model, None, PROMPTS, strategy="early_exit", early_exit_threshold=0.0, max_new_tokens=5, profile=True
    )
    first = model.config.exit_layer_nums[0]
    for r in res:
        assert r.stats["average_exit_layer"] == pytest.approx((4 + 4 * first) / 5)
        assert r.stats["exit_share"] == {first: 0.8, 4: 0.2} and r.stats["early_exit_share"] == 0.8
        assert r.stats["tokens_per_sec"] > 0 and 0.0 < r.stats["exit_time_share"] < 1.0
        # decoding's own throughput: the 4 tokens after each first over the time after the prefill
        after = r.stats["elapsed_s"] - r.stats["prefill_s"]
        assert 0.0 < r.stats["prefill_s"] < r.stats["elapsed_s"]
        assert r.stats["decode_tokens_per_sec"] == pytest.approx(4 * len(PROMPTS) / after)
        assert r.stats["tokens_per_sec"] == pytest.approx(5 * len(PROMPTS) / r.stats["elapsed_s"])
    assert generate(model, None, PROMPTS[:1], max_new_tokens=2)[0].logprobs is None


def test_bad_settings_raise():
    model = make("gpt2")
    for kw, match in (
        ({"strategy": "early_exit", "exit_layers": (5,)}, "exit_layers"),
        ({"strategy": "turbo"}, "strategy"),
        ({"strategy": "self_speculative", "temperature": 0.7}, "greedy"),
        ({"strategy": "self_speculative", "draft_exit_layer": 4}, "draft_exit_layer"),
        ({"early_exit_threshold": 1.5}, "early_exit_threshold"),
        ({"measure": "vibes"}, "measure"),
        ({"top_p": 0.0}, "top_p"),
        ({"max_new_tokens": 100}, "max_new_tokens"),
    ):
        with pytest.raises(ValueError, match=match):
            generate(model, None, PROMPTS, **kw)
    last = EarlyExitGPT(ModelConfig(4, 32, 4, 64, 64, exit_layer_nums=[2, 4]))
    with pytest.raises(ValueError, match="draft_exit_layer"):
        generate(last, None, PROMPTS, strategy="self_speculative", draft_exit_layer=4)
    with pytest.raises(ValueError, match="prompts"):
        generate(model, None, [[1], []])
    with pytest.raises(ValueError, match="prompts"):
        generate(model, None, [[1, 99]])


def save_tiny_checkpoint(directory):
    """The lead's tiny training command; if training cannot run here, a saved random model."""
    argv = ["--mock-data", "--tokenizer-type"]
    argv += "NullTokenizer --vocab-size 128 --num-layers 4 --hidden-size 64 --num-attention-heads 4".split()
    argv += "--seq-length 64 --micro-batch-size 2 --global-batch-size 4 --train-iters 2 --lr 1e-3".split()
    argv += ["--exit-layer-nums", "1", "2", "--eval-interval", "0", "--save", str(directory)]
    if run_script(os.path.join(ROOT, "pretrain_early_exit_gpt.py"), argv).returncode == 0:  # tests/launch.py
        return
    from megatron.early_exit.checkpointing import save_checkpoint
    from megatron.early_exit.tokenizer.null import NullTokenizer

    model = EarlyExitGPT(ModelConfig(4, 64, 4, 128, 64, exit_layer_nums=[1, 2]))
    model.init_weights(0)
    save_checkpoint(str(directory), 0, model, NullTokenizer(127))


def test_generate_cli_json(tmp_path):
    save_tiny_checkpoint(tmp_path / "ck")
    gen = os.path.join(ROOT, "tools", "generate.py")  # run as a subprocess would be (tests/launch.py)
    load = ["--load", str(tmp_path / "ck")]
    args = ["--prompt", "1 2 3", "--prompt", "5 6", "--strategy", "early_exit", "--early-exit-thres", "0"]
    proc = run_script(gen, [*load, *args, "--max-new-tokens", "5", "--json"])
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert {"text", "tokens", "exit_layers", "confidences", "tokens_per_sec"} <= set(row)
        assert len(row["tokens"]) == 5 and row["exit_layers"] == [4, 1, 1, 1, 1]
        assert row["text"] == " " + " ".join(map(str, row["tokens"])) or row["finish_reason"] == "stop"
    for bad, word in (
        # errors name the tool's flags, not the engine's setting names
        (["--prompt", "1", "--exit-layers", "7"], "--exit-layers"),
        (["--prompt", "1", "--early-exit-thres", "2"], "--early-exit-thres"),
        (["--prompt", "1", "--strategy", "nope"], "--strategy"),
        (["--prompt", "1", "--top-p", "x"], "top-p"),
    ):
        proc = run_script(gen, [*load, *bad])
        assert proc.returncode == 2 and word in proc.stderr, (bad, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    proc = run_script(gen, ["--load", str(tmp_path / "missing"), "--prompt", "1"])
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "missing" in proc.stderr

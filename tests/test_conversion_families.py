"""More families through the name tables: Qwen3 (QK-norm), Llama 3.1 (llama3 rope scaling, and
GGUF `rope_freqs`), YaRN rope scaling, and GGUF files with a SentencePiece vocabulary.

Every model is a small random one built by `transformers` itself; the bound on logits is
1e-4 in fp32 (a few layers of round-off; the real differences we guard against, a wrong
frequency or a missing norm, move logits by 1e-2 or more). Parity figures are printed
(`pytest -s`).
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

transformers = pytest.importorskip("transformers", reason="conversion tests need transformers (pip install .[hf])")
gguf = pytest.importorskip("gguf", reason="GGUF tests need the gguf package (pip install gguf)")

from megatron.early_exit import load_checkpoint  # noqa: E402
from megatron.early_exit.checkpointing import save_checkpoint  # noqa: E402
from megatron.early_exit.conversion import ConversionError, export_hf, load_gguf_model, load_hf_model  # noqa: E402
from megatron.early_exit.conversion.gguf import llama3_from_factors  # noqa: E402
from megatron.early_exit.conversion.tables import (  # noqa: E402
    HF_GPT2,
    HF_LLAMA,
    gguf_table,
    permute_qk,
    to_ours,
    to_theirs,
)
from megatron.early_exit.model.rotary import RotaryEmbedding, scaled_inv_freq  # noqa: E402

VOCAB = 300  # not a multiple of 128: the import pads it, users see 300
TOL = 1e-4
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, max_position_embeddings=64)


def _configs():
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    heads = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    return {
        "qwen3": Qwen3Config(**COMMON, **heads, head_dim=16, tie_word_embeddings=True, rope_theta=10000.0),
        "qwen3_untied_hd32": Qwen3Config(**COMMON, **heads, head_dim=32, tie_word_embeddings=False),
        "llama31": LlamaConfig(**COMMON, **heads, rope_theta=5000.0, rope_scaling=dict(LLAMA3)),
        "qwen2_yarn": Qwen2Config(
            **COMMON,
            **heads,
            rope_theta=10000.0,
            rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
        ),
        "llama_yarn_mscale": LlamaConfig(
            **COMMON,
            **heads,
            rope_scaling={
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 16,
                "beta_fast": 16.0,
                "beta_slow": 2.0,
                "mscale": 1.0,
                "mscale_all_dim": 0.5,
            },
        ),
    }


EXPECTED_CLASS = {
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_untied_hd32": "Qwen3ForCausalLM",
    "llama31": "LlamaForCausalLM",
    "qwen2_yarn": "Qwen2ForCausalLM",
    "llama_yarn_mscale": "LlamaForCausalLM",
}


def _hf_model(config):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-trivial norms (QK-norm included) and biases
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def _ids(shape=(2, 40)) -> torch.Tensor:  # 40 > original_max_position_embeddings (16): scaling matters
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(0))


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


@pytest.mark.parametrize("kind", list(_configs()))
def test_hf_family_import_export_parity(kind, tmp_path):
    from transformers import AutoModelForCausalLM

    hf_model = _hf_model(_configs()[kind])
    hf_model.save_pretrained(tmp_path / "hf")
    ids = _ids()
    with torch.no_grad():
        ref = hf_model(ids).logits
        model, _ = load_hf_model(str(tmp_path / "hf"))
        imported = _diff(model(ids).logits, ref)
    assert imported < TOL
    assert model.config.qk_layernorm == kind.startswith("qwen3")

    export_hf(model, None, str(tmp_path / "out"))
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(again).__name__ == EXPECTED_CLASS[kind]
    with torch.no_grad():
        exported = _diff(again(ids).logits, ref)
    assert exported < TOL
    back, _ = load_hf_model(str(tmp_path / "out"))
    assert back.config.to_dict() == model.config.to_dict()
    for name, t in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], t), name
    save_checkpoint(str(tmp_path / "ee"), 0, model, None)  # through our format: config (JSON) and weights
    ours, _ = load_checkpoint(str(tmp_path / "ee"))
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, model(ids).logits)
    print(f"\n{kind}: import max |dlogit| {imported:.2e}, export {exported:.2e}")
    if model.config.rope_scaling:  # the bound is not vacuous: without the scaling logits move far beyond it
        model.rotary = RotaryEmbedding(model.config.head_dim, model.config.rotary_base, None)
        with torch.no_grad():
            assert _diff(model(ids).logits, ref) > 100 * TOL


@pytest.mark.parametrize("table", ["hf_llama", "hf_gpt2", "gguf", "gguf_permuted"])
def test_every_table_is_its_own_inverse(table):
    """to_ours(to_theirs(w)) == w bit for bit, for every rule and op of every table."""
    from megatron.early_exit.config import ModelConfig
    from megatron.early_exit.model import EarlyExitGPT

    llama = dict(normalization="RMSNorm", swiglu=True, position_embedding_type="rope", add_bias_linear=False)
    shape = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, max_position_embeddings=8)
    config = ModelConfig(
        **shape,
        vocab_size=384,
        real_vocab_size=VOCAB,
        untie_embeddings_and_output_weights=True,
        **({} if table == "hf_gpt2" else {**llama, "add_qkv_bias": True, "qk_layernorm": True}),
    )
    if table == "hf_gpt2":
        config.num_query_groups = 4
    tables = {"hf_llama": HF_LLAMA, "hf_gpt2": HF_GPT2, "gguf": gguf_table(False), "gguf_permuted": gguf_table(True)}
    model = EarlyExitGPT(config)
    model.init_weights(0)
    with torch.no_grad():
        model.embedding.word_embeddings.weight[VOCAB:] = 0  # padded rows: what an import creates
        model.output_layer.weight[VOCAB:] = 0
    weights = {k: v.detach() for k, v in model.state_dict().items()}
    theirs = to_theirs(tables[table], config, weights)
    back = to_ours(tables[table], config, lambda name, shape: theirs.pop(name))
    assert not theirs and back.keys() == weights.keys()
    for name, w in weights.items():
        assert torch.equal(back[name], w), name


def test_unsupported_variants_are_one_line_errors(tmp_path):
    cfg = transformers.Qwen3Config(**COMMON, num_hidden_layers=1, num_attention_heads=4, attention_bias=True)
    _hf_model(cfg).save_pretrained(tmp_path / "q3bias")
    with pytest.raises(ConversionError, match=r"attention_bias=true \(bias on every projection\) is not supported"):
        load_hf_model(str(tmp_path / "q3bias"))
    cfg = transformers.LlamaConfig(**COMMON, num_hidden_layers=1, num_attention_heads=4)
    cfg.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    _hf_model(cfg).save_pretrained(tmp_path / "dyn")
    with pytest.raises(ConversionError, match="unsupported rope scaling type 'dynamic'"):
        load_hf_model(str(tmp_path / "dyn"))


def test_qk_norm_is_in_the_table():
    names = {r.theirs[0] for r in HF_LLAMA}
    assert "model.layers.{i}.self_attn.q_norm.weight" in names
    assert "model.layers.{i}.self_attn.k_norm.weight" in names


def test_rope_scaling_errors_name_the_input():
    from megatron.early_exit.config import ModelConfig

    base = dict(num_layers=1, hidden_size=32, num_attention_heads=2, vocab_size=128, max_position_embeddings=16)
    base.update(position_embedding_type="rope")
    with pytest.raises(ValueError, match="rope_scaling: unsupported rope_type 'dynamic'"):
        ModelConfig(**base, rope_scaling={"rope_type": "dynamic", "factor": 2.0}).validate()
    with pytest.raises(ValueError, match="rope_scaling: yarn scaling lacks 'original_max_position_embeddings'"):
        ModelConfig(**base, rope_scaling={"rope_type": "yarn", "factor": 2.0}).validate()


# ----------------------------------------------------------------------------------------
# GGUF: written here with llama.cpp's names and conventions, independently of our tables

GGUF_NAMES = {  # HF (in model.layers.{i}.) -> llama.cpp (in blk.{i}.)
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def _write_gguf(path, arch, hf_model, tokenizer=None, rope_freqs=None):
    c = hf_model.config
    nh, ng = c.num_attention_heads, c.num_key_value_heads
    hd = getattr(c, "head_dim", None) or c.hidden_size // nh
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(nh)
    w.add_head_count_kv(ng)
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(hd)
    (tokenizer or _write_null_vocab)(w)

    def put(name, t):
        w.add_tensor(name, np.ascontiguousarray(t.detach().float().numpy(), dtype=np.float32))

    sd = hf_model.state_dict()
    put("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(c.num_hidden_layers):
        for theirs, ours in GGUF_NAMES.items():
            t = sd.get(f"model.layers.{i}.{theirs}")
            if t is None:
                continue
            if arch == "llama" and theirs.startswith(("self_attn.q_proj", "self_attn.k_proj")):
                t = permute_qk(t, nh if "q_proj" in theirs else ng)  # llama.cpp's converter does this
            put(f"blk.{i}.{ours}", t)
    put("output_norm.weight", sd["model.norm.weight"])
    if not c.tie_word_embeddings:
        put("output.weight", sd["lm_head.weight"])
    if rope_freqs is not None:
        put("rope_freqs.weight", rope_freqs)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _write_null_vocab(w):
    tokens = ["<eos>", "a", "b", "ab"] + [f"x{i}" for i in range(VOCAB - 4)]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3] + [1] * (VOCAB - 1))
    w.add_token_merges(["a b"])
    w.add_eos_token_id(0)


def _llama31_freq_factors(cfg) -> torch.Tensor:
    """What llama.cpp's converter writes as rope_freqs for a Llama-3.1 model: default / scaled frequency."""
    hd = cfg.head_dim
    theta = float(cfg.rope_parameters["rope_theta"])
    plain = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    p = cfg.rope_parameters
    low_wl = p["original_max_position_embeddings"] / p["low_freq_factor"]
    high_wl = p["original_max_position_embeddings"] / p["high_freq_factor"]
    out = []
    for f in plain.tolist():
        wl = 2 * math.pi / f
        if wl < high_wl:
            out.append(1.0)
        elif wl > low_wl:
            out.append(p["factor"])
        else:
            s = (p["original_max_position_embeddings"] / wl - p["low_freq_factor"]) / (
                p["high_freq_factor"] - p["low_freq_factor"]
            )
            out.append(1 / ((1 - s) / p["factor"] + s))
    return torch.tensor(out, dtype=torch.float32)


def test_gguf_llama31_rope_freqs(tmp_path):
    from transformers import AutoModelForCausalLM

    # head dim 32 and a 256-token original context: frequencies kept, blended (two) and divided by 8
    scaling = {**LLAMA3, "original_max_position_embeddings": 256}
    cfg = transformers.LlamaConfig(**COMMON, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    cfg.head_dim, cfg.rope_parameters = 32, {"rope_theta": 10000.0, **scaling}
    hf_model = _hf_model(cfg)
    factors = _llama31_freq_factors(hf_model.config)
    assert (factors == 1.0).sum() == 5 and (factors == 8.0).sum() == 9  # two blended between
    _write_gguf(tmp_path / "l31.gguf", "llama", hf_model, rope_freqs=factors)
    model, _ = load_gguf_model(str(tmp_path / "l31.gguf"))
    scaling = model.config.rope_scaling
    assert scaling["rope_type"] == "llama3" and scaling["factor"] == 8.0  # recognised, so it exports to HF
    ids = _ids()
    with torch.no_grad():
        ref = hf_model(ids).logits
        imported = _diff(model(ids).logits, ref)
    assert imported < TOL
    export_hf(model, None, str(tmp_path / "out"))
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        exported = _diff(again(ids).logits, ref)
    assert exported < TOL
    print(f"\nllama31 GGUF rope_freqs: import max |dlogit| {imported:.2e}, HF export {exported:.2e}")


def test_gguf_arbitrary_rope_freqs_kept_as_factors(tmp_path):
    cfg = transformers.LlamaConfig(**COMMON, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4)
    hf_model = _hf_model(cfg)
    factors = torch.linspace(1.0, 3.0, 8) ** 2  # not a Llama-3.1 curve
    _write_gguf(tmp_path / "f.gguf", "llama", hf_model, rope_freqs=factors)
    model, _ = load_gguf_model(str(tmp_path / "f.gguf"))
    assert model.config.rope_scaling["rope_type"] == "freq_factors"
    inv, _ = scaled_inv_freq(16, 10000.0, None)
    assert torch.allclose(model.rotary.inv_freq.double(), inv / factors.double(), rtol=1e-6)
    with pytest.raises(ConversionError, match="--saver hf: per-frequency rope factors"):
        export_hf(model, None, str(tmp_path / "out"))


def test_llama3_from_factors_recovers_parameters():
    for params in (LLAMA3, {**LLAMA3, "original_max_position_embeddings": 8192, "factor": 32.0}):
        base, hd = 500000.0, 64
        plain, _ = scaled_inv_freq(hd, base, None)
        factors = (plain / scaled_inv_freq(hd, base, params)[0]).tolist()
        guess = llama3_from_factors(factors, hd, base)
        if guess is None:  # fewer than two blended frequencies: kept as factors (still exact)
            continue
        assert torch.allclose(scaled_inv_freq(hd, base, guess)[0], scaled_inv_freq(hd, base, params)[0], rtol=1e-6)


def test_gguf_qwen2_yarn(tmp_path):
    """A Qwen2 YaRN model as llama.cpp's converter writes it: scaling type, factor, original context."""
    hf_model = _hf_model(_configs()["qwen2_yarn"])

    def vocab_and_yarn(w):
        _write_null_vocab(w)
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(4.0)
        w.add_rope_scaling_orig_ctx_len(16)

    _write_gguf(tmp_path / "y.gguf", "qwen2", hf_model, tokenizer=vocab_and_yarn)
    model, _ = load_gguf_model(str(tmp_path / "y.gguf"))
    assert model.config.rope_scaling["rope_type"] == "yarn"
    with torch.no_grad():
        diff = _diff(model(_ids()).logits, hf_model(_ids()).logits)
    assert diff < TOL
    print(f"\nqwen2 yarn GGUF: import max |dlogit| {diff:.2e}")


def test_gguf_qwen3_qk_norm(tmp_path):
    hf_model = _hf_model(_configs()["qwen3"])
    _write_gguf(tmp_path / "q3.gguf", "qwen3", hf_model)
    model, _ = load_gguf_model(str(tmp_path / "q3.gguf"))
    assert model.config.qk_layernorm
    with torch.no_grad():
        diff = _diff(model(_ids()).logits, hf_model(_ids()).logits)
    assert diff < TOL
    print(f"\nqwen3 GGUF: import max |dlogit| {diff:.2e}")


# ----------------------------------------------------------------------------------------
# GGUF with a SentencePiece ("llama") vocabulary

TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "  Early-exit models decode faster, don't they?\nYes.",
    "naïve café – 東京 🙂",  # byte fallback for unseen characters
    "",
]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("spm")
    corpus = d / "corpus.txt"
    corpus.write_text("\n".join(["the quick brown fox jumps over the lazy dog", "early exit language models"] * 50))
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(d / "sp"),
        vocab_size=VOCAB,
        model_type="bpe",
        byte_fallback=True,  # Llama's settings: bytes for unseen characters, text kept as is
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        minloglevel=2,
    )
    return str(d / "sp.model")


def _spm_vocab_writer(model_file):
    """Write a SentencePiece model's vocabulary as llama.cpp does (tokenizer.ggml.model = llama)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=model_file)
    assert sp.GetPieceSize() == VOCAB

    def kind(i):
        if sp.IsUnknown(i):
            return 2
        if sp.IsControl(i):
            return 3
        if sp.IsByte(i):
            return 6
        return 5 if sp.IsUnused(i) else 1

    def write(w):
        w.add_tokenizer_model("llama")
        w.add_token_list([sp.IdToPiece(i) for i in range(VOCAB)])
        w.add_token_scores([sp.GetScore(i) for i in range(VOCAB)])
        w.add_token_types([kind(i) for i in range(VOCAB)])
        w.add_bos_token_id(sp.bos_id())
        w.add_eos_token_id(sp.eos_id())
        w.add_unk_token_id(sp.unk_id())
        w.add_add_space_prefix(True)
        w.add_chat_template("{{ messages[0]['content'] }}")

    return sp, write


def test_gguf_sentencepiece_vocabulary(tmp_path, sp_model):
    sp, write = _spm_vocab_writer(sp_model)
    cfg = transformers.LlamaConfig(**COMMON, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    hf_model = _hf_model(cfg)
    _write_gguf(tmp_path / "sp.gguf", "llama", hf_model, tokenizer=write)
    model, tok = load_gguf_model(str(tmp_path / "sp.gguf"))
    assert type(tok).__name__ == "GGUFSentencePieceTokenizer"
    assert (tok.vocab_size, tok.eod, tok.bos) == (VOCAB, sp.eos_id(), sp.bos_id())
    assert tok.chat_template == "{{ messages[0]['content'] }}"
    for text in TEXTS:
        ids = tok.tokenize(text)
        assert ids == sp.EncodeAsIds(text), text
        assert tok.detokenize(ids) == sp.DecodeIds(ids) == text, text
    assert any(sp.IsByte(i) for i in tok.tokenize(TEXTS[2]))  # the byte pieces were exercised
    with torch.no_grad():
        assert _diff(model(_ids()).logits, hf_model(_ids()).logits) < TOL

    save_checkpoint(str(tmp_path / "ee"), 0, model, tok)  # saved as tokenizer.model, reloads as SentencePiece
    _, tok2 = load_checkpoint(str(tmp_path / "ee"))
    assert type(tok2).__name__ == "SentencePieceTokenizer"
    assert [tok2.tokenize(t) for t in TEXTS] == [tok.tokenize(t) for t in TEXTS]
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "ee" / "iter_0000000" / "tokenizer")
    assert [auto(t).input_ids for t in TEXTS] == [tok.tokenize(t) for t in TEXTS]  # harnesses see our ids

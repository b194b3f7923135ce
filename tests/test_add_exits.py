"""EE-Tuning stage 1: adding copy- or random-initialised exits to a trained model."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from megatron.early_exit import load_checkpoint
from megatron.early_exit.checkpointing import save_checkpoint
from megatron.early_exit.config import ModelConfig
from megatron.early_exit.conversion import ConversionError, add_exits
from megatron.early_exit.model import EarlyExitGPT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools", "checkpoint"))


def _model(untied: bool, llama: bool = True, exits=(), **exit_flags) -> EarlyExitGPT:
    family = (
        dict(normalization="RMSNorm", swiglu=True, position_embedding_type="rope", add_bias_linear=False)
        if llama
        else dict(normalization="LayerNorm", swiglu=False, position_embedding_type="learned_absolute")
    )
    config = ModelConfig(
        num_layers=3,
        hidden_size=32,
        num_attention_heads=4,
        num_query_groups=2 if llama else 4,
        vocab_size=128,
        max_position_embeddings=32,
        ffn_hidden_size=48,
        untie_embeddings_and_output_weights=untied,
        exit_layer_nums=list(exits),
        **family,
        **exit_flags,
    )
    model = EarlyExitGPT(config)
    model.init_weights(seed=7)
    with torch.no_grad():  # non-trivial norms and biases
        gen = torch.Generator().manual_seed(3)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.eval()


def _ids():
    return torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "untied_output,untie_exit",
    [(False, False), (False, True), (True, True)],
    ids=["tied-model", "tied-model-untied-exit", "untied-model-untied-exit"],
)
@pytest.mark.parametrize("llama", [True, False], ids=["llama", "gpt2"])
def test_copied_norm_exit_after_last_layer_is_the_final_head(untied_output, untie_exit, llama):
    # (an untied model's tied exit projects with the input embedding: it cannot be the final head)
    model = _model(untied_output, llama)
    new = add_exits(model, [3], use_exit_norm=True, untie_exit_output_weights=untie_exit)
    with torch.no_grad():
        out = new(_ids())
        ref = model(_ids()).logits
    assert torch.equal(out.logits, ref)
    assert torch.equal(out.exit_logits[3], out.logits)


def test_mlp_block_and_output_copies():
    model = _model(untied=True)
    new = add_exits(
        model, [1, 2], use_exit_norm=True, use_exit_mlp=True, use_exit_block=True, untie_exit_output_weights=True
    )
    w, s = new.state_dict(), model.state_dict()
    for n in (1, 2):
        for leaf in ("linear_fc1.weight", "linear_fc2.weight"):
            assert torch.equal(w[f"exits.{n}.mlp.{leaf}"], s[f"decoder.layers.{n - 1}.mlp.{leaf}"])
        assert torch.equal(w[f"exits.{n}.mlp_norm.weight"], s[f"decoder.layers.{n - 1}.pre_mlp_layernorm.weight"])
        assert torch.equal(w[f"exits.{n}.norm.weight"], s["decoder.final_layernorm.weight"])
        assert torch.equal(w[f"exits.{n}.output_layer.weight"], s["output_layer.weight"])
        for name, t in s.items():
            if name.startswith("decoder.layers.2."):
                assert torch.equal(w[f"exits.{n}.block." + name[len("decoder.layers.2.") :]], t), name
    for name, t in s.items():  # the backbone is untouched
        assert torch.equal(w[name], t)
    # an exit MLP copied from its own layer is "one more MLP sub-block" of that layer
    tied = add_exits(_model(untied=False), [1], use_exit_mlp=True, untie_exit_output_weights=True)
    assert torch.equal(tied.state_dict()["exits.1.output_layer.weight"], tied.embedding.word_embeddings.weight)


def test_existing_exits_are_kept_and_conflicts_fail():
    model = _model(untied=False, exits=[2], use_exit_norm=True, exit_layer_temperature=[2.0])
    with torch.no_grad():
        model.exits["2"].norm.weight.mul_(1.5)
    old = model.exits["2"].norm.weight.clone()
    new = add_exits(model, [1, 3])
    assert new.config.exit_layer_nums == [1, 2, 3] and new.config.exit_layer_temperature == [1.0, 2.0, 1.0]
    assert new.config.use_exit_norm  # inherited
    assert torch.equal(new.exits["2"].norm.weight, old)
    with torch.no_grad():
        assert torch.equal(new(_ids()).exit_logits[2], model(_ids()).exit_logits[2])
    with pytest.raises(ConversionError, match="layer 2 already has an exit"):
        add_exits(model, [2])
    with pytest.raises(ConversionError, match="--use-exit-mlp"):
        add_exits(model, [1], use_exit_mlp=True)
    with pytest.raises(ConversionError, match="outside 1..3"):
        add_exits(model, [4])


def test_random_init_statistics():
    std = 0.03
    model = _model(untied=False, llama=False)
    new = add_exits(
        model,
        [1, 2],
        use_exit_norm=True,
        use_exit_mlp=True,
        untie_exit_output_weights=True,
        use_exit_confidence_head=True,
        random_init=True,
        init_method_std=std,
        seed=5,
    )
    w = new.state_dict()
    exit_names = [k for k in w if k.startswith("exits.")]
    assert exit_names
    matrices = []
    for name in exit_names:
        t = w[name]
        if ".confidence." in name or name.endswith(".bias"):
            assert torch.count_nonzero(t) == 0, name
        elif "norm" in name.split(".")[-2]:
            assert torch.equal(t, torch.ones_like(t)), name
        else:
            matrices.append(t.flatten())
    values = torch.cat(matrices)
    assert values.numel() > 10000
    assert abs(values.mean().item()) < 4 * std / values.numel() ** 0.5
    assert abs(values.std().item() / std - 1) < 0.03
    again = add_exits(
        model,
        [1, 2],
        use_exit_norm=True,
        use_exit_mlp=True,
        untie_exit_output_weights=True,
        use_exit_confidence_head=True,
        random_init=True,
        init_method_std=std,
        seed=5,
    )
    assert all(torch.equal(again.state_dict()[k], w[k]) for k in exit_names)  # seeded


def test_add_exits_cli(tmp_path, capsys):
    import add_exits as cli

    from megatron.early_exit.tokenizer import build_tokenizer

    model = _model(untied=False)
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    null = build_tokenizer("NullTokenizer", vocab_size=100)
    save_checkpoint(src, 30, model, null)
    args = ["--load-dir", src, "--save-dir", dst, "--add-exit-layer-nums", "3", "1", "--use-exit-norm"]
    assert cli.main(args) == 0
    loaded, tok = load_checkpoint(dst)
    assert loaded.config.exit_layer_nums == [1, 3] and tok is not None and tok.vocab_size == null.vocab_size
    assert os.path.isdir(os.path.join(dst, "iter_0000000"))
    with torch.no_grad():
        out = loaded(_ids())
    assert torch.equal(out.exit_logits[3], out.logits)
    # adding to a layer that has one: one-line error, exit code 2
    capsys.readouterr()
    assert cli.main(["--load-dir", dst, "--save-dir", str(tmp_path / "x"), "--add-exit-layer-nums", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "already has an exit" in err
    assert (
        cli.main(
            ["--load-dir", str(tmp_path / "nope"), "--save-dir", str(tmp_path / "y"), "--add-exit-layer-nums", "1"]
        )
        == 2
    )
    assert "nope" in capsys.readouterr().err


@pytest.mark.parametrize("llama", [True, False], ids=["llama", "gpt2"])
def test_backbone_probe_norm_copies_the_final_norm_and_round_trips(tmp_path, llama):
    """--exit-confidence-input backbone: the config says so, each exit gets a probe norm copied
    from the final norm (bias too, for LayerNorm), and our checkpoint and the HF export both
    bring back the config and every probe tensor bit-exact."""
    from megatron.early_exit.conversion import export_hf, load_hf_model

    model = _model(untied=False, llama=llama)
    new = add_exits(
        model, [1, 2], use_exit_norm=True, use_exit_mlp=True, use_exit_confidence_head=True,
        exit_confidence_input="backbone",
    )  # fmt: skip
    assert new.config.exit_confidence_input == "backbone"
    w, s = new.state_dict(), model.state_dict()
    leaves = ["weight"] + ([] if llama else ["bias"])
    for n in (1, 2):
        assert new.exits[str(n)].probe_reads_backbone
        for leaf in leaves:
            assert torch.equal(w[f"exits.{n}.confidence_norm.{leaf}"], s[f"decoder.final_layernorm.{leaf}"])
    with torch.no_grad():  # trained-looking probes, so a round trip that dropped them would show
        for n in (1, 2):
            new.exits[str(n)].confidence_norm.weight.mul_(torch.linspace(0.5, 1.5, 32))
            new.exits[str(n)].confidence.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(n))
    save_checkpoint(str(tmp_path / "ck"), 0, new, None)
    export_hf(new, None, str(tmp_path / "hf"))
    for back in (load_checkpoint(str(tmp_path / "ck"))[0], load_hf_model(str(tmp_path / "hf"))[0]):
        assert back.config.to_dict() == new.config.to_dict()
        b = back.state_dict()
        assert b.keys() == new.state_dict().keys()
        for name, tensor in new.state_dict().items():
            assert torch.equal(b[name], tensor), name


def test_exit_confidence_input_flag_errors():
    model = _model(untied=False)
    with pytest.raises(ConversionError, match="needs --use-exit-confidence-head"):
        add_exits(model, [1], use_exit_norm=True, exit_confidence_input="backbone")
    with pytest.raises(ConversionError, match="must be exit or backbone"):
        add_exits(model, [1], use_exit_confidence_head=True, exit_confidence_input="hidden")
    probed = add_exits(model, [2], use_exit_confidence_head=True, exit_confidence_input="backbone")
    with pytest.raises(ConversionError, match="exit_confidence_input='backbone'"):
        add_exits(probed, [1], exit_confidence_input="exit")
    more = add_exits(probed, [1])  # inherited
    assert more.config.exit_confidence_input == "backbone" and more.exits["1"].confidence_norm is not None
    default = add_exits(model, [1], use_exit_confidence_head=True)
    assert default.config.exit_confidence_input == "exit" and default.exits["1"].confidence_norm is None


def test_add_exits_cli_backbone_probes(tmp_path):
    import add_exits as cli

    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    save_checkpoint(src, 0, _model(untied=False), None)
    argv = ["--load-dir", src, "--save-dir", dst, "--add-exit-layer-nums", "2", "--use-exit-norm", "--use-exit-mlp"]
    assert cli.main([*argv, "--use-exit-confidence-head", "--exit-confidence-input", "backbone"]) == 0
    loaded, _ = load_checkpoint(dst)
    assert loaded.config.exit_confidence_input == "backbone"
    assert torch.equal(loaded.exits["2"].confidence_norm.weight, loaded.decoder.final_layernorm.weight)


@pytest.mark.parametrize("untied_output", [False, True], ids=["tied-model", "untied-model"])
def test_untie_exits_copies_the_shared_projection_and_keeps_the_outputs(tmp_path, capsys, untied_output):
    """--untie-exits: every exit gets an output layer of its own, a copy of the projection it
    shared (the word embedding, also beside an untied output layer); every logit, exit and final, stays
    bit for bit, and every other tensor too. Refused without exits, with untied exits, and
    beside --add-exit-layer-nums (one-line errors, exit code 2)."""
    import add_exits as cli

    from megatron.early_exit.tokenizer import build_tokenizer

    model = _model(untied=untied_output, exits=(1, 2), use_exit_norm=True)
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    save_checkpoint(src, 5, model, build_tokenizer("NullTokenizer", vocab_size=100))
    assert cli.main(["--load-dir", src, "--save-dir", dst, "--untie-exits"]) == 0
    loaded, _ = load_checkpoint(dst)
    assert loaded.config.untie_exit_output_weights and loaded.config.exit_layer_nums == [1, 2]
    shared = model.embedding.word_embeddings.weight  # what tied exits project with, output layer untied or not
    before, after = model.state_dict(), loaded.state_dict()
    for n in (1, 2):
        w = after.pop(f"exits.{n}.output_layer.weight")
        assert torch.equal(w, shared) and w.data_ptr() != after["embedding.word_embeddings.weight"].data_ptr()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    with torch.no_grad():
        a, b = model(_ids()), loaded(_ids())
    assert torch.equal(a.logits, b.logits) and all(torch.equal(a.exit_logits[n], b.exit_logits[n]) for n in (1, 2))
    # the exits' projections are now their own: changing one leaves the final head alone
    with torch.no_grad():
        loaded.exits["1"].output_layer.weight.mul_(2.0)
        c = loaded(_ids())
    assert torch.equal(c.logits, a.logits) and not torch.equal(c.exit_logits[1], a.exit_logits[1])
    capsys.readouterr()
    for args, words in (
        (["--load-dir", dst, "--save-dir", str(tmp_path / "x"), "--untie-exits"], "already have their own"),
        (["--load-dir", src, "--save-dir", str(tmp_path / "y"), "--untie-exits", "--add-exit-layer-nums", "3"],
         "--untie-exit-output-weights"),
    ):  # fmt: skip
        assert cli.main(args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err
    bare = str(tmp_path / "bare")
    save_checkpoint(bare, 5, _model(untied=untied_output), build_tokenizer("NullTokenizer", vocab_size=100))
    assert cli.main(["--load-dir", bare, "--save-dir", str(tmp_path / "z"), "--untie-exits"]) == 2
    assert "has no exits" in capsys.readouterr().err

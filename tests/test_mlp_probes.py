"""MLP confidence probes (`exit_confidence_hidden_size` k > 0: Linear(h, k) -> GELU -> Linear(k, 1)):
k = 0 is the linear probe as before; an MLP probe is initialised, replaced, saved, exported,
tuned from a cache and decoded with like the linear one."""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from megatron.early_exit import load_checkpoint
from megatron.early_exit.arguments import parse_args
from megatron.early_exit.checkpointing import save_checkpoint
from megatron.early_exit.config import ModelConfig
from megatron.early_exit.conversion import ConversionError, add_exits, export_hf, load_hf_model, replace_probes
from megatron.early_exit.inference import EarlyExitEngine, generate
from megatron.early_exit.inference.exit_decision import ExitCosts
from megatron.early_exit.model import EarlyExitGPT
from megatron.early_exit.training.cached_tuning import CachedTuner
from megatron.early_exit.training.trainer import Trainer
from tests.test_add_exits import _ids, _model
from tests.test_exit_cache import TUNE, exit_grads, make_cache, make_checkpoint
from tests.test_inference import PROMPTS, naive_greedy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools", "checkpoint"))
pytestmark = pytest.mark.usefixtures("one_thread")
LEAVES = ("confidence.fc_in.weight", "confidence.fc_in.bias", "confidence.fc_out.weight", "confidence.fc_out.bias")


def _probe_keys(model) -> list[str]:
    return sorted(k for k in model.state_dict() if ".confidence" in k)


def _by_hand(probe, h: torch.Tensor) -> torch.Tensor:
    """Linear -> exact GELU -> Linear written out: the logit [b, s]."""
    mid = F.gelu(h @ probe.fc_in.weight.t() + probe.fc_in.bias)  # (b, s, k)
    return (mid @ probe.fc_out.weight.t() + probe.fc_out.bias).squeeze(-1)


def _trained_looking(model, seed: int = 1):
    """Non-zero probe weights, so that a path that dropped or zeroed them would show."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".confidence." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


def test_zero_is_the_linear_probe_with_unchanged_keys():
    """k = 0 (the default, and what a config saved before the field reads as) builds the plain
    Linear(h, 1) under the same state-dict names as before."""
    model = _model(untied=False, exits=(1, 2), use_exit_norm=True, use_exit_confidence_head=True)
    assert model.config.exit_confidence_hidden_size == 0
    old = {k: v for k, v in model.config.to_dict().items() if k != "exit_confidence_hidden_size"}
    assert ModelConfig.from_dict(old).exit_confidence_hidden_size == 0
    assert type(model.exits["1"].confidence) is nn.Linear
    assert _probe_keys(model) == [f"exits.{n}.confidence.{leaf}" for n in (1, 2) for leaf in ("bias", "weight")]


def test_mlp_probe_shape_and_logit():
    model = _trained_looking(_model(untied=False, exits=(1, 2), use_exit_norm=True, use_exit_confidence_head=True,
                                    exit_confidence_hidden_size=8))  # fmt: skip
    assert _probe_keys(model) == sorted(f"exits.{n}.{leaf}" for n in (1, 2) for leaf in LEAVES)
    probe = model.exits["1"].confidence
    assert probe.fc_in.weight.shape == (8, 32) and probe.fc_out.weight.shape == (1, 8)
    h = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0))
    # fp32, the same three operations in another order of calls: round-off only
    torch.testing.assert_close(model.exits["1"].confidence_logit(h), _by_hand(probe, h), rtol=1e-6, atol=1e-6)


def test_config_checks_name_the_flag():
    base = dict(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=64, max_position_embeddings=8,
                exit_layer_nums=[1])  # fmt: skip
    with pytest.raises(ValueError, match="--exit-confidence-hidden-size must be an integer >= 0, got -1"):
        ModelConfig(**base, use_exit_confidence_head=True, exit_confidence_hidden_size=-1).validate()
    with pytest.raises(ValueError, match="--exit-confidence-hidden-size needs --use-exit-confidence-head"):
        ModelConfig(**base, exit_confidence_hidden_size=8).validate()


def test_add_exits_starts_an_mlp_probe_at_one_half_and_able_to_learn():
    """Copy and random init: the first layer N(0, std), the rest zeros (logit 0, sigmoid 0.5;
    an all-zero MLP would get no gradient); adding exits of another probe size to a model
    whose exits have probes is refused, naming the flag."""
    model = _model(untied=False)
    for random_init in (False, True):
        std = 0.05 if random_init else model.config.init_method_std
        new = add_exits(model, [1, 2], use_exit_norm=True, use_exit_confidence_head=True,
                        exit_confidence_hidden_size=64, random_init=random_init,
                        init_method_std=std if random_init else None)  # fmt: skip
        w = new.state_dict()
        for n in (1, 2):
            fc_in = w[f"exits.{n}.confidence.fc_in.weight"]
            assert abs(fc_in.std().item() / std - 1) < 0.1  # 2,048 draws: the std within ~3 sigma
            for leaf in LEAVES[1:]:
                assert torch.count_nonzero(w[f"exits.{n}.{leaf}"]) == 0, leaf
        with torch.no_grad():
            h = torch.randn(3, 32)
            assert torch.equal(new.exits["1"].confidence_logit(h), torch.zeros(3))
    with pytest.raises(ConversionError, match="exit_confidence_hidden_size=64; all exits share one structure"):
        add_exits(new, [3], exit_confidence_hidden_size=0)
    assert add_exits(new, [3]).config.exit_confidence_hidden_size == 64  # inherited


@pytest.mark.parametrize("probe_input", ["exit", "backbone"])
def test_replace_probes_keeps_every_other_tensor(probe_input):
    model = _trained_looking(_model(untied=False, exits=(1, 2), use_exit_norm=True, use_exit_confidence_head=True))
    new = replace_probes(model, 16, exit_confidence_input=probe_input)
    assert new.config.exit_confidence_hidden_size == 16 and new.config.exit_confidence_input == probe_input
    old, w = model.state_dict(), new.state_dict()
    kept = [k for k in old if ".confidence" not in k]
    assert sorted(k for k in w if ".confidence" not in k) == sorted(kept)
    assert all(torch.equal(w[k], old[k]) for k in kept)
    for n in (1, 2):
        assert torch.count_nonzero(w[f"exits.{n}.confidence.fc_out.weight"]) == 0
        if probe_input == "backbone":
            assert torch.equal(w[f"exits.{n}.confidence_norm.weight"], old["decoder.final_layernorm.weight"])
    back = replace_probes(new, 0, exit_confidence_input="exit")  # back to a (new, zero) linear probe
    assert _probe_keys(back) == _probe_keys(model) and all(torch.count_nonzero(back.state_dict()[k]) == 0
                                                           for k in _probe_keys(back) if "norm" not in k)  # fmt: skip
    with pytest.raises(ConversionError, match="--replace-probes: the model has no exits"):
        replace_probes(_model(untied=False), 8)
    with pytest.raises(ConversionError, match="--exit-confidence-hidden-size must be in 0..65536, got -2"):
        replace_probes(model, -2)


def test_mlp_probe_round_trips_through_checkpoint_and_hf_export(tmp_path):
    model = _model(untied=False, exits=(1, 2), use_exit_norm=True, use_exit_confidence_head=True,
                   exit_confidence_hidden_size=8)  # fmt: skip
    model = _trained_looking(model)
    save_checkpoint(str(tmp_path / "ck"), 0, model, None)
    export_hf(model, None, str(tmp_path / "hf"))
    ids = _ids()
    for back in (load_checkpoint(str(tmp_path / "ck"))[0], load_hf_model(str(tmp_path / "hf"))[0]):
        assert back.config.to_dict() == model.config.to_dict()
        b = back.state_dict()
        assert b.keys() == model.state_dict().keys()
        assert all(torch.equal(b[k], v) for k, v in model.state_dict().items())
        with torch.no_grad():
            for n, x in model.run_layers(*model.embed_input(ids, None, None))[1]:
                want = model.exits[str(n)].confidence_logit(model.exits[str(n)].hidden(x))
                got = back.exits[str(n)].confidence_logit(back.exits[str(n)].hidden(x))
                assert torch.equal(got, want) and want.abs().max() > 0.1


def test_add_exits_cli_replace_probes(tmp_path, capsys):
    import add_exits as cli

    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    model = _model(untied=False, exits=(2,), use_exit_norm=True, use_exit_confidence_head=True)
    save_checkpoint(src, 0, model, None)
    argv = ["--load-dir", src, "--save-dir", dst, "--replace-probes", "--exit-confidence-hidden-size", "8"]
    assert cli.main(argv) == 0
    assert "MLP (8) probes" in capsys.readouterr().err
    loaded, _ = load_checkpoint(dst)
    assert loaded.config.exit_confidence_hidden_size == 8 and loaded.exits["2"].confidence.fc_in.weight.shape == (8, 32)
    assert torch.equal(loaded.exits["2"].norm.weight, model.exits["2"].norm.weight)
    assert cli.main(["--load-dir", src, "--save-dir", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--replace-probes, --untie-exits or several" in err


def _decoding_model() -> EarlyExitGPT:
    cfg = ModelConfig(num_layers=4, hidden_size=32, num_attention_heads=4, vocab_size=64, max_position_embeddings=64,
                      exit_layer_nums=[1, 3], use_exit_norm=True, use_exit_mlp=True, use_exit_confidence_head=True,
                      exit_confidence_hidden_size=16)  # fmt: skip
    model = EarlyExitGPT(cfg)
    model.init_weights(3)
    return _trained_looking(model.eval(), seed=4)


@pytest.mark.parametrize("policy", ["exact", "cost_aware"])
def test_learned_measure_decodes_with_an_mlp_probe(policy):
    """Threshold 1.0: full decoding's tokens, every token at full depth; a probe whose output
    bias forces "agree" at exit 1: every decoded token leaves there with sigmoid(10)."""
    model = _decoding_model()
    ref = [naive_greedy(model, p, 6) for p in PROMPTS]
    kw = dict(strategy="early_exit", measure="learned", max_new_tokens=6, exit_policy=policy)
    res = generate(model, None, PROMPTS, early_exit_threshold=1.0, **kw)
    assert [r.tokens for r in res] == ref and all(set(r.exit_layers) == {4} for r in res)
    with torch.no_grad():
        model.exits["1"].confidence.fc_out.weight.zero_()
        model.exits["1"].confidence.fc_out.bias.fill_(10.0)
    res = generate(model, None, PROMPTS, early_exit_threshold=0.9, **kw)
    assert all(r.exit_layers[1:] == [1] * 5 for r in res)
    assert all(c == pytest.approx(torch.sigmoid(torch.tensor(10.0)).item()) for c in res[0].confidences[1:])


def test_learned_confidence_is_the_mlp_probe_of_the_exit_hidden_state():
    """The first decoded token's confidence at exit 1 (threshold 0: it always leaves there) is
    sigmoid(MLP probe(exit 1's hidden state of the prompt's last position)), by hand."""
    model = _decoding_model()
    res = generate(model, None, PROMPTS[:1], strategy="early_exit", measure="learned", early_exit_threshold=0.0,
                   max_new_tokens=2, exit_policy="exact")  # fmt: skip
    ids = torch.tensor([PROMPTS[0] + res[0].tokens[:1]])
    with torch.no_grad():
        (n, x), _ = model.run_layers(*model.embed_input(ids, None, None))[1]
        head = model.exits[str(n)]
        want = torch.sigmoid(_by_hand(head.confidence, head.hidden(x))[0, -1]).item()
    assert n == 1 and res[0].exit_layers[1] == 1
    assert res[0].confidences[1] == pytest.approx(want, rel=1e-5)  # fp32 KV-cached vs uncached forward


def test_parameter_costs_price_the_mlp_probe():
    """EE_EXIT_COSTS=parameters: an MLP probe costs its weights, (h + 2) k + 1; a linear one
    keeps the old floor of 1/50 of a layer."""
    passes = EarlyExitEngine(_decoding_model()).passes
    layer = sum(p.numel() for p in passes.model.decoder.layers[str(passes.start)].parameters())
    assert ExitCosts.from_parameters(passes).probe == max(layer / 50, 34 * 16 + 1)
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=64, max_position_embeddings=8,
                      exit_layer_nums=[1], use_exit_confidence_head=True, exit_confidence_hidden_size=512)  # fmt: skip
    big = EarlyExitEngine(EarlyExitGPT(cfg).eval()).passes
    assert ExitCosts.from_parameters(big).probe == 34 * 512 + 1


def test_cached_tuning_trains_mlp_probes_as_tuning_through_the_backbone(tmp_path):
    """The cache's fingerprint ignores the probe size (a cache of the linear-probe model tunes
    the MLP-probe one), and one cached step equals one step through the backbone (fp32 round-off)."""
    cache = make_cache(make_checkpoint(tmp_path / "linear", "mlp"), tmp_path / "cache")
    ckpt = make_checkpoint(tmp_path / "ck", "mlp", exit_confidence_hidden_size=8)
    common = [*TUNE, "--load", ckpt, "--exit-loss-type", "ce+kd"]
    live = Trainer(parse_args([*common, "--mock-data"]))
    cached = CachedTuner(parse_args([*common, "--exit-activation-cache", cache]))
    a, b = live.train_step(), cached.train_step()
    for n in live.config.exit_layer_nums:
        assert b[f"exit_{n} confidence loss"] == pytest.approx(a[f"exit_{n} confidence loss"], rel=1e-6)
        assert a[f"exit_{n} confidence loss"] > 0.1
    ga, gb = exit_grads(live.model), exit_grads(cached.model)
    assert {f"exits.{n}.{leaf}" for n in (1, 3) for leaf in LEAVES} <= set(ga) and sorted(ga) == sorted(gb)
    for name in ga:
        assert torch.allclose(gb[name], ga[name], rtol=1e-5, atol=1e-7), name  # as test_exit_cache
        assert ga[name].abs().sum() > 0, name


def test_tensor_parallelism_keeps_mlp_probes_replicated():
    """The probe's layers are not the backbone MLP's: TP leaves them whole on every rank, and
    gathering a full state dict does not concatenate them (`shard_spec`)."""
    from megatron.early_exit.parallel.tensor_parallel import shard_spec

    for name in ("exits.3.confidence.fc_in.weight", "exits.3.confidence.fc_out.weight", "exits.3.confidence.weight"):
        assert shard_spec(name, swiglu=True) == "replicated", name
    assert shard_spec("exits.3.mlp.linear_fc1.weight", swiglu=False) == "rows"  # the exit's own MLP is sharded

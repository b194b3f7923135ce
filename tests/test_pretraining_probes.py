"""Confidence probes in pretraining: trained on the exits' detached hidden states, they change
no other gradient, and their own gradient is non-zero."""

from __future__ import annotations

import pytest
import torch

from megatron.early_exit.arguments import parse_args
from megatron.early_exit.training.trainer import Trainer
from tests.test_parallel_training import BASE, LAYOUTS, train

PROBES = ["--use-exit-confidence-head"]

SMALL = (
    "--mock-data --tokenizer-type NullTokenizer --vocab-size 64 --num-layers 4 --hidden-size 32 "
    "--num-attention-heads 4 --seq-length 16 --micro-batch-size 2 --global-batch-size 4 --train-iters 1 "
    "--lr 3e-3 --log-interval 100 --eval-interval 0 --seed 5 --device cpu --clip-grad 0 "
    "--exit-layer-nums 1 3 --exit-layer-weight 0.5 0.8 --use-exit-norm --use-exit-mlp"
).split()  # --clip-grad 0: the probes' gradients would otherwise change the clipping factor


def one_step(*extra):
    trainer = Trainer(parse_args([*SMALL, *extra]))
    state = trainer.run()
    return trainer.model, state.history[-1]


def assert_only_probes_differ(plain, plain_parts, probed, parts, leaves) -> None:
    """Every gradient and logged loss of the run with probes equals the run without, bit for bit
    (the probe's input is detached); the probes' own parameters (`leaves` of exits 1 and 3) got
    non-zero gradients."""
    grads = {n: p.grad for n, p in probed.named_parameters()}
    for name, p in plain.named_parameters():
        assert torch.equal(p.grad, grads.pop(name)), name
    assert sorted(grads) == sorted(f"exits.{n}.{leaf}" for n in (1, 3) for leaf in leaves)
    for name, g in grads.items():
        assert g is not None and torch.count_nonzero(g) > 0, name
    for key, value in plain_parts.items():
        if key != "grad norm":
            assert parts[key] == value, key


def test_probes_change_no_other_gradient():
    plain, plain_parts = one_step()
    probed, parts = one_step("--use-exit-confidence-head")
    assert_only_probes_differ(plain, plain_parts, probed, parts, ("confidence.bias", "confidence.weight"))
    for n in (1, 3):
        assert 0.0 < parts[f"exit_{n} confidence loss"] < 2.0  # BCE near ln 2 at initialisation


MLP = ["--use-exit-confidence-head", "--exit-confidence-hidden-size", "8"]
MLP_LEAVES = tuple(f"confidence.{m}.{leaf}" for m in ("fc_in", "fc_out") for leaf in ("bias", "weight"))


def test_mlp_probes_change_no_other_gradient():
    """--exit-confidence-hidden-size 8: the probe is Linear -> GELU -> Linear on the detached
    exit state; every other gradient is bit-identical to a run without probes."""
    plain, plain_parts = one_step()
    probed, parts = one_step(*MLP)
    assert_only_probes_differ(plain, plain_parts, probed, parts, MLP_LEAVES)
    assert probed.exits["1"].confidence.fc_in.weight.shape == (8, 32)
    for n in (1, 3):
        assert 0.0 < parts[f"exit_{n} confidence loss"] < 2.0


def test_exit_confidence_hidden_size_flag(tmp_path):
    with pytest.raises(ValueError, match="--exit-confidence-hidden-size needs --use-exit-confidence-head"):
        Trainer(parse_args([*SMALL, "--exit-confidence-hidden-size", "8"]))
    with pytest.raises(ValueError, match="--exit-confidence-hidden-size must be in 0..65536, got -1"):
        Trainer(parse_args([*SMALL, *PROBES, "--exit-confidence-hidden-size", "-1"]))
    Trainer(parse_args([*SMALL, *MLP, "--save", str(tmp_path / "ck")])).run()
    resumed = Trainer(parse_args([*SMALL, "--load", str(tmp_path / "ck")]))
    assert resumed.config.exit_confidence_hidden_size == 8  # from the checkpoint's config
    with pytest.raises(ValueError, match="--exit-confidence-hidden-size 4 does not match the checkpoint"):
        Trainer(parse_args([*SMALL, *PROBES, "--exit-confidence-hidden-size", "4", "--load", str(tmp_path / "ck")]))


@pytest.fixture(scope="module")
def probe_reference(tmp_path_factory):
    return train(tmp_path_factory.mktemp("ref"), "single", 1, PROBES, BASE)


@pytest.mark.parametrize("layout", ["pp2", "tp2"])
def test_probe_training_is_layout_invariant(tmp_path, probe_reference, layout):
    """The probes' target ("exit's top-1 is the label") is local to the exit's stage and, under
    TP, a vocab-parallel argmax: every layout trains them alike. Tolerances as in
    test_parallel_training (fp32 round-off of sharded sums; Adam's sign-sized steps)."""
    nproc, extra = LAYOUTS[layout]
    records, weights = train(tmp_path, layout, nproc, extra + PROBES, BASE)
    ref_records, ref_weights = probe_reference
    assert len(records) == len(ref_records) == 5
    for r, e in zip(records, ref_records):
        assert "exit_1 confidence loss" in e and "exit_3 confidence loss" in e
        for k in (k for k in e if k.endswith("loss")):
            assert r[k] == pytest.approx(e[k], rel=1e-5), (r["iteration"], k)
    assert weights.keys() == ref_weights.keys()
    assert "exits.1.confidence.weight" in weights
    for name in ref_weights:
        torch.testing.assert_close(weights[name], ref_weights[name], rtol=1e-4, atol=5e-5, msg=name)


BACKBONE = ["--use-exit-confidence-head", "--exit-confidence-input", "backbone"]


def test_backbone_probes_change_no_other_gradient():
    """--exit-confidence-input backbone: the probe reads its own norm of the detached backbone
    state, so every other gradient is bit-identical to a run without probes, and the probe's
    norm and linear layer both learn."""
    plain, plain_parts = one_step()
    probed, parts = one_step(*BACKBONE)
    leaves = ("confidence.bias", "confidence.weight", "confidence_norm.bias", "confidence_norm.weight")
    assert_only_probes_differ(plain, plain_parts, probed, parts, leaves)
    for n in (1, 3):
        assert 0.0 < parts[f"exit_{n} confidence loss"] < 2.0


def test_backbone_probe_input_is_its_norm_of_the_backbone_state():
    """The probe's loss in pretraining is BCE of confidence(confidence_norm(backbone state))."""
    trainer = Trainer(parse_args([*SMALL, *BACKBONE]))
    model = trainer.model
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        h, rotary = model.embed_input(ids, None, None)
        _, exit_inputs = model.run_layers(h, rotary)
        for n, x in exit_inputs:
            head = model.exits[str(n)]
            want = head.confidence(head.confidence_norm(x)).squeeze(-1)
            assert torch.equal(head.confidence_logit(head.probe_input(x, head.hidden(x, rotary))), want)
            other = head.confidence(head.hidden(x, rotary)).squeeze(-1)
            assert not torch.allclose(want, other)  # the MLP exit's hidden state is another input


def test_backbone_probe_loss_falls():
    """A toy run: the backbone-mode probes learn (their loss falls well below its start). On
    random tokens an exit is rarely right, so the probe first learns that base rate."""
    extra = ["--train-iters", "25", "--lr", "3e-2", "--lr-decay-style", "constant"]
    trainer = Trainer(parse_args([*SMALL, *BACKBONE, *extra]))
    history = trainer.run().history
    for n in (1, 3):
        losses = [h[f"exit_{n} confidence loss"] for h in history if f"exit_{n} confidence loss" in h]
        assert len(losses) == 25
        assert losses[-1] < 0.5 * losses[0], (n, losses[0], losses[-1])


def test_exit_confidence_input_flag(tmp_path):
    with pytest.raises(ValueError, match="--exit-confidence-input needs --use-exit-confidence-head"):
        Trainer(parse_args([*SMALL, "--exit-confidence-input", "backbone"]))
    with pytest.raises(SystemExit):
        parse_args([*SMALL, *PROBES, "--exit-confidence-input", "hidden"])
    trainer = Trainer(parse_args([*SMALL, *BACKBONE, "--save", str(tmp_path / "ck")]))
    assert trainer.config.exit_confidence_input == "backbone"
    trainer.run()
    resumed = Trainer(parse_args([*SMALL, "--load", str(tmp_path / "ck")]))
    assert resumed.model.exits["1"].probe_reads_backbone  # from the checkpoint's config
    with pytest.raises(ValueError, match="--exit-confidence-input exit does not match the checkpoint"):
        Trainer(parse_args([*SMALL, *PROBES, "--exit-confidence-input", "exit", "--load", str(tmp_path / "ck")]))


@pytest.mark.parametrize("layout", ["tp2"])
def test_backbone_probe_training_is_layout_invariant(tmp_path, layout):
    """Backbone-mode probes (and their norm, a replicated weight under TP) train alike under TP;
    tolerances as above. (PP2 passed too, 06:37 UTC, but a stage's exits only ever see that
    stage's own backbone state, which the exit-mode PP2 test above covers; one layout keeps the
    suite's torchrun time down.)"""
    ref_records, ref_weights = train(tmp_path, "single", 1, BACKBONE, BASE)
    nproc, extra = LAYOUTS[layout]
    records, weights = train(tmp_path, layout, nproc, extra + BACKBONE, BASE)
    assert len(records) == len(ref_records) == 5
    for r, e in zip(records, ref_records):
        assert "exit_1 confidence loss" in e and "exit_3 confidence loss" in e
        for k in (k for k in e if k.endswith("loss")):
            assert r[k] == pytest.approx(e[k], rel=1e-5), (r["iteration"], k)
    assert "exits.1.confidence_norm.weight" in weights and weights.keys() == ref_weights.keys()
    assert not torch.equal(weights["exits.1.confidence_norm.weight"], torch.ones(32))  # it trained
    for name in ref_weights:
        torch.testing.assert_close(weights[name], ref_weights[name], rtol=1e-4, atol=5e-5, msg=name)


def test_mlp_probe_training_is_layout_invariant(tmp_path):
    """MLP probes are replicated under TP (not sharded like the backbone's MLPs): TP2 trains
    them as one process does; tolerances as above."""
    ref_records, ref_weights = train(tmp_path, "single", 1, MLP, BASE)
    nproc, extra = LAYOUTS["tp2"]
    records, weights = train(tmp_path, "tp2", nproc, extra + MLP, BASE)
    assert len(records) == len(ref_records) == 5
    for r, e in zip(records, ref_records):
        assert "exit_1 confidence loss" in e and "exit_3 confidence loss" in e
        for k in (k for k in e if k.endswith("loss")):
            assert r[k] == pytest.approx(e[k], rel=1e-5), (r["iteration"], k)
    assert weights.keys() == ref_weights.keys() and "exits.1.confidence.fc_in.weight" in weights
    for name in ref_weights:
        torch.testing.assert_close(weights[name], ref_weights[name], rtol=1e-4, atol=5e-5, msg=name)

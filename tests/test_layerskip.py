"""LayerSkip's training recipe (arXiv 2404.16710): layer dropout rising with depth, with a
curriculum, and a rotating subset of exit losses per iteration."""

from __future__ import annotations

import math

import pytest
import torch

from megatron.early_exit.arguments import parse_args
from megatron.early_exit.config import ExitLossConfig
from megatron.early_exit.parallel.dims import single_process_state
from megatron.early_exit.training.layer_dropout import LayerDropout
from megatron.early_exit.training.losses import rotational_exit_weights
from megatron.early_exit.training.schedules import ScheduleContext, skipped_layers
from megatron.early_exit.training.trainer import Trainer
from tests.test_parallel_training import BASE, LAYOUTS, assert_same, train

SMALL = (
    "--mock-data --tokenizer-type NullTokenizer --vocab-size 64 --num-layers 4 --hidden-size 32 "
    "--num-attention-heads 4 --seq-length 16 --micro-batch-size 2 --global-batch-size 8 --train-iters 3 "
    "--lr 3e-3 --log-interval 100 --eval-interval 0 --seed 5 --device cpu "
    "--exit-layer-nums 1 3 --exit-layer-weight 0.5 0.8 --use-exit-norm --use-exit-mlp"
).split()


def train_in_process(*extra):
    trainer = Trainer(parse_args([*SMALL, *extra]))
    return trainer, trainer.run()


def test_depth_scale_and_curriculum():
    ld = LayerDropout(0.2, 5, seed=1, curriculum="linear", warmup_iters=10)
    assert ld.rate(0, 100) == 0.0  # the first layer is never skipped
    assert ld.rate(4, 100) == pytest.approx(0.2)  # the last gets P once the curriculum is done
    assert ld.rate(2, 100) == pytest.approx(0.2 * (math.sqrt(2.0) - 1.0))  # e^{l ln2/(L-1)} - 1
    assert ld.rate(4, 0) == 0.0 and ld.rate(4, 5) == pytest.approx(0.1)  # linear warm-up
    assert LayerDropout(0.2, 5, seed=1).rate(4, 0) == pytest.approx(0.2)  # no curriculum


def test_decisions_depend_on_their_keys_alone():
    ld = LayerDropout(0.9, 8, seed=3)
    draws = {(t, k): ld.skipped(t, k, range(8)) for t in range(4) for k in range(4)}
    # A stage deciding for its own layers agrees with the whole model's decision.
    for (t, k), skip in draws.items():
        assert ld.skipped(t, k, range(4, 8)) == {i for i in skip if i >= 4}
    assert len(set(draws.values())) > 1  # decisions vary over iterations and micro-batches
    assert all(0 not in s for s in draws.values())
    assert LayerDropout(0.0, 8, seed=3).skipped(0, 0, range(8)) == frozenset()


def test_dropout_only_in_training():
    trainer = Trainer(parse_args([*SMALL, "--layer-dropout-max", "0.9", "--train-iters", "1"]))
    ctx = ScheduleContext(
        trainer.model, single_process_state(torch.device("cpu")), ExitLossConfig(), {}, 1, (2, 16, 32),
        torch.device("cpu"), layer_dropout=LayerDropout(0.9, 4, seed=5),
    )  # fmt: skip
    drawn = [skipped_layers(ctx, k, frozen=False) for k in range(8)]
    assert any(drawn)
    with torch.no_grad():
        assert not any(skipped_layers(ctx, k, frozen=False) for k in range(8))
    assert not any(skipped_layers(ctx, k, frozen=True) for k in range(8))  # EE-Tuning's frozen backbone
    trainer.model.eval()
    assert not any(skipped_layers(ctx, k, frozen=False) for k in range(8))


def test_rotational_schedule():
    w = [0.5, 0.8, 1.0]
    assert rotational_exit_weights(w, 0, 1) == [0.5, 0.0, 0.0]
    assert rotational_exit_weights(w, 1, 1) == [0.0, 0.8, 0.0]
    assert rotational_exit_weights(w, 1, 2) == [0.5, 0.0, 1.0]  # exits {2, 3 mod 3}
    assert rotational_exit_weights(w, 7, 3) == w


def test_zero_dropout_and_full_rotation_train_exactly_as_today():
    plain, plain_state = train_in_process()
    flags, flags_state = train_in_process(
        "--layer-dropout-max", "0", "--exit-loss-curriculum", "rotational", "--exit-loss-rotation-size", "2"
    )
    assert plain_state.history == flags_state.history
    params = dict(flags.model.named_parameters())
    for name, p in plain.model.named_parameters():
        assert torch.equal(p, params[name]), name
    # ...and a real rate changes training (layers really are skipped).
    _, dropped_state = train_in_process("--layer-dropout-max", "0.5")
    assert dropped_state.history[-1]["lm loss"] != plain_state.history[-1]["lm loss"]


@pytest.mark.parametrize("iters", [1, 2])
def test_rotation_trains_only_the_scheduled_exit(iters):
    # One exit per iteration: exit 1 at iteration 0, exit 3 at iteration 1. The grads left on
    # the model are the last iteration's; the unscheduled exit's own parameters get exactly 0.
    trainer, _ = train_in_process(
        "--exit-loss-curriculum", "rotational", "--exit-loss-rotation-size", "1", "--train-iters", str(iters)
    )
    scheduled, other = (1, 3) if iters == 1 else (3, 1)
    for name, p in trainer.model.named_parameters():
        if name.startswith(f"exits.{other}."):
            assert p.grad is not None and torch.count_nonzero(p.grad) == 0, name
        if name.startswith(f"exits.{scheduled}.") and "weight" in name and "norm" not in name:
            assert torch.count_nonzero(p.grad) > 0, name


DROPOUT = ["--layer-dropout-max", "0.5", "--layer-dropout-curriculum", "linear", "--layer-dropout-warmup-iters", "2"]


@pytest.fixture(scope="module")
def dropout_reference(tmp_path_factory):
    return train(tmp_path_factory.mktemp("ref"), "single", 1, DROPOUT, BASE)


@pytest.mark.parametrize("layout", ["pp2", "tp2"])
def test_layer_dropout_is_layout_invariant(tmp_path, dropout_reference, layout):
    """Same dropped layers, same losses and weights as one process (tolerances: test_parallel_training)."""
    nproc, extra = LAYOUTS[layout]
    assert_same(train(tmp_path, layout, nproc, extra + DROPOUT, BASE), dropout_reference)

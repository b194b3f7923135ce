"""Exit-loss weights and the combined objective."""

import math

import pytest
import torch

from megatron.early_exit.config import ExitLossConfig
from megatron.early_exit.model.gpt import ModelOutput
from megatron.early_exit.training.losses import combine_losses, exit_weights_at, masked_mean
from megatron.early_exit.training.optimizer import LRScheduler


def test_linear_warmup_of_exit_weights():
    cfg = ExitLossConfig(
        exit_layer_weight=[0.5, 1.0], exit_layer_weight_init=[0.0, 0.2], exit_layer_weight_warmup_iters=10
    )
    assert exit_weights_at(cfg, 0) == [0.0, 0.2]
    assert exit_weights_at(cfg, 5) == pytest.approx([0.25, 0.6])
    assert exit_weights_at(cfg, 10) == [0.5, 1.0]
    assert exit_weights_at(cfg, 1000) == [0.5, 1.0]


def test_cosine_warmup_of_exit_weights():
    cfg = ExitLossConfig(
        exit_layer_weight=[1.0],
        exit_layer_weight_init=[0.0],
        exit_layer_weight_warmup_iters=8,
        exit_layer_weight_warmup_style="cosine",
    )
    for t in range(9):
        assert exit_weights_at(cfg, t)[0] == pytest.approx(0.5 * (1 - math.cos(math.pi * t / 8)))
    assert exit_weights_at(cfg, 2)[0] < 0.25  # cosine starts slower than linear


def test_no_warmup_means_final_weights():
    cfg = ExitLossConfig(exit_layer_weight=[0.3, 0.7])
    assert exit_weights_at(cfg, 0) == [0.3, 0.7]


def test_combined_loss_is_weighted_sum_of_masked_means():
    g = torch.Generator().manual_seed(0)
    final, e1, e2 = (torch.rand(2, 5, generator=g) for _ in range(3))
    conf = torch.rand(2, 5, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.float)
    out = ModelOutput(loss=final, exit_losses={1: e1, 3: e2}, exit_confidences={1: conf, 3: conf})
    total, parts = combine_losses(out, mask, {1: 0.25, 3: 0.5}, final_weight=1.0)
    mean = lambda x: (x * mask).sum() / 8  # noqa: E731
    torch.testing.assert_close(total, 0.25 * mean(e1) + 0.5 * mean(e2) + mean(final))
    assert set(parts) == {"lm loss", "exit_1 loss", "exit_3 loss"}
    torch.testing.assert_close(parts["exit_3 loss"], mean(e2))
    dyn, parts_dyn = combine_losses(out, mask, {1: 0.25, 3: 0.5}, final_weight=1.0, dynamic=True)
    torch.testing.assert_close(dyn, 0.25 * mean(e1 * conf) + 0.5 * mean(e2 * conf) + mean(final))
    torch.testing.assert_close(parts_dyn["exit_1 loss"], mean(e1))  # logged unweighted


def test_masked_mean_ignores_masked_tokens():
    x = torch.tensor([[1.0, 100.0]])
    assert masked_mean(x, torch.tensor([[1.0, 0.0]])).item() == 1.0


def test_lr_schedule_warmup_then_cosine_to_min():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = LRScheduler(opt, lr=1.0, min_lr=0.1, warmup_iters=4, decay_iters=12, style="cosine")
    lrs = []
    for _ in range(14):
        lrs.append(sched.lr)
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[7] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert lrs[11] == pytest.approx(0.1) and lrs[13] == pytest.approx(0.1)
    state = sched.state_dict()
    sched2 = LRScheduler(opt, lr=1.0, min_lr=0.1, warmup_iters=4, decay_iters=12, style="cosine")
    sched2.load_state_dict(state)
    assert sched2.lr == sched.lr

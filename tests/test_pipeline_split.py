"""The pure stage-splitting function."""

import pytest

from megatron.early_exit.config import ModelConfig
from megatron.early_exit.parallel.pipeline import embedding_holders, split_stages, stages_for


def ranges(specs):
    return [s.layer_range for s in specs]


def test_uniform_split_is_megatrons():
    assert ranges(split_stages(8, 4, uniform=True)) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    with pytest.raises(ValueError, match="--num-layers"):
        split_stages(6, 4, uniform=True)


def test_balanced_split_without_heads_is_even():
    assert ranges(split_stages(8, 2)) == [(0, 4), (4, 8)]
    specs = split_stages(7, 3)
    assert ranges(specs) == [(0, 3), (3, 5), (5, 7)] or max(b - a for a, b in ranges(specs)) == 3
    assert specs[0].pre_process and not specs[0].post_process and specs[-1].post_process


def test_final_head_cost_moves_layers_off_the_last_stage():
    # Final head costs 2 layers: best max cost is 5 = 5 layers | 3 layers + head.
    assert ranges(split_stages(8, 2, final_cost=2.0)) == [(0, 5), (5, 8)]


def test_exit_costs_count_on_the_stage_that_holds_them():
    # Exits after layers 1 and 2 (each as costly as a layer) load the first stage:
    # 2 + 2 | 6 -> max 6, but 3 + 2 | 5 -> max 5.
    specs = split_stages(8, 2, exit_layers=[1, 2], exit_cost=1.0)
    assert ranges(specs) == [(0, 3), (3, 8)]


def test_every_stage_gets_a_layer_and_errors():
    assert ranges(split_stages(4, 4, final_cost=10.0)) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    with pytest.raises(ValueError):
        split_stages(2, 3)


def test_embedding_holders_follow_tied_heads():
    cfg = ModelConfig(
        num_layers=4,
        hidden_size=32,
        num_attention_heads=4,
        vocab_size=128,
        max_position_embeddings=8,
        exit_layer_nums=[1, 3],
    )
    specs = stages_for(cfg, 4)
    assert embedding_holders(cfg, specs) == [0, 2, 3]  # first; tied exit 3 on stage 2; tied final
    cfg.untie_exit_output_weights = True
    cfg.untie_embeddings_and_output_weights = True
    assert embedding_holders(cfg, specs) == [0]

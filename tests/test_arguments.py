"""Trainer flags checked in-process by `validate_args`: flags that would be inert are one clear error."""

from __future__ import annotations

import pytest

from megatron.early_exit.arguments import parse_args, validate_args
from megatron.early_exit.config import ModelConfig

BASE = (
    "--mock-data --tokenizer-type NullTokenizer --vocab-size 64 --num-layers 4 --hidden-size 16 "
    "--num-attention-heads 2 --seq-length 16 --micro-batch-size 2 --global-batch-size 4 --train-iters 2 "
    "--lr 1e-3 --exit-layer-nums 1 --device cpu"
).split()


def validated(*extra: str, ckpt: ModelConfig | None = None):
    args = parse_args([*BASE, *extra])
    validate_args(args, ckpt)
    return args


def test_bubble_filling_on_one_stage_keeps_its_default_fill():
    # One stage runs the fills in sequence: the reference objective of the PP fill tests.
    args = validated("--fill-explicit-bubbles")
    assert args.pipeline_model_parallel_size == 1
    assert (args.num_fill_warmup_microbatches, args.num_fill_cooldown_microbatches) == (1, 0)


def test_bubble_filling_with_no_fills_is_an_error():
    no_warmup = ("--fill-explicit-bubbles", "--num-fill-warmup-microbatches", "0")
    assert validated(*no_warmup, "--num-fill-cooldown-microbatches", "1").num_fill_warmup_microbatches == 0
    with pytest.raises(ValueError, match=r"^--fill-explicit-bubbles with --num-fill-warmup-microbatches 0 and") as err:
        validated(*no_warmup)
    assert str(err.value).endswith("fills nothing") and "\n" not in str(err.value)


def test_bubble_filling_with_tune_exit_is_an_error(tmp_path):
    ckpt = ModelConfig(
        num_layers=4,
        hidden_size=16,
        num_attention_heads=2,
        vocab_size=64,
        max_position_embeddings=16,
        exit_layer_nums=[1],
    )
    tune = ["--tune-exit", "--load", str(tmp_path), "--tune-exit-pipeline-parallel-size", "2"]
    assert validated(*tune, ckpt=ckpt).pipeline_model_parallel_size == 2  # the same flags pass without filling
    with pytest.raises(ValueError, match=r"^--fill-explicit-bubbles does nothing with --tune-exit \("):
        validated(*tune, "--fill-explicit-bubbles", ckpt=ckpt)

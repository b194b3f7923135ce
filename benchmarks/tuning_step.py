#!/usr/bin/env python
"""Cost of an EE-Tuning step against a full training step, on the same model and batch.

    python benchmarks/tuning_step.py --load runs/ee_tuning_smollm2/with_exits   # SmolLM2 + exits 8/15/22
    python benchmarks/tuning_step.py                                            # random SmolLM2 shape

Both run in this process on mock data with the same micro-batch: `--tune-exit` (backbone
frozen under no_grad, layers after the last exit not built, only exit parameters updated)
against plain training of the whole model with its exits. Prints time per step, the ratio,
and trainable parameter counts.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.early_exit.arguments import parse_args  # noqa: E402
from megatron.early_exit.training.trainer import Trainer  # noqa: E402


def random_smollm2_with_exits(path: str) -> None:
    from megatron.early_exit.checkpointing import save_checkpoint
    from megatron.early_exit.config import ModelConfig
    from megatron.early_exit.model import EarlyExitGPT
    from megatron.early_exit.tokenizer import build_tokenizer

    cfg = ModelConfig(num_layers=30, hidden_size=576, num_attention_heads=9, num_query_groups=3, ffn_hidden_size=1536,
                      vocab_size=49152, real_vocab_size=49152, max_position_embeddings=2048, normalization="RMSNorm",
                      swiglu=True, position_embedding_type="rope", add_bias_linear=False, exit_layer_nums=[8, 15, 22],
                      use_exit_norm=True, use_exit_mlp=True)  # fmt: skip
    model = EarlyExitGPT(cfg)
    model.init_weights(0)
    save_checkpoint(path, 0, model, build_tokenizer("NullTokenizer", vocab_size=49151))


def time_steps(argv: list[str], steps: int) -> tuple[float, int]:
    trainer = Trainer(parse_args(argv))
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    trainer.train_step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    return (time.perf_counter() - start) / steps, trainable


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", help="a checkpoint with exits (default: a random SmolLM2-shaped one)")
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--bf16", action="store_true")
    a = p.parse_args()
    load = a.load
    if load is None:
        load = tempfile.mkdtemp(prefix="smollm2_shape_")
        random_smollm2_with_exits(load)
    common = ["--load", load, "--mock-data", "--micro-batch-size", str(a.micro_batch_size), "--seq-length",
              str(a.seq_length), "--train-iters", "1000", "--lr", "1e-4", "--eval-interval", "0", "--device", "cpu",
              "--log-interval", "1000"] + (["--bf16"] if a.bf16 else [])  # fmt: skip
    tune_s, tune_params = time_steps([*common, "--tune-exit"], a.steps)
    full_s, full_params = time_steps([*common, "--finetune"], a.steps)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; "
        f"micro-batch {a.micro_batch_size} x {a.seq_length} tokens, {'bf16' if a.bf16 else 'fp32'}"
    )
    print(f"full training step (backbone + exits): {full_s:.2f} s, {full_params / 1e6:.1f}M trainable parameters")
    print(f"EE-Tuning step (exits only):           {tune_s:.2f} s, {tune_params / 1e6:.1f}M trainable parameters")
    print(f"ratio tuning / full: {tune_s / full_s:.3f}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Run a checkpoint's frozen backbone once over a corpus and cache what its exits need.

    python tools/checkpoint/cache_exit_activations.py --load CKPT --data-path PREFIX --output DIR \\
        --seq-length 256 --max-tokens 1000000 --top-k 16 --dtype bf16 --bf16

Stores, per token: the INPUT hidden state of every exit (at its depth), the final head's
top-k token ids and log-probabilities (full-vocabulary, temperature 1), the label and the
loss mask, as memory-mapped .npy files with a manifest (format: megatron/early_exit/
training/exit_cache.py). The train split is cached in `DIR/train`, and `--num-valid-samples`
sequences of the validation split in `DIR/valid`. Sequences are taken in the order
`pretrain_early_exit_gpt.py` would read them (same --seed, --split, --seq-length).
Then: `pretrain_early_exit_gpt.py --load CKPT --tune-exit --exit-activation-cache DIR ...`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import nullcontext

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megatron.early_exit.arguments import OneLineErrorParser, run_tool  # noqa: E402
from megatron.early_exit.training import exit_cache  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="checkpoint with exits")
    p.add_argument("--data-path", nargs="+", help="Megatron .bin/.idx prefix (or weighted blend)")
    p.add_argument("--mock-data", action="store_true", help="megatron-core's mock corpus (tests)")
    p.add_argument("--data-loss-mask", action="store_true",
                   help="the cached loss mask also the corpus's own per token (preprocess_data.py "
                   "--loss-mask-key): exits and probes tuned from it learn where labels are targets")  # fmt: skip
    p.add_argument("--output", required=True, help="cache directory (created)")
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--num-samples", type=int, help="train sequences to cache")
    p.add_argument("--max-tokens", type=int, help="train tokens to cache (sequences = tokens // seq length)")
    p.add_argument("--num-valid-samples", type=int, default=0, help="validation sequences to cache (default 0)")
    p.add_argument("--split", default="969,30,1")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--top-k", type=int, default=16, help="final-head tokens kept per position (default 16)")
    p.add_argument("--dtype", choices=sorted(exit_cache.STORAGE), default="bf16", help="hidden-state storage")
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--bf16", action="store_true", help="run the backbone under bf16 autocast")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress-bar", action="store_true")
    return p


def check_args(a: argparse.Namespace, config) -> int:
    """Validate the flags against the checkpoint; returns the number of train sequences."""
    if bool(a.mock_data) == bool(a.data_path):
        raise ValueError("give exactly one of --data-path PREFIX and --mock-data")
    if not config.exit_layer_nums:
        raise ValueError(f"--load {a.load}: the checkpoint has no exits (tools/checkpoint/add_exits.py)")
    if not 0 < a.seq_length <= config.max_position_embeddings:
        raise ValueError(f"--seq-length must be in 1..{config.max_position_embeddings}, got {a.seq_length}")
    if not 1 <= a.top_k <= config.vocab_size:
        raise ValueError(f"--top-k must be in 1..{config.vocab_size}, got {a.top_k}")
    if a.micro_batch_size < 1 or a.num_valid_samples < 0:
        raise ValueError("--micro-batch-size must be >= 1 and --num-valid-samples >= 0")
    num = a.num_samples if a.num_samples is not None else (a.max_tokens or 0) // a.seq_length
    if num < 1:
        raise ValueError("give --num-samples N or --max-tokens T (at least one sequence)")
    return num


@torch.no_grad()
def cache_split(model, dataset, writer, a, desc: str) -> None:
    """Run the backbone over `writer`'s rows of `dataset`, micro-batch by micro-batch."""
    from tqdm import tqdm

    from megatron.early_exit.data import build_data_loader
    from megatron.early_exit.model.gpt import ModelOutput

    total = writer.arrays["labels"].shape[0]
    loader = build_data_loader(dataset, consumed_samples=0, micro_batch_size=1)
    autocast = torch.autocast(torch.device(a.device).type, dtype=torch.bfloat16) if a.bf16 else nullcontext()
    bar = tqdm(total=total, desc=desc, unit="seq", disable=a.no_progress_bar)
    pending: list[dict] = []
    for sample in loader:
        pending.append(sample)
        if len(pending) == a.micro_batch_size or writer.rows + len(pending) == total:
            batch = {k: torch.cat([p[k] for p in pending]).to(a.device) for k in pending[0]}
            with autocast:
                h, rotary = model.embed_input(batch["tokens"], batch["position_ids"], None)
                h, exit_inputs = model.run_layers(h, rotary)  # each exit's input, heads not run
                out = ModelOutput()
                model.final_head(out, h)
            top_lp, top_ids = torch.log_softmax(out.logits.float(), -1).topk(a.top_k, dim=-1)  # [b, s, k]
            writer.write(dict(exit_inputs), top_lp, top_ids, batch["labels"], batch["loss_mask"])
            bar.update(len(pending))
            pending = []
        if writer.rows == total:
            break
    bar.close()
    if writer.rows != total:
        raise ValueError(f"--data-path: the {desc} split has only {writer.rows} sequences, {total} were asked for")


def build_cache(a: argparse.Namespace) -> dict:
    from megatron.early_exit import checkpointing as ckpt
    from megatron.early_exit.data import build_datasets

    meta = ckpt.read_meta(a.load)
    config = meta.model_config
    num_train = check_args(a, config)
    model, tokenizer = ckpt.load_checkpoint(a.load, device=a.device)
    fingerprint = exit_cache.backbone_fingerprint(config, dict(model.named_parameters()))
    train_ds, valid_ds, _ = build_datasets(
        tokenizer=tokenizer, seq_length=a.seq_length, seed=a.seed, data_path=a.data_path, split=a.split,
        mock_data=a.mock_data, train_samples=num_train, valid_samples=a.num_valid_samples, test_samples=0,
        loss_mask=a.data_loss_mask,
    )  # fmt: skip
    os.makedirs(a.output, exist_ok=True)
    sizes = {"train": num_train, "valid": a.num_valid_samples if valid_ds is not None else 0}
    start = time.time()
    for name, ds in (("train", train_ds), ("valid", valid_ds)):
        if sizes[name]:
            shape = (sizes[name], a.seq_length, config.hidden_size)
            writer = exit_cache.SplitWriter.create(
                os.path.join(a.output, name), config.exit_layer_nums, shape, a.top_k, a.dtype
            )
            cache_split(model, ds, writer, a, name)
            writer.close()
    manifest = {
        "fingerprint": fingerprint,
        "checkpoint": meta.directory,
        "exits": config.exit_layer_nums,
        "pre_exit": config.pre_exit,
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        "corpus": {
            "data_path": a.data_path,
            "mock_data": a.mock_data,
            "split": a.split,
            "seed": a.seed,
            "loss_mask": a.data_loss_mask,
        },  # fmt: skip
        "num_sequences": sizes,
        "seq_length": a.seq_length,
        "top_k": a.top_k,
        "dtype": a.dtype,
        "backbone_compute": "bf16 autocast" if a.bf16 else "fp32",
        "topk_logprobs": "full-vocabulary log-softmax of the final head, temperature 1",
    }
    exit_cache.write_manifest(a.output, manifest)
    tokens = (sizes["train"] + sizes["valid"]) * a.seq_length
    print(f"cached {tokens} tokens ({sizes}) in {time.time() - start:.1f} s to {a.output}", flush=True)
    return manifest


def main(argv: list[str] | None = None) -> None:
    run_tool(build_cache, build_parser().parse_args(argv))


if __name__ == "__main__":
    main()

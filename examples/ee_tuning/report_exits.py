#!/usr/bin/env python
"""Each exit's validation loss and top-1 agreement with the final head, on held-out text.

python examples/ee_tuning/report_exits.py --load CKPT [CKPT ...] --data PREFIX [--samples 16] [--label L ...]

Several checkpoints (e.g. before and after tuning, `--label before after`) are reported by one
process: the demo pays for Python, torch and the data pipeline once.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megatron.early_exit import load_checkpoint  # noqa: E402
from megatron.early_exit.data import build_data_loader, build_datasets  # noqa: E402
from megatron.early_exit.precision import fast_bf16  # noqa: E402


def report(load: str, data: str, samples: int, seq_length: int, label: str) -> dict:
    from megatron.early_exit.data.checks import check_data_paths

    model, tok = load_checkpoint(load)
    for warning in check_data_paths([data], tok, model.config.vocab_size):  # the tokenizer that made --data
        print(warning, file=sys.stderr)
    return evaluate_exits(model, tok, data, samples, seq_length, label)


@torch.no_grad()
def evaluate_exits(model, tok, data: str, samples: int, seq_length: int, label: str | None = None) -> dict:
    """{exit layer: (validation loss, agreement with the final head)} on `samples` held-out sequences."""
    was_training = model.training
    model.eval()
    _, valid, _ = build_datasets(tokenizer=tok, seq_length=seq_length, seed=1234, data_path=[data],
                                 split="98,2,0", train_samples=1, valid_samples=samples, test_samples=0)  # fmt: skip
    sums, count = {}, 0
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=fast_bf16("cpu")):  # fp32 where bf16 has no kernels
        for batch in build_data_loader(valid, consumed_samples=0, micro_batch_size=4):
            if count >= samples:
                break
            out = model(batch["tokens"])
            final_top = out.logits.float().argmax(-1)
            for n, logits in out.exit_logits.items():
                lf = logits.float()
                ce = torch.nn.functional.cross_entropy(lf.flatten(0, 1), batch["labels"].flatten()).item()
                agree = (lf.argmax(-1) == final_top).float().mean().item()
                sums.setdefault(n, [0.0, 0.0])
                sums[n][0] += ce
                sums[n][1] += agree
            count += batch["tokens"].shape[0]
    steps = max(1, (count + 3) // 4)
    result = {n: (v[0] / steps, v[1] / steps) for n, v in sorted(sums.items())}
    model.train(was_training)
    for n, (ce, agree) in result.items():
        if label is None:
            break
        print(f"{label}: exit after layer {n:2d}: validation loss {ce:.3f}, agreement with the final head {agree:.1%}")
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, nargs="+", help="one or more checkpoints, reported in turn")
    p.add_argument("--data", required=True)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--label", nargs="+", default=["exits"], help="one per --load (default: 'exits' for one)")
    return p


def main(argv: list[str] | None = None) -> None:
    a = build_parser().parse_args(argv)
    try:
        if len(a.label) != len(a.load):
            raise ValueError(f"--label: {len(a.label)} labels for {len(a.load)} checkpoints in --load")
        for load, label in zip(a.load, a.label):
            report(load, a.data, a.samples, a.seq_length, label)
    except ValueError as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(2)


if __name__ == "__main__":
    main()

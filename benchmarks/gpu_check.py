#!/usr/bin/env python
"""`make gpu-check`: everything that needs a GPU, in one go (under 10 minutes on one GPU).

1. the tests with a CUDA variant (tests/test_cuda.py: forward and fp32 decoding on CUDA equal
   the CPU, bf16 autocast training learns, a one-process nccl world trains);
2. SmolLM2-135M decoding on the GPU, ours vs `transformers` `generate`, fp32 and bf16
   (benchmarks/smollm2_decode.py --device cuda, part 1);
3. a training step's tokens/s against a plain `transformers` loop and its model FLOPs
   utilisation (benchmarks/train_throughput.py --device cuda --bf16, a model large enough
   to keep a GPU busy).

Where no GPU exists (or torch is a CPU build) it says so in one line and exits 0, so it can
sit in any script. On a CUDA machine install the CUDA torch first: `make install TORCH_SPEC=torch`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STEPS = [
    ("CUDA tests", [sys.executable, "-m", "pytest", "-q", "tests/test_cuda.py"]),
    (
        "SmolLM2 decoding on the GPU vs transformers",
        [sys.executable, "benchmarks/smollm2_decode.py", "--device", "cuda", "--skip-early-exit",
         "--batch", "1", "8", "--new-tokens", "64", "--repeats", "3"],
    ),
    (
        "training throughput and MFU (bf16)",
        [sys.executable, "benchmarks/train_throughput.py", "--device", "cuda", "--bf16", "--layers", "16",
         "--hidden", "1024", "--heads", "16", "--ffn", "2816", "--vocab", "32000", "--seq", "1024",
         "--batch", "8", "--steps", "5", "--rounds", "3"],
    ),
]  # fmt: skip


def main() -> int:
    if not torch.cuda.is_available():
        build = f"CUDA build {torch.version.cuda}" if torch.version.cuda else "a CPU build"
        print(f"gpu-check: skipped: no CUDA device visible (torch {torch.__version__}, {build})")
        return 0
    print(f"gpu-check on {torch.cuda.get_device_name(0)} (torch {torch.__version__}, CUDA {torch.version.cuda})")
    failed = []
    for name, cmd in STEPS:
        print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
        start = time.time()
        code = subprocess.call(cmd, cwd=ROOT)
        print(f"=== {name}: {'ok' if code == 0 else f'FAILED (exit {code})'} in {time.time() - start:.0f} s")
        if code != 0:
            failed.append(name)
    print(f"\ngpu-check: {len(STEPS) - len(failed)}/{len(STEPS)} passed" + (f"; failed: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

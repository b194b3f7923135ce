"""Whether bf16 is worth asking for on a device.

bf16 halves the bytes a memory-bound step reads, and on CPUs with bf16 matrix kernels (AVX-512
through oneDNN, AVX512_BF16, AMX) its products run faster than fp32's. On a CPU without them
PyTorch falls back to a reference loop: on an AMD EPYC with AVX2 alone (torch 2.13.0+cpu, 2
threads) a 2048 x 2048 bf16 matrix product took 64.8 s against 0.18 s in fp32, so a `--bf16`
training run or prefill there is hundreds of times slower, not faster (a one-row product, which
reads the weights once, still ran at 0.57x fp32's time). `fast_bf16` tells the two apart without
timing anything: CUDA asks the GPU (Ampere and later), a CPU asks oneDNN whether it has bf16
kernels. The demo picks its dtype by it (`python -m megatron.early_exit.precision` prints the flag
to pass), and training warns when `--bf16` asks for the slow path. Decoding is another matter:
its products run on the project's native kernel where a C compiler built it (`inference/native.py`,
which widens bf16 weights itself), so bf16 halves the bytes a step reads there too: on that AVX2
EPYC SmolLM2 decoded 62.6 tokens/s in bf16 against 32.0 in fp32 (batch 1, decoding alone), and
its prefill, bound by compute, ran at 0.83x fp32's speed (a 400-token prompt: 2.09 s against
1.73 s, 52 and 62 GFLOP/s; 16 prompts of 32 tokens: 2.43 s against 2.45 s). `decode_dtype`
says which dtype decoding should take (`python -m megatron.early_exit.precision
--decode-dtype`: the demo decodes in it).
"""

from __future__ import annotations

import sys

import torch

SLOW_BF16 = (
    "this CPU has no bf16 matrix kernels (oneDNN reports none: no AVX-512 or AMX), so bf16 matrix "
    "products take a fallback hundreds of times slower than fp32; train and prefill in fp32 here"
)


def fast_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether bf16 matrix products run on native kernels on `device` (see the module docstring)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return True  # other accelerators: their own business


def bf16_flag(device: torch.device | str = "cpu") -> str:
    """`--bf16` where bf16 is fast on `device`, else nothing (for shell scripts: `main`)."""
    return "--bf16" if fast_bf16(device) else ""


def decode_dtype(device: torch.device | str = "cpu") -> str:
    """`bf16` where decoding's products run fast in bf16 on `device`: it has bf16 kernels
    (`fast_bf16`), or it is a CPU where the native kernel was built (it widens bf16 weights
    itself, so a decode step reads half the bytes: see the module docstring); else `fp32`."""
    if fast_bf16(device):
        return "bf16"
    if torch.device(device).type == "cpu":
        from megatron.early_exit.inference import native

        return "bf16" if native.available(torch.bfloat16) else "fp32"
    return "fp32"


def main(argv: list[str] | None = None) -> None:
    """`python -m megatron.early_exit.precision [--dtype | --decode-dtype]`: print `--bf16` or
    nothing (with `--dtype`: `bf16` or `fp32`; with `--decode-dtype`: `decode_dtype`'s) for this
    machine's CPU."""
    argv = sys.argv[1:] if argv is None else argv
    if argv not in ([], ["--dtype"], ["--decode-dtype"]):
        raise SystemExit(
            f"usage: python -m megatron.early_exit.precision [--dtype | --decode-dtype] (got {' '.join(argv)})"
        )
    if argv == ["--decode-dtype"]:
        print(decode_dtype())
    elif argv:
        print("bf16" if fast_bf16() else "fp32")
    else:
        print(bf16_flag())


if __name__ == "__main__":
    main()

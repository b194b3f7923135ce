#!/usr/bin/env python
"""Runs of layers in one native call against one call a layer, side by side in one process.

    python benchmarks/layer_runs.py --load runs/ee_aclsum/tuned [--dtypes bf16 fp32] [--repeats 8]

A decode step runs its layers up to its next stop (an exit whose check is due or fires, a block
exit's input, the end) in one native call (`Passes.decode_layers`, `advance_layers`,
`lean.native_run`); "one call a layer" is the same engine with `lean.native_run` turned off,
so each layer runs its own call (`LeanLayer.native_step`) with the Python between layers. Per
dtype: full decoding, early exit (learned measure, threshold 0.5, cost_aware) and dynamic
self-speculation of 48 new tokens at batch 1 from one prompt, each setting under both ways in
alternating order, `--repeats` rounds; prints tokens/s (best round) and the paired median of
"one call a layer" time over "runs" time, and checks that both ways give the same tokens.
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.early_exit import load_checkpoint  # noqa: E402
from megatron.early_exit.inference import EarlyExitEngine, GenerationSettings, lean  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PROMPT = "We study early exit in large language models and show that"


def settings(new: int) -> dict[str, GenerationSettings]:
    common = dict(max_new_tokens=new, ignore_eos=True)
    return {
        "full": GenerationSettings(**common),
        "early exit 0.5": GenerationSettings(strategy="early_exit", early_exit_threshold=0.5, **common),
        "self-speculative": GenerationSettings(strategy="self_speculative", **common),
    }


def compare(engine, prompt: list[int], new: int, repeats: int) -> None:
    real = lean.native_run
    ways = {"runs": real, "one call a layer": lambda *a, **k: None}
    for name, s in settings(new).items():
        tokens, times = {}, {w: [] for w in ways}
        for way, fn in ways.items():  # warm-up (kernel choices, draft costs), and the tokens
            lean.native_run = fn
            tokens[way] = engine.generate([prompt], s)[0].tokens
        for r in range(repeats):
            for way in ways if r % 2 == 0 else reversed(ways):
                lean.native_run = ways[way]
                start = time.perf_counter()
                engine.generate([prompt], s)
                times[way].append(time.perf_counter() - start)
        lean.native_run = real
        same = "same tokens" if tokens["runs"] == tokens["one call a layer"] else "TOKENS DIFFER"
        ratio = statistics.median(b / a for a, b in zip(times["runs"], times["one call a layer"]))
        print(
            f"  {name:17s} runs {new / min(times['runs']):7.1f} tok/s, one call a layer "
            f"{new / min(times['one call a layer']):7.1f} tok/s: runs {ratio:.3f}x (paired median); {same}",
            flush=True,
        )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--load", required=True, help="checkpoint directory")
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["bf16", "fp32"])
    p.add_argument("--repeats", type=int, default=8, help="alternating rounds per setting")
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    for name in args.dtypes:
        model, tok = load_checkpoint(args.load, dtype=DTYPES[name])
        engine = EarlyExitEngine(model, tok)
        print(f"{args.load} {name}, batch 1, {args.threads} thread(s):", flush=True)
        with torch.no_grad():
            compare(engine, tok.tokenize(PROMPT), args.new_tokens, args.repeats)


if __name__ == "__main__":
    main()

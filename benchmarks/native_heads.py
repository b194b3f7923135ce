#!/usr/bin/env python
"""Vocabulary heads in one native call (`native.head`, `Passes.native_vocab`, `Passes.native_draft`)
against the same engine running them as torch operations, side by side in one process.

A head is the final norm (or a norm-only exit's), the projection onto the vocabulary, and the
argmax and max-probability of its row; in one call (`ee_head`) it is one product plus a pass over
the row, where torch takes ~10 calls around the product. This decodes the same prompts with the
native heads on and off, alternating, each pair timed back to back, and prints per setting the
median of the paired ratios (off / on: > 1 means the native heads are faster), the best times and
whether the tokens are the same. A setting is full decoding, early exit at a threshold (learned
probes where the exits have them; `exact`), every token forced out at one exit (`--forced-exits`),
or self-speculation (lossless: its drafts' heads and the verify pass's too).

`--compare exit_mlp` toggles an MLP exit's lean sub-block instead (`lean.ExitMLP`, which a leaving
row's MLP exit runs where lean layers are on; off: the exit's modules, then its head as separate
calls); `--decoding-alone` subtracts each run's prefill (a one-token run of the same setting).

    python benchmarks/native_heads.py --load runs/ee_aclsum/tuned [--bf16] [--thresholds 0.5] [--self-speculative]
    python benchmarks/native_heads.py --load runs/demo_smollm2/tuned --bf16 --compare exit_mlp --thresholds \
        --forced-exits 8 22 --decoding-alone
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.decode_speed import cpu_model_name  # noqa: E402
from megatron.early_exit import load_checkpoint  # noqa: E402
from megatron.early_exit.inference import EarlyExitEngine, GenerationSettings, lean, passes  # noqa: E402


def settings(args) -> dict[str, GenerationSettings]:
    common = {"max_new_tokens": args.new_tokens, "ignore_eos": True}
    out = {"full": GenerationSettings("full", **common)}
    for t in args.thresholds:
        out[f"early_exit {t}"] = GenerationSettings("early_exit", early_exit_threshold=t, exit_policy="exact", **common)
    for n in args.forced_exits:
        out[f"every token at exit {n}"] = GenerationSettings(
            "early_exit", exit_layers=(n,), early_exit_threshold=0.0, exit_policy="exact", **common
        )
    if args.self_speculative:
        out["self_speculative"] = GenerationSettings("self_speculative", **common)
    return out


def toggles(what: str) -> tuple[object, dict, dict]:
    """(the owner of what `what` names, its real attributes, their stand-ins that turn it off)."""
    if what == "exit_mlp":
        return lean, {"exit_mlp": lean.exit_mlp}, {"exit_mlp": lambda head: None}
    real = {name: getattr(passes.Passes, name) for name in ("native_vocab", "native_draft")}
    return passes.Passes, real, {name: (lambda *a, **k: None) for name in real}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--load", required=True)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--thresholds", type=float, nargs="*", default=[0.5])
    p.add_argument("--self-speculative", action="store_true")
    p.add_argument("--forced-exits", type=int, nargs="*", default=[], help="settings: every token out at exit n")
    p.add_argument("--compare", choices=("heads", "exit_mlp"), default="heads", help="what is on / off (see above)")
    p.add_argument("--decoding-alone", action="store_true", help="subtract each run's prefill")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=60)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--pairs", type=int, default=10, help="paired runs per setting (the median ratio counts)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    loaded = load_checkpoint(args.load, dtype=dtype)
    model = loaded[0] if isinstance(loaded, tuple) else loaded
    engine = EarlyExitEngine(model)
    vocab = engine.vocab
    prompts = [[(7 * j + 11 * b + 3) % (vocab - 10) + 5 for j in range(args.prompt_len)] for b in range(args.batch)]
    owner, real, off = toggles(args.compare)

    def run(s: GenerationSettings, on: bool) -> tuple[float, list]:
        for name, fn in (real if on else off).items():
            setattr(owner, name, fn)
        start = time.perf_counter()
        out = engine.generate(prompts, s)
        took = time.perf_counter() - start
        if args.decoding_alone:
            start = time.perf_counter()
            engine.generate(prompts, GenerationSettings(**{**vars(s), "max_new_tokens": 1}))
            took -= time.perf_counter() - start
        return took, [r.tokens for r in out]

    dt = "bf16" if args.bf16 else "fp32"
    what = "torch heads / native heads" if args.compare == "heads" else "exit modules / lean exit MLP"
    print(f"{args.load}, {dt}, batch {args.batch}, {args.threads} threads, {cpu_model_name()}")
    try:
        for name, s in settings(args).items():
            run(s, True), run(s, False)  # warm-up: kernels chosen, tables made
            ratios, best, same = [], {True: float("inf"), False: float("inf")}, True
            for i in range(args.pairs):
                times, tokens = {}, {}
                for on in (True, False) if i % 2 == 0 else (False, True):
                    times[on], tokens[on] = run(s, on)
                    best[on] = min(best[on], times[on])
                ratios.append(times[False] / times[True])
                same &= tokens[True] == tokens[False]
            print(
                f"  {name:18s} {what}: median {statistics.median(ratios):.3f} "
                f"[{min(ratios):.3f}, {max(ratios):.3f}], best {best[False] * 1e3:.1f} / {best[True] * 1e3:.1f} ms, "
                f"same tokens: {'yes' if same else 'NO'}"
            )
    finally:
        for name, fn in real.items():
            setattr(owner, name, fn)


if __name__ == "__main__":
    main()

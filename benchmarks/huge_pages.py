#!/usr/bin/env python
"""The decode kernels' weight copies on transparent huge pages against ordinary pages, side by side.

    python benchmarks/huge_pages.py --load runs/ee_aclsum/probes --bf16
    python benchmarks/huge_pages.py --load runs/ee_tuning_smollm2/base --bf16 --num-examples 8 --max-new-tokens 32

Loads the checkpoint twice: one engine's packed weights (and int8 head) made on huge pages
(`inference/huge_pages.py`), the other's on ordinary 4 KiB pages (`huge_pages.enabled(False)` while
it makes them). First a stream probe: a one-row product (`native.linear`) over a random weight of
`--stream-mib` MiB (past the last-level cache) packed each way, `--pairs` alternating pairs. Then
the aclsum test abstracts decoded one at a time (48 tokens, one line, as `tools/eval/ee_sweep.py`
does) by both engines back to back, in alternating order, for each setting (full decoding, early
exit at the checkpoint's calibrated thresholds, self-speculation: `native_ab.settings_of`). It
prints, per setting, the median and quartiles of the huge-page engine's decode time over the other's
(below 1: huge pages faster), checks that both made the same tokens, and each engine's tokens/s
and its settings' speedups over its own full decoding (prefill included, as the sweep's `speedup`).

Self-speculation's controller plans rounds from round costs it times on first use
(`draft_costs.measure_draft_costs`); timed twice in one process they read a verify row at 0.25 and
0.32 of a step, and the plans they make moved one engine's time by more than the pages did (the
huge-page engine 1.12x slower in one run, faster in the next). Both engines therefore plan from the
huge-page engine's costs (`--own-costs`: each its own); their loop clocks still learn apart.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from decode_speed import cpu_model_name  # noqa: E402
from native_ab import paired_arguments, settings_of  # noqa: E402

from megatron.early_exit.inference import huge_pages, native  # noqa: E402


def quartiles(v: list[float]) -> str:
    v = sorted(v)
    q = len(v) // 4
    return f"median {statistics.median(v):.3f}  quartiles {v[q]:.3f} / {v[-q - 1]:.3f}  pairs {len(v)}"


def stream_ratios(mib: float, dtype: torch.dtype, pairs: int) -> list[float]:
    """Huge over ordinary pages: a one-row product's time over a (M, 1024) weight of `mib` MiB."""
    k = 1024
    m = max(int(mib * (1 << 20)) // (k * dtype.itemsize), native.PANEL)
    w = torch.randn(m, k, generator=torch.Generator().manual_seed(0)).to(dtype)
    packed = {}
    for name, on in (("huge", True), ("4k", False)):
        huge_pages.enabled(on)
        packed[name] = native.pack(w)
    huge_pages.enabled(True)
    x, ratios, out = torch.randn(1, k).to(dtype), [], {}
    for i in range(pairs + 1):  # the first pair warms up
        t = {}
        for name in ("huge", "4k") if i % 2 == 0 else ("4k", "huge"):
            start = time.perf_counter()
            out[name] = native.linear(x, packed[name], m)
            t[name] = time.perf_counter() - start
        if i:
            ratios.append(t["huge"] / t["4k"])
    if not torch.equal(out["huge"], out["4k"]):
        raise SystemExit("stream probe: the two copies' products differ")
    return ratios


def decode_ratios(args) -> None:
    from megatron.early_exit import load_checkpoint
    from megatron.early_exit.inference import EarlyExitEngine
    from tools.eval.ee_sweep import summarisation_task

    engines, prompts, kinds = {}, None, None
    for name, on in (("huge", True), ("4k", False)):
        huge_pages.enabled(on)  # the copies made on first use below take this engine's pages
        model, tok = load_checkpoint(args.load, dtype=torch.bfloat16 if args.bf16 else None)
        engines[name] = EarlyExitEngine(model, tok)
        if prompts is None:
            prompts, _ = summarisation_task(tok, args.data, args.num_examples, args.max_prompt_chars)
            kinds = settings_of(engines[name], args.max_new_tokens)
        for s in kinds.values():  # warm-up: kernel choices, packed weights, costs made on first use
            for prompt in prompts[:2]:
                engines[name].generate([prompt], s)
        print(f"{name}: {huge_pages.backed_bytes() / (1 << 20):.0f} MiB of the process on huge pages", flush=True)
    huge_pages.enabled(True)
    if args.shared_costs:  # the second engine plans its rounds with the costs the first timed
        from megatron.early_exit.inference.strategies import self_speculative

        held = self_speculative._COSTS.get(engines["huge"])
        if held is not None:
            self_speculative._COSTS[engines["4k"]] = held
    ratios = {k: [] for k in kinds}
    total = {(k, name): [0.0, 0] for k in kinds for name in engines}  # whole-call seconds, tokens
    for rep in range(args.repeats):
        for i, prompt in enumerate(prompts):
            for k, s in kinds.items():
                t, made = {}, {}
                for name in ("huge", "4k") if (rep + i) % 2 == 0 else ("4k", "huge"):
                    r = engines[name].generate([prompt], s)[0]
                    t[name], made[name] = r.stats["elapsed_s"] - r.stats["prefill_s"], r.tokens
                    total[k, name][0] += r.stats["elapsed_s"]
                    total[k, name][1] += len(r.tokens)
                if made["huge"] != made["4k"]:
                    raise SystemExit(f"{k}: the two engines made different tokens for prompt {i}")
                ratios[k].append(t["huge"] / max(t["4k"], 1e-12))
        print(f"pass {rep + 1}/{args.repeats}: " + ", ".join(
            f"{k} {statistics.median(v):.3f}" for k, v in ratios.items()), flush=True)  # fmt: skip
    print("huge pages' decode time over ordinary pages', per prompt, same tokens:")
    for k, v in ratios.items():
        print(f"  {k:26s} {quartiles(v)}")
    for name in engines:
        secs, toks = total["full", name]
        speedups = ", ".join(f"{k} {secs / total[k, name][0]:.3f}x" for k in kinds if k != "full")
        print(f"  {name:5s} pages: full decoding {toks / secs:.1f} tokens/s (prefill included); {speedups or '-'}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--load", default=None, help="a checkpoint of ours (runs/ee_aclsum/probes); none: the probe alone")
    paired_arguments(p, repeats=3)
    p.add_argument(
        "--own-costs",
        dest="shared_costs",
        action="store_false",
        help="each engine's self-speculation priced by the round costs it timed itself (default: both by the "
        "huge-page engine's, so that the timing's noise does not move one engine's plans alone)",
    )
    p.add_argument("--stream-mib", type=float, default=48.0, help="the stream probe's weight (0: no probe)")
    p.add_argument("--pairs", type=int, default=200, help="the stream probe's timed pairs")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.num_examples < 1 or args.pairs < 1:
        p.error("--repeats, --num-examples and --pairs must be >= 1")
    if not huge_pages.supported():
        raise SystemExit("no transparent huge pages here (not Linux, or the kernel's mode is 'never')")
    if not native.available(torch.bfloat16 if args.bf16 else torch.float32):
        raise SystemExit("the native kernel is not available here (no C compiler, or switched off)")
    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    print(f"{cpu_model_name()}, {args.threads} threads, {'bf16' if args.bf16 else 'fp32'}", flush=True)
    if args.stream_mib > 0:
        v = stream_ratios(args.stream_mib, dtype, args.pairs)
        print(f"stream probe, one row over {args.stream_mib:g} MiB, huge over ordinary pages: {quartiles(v)}")
    if args.load:
        decode_ratios(args)


if __name__ == "__main__":
    main()

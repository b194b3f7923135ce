#!/usr/bin/env python
"""The native kernel's library against another version of its source, decoding side by side.

    python benchmarks/native_ab.py --load runs/ee_aclsum/probes --bf16 --against HEAD~1
    python benchmarks/native_ab.py --load runs/ee_aclsum/probes --bf16 --source /tmp/native_linear.c

Builds a second library from another version of `megatron/early_exit/inference/native_linear.c`
(`--against REV`: the file at a git revision; `--source FILE`: a file) with the flags and cache
of `native.library`, loads it beside this checkout's, and decodes the aclsum test abstracts one
at a time (48 tokens, one line, as `tools/eval/ee_sweep.py` does) with each, prompt by prompt:
for every prompt and setting (full decoding, early exit at the checkpoint's calibrated
thresholds where it has them, self-speculation where it has exits to draft from) the two
libraries decode it back to back, in alternating order, and the ratio of this checkout's decode
time (after the prefill) to the other's is kept. It prints, per setting, the median of those
ratios (below 1: this checkout decodes faster) with their quartiles, and checks that both made
the same tokens; "prefill": the same for the prompts' prefill in full decoding's calls.
Per-prompt pairs, because the host's speed moves by 10-40% within a minute on the machines
these figures come from: best-of times of whole runs taken a few minutes apart read the same
change as 0.86-0.90x and 0.94-1.06x, where 160 pairs' medians read 0.92-0.96x.

`--different-tokens` times a version that sums in another order too (bf16 greedy tokens then part
at near-ties: the two decode different texts of about the same length), counting the prompts that
differed; early exit's and self-speculation's work then differs a little between the two as well.
Four chains a row for bf16 products (stop 82, not taken) read full decoding 0.999x, early exit
1.027x and self-speculation 1.114x this way (120 pairs; 9-15 of 40 prompts differed).

`--attention R [R ...]` times `native.attend` alone instead, at the checkpoint's head shape: R rows
of a prompt (R > 16) or of a verify pass (after CONTEXT keys), `--pairs` alternating pairs; their
outputs must be equal, or with `--different-tokens` their largest difference is printed.

Objects made once from the library (a learned probe's entry point, `native.Probe`) keep the one
that was loaded when they were made: this checkout's. Compare versions that differ elsewhere.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from decode_speed import cpu_model_name  # noqa: E402

from megatron.early_exit.inference import native  # noqa: E402

SOURCE_IN_REPO = "megatron/early_exit/inference/native_linear.c"
CONTEXT = 260  # --attention: the keys before a verify pass's rows


def other_source(args) -> Path:
    """The other version's source as a file: `--source`, or the file at `--against`'s revision."""
    if args.source:
        path = Path(args.source)
        if not path.is_file():
            raise SystemExit(f"--source: {path} is not a file")
        return path
    done = subprocess.run(
        ["git", "-C", ROOT, "show", f"{args.against}:{SOURCE_IN_REPO}"], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"--against: no {SOURCE_IN_REPO} at {args.against!r} ({done.stderr.strip()})")
    fd, name = tempfile.mkstemp(suffix=".c")
    with os.fdopen(fd, "w") as f:
        f.write(done.stdout)
    return Path(name)


def load_both(source: Path):
    """(this checkout's library, the other's), both built and loaded as `native.library` does."""
    ours = native.library()
    if ours is None:
        raise SystemExit("the native kernel is not available here (no C compiler, or switched off)")
    here = native.SOURCE
    native.SOURCE = source
    try:
        theirs = native.library.__wrapped__()  # the uncached loader: built from `source`
    finally:
        native.SOURCE = here
    if theirs is None:
        raise SystemExit(f"the other version ({source}) did not build or load")
    return ours, theirs


def settings_of(engine, max_new_tokens: int) -> dict:
    from megatron.early_exit.inference import GenerationSettings
    from megatron.early_exit.inference.settings import calibrated_settings

    full = GenerationSettings(strategy="early_exit", early_exit_threshold=1.0, max_new_tokens=max_new_tokens,
                              stop_strings=("\n",))  # fmt: skip
    kinds = {"full": full}
    record = getattr(engine.model, "calibrated_thresholds", None)
    if record and record.get("thresholds"):
        kinds["early_exit calibrated"] = replace(full, **calibrated_settings(record, "the checkpoint"))
    if engine.draft_exits():
        kinds["self_speculative"] = GenerationSettings(strategy="self_speculative", max_new_tokens=max_new_tokens,
                                                       stop_strings=("\n",))  # fmt: skip
    return kinds


def paired_ratios(args, libs: dict, current: dict) -> dict[str, list[float]]:
    """Per setting, this library's decode time over the other's, prompt by prompt (see the module
    docstring); `current["lib"]` is what `native.library` returns meanwhile."""
    from megatron.early_exit import load_checkpoint
    from megatron.early_exit.inference import EarlyExitEngine
    from tools.eval.ee_sweep import summarisation_task

    model, tok = load_checkpoint(args.load, dtype=torch.bfloat16 if args.bf16 else None)
    engine = EarlyExitEngine(model, tok)
    prompts, _ = summarisation_task(tok, args.data, args.num_examples, args.max_prompt_chars)
    kinds = settings_of(engine, args.max_new_tokens)

    def decode(name: str, prompt, s):
        current["lib"] = libs[name]
        same_settings(libs)
        r = engine.generate([prompt], s)[0]
        return r.stats["elapsed_s"] - r.stats["prefill_s"], r.stats["prefill_s"], r.tokens

    for name in libs:  # warm-up: kernel choices, packed weights, costs made on first use
        for s in kinds.values():
            for prompt in prompts[:2]:
                decode(name, prompt, s)
    ratios, differed = {k: [] for k in [*kinds, "prefill"]}, {}
    for rep in range(args.repeats):
        for i, prompt in enumerate(prompts):
            for k, s in kinds.items():
                t, pre, made = {}, {}, {}
                for name in ("this", "other") if (rep + i) % 2 == 0 else ("other", "this"):
                    t[name], pre[name], made[name] = decode(name, prompt, s)
                if made["this"] != made["other"]:
                    if not args.different_tokens:
                        raise SystemExit(f"{k}: the two libraries made different tokens for prompt {i}")
                    differed[k] = differed.get(k, 0) + 1
                ratios[k].append(t["this"] / max(t["other"], 1e-12))
                if k == "full":  # the prompt's prefill, timed in the same calls
                    ratios["prefill"].append(pre["this"] / max(pre["other"], 1e-12))
        print(f"pass {rep + 1}/{args.repeats}: " + ", ".join(
            f"{k} {statistics.median(v):.3f}" for k, v in ratios.items()), flush=True)  # fmt: skip
    if differed:
        print("prompts whose tokens differed: " + ", ".join(f"{k} {n}" for k, n in differed.items()))
    return ratios


def same_settings(libs: dict) -> None:
    """The other library's run-time settings made this one's: the prefetch of each dtype, which
    `kernels.prefetch_choice` times once and sets in whichever library is loaded at the time (the
    other kept its default). Left apart, two builds of one source read full decoding of the CPU
    reference model (bf16, AMD EPYC, 120 pairs) 0.915x: the prefetch off in one and on in the other."""
    ours, theirs = libs["this"], libs["other"]
    if hasattr(ours, "ee_prefetch") and hasattr(theirs, "ee_prefetch"):
        for bf16 in (0, 1):
            theirs.ee_prefetch(bf16, ours.ee_prefetch(bf16, -1))


def attention_ratios(args, libs: dict, current: dict) -> dict[str, list[float]]:
    """`--attention`: `native.attend` alone on random queries, keys and values of the checkpoint's
    head shape (its groups, query heads per group, head dim; `--bf16` or fp32), per row count R: R
    rows from position 0 over R keys, causal (a prompt's) where R > 16, else R rows at the end of
    CONTEXT keys (a verify pass's); the two libraries back to back in alternating order, `--pairs`
    times, the ratio of this library's time to the other's kept; their outputs must be equal."""
    import time

    from megatron.early_exit import load_checkpoint

    cfg = load_checkpoint(args.load)[0].config
    g = cfg.num_query_groups or cfg.num_attention_heads
    per, hd = cfg.num_attention_heads // g, cfg.kv_channels or cfg.hidden_size // cfg.num_attention_heads
    dtype, gen = torch.bfloat16 if args.bf16 else torch.float32, torch.Generator().manual_seed(0)
    out = {}
    for r in args.attention:
        span, lo = (r, 0) if r > 16 else (CONTEXT + r, CONTEXT)
        q = torch.randn(1, r, g, per, hd, generator=gen).to(dtype)
        keys, values = (torch.randn(1, g, span, hd, generator=gen).to(dtype) for _ in range(2))
        mask = torch.ones(r, span, dtype=torch.bool).tril(lo).view(1, 1, r, span)
        made, ratios = {}, []
        for i in range(args.pairs + 1):  # the first pair warms up
            t = {}
            for name in ("this", "other") if i % 2 == 0 else ("other", "this"):
                current["lib"] = libs[name]
                same_settings(libs)
                start = time.perf_counter()
                made[name] = native.attend(q, keys, values, mask)
                t[name] = time.perf_counter() - start
            if i:
                ratios.append(t["this"] / max(t["other"], 1e-12))
        name = f"attention, {r} rows over {span} keys"
        if not torch.equal(made["this"], made["other"]):
            if not args.different_tokens:
                raise SystemExit(f"--attention {r}: the two libraries' outputs differ (--different-tokens times them)")
            gap = (made["this"].float() - made["other"].float()).abs()
            print(f"{name}: outputs differ, at most {gap.max():.3g} apart (mean {gap.mean():.3g})")
        out[name] = ratios
    return out


def paired_arguments(p: argparse.ArgumentParser, repeats: int) -> None:
    """The flags of decoding the aclsum abstracts prompt by prompt in pairs (this script's and
    `huge_pages.py`'s): the prompts, their length and the answers', the passes, dtype and threads."""
    p.add_argument("--data", default="data/aclsum/test_summarization.jsonl")
    p.add_argument("--num-examples", type=int, default=40)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--max-prompt-chars", type=int, default=1200, help="abstracts cut to this many characters")
    p.add_argument("--repeats", type=int, default=repeats, help="passes over the prompts (pairs: prompts x repeats)")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--threads", type=int, default=2)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--load", required=True, help="a checkpoint of ours (e.g. runs/ee_aclsum/probes)")
    p.add_argument("--against", default="HEAD", help="git revision whose native_linear.c is the other version")
    p.add_argument("--source", default=None, help="a file holding the other version instead of --against")
    paired_arguments(p, repeats=4)
    p.add_argument(
        "--attention",
        type=int,
        nargs="+",
        default=None,
        metavar="R",
        help="instead of decoding: native.attend alone at these row counts (see attention_ratios)",
    )
    p.add_argument("--pairs", type=int, default=300, help="--attention: timed pairs per row count")
    p.add_argument(
        "--different-tokens",
        action="store_true",
        help="time prompts whose tokens differ too (a version that sums in another order rounds differently: "
        "bf16 greedy tokens then part at near-ties), counting them",
    )
    args = p.parse_args(argv)
    if args.repeats < 1 or args.num_examples < 1:
        p.error("--repeats and --num-examples must be >= 1")
    torch.set_num_threads(args.threads)
    libs = dict(zip(("this", "other"), load_both(other_source(args)), strict=True))
    current, loader = {"lib": libs["this"]}, native.library
    native.library = lambda: current["lib"]  # what every native call asks for, switched below
    try:
        ratios = attention_ratios(args, libs, current) if args.attention else paired_ratios(args, libs, current)
    finally:
        native.library = loader
    dtype, other = "bf16" if args.bf16 else "fp32", args.source or args.against
    what = "time" if args.attention else "decode time (prefill: the prompt's prefill time)"
    each = "per call, same outputs" if args.attention else "per prompt, same tokens"
    if args.different_tokens:
        each = "per call, outputs allowed to differ" if args.attention else "per prompt, tokens allowed to differ"
        each += " (counted above)" if not args.attention else ""
    print(f"{cpu_model_name()}, {args.threads} threads, {dtype}, {args.load}; this checkout's {what} over the "
          f"other's ({other}), {each}:")  # fmt: skip
    for k, v in ratios.items():
        v = sorted(v)
        q = len(v) // 4
        print(f"  {k:34s} median {statistics.median(v):.3f}  quartiles {v[q]:.3f} / {v[-q - 1]:.3f}  pairs {len(v)}")


if __name__ == "__main__":
    main()

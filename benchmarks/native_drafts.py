#!/usr/bin/env python
"""Self-speculation with a round's drafts in one native call (`Passes.native_drafts_of`, or
`native_spec.spec_round` with the verify pass right after) against the same engine drafting step
by step, and both against full decoding, side by side in one process.

A draft step runs a few layers and the exit's head, so the Python around it (the pass's setup,
checks, bookkeeping: ~0.15-0.2 ms a step on the CPU reference model) is a third of it; in one call
(`ee_drafts`) a round's drafts pay it once. This decodes the sweep's aclsum summaries (each prompt
as `tools/eval/ee_sweep.py` builds it, stopping at the first newline) with full decoding,
self-speculation drafting in one call and drafting step by step, in rounds whose order rotates;
per round the decode rate (prefill excluded) of each over all prompts, then the medians of the
per-round ratios: drafts in one call over step by step (> 1: faster), and each over full decoding.
Tokens: whether each setting's equal full decoding's (lossless; in bf16 a verify pass's rounding
may differ from a decode step's).

    python benchmarks/native_drafts.py --load runs/ee_aclsum/tuned [--bf16] [--num-examples 6] [--rounds 6]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.decode_speed import cpu_model_name  # noqa: E402
from megatron.early_exit import load_checkpoint  # noqa: E402
from megatron.early_exit.inference import EarlyExitEngine, GenerationSettings  # noqa: E402
from tools.eval.ee_sweep import summarisation_task  # noqa: E402

SETTINGS = ("full", "drafts in one call", "drafts step by step")


def decode_rate(engine, prompts, s: GenerationSettings, native: bool) -> tuple[float, list[list[int]]]:
    """Tokens per second of decoding (prefill excluded) over `prompts`, one at a time, and the tokens."""
    engine.passes.native_drafting = native
    seconds, tokens, out = 0.0, 0, []
    for p in prompts:
        r = engine.generate([p], s)[0]
        n = len(r.tokens) - 1
        seconds += n / r.stats["decode_tokens_per_sec"]
        tokens += n
        out.append(r.tokens)
    return tokens / seconds, out


def count_native_drafts(engine) -> tuple[list[bool], object]:
    """Per draft phase that asked for its drafts in one call (a round with its verify pass,
    `native_spec.spec_round`, else the engine's `native_drafts_of`), whether it drafted in one call
    (a model without a draft vocabulary or with more than a norm in its exits never does); and a
    callable that stops the counting of rounds (the strategy module's own function back)."""
    from megatron.early_exit.inference.strategies import self_speculative

    calls, real, real_round = [], engine.passes.native_drafts_of, self_speculative.spec_round

    def counted(*args, **kwargs):
        made = real(*args, **kwargs)
        if engine.passes.native_drafting:  # (off: the step-by-step setting)
            calls.append(made is not None)
        return made

    def counted_round(*args, **kwargs):
        made = real_round(*args, **kwargs)
        if made is not None:  # (None: the round's drafts asked `native_drafts_of` next)
            calls.append(True)
        return made

    engine.passes.native_drafts_of = counted
    self_speculative.spec_round = counted_round
    return calls, lambda: setattr(self_speculative, "spec_round", real_round)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--load", required=True)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--data", default="data/aclsum/test_summarization.jsonl", help="the sweep's summaries")
    p.add_argument("--num-examples", type=int, default=6)
    p.add_argument("--max-prompt-chars", type=int, default=1200, help="of each abstract, as the sweep cuts it")
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--rounds", type=int, default=6, help="rounds of all three settings (medians of their ratios)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if not os.path.exists(args.data):
        p.error(f"--data {args.data}: not found (make data, or tools/prepare_aclsum_corpus.py)")
    torch.set_num_threads(args.threads)
    model, tokenizer = load_checkpoint(args.load, dtype=torch.bfloat16 if args.bf16 else torch.float32)
    if tokenizer is None:
        p.error(f"--load {args.load}: no tokenizer saved with it (the summaries' prompts need one)")
    engine = EarlyExitEngine(model, tokenizer)
    prompts, _ = summarisation_task(tokenizer, args.data, args.num_examples, args.max_prompt_chars)
    common = {"max_new_tokens": args.new_tokens, "stop_strings": ("\n",)}
    runs = {
        "full": (GenerationSettings("full", **common), True),
        "drafts in one call": (GenerationSettings("self_speculative", **common), True),
        "drafts step by step": (GenerationSettings("self_speculative", **common), False),
    }
    print(f"machine: {cpu_model_name()}, {args.threads} threads, torch {torch.__version__}")
    print(f"model: {args.load} ({'bf16' if args.bf16 else 'fp32'}), {len(prompts)} summaries, batch 1")
    calls, uncount = count_native_drafts(engine)
    for s, native in runs.values():  # warm-up: kernels chosen, draft costs timed, controller warm
        decode_rate(engine, prompts[:2], s, native)
    calls.clear()
    rates: dict[str, list[float]] = {name: [] for name in SETTINGS}
    tokens: dict[str, list] = {}
    for r in range(args.rounds):
        for name in SETTINGS[r % 3 :] + SETTINGS[: r % 3]:
            rate, tokens[name] = decode_rate(engine, prompts, *runs[name])
            rates[name].append(rate)
        print(f"round {r + 1}: " + ", ".join(f"{name} {rates[name][-1]:.1f} tok/s" for name in SETTINGS), flush=True)
    engine.passes.native_drafting = True
    uncount()

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(rates[a], rates[b]))

    print(f"drafts in one call / step by step: {ratio('drafts in one call', 'drafts step by step'):.3f}x "
          f"({sum(calls)} of {len(calls)} draft phases in one call)")  # fmt: skip
    for name in SETTINGS[1:]:
        same = "identical to full" if tokens[name] == tokens["full"] else "NOT identical to full"
        print(f"{name} / full: {ratio(name, 'full'):.3f}x ({same})")


if __name__ == "__main__":
    main()

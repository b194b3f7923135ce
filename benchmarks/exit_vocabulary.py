#!/usr/bin/env python
"""Leaving tokens chosen from the draft vocabulary against the whole vocabulary
(`GenerationSettings.exit_vocabulary` draft / full), side by side in one process.

A token that leaves at an exit pays that exit's vocabulary projection; on SmolLM2 (49,152 x 576)
that is as much to read as ~8 layers, and with the checkpoint's draft vocabulary (its calibration
record's: ~2% of the rows) it is a small product. This decodes aclsum abstracts at batch 1 (the
sweep's prompt, greedy, a one-sentence summary) with full decoding, and with early exit at each
threshold and exit policy twice, once per vocabulary; every round runs every setting on every
prompt in turn (full decoding twice: the control, what noise alone reads), and prints per setting
the decoding tokens/s of the median round and the median [range] over rounds of its ratio to full
decoding in the same round (decoding alone: the tokens after the first over the time after the
prefill), with the share of tokens that left early and the share of positions whose token is
full decoding's.

    python benchmarks/exit_vocabulary.py --load runs/demo_smollm2/tuned --dtype bf16 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for sub in ("", os.path.join("tools", "eval")):
    sys.path.insert(0, os.path.join(ROOT, sub))

import torch  # noqa: E402

from benchmarks.decode_speed import cpu_model_name  # noqa: E402
from megatron.early_exit.arguments import OneLineErrorParser, run_tool  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CALIBRATED = "calibrated"


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--load", required=True, help="a checkpoint with exits, probes and a draft vocabulary")
    p.add_argument("--data", default="data/aclsum", help="folder with test_summarization.jsonl")
    p.add_argument("--dtype", choices=DTYPES, default="bf16")
    p.add_argument("--num-prompts", type=int, default=6)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--thresholds", nargs="+", default=[CALIBRATED, "0.5"],
                   help="learned thresholds, or 'calibrated' (the checkpoint's per-exit thresholds)")  # fmt: skip
    p.add_argument("--exit-policies", nargs="+", choices=("exact", "cost_aware"), default=["exact", "cost_aware"])
    p.add_argument("--repeats", type=int, default=5, help="alternating rounds")
    p.add_argument("--threads", type=int, default=2)
    return p


def settings(a, record: dict | None) -> dict[str, dict]:
    """name -> GenerationSettings fields: full, its control, early exit per threshold, policy and vocabulary."""
    out = {"full": dict(strategy="full"), "full (again)": dict(strategy="full")}
    for t in a.thresholds:
        if t == CALIBRATED:
            if record is None:
                raise ValueError(f"--thresholds calibrated: {a.load} has no calibrated thresholds")
            ee = dict(early_exit_threshold=1.0, exit_thresholds=record["thresholds"], measure=record["measure"])
        else:
            ee = dict(early_exit_threshold=float(t), measure="learned")
        for pol in a.exit_policies:
            for vocab in ("full", "draft"):
                out[f"{t} {pol} {vocab}"] = dict(strategy="early_exit", exit_policy=pol, exit_vocabulary=vocab, **ee)
    return out


def run(a: argparse.Namespace) -> None:
    from ee_sweep import build_prompt, load_examples

    from megatron.early_exit import load_checkpoint
    from megatron.early_exit.checkpointing import read_calibrated_thresholds
    from megatron.early_exit.inference import EarlyExitEngine, GenerationSettings

    if a.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {a.repeats}")
    torch.set_num_threads(a.threads)
    model, tok = load_checkpoint(a.load, dtype=DTYPES[a.dtype])
    engine = EarlyExitEngine(model, tok)
    if engine.passes.draft_vocab is None:
        raise ValueError(f"--load {a.load}: no draft vocabulary (tools/eval/calibrate_thresholds.py records one)")
    ways = settings(a, read_calibrated_thresholds(a.load))
    examples = load_examples(os.path.join(a.data, "test_summarization.jsonl"), a.num_prompts)
    prompts = [build_prompt(tok, ex["abstract"], 1500) for ex in examples]
    common = dict(max_new_tokens=a.max_new_tokens, stop_strings=("\n",))
    runs = {name: GenerationSettings(**common, **kw) for name, kw in ways.items()}
    print(f"machine: {cpu_model_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"model: {a.load}, {a.dtype}, batch 1, {len(prompts)} abstracts, at most {a.max_new_tokens} new tokens; "
          f"draft vocabulary {len(engine.passes.draft_vocab)} of {engine.vocab} tokens")  # fmt: skip
    first = {name: [engine.generate([ids], s)[0] for ids in prompts] for name, s in runs.items()}  # the warm-up
    tokens = {name: sum(len(r.tokens) - 1 for r in res) for name, res in first.items()}
    seconds = {name: [0.0] * a.repeats for name in runs}
    for r in range(a.repeats):
        for ids in prompts:
            for name, s in runs.items():
                res = engine.generate([ids], s)[0]
                seconds[name][r] += res.stats["elapsed_s"] - res.stats["prefill_s"]
    rates = {name: [tokens[name] / max(t, 1e-9) for t in seconds[name]] for name in runs}
    n = model.config.num_layers
    print(f"\n  {'setting':28s} {'tok/s':>7s}  {'vs full, median [range]':24s} {'left early':>10s} {'as full':>8s}")
    for name, res in first.items():
        ratio = [x / f for x, f in zip(rates[name], rates["full"])]
        layers = [e for x in res for e in x.exit_layers]
        same = sum(a == b for x, f in zip(res, first["full"]) for a, b in zip(x.tokens, f.tokens))
        print(f"  {name:28s} {statistics.median(rates[name]):7.1f}  {statistics.median(ratio):.3f}x "
              f"[{min(ratio):.3f}, {max(ratio):.3f}]   {sum(e < n for e in layers) / len(layers):10.1%} "
              f"{same / sum(len(f.tokens) for f in first['full']):8.1%}")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    run_tool(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    main()

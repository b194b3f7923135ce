#!/usr/bin/env python
"""`make demo`'s last step: a model with tuned exits summarises a few abstracts three ways,
showing where each token left the network, then times each way against full decoding.

    python examples/ee_tuning/demo_generate.py --load runs/demo_smollm2/tuned --data data/aclsum

Prompts: the first --num-prompts aclsum test abstracts, "Summarize this abstract in one
sentence" in the model's chat template (tools/eval/ee_sweep.py's prompt), greedy.
Each generated token is printed followed by the layer it left at as a subscript ("paper₁₅");
a token without one went through every layer.

- full: every token through all layers;
- early_exit: a token leaves at the first exit whose confidence reaches its threshold: the
  checkpoint's calibrated per-exit thresholds (tools/eval/calibrate_thresholds.py) when it has
  them, else --threshold with --measure;
- self_speculative: an exit drafts tokens and the whole model verifies them in one pass; by
  default (the engine's) the draft exit and the draft length are chosen online from the measured
  acceptance and the cost model, and a round drafts nothing where drafting would not pay
  (--draft-exit-layer / --num-draft-tokens fix them). The text equals full decoding's (checked;
  exactly so in fp32, in bf16 near-ties can flip), and a subscript marks a drafted token the
  final head accepted.
The first token always comes from the prompt's pass through every layer.

Speed: --repeats rounds, each running every way on every prompt in turn at batch 1, after the
generations shown, which warm every way up; decoding alone (the tokens after each prompt's first
over the time after its prefill, which is the same pass in every way: an early exit that ends the
summary sooner would otherwise read slower for sharing the prefill among fewer tokens). Each
way's ratio to full decoding is taken within each round (neighbours in time, which a busy machine
slows alike) and printed as the median and range over rounds; full decoding runs twice a round,
and the second run's ratio (the control) is what noise alone reads. A way is called faster or
slower only where every round's ratio lies beyond the control's spread (on the demo's SmolLM2,
the best of 3 rounds with the prefill in printed early exit at 0.87x, "SLOWER"; decoding alone,
paired by round, reads 1.13x [1.11, 1.24], the control 1.07x [1.02, 1.07]).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
for sub in ("", "benchmarks", "tools", os.path.join("tools", "eval")):
    sys.path.insert(0, os.path.join(ROOT, sub))

from megatron.early_exit.arguments import OneLineErrorParser, run_tool  # noqa: E402

CONTROL = "full (again)"
SUBSCRIPT = str.maketrans("0123456789", "₀₁₂₃₄₅₆₇₈₉")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="checkpoint with (tuned) exits")
    p.add_argument("--data", default="data/aclsum", help="folder with test_summarization.jsonl")
    p.add_argument("--num-prompts", type=int, default=3)
    p.add_argument("--max-prompt-chars", type=int, default=700, help="abstracts are cut to this length")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--threshold", type=float, default=0.8, help="early exit without calibrated thresholds")
    p.add_argument("--measure", default="learned", help="with --threshold (learned needs probes, else max_prob)")
    p.add_argument("--draft-exit-layer", type=int, help="self_speculative's drafter (default: chosen online)")
    p.add_argument("--num-draft-tokens", type=int, help="self_speculative's draft length (default: chosen online)")
    p.add_argument("--repeats", type=int, default=3, help="timed alternating rounds")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    return p


def check_args(a: argparse.Namespace) -> None:
    for name in ("num_prompts", "max_new_tokens", "num_draft_tokens", "repeats", "max_prompt_chars", "threads"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if not 0.0 <= a.threshold <= 1.0:
        raise ValueError(f"--threshold must be in [0, 1], got {a.threshold}")
    if not os.path.isdir(a.load):
        raise ValueError(f"--load {a.load}: no such checkpoint directory")
    if not os.path.isfile(os.path.join(a.data, "test_summarization.jsonl")):
        raise ValueError(f"--data {a.data}: no test_summarization.jsonl (tools/prepare_aclsum_corpus.py makes it)")


def strategies(a: argparse.Namespace, model, record: dict | None) -> list[tuple[str, dict, str]]:
    """(name, GenerationSettings fields, what it means) of the three ways to decode."""
    n, exits = model.config.num_layers, model.config.exit_layer_nums
    measure = a.measure if model.config.use_exit_confidence_head or a.measure != "learned" else "max_prob"
    if record is not None:
        shown = ", ".join(f"exit {k}: {v:.2f}" for k, v in record["thresholds"].items())
        ee = dict(early_exit_threshold=1.0, exit_thresholds=record["thresholds"], measure=record["measure"])
        how = f"{record['measure']} confidence, calibrated thresholds ({shown}; delta {record['delta']:g})"
    else:
        ee = dict(early_exit_threshold=a.threshold, measure=measure)
        how = f"{measure} confidence >= {a.threshold:g} at any exit"
    if a.draft_exit_layer is not None and a.draft_exit_layer not in exits:
        raise ValueError(f"--draft-exit-layer {a.draft_exit_layer}: not an exit of this model (exits {exits})")
    draft = a.draft_exit_layer if a.draft_exit_layer is not None else "auto"
    length = a.num_draft_tokens if a.num_draft_tokens is not None else "auto"
    drafting = {
        (True, True): "draft exit and length chosen online from acceptance and cost",
        (True, False): f"an exit chosen online drafts {length} tokens",
        (False, True): f"exit {draft} drafts, length chosen online from acceptance and cost",
        (False, False): f"exit {draft} drafts {length} tokens",
    }[draft == "auto", length == "auto"]
    return [
        ("full", dict(strategy="full"), f"all {n} layers for every token"),
        ("early_exit", dict(strategy="early_exit", **ee), how),
        ("self_speculative", dict(strategy="self_speculative", draft_exit_layer=draft, num_draft_tokens=length),
         f"{drafting}, all {n} layers verify them"),
    ]  # fmt: skip


def annotated(tok, result, num_layers: int) -> str:
    """The generated text, each token followed by its exit layer as a subscript (none: the final head)."""
    pieces = []
    for t, layer in zip(result.tokens, result.exit_layers):
        text = tok.detokenize([t]).replace("\n", "⏎")
        pieces.append(text if layer >= num_layers else text + str(layer).translate(SUBSCRIPT))
    return "".join(pieces).strip()


def rounds(stats: dict) -> str:
    """', drafting from exit 22 (5 rounds), 3 rounds without a draft' from self-speculation's telemetry."""
    exits = stats.get("draft_exits") or {}
    plain = (stats.get("draft_lengths") or {}).get(0, 0)

    def rounds_of(k: int) -> str:
        return f"{k} round" + ("s" if k != 1 else "")

    text = ", ".join(f"{n} ({rounds_of(k)})" for n, k in sorted(exits.items()))
    return (f", drafting from exit {text}" if text else "") + (f", {rounds_of(plain)} without a draft" if plain else "")


def show(tok, prompt_text: str, results: dict, ways, num_layers: int) -> None:
    """One prompt: the abstract's start, then each way's annotated text and what its exits did."""
    full = results["full"].tokens
    print(f'\n--- "{prompt_text[:110].strip()}..."')
    for name, _, how in ways:
        r = results[name]
        early = sum(x < num_layers for x in r.exit_layers)
        same = sum(x == y for x, y in zip(r.tokens, full))
        note = f"{early} of {len(r.tokens)} tokens left early, average exit layer {r.stats['average_exit_layer']:.1f}"
        if name == "early_exit":
            note += f"; {same} of {len(full)} tokens as full decoding"
        if name == "self_speculative":
            same = "yes" if r.tokens == full else "no (bf16: the verify pass rounds rows together, near-ties flip)"
            accepted = f"{r.stats.get('acceptance_rate', 0.0):.0%} of drafted tokens accepted"
            note = f"{accepted}{rounds(r.stats)}; identical to full: {same}"
        print(f"  {name:17s}({how})\n    {annotated(tok, r, num_layers)}")
        if name != "full":
            print(f"    [{note}]")


def speed(engine, prompts, ways, a: argparse.Namespace, common: dict) -> None:
    """Decoding tokens/s of each way and its ratio to full decoding in the same round (median and
    range over rounds); each round runs every way on every prompt in turn, full decoding twice
    back to back (the second run's ratio, the control, is what this machine's noise alone reads)."""
    from decode_speed import paired_ratios

    from megatron.early_exit.inference import GenerationSettings

    timed = [(ways[0][0], ways[0][1]), (CONTROL, ways[0][1])] + [(name, kw) for name, kw, _ in ways[1:]]
    runs = [(name, GenerationSettings(**common, **kw)) for name, kw in timed]
    decoded = dict.fromkeys((name for name, _ in timed), 0)
    seconds = {name: [0.0] * a.repeats for name in decoded}  # per round, over the prompts
    for r in range(a.repeats):  # the generations shown ran every way on every prompt: the warm-up
        for ids in prompts:
            for name, settings in runs:
                res = engine.generate([ids], settings)[0]
                seconds[name][r] += res.stats["elapsed_s"] - res.stats["prefill_s"]
                if r == 0:  # the same tokens every round; the first is the prefill's
                    decoded[name] += len(res.tokens) - 1
    rate = {name: [decoded[name] / max(t, 1e-9) for t in seconds[name]] for name in decoded}
    ratio = {name: [x / f for x, f in zip(rate[name], rate["full"])] for name in decoded}
    noise = max(abs(x - 1.0) for x in ratio[CONTROL])
    print(f"\n=== speed: {a.dtype}, batch 1, {len(prompts)} prompts, {torch.get_num_threads()} threads; each way "
          f"warmed up, {a.repeats} alternating rounds; decoding alone (tokens after the first over the time after "
          f"the prefill: the ways stop at different lengths); tokens/s of the median round, ratio to full decoding "
          f"in the same round, median [range]")  # fmt: skip
    paired = {name: paired_ratios({"rounds": rate[name]}, {"rounds": rate["full"]}) for name in decoded}
    for name, _, _ in ways:
        print(f"  {name:17s} {statistics.median(rate[name]):6.1f} tokens/s  {paired[name]}"
              f"{'' if name == 'full' else verdict(ratio[name], noise)}")  # fmt: skip
    print(f"  (control: full decoding run twice a round read {paired[CONTROL]})")


def verdict(ratios: list[float], noise: float) -> str:
    """Faster or slower where every round says so by more than the control's spread, else no clear difference."""
    if min(ratios) > 1.0 + noise:
        return "  faster than full decoding"
    if max(ratios) < 1.0 - noise:
        return "  SLOWER than full decoding"
    return f"  no clear difference from full decoding (the control moved up to {noise:.0%})"


def run(a: argparse.Namespace) -> None:
    from ee_sweep import build_prompt, load_examples

    from megatron.early_exit import load_checkpoint
    from megatron.early_exit.checkpointing import read_calibrated_thresholds
    from megatron.early_exit.inference import EarlyExitEngine, GenerationSettings

    check_args(a)
    torch.set_num_threads(a.threads)
    model, tok = load_checkpoint(a.load, dtype=DTYPES[a.dtype])
    if not model.config.exit_layer_nums:
        raise ValueError(f"--load {a.load}: the checkpoint has no exits (tools/checkpoint/add_exits.py)")
    engine, n = EarlyExitEngine(model, tok), model.config.num_layers
    ways = strategies(a, model, read_calibrated_thresholds(a.load))
    examples = load_examples(os.path.join(a.data, "test_summarization.jsonl"), a.num_prompts)
    prompts = [build_prompt(tok, ex["abstract"], a.max_prompt_chars) for ex in examples]
    common = dict(max_new_tokens=a.max_new_tokens, stop_strings=("\n",))
    print(f"model: {a.load}, {n} layers, exits after layers {model.config.exit_layer_nums}, {a.dtype}; greedy, "
          f"at most {a.max_new_tokens} new tokens")  # fmt: skip
    print(f"each token's subscript: the layer it left the network at (none: all {n} layers)")
    for ex, ids in zip(examples, prompts):
        results = {name: engine.generate([ids], GenerationSettings(**common, **kw))[0] for name, kw, _ in ways}
        show(tok, ex["abstract"], results, ways, n)
    speed(engine, prompts, ways, a, common)


def main(argv: list[str] | None = None) -> None:
    run_tool(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    main()

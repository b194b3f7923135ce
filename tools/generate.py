#!/usr/bin/env python
"""Generate text from a checkpoint with early exit, and show where each token left the network.

    python tools/generate.py --load runs/demo/checkpoints --prompt "Early exit" \
        --strategy early_exit --early-exit-thres 0.8 --max-new-tokens 48

Several prompts (`--prompt` repeated, or `--prompts-file F.jsonl` with a "prompt" or "text"
field per line) are decoded as one batch. `--json` prints one JSON object per prompt.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="checkpoint directory (its tokenizer comes with it)")
    p.add_argument("--prompt", action="append", default=[])
    p.add_argument("--prompts-file")
    p.add_argument("--strategy", choices=["full", "early_exit", "self_speculative"], default="early_exit")
    p.add_argument("--early-exit-thres", type=float, default=0.8)
    p.add_argument("--exit-layers", type=int, nargs="+", help="exits allowed to fire (default: all)")
    p.add_argument("--min-exit-layer", type=int)
    p.add_argument("--measure", choices=["max_prob", "top2_margin", "entropy", "learned"], default="max_prob")
    p.add_argument("--num-draft-tokens", type=int, default=4)
    p.add_argument("--draft-exit-layer", type=int)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--add-bos", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--json", action="store_true")
    return p


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        if not os.path.isfile(args.prompts_file):
            raise ValueError(f"--prompts-file: no such file: {args.prompts_file}")
        with open(args.prompts_file, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        obj = json.loads(line)
                        prompts.append(obj.get("prompt", obj.get("text")))
                    except (json.JSONDecodeError, AttributeError):
                        raise ValueError(f"--prompts-file {args.prompts_file}:{n}: not a JSON object") from None
    if not prompts or any(not isinstance(p, str) for p in prompts):
        raise ValueError("give --prompt TEXT or --prompts-file F.jsonl (with a 'prompt' field)")
    return prompts


def run(args) -> None:
    import torch

    from megatron.early_exit import load_checkpoint
    from megatron.early_exit.inference import EarlyExitEngine, GenerationSettings

    prompts = read_prompts(args)
    model, tok = load_checkpoint(args.load, device=args.device, dtype=torch.bfloat16 if args.bf16 else None)
    if tok is None:
        raise ValueError(f"--load {args.load}: the checkpoint has no tokenizer")
    ids = [([tok.bos] if args.add_bos and tok.bos is not None else []) + tok.tokenize(p) for p in prompts]
    settings = GenerationSettings(
        strategy=args.strategy, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop_strings=tuple(args.stop),
        early_exit_threshold=args.early_exit_thres,
        exit_layers=tuple(args.exit_layers) if args.exit_layers else None, min_exit_layer=args.min_exit_layer,
        measure=args.measure, num_draft_tokens=args.num_draft_tokens, draft_exit_layer=args.draft_exit_layer,
    )  # fmt: skip
    results = EarlyExitEngine(model, tok).generate(ids, settings)
    for prompt, r in zip(prompts, results):
        if args.json:
            print(json.dumps({
                "prompt": prompt, "text": r.text, "tokens": r.tokens, "exit_layers": r.exit_layers,
                "confidences": [round(c, 6) for c in r.confidences], "finish_reason": r.finish_reason,
                "tokens_per_sec": r.stats["tokens_per_sec"], "average_exit_layer": r.stats["average_exit_layer"],
                **({"acceptance_rate": r.stats["acceptance_rate"]} if "acceptance_rate" in r.stats else {}),
            }))  # fmt: skip
            continue
        print(f"=== {prompt!r}\n{prompt}{r.text}\n--- token | exit layer | confidence")
        for t, layer, c in zip(r.tokens, r.exit_layers, r.confidences):
            print(f"{tok.detokenize([t])!r:>20} | {layer:2d} | {c:.3f}")
        share = ", ".join(f"layer {k}: {v:.0%}" for k, v in r.stats["exit_share"].items())
        print(
            f"--- average exit layer {r.stats['average_exit_layer']:.2f} of {model.config.num_layers} "
            f"({share}); {r.stats['tokens_per_sec']:.1f} tokens/s over the batch"
        )


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except ValueError as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(2)


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Generate text from a checkpoint with early exit, and show where each token left the network.

    python tools/generate.py --load runs/demo/checkpoints --prompt "Early exit" \\
        --strategy early_exit --early-exit-thres 0.8 --max-new-tokens 48

Several prompts (`--prompt` repeated, or `--prompts-file F.jsonl` with a "prompt" or
"text" field per line) are decoded as one batch. The default output shows each prompt's
text, then every generated token with its exit layer and confidence, then a summary;
`--json` prints one JSON object per prompt instead (text, tokens, exit_layers,
confidences, tokens_per_sec, finish_reason, average_exit_layer, exit_share, ...).
Errors are one line on stderr and exit code 2.

Strategies and confidence measures come from their registries; `--plugin MODULE`
(repeatable) imports a module that registers more before the choices are made:

    python tools/generate.py --plugin my_pkg.exit_at --strategy exit_at --load DIR --prompt "Hi"

Tensor and pipeline parallel (rank 0 prints, the others stay silent):

    torchrun --nproc-per-node 2 tools/generate.py --load DIR --prompt "Early exit" \
        --pipeline-model-parallel-size 2    # or --tensor-model-parallel-size 2
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.early_exit.arguments import GENERATE_RANGES, OneLineErrorParser, check_ranges, run_tool  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    from megatron.early_exit.inference import measure_names, strategy_names
    from megatron.early_exit.inference.settings import EXIT_VOCABULARIES

    p = OneLineErrorParser(name_prog=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="checkpoint directory (its tokenizer comes with it)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts-file", help='JSON lines with a "prompt" (or "text") field')
    p.add_argument("--plugin", action="append", default=[], help="import a registering module")
    p.add_argument("--strategy", choices=strategy_names(), default="early_exit")
    p.add_argument(
        "--early-exit-thres", type=_threshold, default=0.8,
        help="confidence needed to exit, in [0, 1]; auto: the checkpoint's calibrated per-exit thresholds and measure",
    )  # fmt: skip
    p.add_argument("--exit-layers", type=int, nargs="+", help="exits allowed to fire (default: all)")
    p.add_argument("--min-exit-layer", type=int)
    p.add_argument(
        "--measure", choices=measure_names(), default=None,
        help="confidence measure (default: learned when the checkpoint's exits have probes, else max_prob)",
    )  # fmt: skip
    p.add_argument(
        "--exit-policy", choices=("exact", "cost_aware"), default="cost_aware",
        help="early_exit: cost_aware lets tokens leave only where that saves time at this batch size and skips "
        "exits that rarely pay; exact evaluates every allowed exit for every token",
    )  # fmt: skip
    p.add_argument(
        "--exit-vocabulary", choices=EXIT_VOCABULARIES, default="auto",
        help="early_exit: what a leaving token is chosen from: draft (the checkpoint's draft vocabulary alone: a "
        "projection of ~2%% of the head), full, or auto (draft where the checkpoint records one, decoding is greedy "
        "and the measure is learned)",
    )  # fmt: skip
    p.add_argument(
        "--num-draft-tokens", type=_int_or_auto, default="auto",
        help="self_speculative: tokens drafted per round, or auto (chosen each round from measured acceptance)",
    )  # fmt: skip
    p.add_argument(
        "--draft-exit-layer", type=_int_or_auto, default="auto",
        help="self_speculative: the drafting exit, or auto (chosen each round; plain steps when no draft pays)",
    )  # fmt: skip
    p.add_argument(
        "--draft-alternatives", action="store_true",
        help="self_speculative: verify each draft's second choice too (a row of its own; see GenerationSettings)",
    )  # fmt: skip
    p.add_argument(
        "--prompt-lookup-max", type=int, default=0, metavar="N",
        help="self_speculative: also draft from the context (the tokens after the first occurrence of its "
        "last n <= N tokens; prompt lookup, not early exit); 0 (default): off",
    )  # fmt: skip
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument(
        "--compile", action="store_true",
        help="run decode steps' layers through torch.compile (one device; falls back to eager with a warning)",
    )  # fmt: skip
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--stop-token-id", type=int, action="append", default=[], help="stop token id (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--add-bos", action="store_true")
    p.add_argument("--logprobs", action="store_true", help="also report each token's log-probability")
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1, help="under torchrun")
    p.add_argument(
        "--pipeline-model-parallel-size", type=int, default=1, help="under torchrun (early exit, EE-LLM style)"
    )
    p.add_argument("--json", action="store_true", help="one JSON object per prompt")
    return p


def _or_auto(cast, expected: str):
    """An argparse type: "auto", or `text` through `cast` (an error naming what was expected)."""

    def parse(text: str):
        if text == "auto":
            return text
        try:
            return cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected} or auto, got {text!r}") from None

    return parse


_int_or_auto = _or_auto(int, "an integer")
_threshold = _or_auto(float, "a number in [0, 1]")


def _calibrated(args) -> dict | None:
    """--early-exit-thres auto: the record tools/eval/calibrate_thresholds.py wrote into the checkpoint."""
    from megatron.early_exit.checkpointing import read_calibrated_thresholds
    from megatron.early_exit.inference.settings import calibrated_settings

    if args.early_exit_thres != "auto":
        return None
    if args.pipeline_model_parallel_size > 1:
        raise ValueError("--early-exit-thres auto (per-exit thresholds) is not supported with pipeline parallelism")
    return calibrated_settings(read_calibrated_thresholds(args.load), f"--early-exit-thres auto: {args.load}")


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        if not os.path.isfile(args.prompts_file):
            raise ValueError(f"--prompts-file: no such file: {args.prompts_file}")
        with open(args.prompts_file, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    raise ValueError(f"--prompts-file {args.prompts_file}:{n}: not valid JSON") from None
                text = obj.get("prompt", obj.get("text")) if isinstance(obj, dict) else obj
                if not isinstance(text, str):
                    raise ValueError(f'--prompts-file {args.prompts_file}:{n}: needs a "prompt" string')
                prompts.append(text)
    if not prompts:
        raise ValueError("give --prompt TEXT or --prompts-file F.jsonl")
    return prompts


def run(args) -> None:
    import torch

    from megatron.early_exit.inference import GenerationSettings

    check_ranges(args, GENERATE_RANGES)
    prompts = read_prompts(args)
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise ValueError(f"--device: unknown device {args.device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available on this machine")
    model, tok, engine, is_main = _load(args, device, torch.bfloat16 if args.bf16 else None)
    if tok is None:
        raise ValueError(f"--load {args.load}: the checkpoint has no tokenizer")
    bos = [tok.bos] if args.add_bos and tok.bos is not None else []
    ids = [bos + _tokenize(tok, p) for p in prompts]
    for p, i in zip(prompts, ids):
        if not i:
            raise ValueError(f"--prompt {p!r}: tokenizes to nothing")
    try:
        results = _generate(args, engine, ids, GenerationSettings)
    except ValueError as e:  # the engine names its settings: say which flag
        raise ValueError(_as_flags(str(e))) from None
    if not is_main:
        return
    _report(args, prompts, results, model, tok)


# Engine setting names -> this tool's flags, for error messages.
_FLAGS = {
    "self_speculative": "--strategy self_speculative", "strategy": "--strategy", "measure": "--measure",
    "early_exit_threshold": "--early-exit-thres", "min_exit_layer": "--min-exit-layer",
    "exit_layers": "--exit-layers", "num_draft_tokens": "--num-draft-tokens",
    "draft_exit_layer": "--draft-exit-layer", "max_new_tokens": "--max-new-tokens", "temperature": "--temperature",
    "top_k": "--top-k", "top_p": "--top-p", "stop_strings": "--stop", "stop_token_ids": "--stop-token-id",
    "prompts": "--prompt", "exit_policy": "--exit-policy", "prompt_lookup_max": "--prompt-lookup-max",
    "exit_vocabulary": "--exit-vocabulary",
}  # fmt: skip
_FLAG_WORDS = re.compile(r"(?<![-\w])(" + "|".join(sorted(_FLAGS, key=len, reverse=True)) + r")\b")


def _tokenize(tok, prompt: str) -> list[int]:
    try:
        return tok.tokenize(prompt)
    except ValueError as e:
        raise ValueError(f"--prompt {prompt!r}: {e}") from None


def _as_flags(message: str) -> str:
    """Prefix the engine's message with the flag its setting comes from: `--exit-layers: exit_layers: ...`."""
    m = _FLAG_WORDS.search(message)
    return f"{_FLAGS[m.group(1)]}: {message}" if m else message


def _generate(args, engine, ids, GenerationSettings):
    auto = _calibrated(args)
    settings = GenerationSettings(
        strategy=args.strategy, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop_strings=tuple(args.stop),
        stop_token_ids=tuple(args.stop_token_id), ignore_eos=args.ignore_eos,
        exit_layers=tuple(args.exit_layers) if args.exit_layers else None, min_exit_layer=args.min_exit_layer,
        num_draft_tokens=args.num_draft_tokens, draft_exit_layer=args.draft_exit_layer,
        return_logprobs=args.logprobs, exit_policy=args.exit_policy, draft_alternatives=args.draft_alternatives,
        prompt_lookup_max=args.prompt_lookup_max, exit_vocabulary=args.exit_vocabulary,
        **(auto or {"early_exit_threshold": args.early_exit_thres, "measure": args.measure}),
    )  # fmt: skip
    return engine.generate(ids, settings)


def _report(args, prompts, results, model, tok) -> None:
    from megatron.early_exit.inference import summarize

    num_layers = model.config.num_layers
    for prompt, r in zip(prompts, results):
        if args.json:
            print(json.dumps(_as_json(prompt, r)))
        else:
            _print_text(prompt, r, tok, num_layers)
    if not args.json:
        s = summarize(results, num_layers)
        line = (
            f"=== batch of {len(results)}: {s['tokens']} tokens, {s['tokens_per_sec']:.1f} tokens/s, "
            f"average exit layer {s['average_exit_layer']:.2f} of {num_layers}, "
            f"{s['early_exit_share']:.0%} exited early"
        )
        if "acceptance_rate" in s:
            line += f", acceptance rate {s['acceptance_rate']:.0%}"
        rounds = [r.stats["draft_lengths"] for r in results if "draft_lengths" in r.stats]
        if rounds:  # self_speculative: how often drafting paid (auto falls back to plain steps)
            plain = sum(x.get(0, 0) for x in rounds) / max(sum(sum(x.values()) for x in rounds), 1)
            line += f", plain rounds {plain:.0%}"
        print(line)


def _load(args, device, dtype):
    """(model, tokenizer, engine, prints?): the whole model on one device, or under torchrun this
    rank's stage / TP shard, with the engine for that layout."""
    from megatron.early_exit import load_checkpoint
    from megatron.early_exit.inference import EarlyExitEngine
    from megatron.early_exit.inference.parallel import load_stage, make_engine
    from megatron.early_exit.parallel.dims import initialize

    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    if tp == pp == 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        model, tok = load_checkpoint(args.load, device=device, dtype=dtype)
        return model, tok, EarlyExitEngine(model, tok, compile=args.compile), True
    pstate = initialize(tp, pp, device)
    model, tok, specs = load_stage(args.load, pstate, dtype)
    return model, tok, make_engine(model, tok, pstate, specs), pstate.rank == 0


def _as_json(prompt: str, r) -> dict:
    row = {
        "prompt": prompt,
        "text": r.text,
        "tokens": r.tokens,
        "exit_layers": r.exit_layers,
        "confidences": [round(c, 6) for c in r.confidences],
        "finish_reason": r.finish_reason,
        "tokens_per_sec": r.stats["tokens_per_sec"],
        "average_exit_layer": r.stats["average_exit_layer"],
        "exit_share": {str(k): v for k, v in r.stats["exit_share"].items()},
    }
    if r.logprobs is not None:
        row["logprobs"] = r.logprobs
    if "acceptance_rate" in r.stats:
        row["acceptance_rate"] = r.stats["acceptance_rate"]
    return row


def _print_text(prompt: str, r, tok, num_layers: int) -> None:
    print(f"=== {prompt!r}\n{prompt}{r.text}\n--- token | exit layer | confidence")
    for t, layer, c in zip(r.tokens, r.exit_layers, r.confidences):
        where = "final" if layer == num_layers else f"exit {layer}"
        print(f"{tok.detokenize([t])!r:>20} | {where:>7} | {c:.3f}")
    if r.tokens:
        share = ", ".join(f"layer {k}: {v:.0%}" for k, v in r.stats["exit_share"].items())
        print(
            f"--- {len(r.tokens)} tokens ({r.finish_reason}); average exit layer "
            f"{r.stats['average_exit_layer']:.2f} of {num_layers} ({share})"
        )


def main(argv=None) -> None:
    from megatron.early_exit.inference.plugins import load_plugins_from_argv

    run_tool(lambda _: load_plugins_from_argv(argv), None)  # before the choices are read
    args = build_parser().parse_args(argv)
    run_tool(run, args)


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Self-distillation data for exits: the model's own answers, in the format it is served in.

    python tools/make_distillation_corpus.py --load runs/ee_tuning_smollm2/tuned \
        --output data/aclsum/smollm2_distill.jsonl --max-prompts 1200 --bf16
    python tools/preprocess_data.py --input data/aclsum/smollm2_distill.jsonl \
        --output-prefix data/aclsum/smollm2_distill --json-keys tokens --tokenizer-type HuggingFaceTokenizer \
        --tokenizer-model runs/ee_tuning_smollm2/tuned/iter_0001245/tokenizer/tokenizer.json

Exits are tuned to agree with the final head, and are asked to agree with it on what the model
itself writes, in the format it is prompted in (an instruction model's chat template). Tuned on
plain text alone, the SmolLM2 reference's exits agreed with its final head 47 / 56 / 69% of the
time on held-out paper text but 30 / 36 / 63% along its own summaries. This tool writes the
text they are used on: prompts from aclsum papers outside the test split (whose abstracts are
`tools/eval/ee_sweep.py`'s prompts), each answered by full greedy decoding (the final head's
tokens, which drafts are checked against; --one-line: up to the first newline, where the sweep
stops too). From each paper: its abstract in the sweep's own
prompt (`ee_sweep.prompt_text`), then passages of its body (consecutive paragraphs joined up to
--max-prompt-chars) asked for the same one-sentence summary; papers are visited in turn so
that --max-prompts takes a little of every paper.

Tuning the exits from the tuned checkpoint on 1,500 such documents (README: "Exits tuned on the
model's own answers") raised their agreement along the sweep's summaries from 30.0 / 36.0 / 62.6%
to 34.5 / 41.6 / 66.4% (`benchmarks/draft_policy.py`, 20 abstracts); the CPU reference model's
(3,000 documents, --one-line) from 81.6 / 88.1% to 84.4 / 89.5%.

One jsonl line per prompt: "text" (prompt and answer as text, for reading), "prompt" (the
prompt alone, as text), "tokens" (the
prompt's token ids and the generated ones, exactly as decoded: `preprocess_data.py --json-keys
tokens` takes them as they are), "loss_mask" (0 for each prompt token, 1 for each answer token:
`preprocess_data.py --loss-mask-key loss_mask`, then `--data-loss-mask`, tunes on the answers'
positions alone), "paper", "source" ("abstract" or "passage"), "answer", "finish_reason".
Progress goes to stdout; the file is written under a temporary name and renamed at the end, so
an interrupted run leaves nothing half-written.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))
sys.path.insert(0, os.path.join(ROOT, "tools", "eval"))

from megatron.early_exit.arguments import OneLineErrorParser, run_tool  # noqa: E402

SPLITS = ("train", "val", "test")


def split_ids(dataset_dir: str, splits: list[str]) -> set[str]:
    """Paper ids of the given aclsum splits."""
    ids = set()
    for split in splits:
        with open(os.path.join(dataset_dir, f"{split}.jsonl"), encoding="utf-8") as f:
            ids |= {json.loads(line)["id"] for line in f if line.strip()}
    return ids


def passages(paper: dict, max_chars: int) -> list[str]:
    """The paper's body paragraphs joined in order into passages of at most `max_chars`
    characters (a longer paragraph is a passage of its own, cut at `max_chars`)."""
    out, cur = [], ""
    for para in (p.get("text", "").strip() for p in paper.get("pdf_parse", {}).get("body_text", [])):
        if not para:
            continue
        if cur and len(cur) + 1 + len(para) > max_chars:
            out.append(cur)
            cur = ""
        cur = f"{cur}\n{para}" if cur else para
    if cur:
        out.append(cur)
    return [p[:max_chars] for p in out]


def paper_prompts(dataset_dir: str, exclude: set[str], max_chars: int, min_chars: int) -> list[list[dict]]:
    """Per paper outside `exclude` (sorted by id): its prompt sources in order, each
    {"paper", "source", "content"}: the abstract first, then its passages."""
    papers = []
    for path in sorted(glob.glob(os.path.join(dataset_dir, "paper_jsons", "*.json"))):
        paper_id = os.path.splitext(os.path.basename(path))[0]
        if paper_id in exclude:
            continue
        with open(path, encoding="utf-8") as f:
            paper = json.load(f)
        items = []
        if (paper.get("abstract") or "").strip():
            items.append({"paper": paper_id, "source": "abstract", "content": paper["abstract"].strip()[:max_chars]})
        items += [{"paper": paper_id, "source": "passage", "content": p}
                  for p in passages(paper, max_chars) if len(p) >= min_chars]  # fmt: skip
        if items:
            papers.append(items)
    return papers


def interleave(papers: list[list[dict]], limit: int | None) -> list[dict]:
    """Round-robin over the papers (first item of each, then the second, ...), up to `limit`."""
    out = []
    for k in range(max(map(len, papers), default=0)):
        out += [items[k] for items in papers if k < len(items)]
    return out if limit is None else out[:limit]


def write_prompts(path: str, texts: list[str], items: list[dict]) -> None:
    """--prompts-only: the prompts as text, one {"prompt", "paper", "source"} line each."""
    with open(path + ".tmp", "w", encoding="utf-8") as out:
        for text, item in zip(texts, items):
            out.write(json.dumps({"prompt": text, "paper": item["paper"], "source": item["source"]}) + "\n")
    os.replace(path + ".tmp", path)
    print(f"wrote {len(items)} prompts from {len({i['paper'] for i in items})} papers to {path}")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="checkpoint whose final head answers (the one whose exits are tuned)")
    p.add_argument("--output", required=True, help="jsonl file to write")
    p.add_argument("--splits", nargs="+", choices=SPLITS, default=["train", "val"],
                   help="aclsum splits whose papers give prompts (test has the sweep's)")  # fmt: skip
    p.add_argument("--max-prompts", type=int, help="stop after this many prompts (default: every passage)")
    p.add_argument("--skip-prompts", type=int, default=0,
                   help="start after this many prompts (held out for calibration: those after a corpus's)")  # fmt: skip
    p.add_argument("--prompts-only", action="store_true",
                   help="write the prompts alone, no answers ({\"prompt\", \"paper\", \"source\"} lines: "
                   "calibrate_thresholds.py --prompts)")  # fmt: skip
    p.add_argument("--max-prompt-chars", type=int, default=1000, help="characters of a passage or abstract")
    p.add_argument("--min-prompt-chars", type=int, default=200, help="shorter passages are skipped (default 200)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--one-line", action="store_true",
                   help="stop each answer at its first newline, as the sweep does")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--bf16", action="store_true", help="decode in bf16")
    p.add_argument("--device", default="cpu")
    return p


def run(args: argparse.Namespace) -> None:
    import torch
    from ee_sweep import prompt_text
    from prepare_aclsum_corpus import aclsum_dir

    from megatron.early_exit import load_checkpoint
    from megatron.early_exit.checkpointing import load_tokenizer_from, read_meta
    from megatron.early_exit.inference import EarlyExitEngine, GenerationSettings

    if args.max_prompts is not None and args.max_prompts < 1:
        raise ValueError(f"--max-prompts must be >= 1, got {args.max_prompts}")
    if args.skip_prompts < 0:
        raise ValueError(f"--skip-prompts must be >= 0, got {args.skip_prompts}")
    for name in ("max_prompt_chars", "max_new_tokens", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    out_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(out_dir):
        raise ValueError(f"--output: no such directory: {out_dir}")
    src = aclsum_dir()
    exclude = split_ids(src, [s for s in SPLITS if s not in args.splits])
    limit = None if args.max_prompts is None else args.skip_prompts + args.max_prompts
    papers = paper_prompts(src, exclude, args.max_prompt_chars, args.min_prompt_chars)
    items = interleave(papers, limit)[args.skip_prompts :]
    if not items:
        raise ValueError(f"--splits {' '.join(args.splits)}: no papers with text to prompt from after --skip-prompts")
    if args.prompts_only:  # the prompts need the tokenizer alone (its chat template), not the weights
        model, tokenizer = None, load_tokenizer_from(read_meta(args.load))
    else:
        model, tokenizer = load_checkpoint(args.load, device=args.device, dtype=torch.bfloat16 if args.bf16 else None)
    if tokenizer is None:
        raise ValueError(f"--load: {args.load} has no tokenizer (the prompts are text)")
    texts = [prompt_text(tokenizer, item["content"], item["source"]) for item in items]  # the sweep's request
    if args.prompts_only:
        write_prompts(args.output, texts, items)
        return
    engine = EarlyExitEngine(model, tokenizer)
    stops = ("\n",) if args.one_line else ()
    settings = GenerationSettings("full", max_new_tokens=args.max_new_tokens, stop_strings=stops)
    print(f"{len(items)} prompts from {len({i['paper'] for i in items})} papers ({', '.join(args.splits)})", flush=True)
    start, generated = time.time(), 0
    tmp = args.output + ".tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as out:
            for b in range(0, len(items), args.batch_size):
                batch = list(range(b, min(b + args.batch_size, len(items))))
                prompts = [tokenizer.tokenize(texts[i]) for i in batch]
                for i, prompt, r in zip(batch, prompts, engine.generate(prompts, settings)):
                    answer = tokenizer.detokenize(r.tokens)
                    record = {"text": texts[i] + answer, "prompt": texts[i], "tokens": prompt + r.tokens,
                              "loss_mask": [0] * len(prompt) + [1] * len(r.tokens),
                              "paper": items[i]["paper"],
                              "source": items[i]["source"], "answer": r.text,
                              "finish_reason": r.finish_reason}  # fmt: skip
                    out.write(json.dumps(record) + "\n")
                    generated += len(r.tokens)
                rate = generated / max(time.time() - start, 1e-9)
                print(f" {batch[-1] + 1}/{len(items)} prompts, {generated} tokens ({rate:.0f} tok/s)", flush=True)
        os.replace(tmp, args.output)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    print(f"wrote {len(items)} documents ({generated} generated tokens) to {args.output}")


def main(argv: list[str] | None = None) -> None:
    run_tool(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    main()

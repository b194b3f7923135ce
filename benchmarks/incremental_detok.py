#!/usr/bin/env python
"""Streaming text per decode step: re-detokenizing the whole sequence vs incremental.

    python benchmarks/incremental_detok.py                 # GPT-2 BPE, 2,000 generated tokens
    python benchmarks/incremental_detok.py --tokens 8000

The server streams each step's new text. Before, it decoded the prompt and every generated
token again at every step (and once more for stop strings), so one step cost time in
proportion to the whole output and a long generation cost its square; now each sequence keeps
prefix/read offsets (`inference.acceptance.IncrementalText`, vLLM's scheme) and a step decodes
only the few tokens since the last stable point. The token stream is real text (aclsum papers
tokenized with GPT-2's BPE), fed one token per step, on the thread that would serve everyone.
Both ways are timed alternately, best of --repeats, and must give the same text.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.early_exit.inference.acceptance import IncrementalText  # noqa: E402
from megatron.early_exit.tokenizer import build_tokenizer  # noqa: E402


def corpus_ids(tok, count: int) -> list[int]:
    import glob
    import importlib.util
    import json

    spec = importlib.util.find_spec("aclsum")
    root = list(spec.submodule_search_locations)[0]
    ids: list[int] = []
    for path in sorted(glob.glob(os.path.join(root, "**", "paper_jsons", "*.json"), recursive=True)):
        with open(path) as f:
            paper = json.load(f)
        text = json.dumps(paper)[:20000]  # any real English text with punctuation and unicode
        ids += tok.tokenize(text)
        if len(ids) >= count:
            break
    return ids[:count]


def whole_each_step(tok, prompt: list[int], generated: list[int]) -> tuple[float, str]:
    """The old way: at each step, the text of prompt + everything so far, minus the prompt's text."""
    start, sent = time.perf_counter(), ""
    prompt_text = tok.detokenize(prompt)
    for n in range(1, len(generated) + 1):
        text = tok.detokenize(prompt + generated[:n])[len(prompt_text) :]
        sent = text if not text.endswith("\ufffd") else sent
    return time.perf_counter() - start, tok.detokenize(prompt + generated)[len(prompt_text) :]


def incremental(tok, prompt: list[int], generated: list[int]) -> tuple[float, str]:
    start = time.perf_counter()
    detok = IncrementalText(tok)
    state = detok.start(prompt)
    for tid in generated:
        detok.feed(state, [tid])
    return time.perf_counter() - start, state.text + state.tail


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=2000, help="generated tokens")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    tok = build_tokenizer("GPT2BPETokenizer")
    ids = corpus_ids(tok, a.prompt_tokens + a.tokens)
    prompt, generated = ids[: a.prompt_tokens], ids[a.prompt_tokens :]
    best = {"whole sequence each step": float("inf"), "incremental": float("inf")}
    texts = {}
    for _ in range(a.repeats):
        for name, fn in (("whole sequence each step", whole_each_step), ("incremental", incremental)):
            sec, texts[name] = fn(tok, prompt, generated)
            best[name] = min(best[name], sec)
    same = texts["whole sequence each step"] == texts["incremental"]
    print(f"GPT-2 BPE, prompt {len(prompt)} tokens, {len(generated)} generated tokens, one per step; same text: {same}")
    for name, sec in best.items():
        print(f"  {name:26s} {1000 * sec / len(generated):8.3f} ms/step  {sec:7.3f} s in all")
    print(f"  ratio: {best['whole sequence each step'] / best['incremental']:.1f}x less detokenization time per step")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Tokenise a jsonl corpus into Megatron's .bin/.idx format (megatron-core's builder).

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \
        --tokenizer-type GPT2BPETokenizer --append-eod --workers 2

writes `data/corpus_text_document.{bin,idx}` (one document per jsonl line; `--json-keys`
selects the fields, default `text`), readable by `--data-path data/corpus_text_document`.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_TOKENIZER = None
_KEYS: list[str] = []
_APPEND_EOD = False


def _init_worker(tok_args: dict, keys: list[str], append_eod: bool) -> None:
    global _TOKENIZER, _KEYS, _APPEND_EOD
    from megatron.early_exit.tokenizer import build_tokenizer

    _TOKENIZER = build_tokenizer(**tok_args)
    _KEYS, _APPEND_EOD = keys, append_eod


def _encode(item: tuple[int, str]) -> tuple[int, dict[str, list[int]] | str, int]:
    """(line number, raw line) -> (line number, {key: ids} or an error message, bytes)."""
    lineno, line = item
    try:
        doc = json.loads(line)
    except json.JSONDecodeError as e:
        return lineno, f"invalid JSON ({e.msg})", len(line)
    out = {}
    for key in _KEYS:
        if not isinstance(doc, dict) or key not in doc or not isinstance(doc[key], str):
            return lineno, f"no string field {key!r}", len(line)
        ids = _TOKENIZER.tokenize(doc[key])
        if _APPEND_EOD:
            ids.append(_TOKENIZER.eod)
        out[key] = ids
    return lineno, out, len(line)


def _lines(path: str):
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                yield lineno, line


def preprocess(args: argparse.Namespace) -> list[str]:
    import numpy as np
    import torch

    from megatron.early_exit.data.datasets import import_core_datasets
    from megatron.early_exit.tokenizer import build_tokenizer

    tok_args = dict(
        tokenizer_type=args.tokenizer_type,
        vocab_file=args.vocab_file,
        merge_file=args.merge_file,
        tokenizer_model=args.tokenizer_model,
        vocab_size=args.vocab_size,
    )
    vocab_size = build_tokenizer(**tok_args).vocab_size  # fail fast on a bad tokenizer flag
    import_core_datasets()
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder, get_bin_path, get_idx_path

    dtype = np.uint16 if vocab_size < 65500 else np.int32
    os.makedirs(os.path.dirname(os.path.abspath(args.output_prefix)), exist_ok=True)
    prefixes = {k: f"{args.output_prefix}_{k}_document" for k in args.json_keys}
    builders = {k: IndexedDatasetBuilder(get_bin_path(p) + ".tmp", dtype=dtype) for k, p in prefixes.items()}
    start = time.time()
    docs = tokens = nbytes = 0
    init = (tok_args, args.json_keys, args.append_eod)
    if args.workers > 1:
        pool = multiprocessing.Pool(args.workers, initializer=_init_worker, initargs=init)
        results = pool.imap(_encode, _lines(args.input), chunksize=args.chunk_size)
    else:
        pool = None
        _init_worker(*init)
        results = map(_encode, _lines(args.input))
    try:
        for lineno, encoded, size in results:
            if isinstance(encoded, str):
                raise ValueError(f"{args.input}:{lineno}: {encoded}")
            for key, ids in encoded.items():
                builders[key].add_document(torch.tensor(ids, dtype=torch.long), [len(ids)])
                tokens += len(ids)
            docs += 1
            nbytes += size
            if docs % args.log_interval == 0:
                elapsed = time.time() - start
                print(
                    f" processed {docs} documents ({docs / elapsed:.0f} docs/s, {nbytes / elapsed / 2**20:.2f} MB/s)",
                    flush=True,
                )
    finally:
        if pool is not None:
            pool.terminate()
    outputs = []
    for key, builder in builders.items():
        prefix = prefixes[key]
        builder.finalize(get_idx_path(prefix))
        os.replace(get_bin_path(prefix) + ".tmp", get_bin_path(prefix))
        outputs.append(prefix)
    elapsed = time.time() - start
    print(
        f"done: {docs} documents, {tokens} tokens in {elapsed:.1f}s -> " + ", ".join(f"{p}.bin/.idx" for p in outputs)
    )
    return outputs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="jsonl file, one document per line")
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--json-keys", nargs="+", default=["text"])
    p.add_argument(
        "--tokenizer-type",
        required=True,
        choices=["GPT2BPETokenizer", "SentencePieceTokenizer", "HuggingFaceTokenizer", "NullTokenizer"],
    )
    p.add_argument("--vocab-file")
    p.add_argument("--merge-file")
    p.add_argument("--tokenizer-model")
    p.add_argument("--vocab-size", type=int)
    p.add_argument("--append-eod", action="store_true")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--chunk-size", type=int, default=8)
    p.add_argument("--log-interval", type=int, default=1000)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if not os.path.isfile(args.input):
        sys.stderr.write(f"error: --input: no such file: {args.input}\n")
        sys.exit(2)
    if args.workers < 1:
        sys.stderr.write("error: --workers must be >= 1\n")
        sys.exit(2)
    try:
        preprocess(args)
    except (ValueError, OSError) as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(2)


if __name__ == "__main__":
    main()

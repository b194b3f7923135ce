#!/usr/bin/env python
"""Tokenise a jsonl corpus into Megatron's .bin/.idx format (megatron-core's builder).

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \
        --tokenizer-type GPT2BPETokenizer --append-eod --workers 2

writes `data/corpus_text_document.{bin,idx}` (one document per jsonl line; `--json-keys`
selects the fields, default `text`; a field holding a list of token ids is taken as they are,
checked against the vocabulary), readable by `--data-path data/corpus_text_document`, and
beside them `data/corpus_text_document.tokenizer.json`: the tokenizer that made them (type,
vocabulary size, end-of-document id, fingerprint) and the document and token counts, which
training checks against its own tokenizer. Errors name `file:line`; a failed run leaves no
partial output.

`--loss-mask-key FIELD` (one `--json-keys` field): FIELD holds a 0/1 per token of that field
(1: the token is a target the loss counts, as the answer of a prompt and answer; the end of
document `--append-eod` adds gets 0), written beside the tokens as
`<prefix>_<key>_document_loss_mask.{bin,idx}` (uint8, one document per line): training and the
activation cache take it with `--data-loss-mask` (a position counts where its label does).
`tools/make_distillation_corpus.py` writes such a field, `loss_mask`.
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
_MASK_KEY: str | None = None
MASK = "\0loss_mask"  # the builders' key of the loss mask (no JSON key is one)


def _init_worker(tok_args: dict, keys: list[str], append_eod: bool, mask_key: str | None = None) -> None:
    global _TOKENIZER, _KEYS, _APPEND_EOD, _MASK_KEY
    from megatron.early_exit.tokenizer import build_tokenizer

    _TOKENIZER = build_tokenizer(**tok_args)
    _KEYS, _APPEND_EOD, _MASK_KEY = keys, append_eod, mask_key


def _encode(item: tuple[int, str]) -> tuple[int, dict[str, list[int]] | str, int]:
    """(line number, raw line) -> (line number, {key: ids} or an error message, bytes)."""
    lineno, line = item
    try:
        doc = json.loads(line)
    except json.JSONDecodeError as e:
        return lineno, f"invalid JSON ({e.msg})", len(line)
    out = {}
    for key in _KEYS:
        value = doc.get(key) if isinstance(doc, dict) else None
        if isinstance(value, list):  # already token ids (tools/make_distillation_corpus.py): taken as they are
            vocab = _TOKENIZER.vocab_size
            if not value or not all(type(i) is int and 0 <= i < vocab for i in value):
                return lineno, f"field {key!r} is not a non-empty list of token ids in 0..{vocab - 1}", len(line)
            ids = list(value)
        elif not isinstance(value, str):
            return lineno, f"no string field {key!r} (nor a list of token ids)", len(line)
        else:
            try:
                ids = _TOKENIZER.tokenize(value)
            except Exception as e:  # a tokenizer's own failure: report the line, not a traceback
                return lineno, f"the tokenizer failed on field {key!r}: {type(e).__name__}: {e}", len(line)
        if _MASK_KEY is not None:  # one key (checked in `preprocess`): its tokens' mask
            mask = doc.get(_MASK_KEY)
            if not isinstance(mask, list) or len(mask) != len(ids) or not all(m in (0, 1) for m in mask):
                why = f"field {_MASK_KEY!r} is not a list of 0/1, one per token of {key!r} ({len(ids)})"
                return lineno, why, len(line)
            out[MASK] = [int(m) for m in mask] + [0] * _APPEND_EOD
        if _APPEND_EOD:
            ids.append(_TOKENIZER.eod)
        out[key] = ids
    return lineno, out, len(line)


def _lines(path: str):
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid UTF-8 (byte {e.start})") from None
            if line.strip():
                yield lineno, line


def preprocess(args: argparse.Namespace) -> list[str]:
    import numpy as np

    from megatron.early_exit.data.datasets import import_core_datasets, loss_mask_prefix
    from megatron.early_exit.tokenizer import build_tokenizer

    tok_args = dict(
        tokenizer_type=args.tokenizer_type,
        vocab_file=args.vocab_file,
        merge_file=args.merge_file,
        tokenizer_model=args.tokenizer_model,
        vocab_size=args.vocab_size,
    )
    tokenizer = build_tokenizer(**tok_args)  # fail fast on a bad tokenizer flag
    vocab_size = tokenizer.vocab_size
    import_core_datasets()
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder, get_bin_path, get_idx_path

    dtype = np.uint16 if vocab_size < 65500 else np.int32
    if args.loss_mask_key is not None and len(args.json_keys) != 1:
        raise ValueError(f"--loss-mask-key {args.loss_mask_key}: one --json-keys field, got {len(args.json_keys)}")
    os.makedirs(os.path.dirname(os.path.abspath(args.output_prefix)), exist_ok=True)
    prefixes = {k: f"{args.output_prefix}_{k}_document" for k in args.json_keys}
    if args.loss_mask_key is not None:
        prefixes[MASK] = loss_mask_prefix(prefixes[args.json_keys[0]])  # where --data-loss-mask reads it
    tmp = {k: get_bin_path(p) + ".tmp" for k, p in prefixes.items()}
    builders = {k: IndexedDatasetBuilder(tmp[k], dtype=np.uint8 if k == MASK else dtype) for k in prefixes}
    try:
        docs, tokens, largest = _fill(args, builders, tok_args)
        if docs == 0:
            raise ValueError(f"--input {args.input}: no documents (the file has no non-blank lines)")
        outputs = _finish(prefixes, builders, tmp, tokenizer, docs, tokens, largest)
    except BaseException:
        for k, p in prefixes.items():
            for path in (tmp[k], get_idx_path(p) + ".tmp"):
                if os.path.exists(path):
                    os.remove(path)
        raise
    counted = sum(n for k, n in tokens.items() if k != MASK)
    print(f"done: {docs} documents, {counted} tokens -> " + ", ".join(f"{p}.bin/.idx" for p in outputs))
    return outputs


def _fill(args, builders, tok_args) -> tuple[int, dict[str, int], dict[str, int]]:
    """Tokenize every line into the builders: (documents, tokens per key, largest id per key)."""
    import torch

    start = time.time()
    docs = nbytes = 0
    tokens = dict.fromkeys(builders, 0)
    largest = dict.fromkeys(builders, -1)
    init = (tok_args, args.json_keys, args.append_eod, args.loss_mask_key)
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
                tokens[key] += len(ids)
                largest[key] = max([largest[key], *ids])
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
    return docs, tokens, largest


def _finish(prefixes, builders, tmp, tokenizer, docs, tokens, largest) -> list[str]:
    """Write each index, rename the .bin/.idx pair into place, and write the tokenizer sidecar."""
    from megatron.core.datasets.indexed_dataset import get_bin_path, get_idx_path

    from megatron.early_exit.data.checks import tokenizer_info, write_sidecar

    description = tokenizer_info(tokenizer)
    outputs = []
    for key, builder in builders.items():
        prefix = prefixes[key]
        builder.finalize(get_idx_path(prefix) + ".tmp")
        os.replace(tmp[key], get_bin_path(prefix))
        os.replace(get_idx_path(prefix) + ".tmp", get_idx_path(prefix))
        if key != MASK:  # the mask is no token corpus: no tokenizer sidecar
            write_sidecar(prefix, description, docs, tokens[key], largest[key])
        outputs.append(prefix)
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
    p.add_argument("--loss-mask-key", metavar="FIELD",
                   help="a field of 0/1 per token of the one --json-keys field: written as <prefix>_<key>_document"
                   "_loss_mask.{bin,idx}, which --data-loss-mask takes (1: the token is a target)")  # fmt: skip
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

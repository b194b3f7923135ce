"""Start-up checks of --data-path prefixes, before any work: file sizes, tokenizer, token ids.

Each `.bin/.idx` pair written by tools/preprocess_data.py has a sidecar `PREFIX.tokenizer.json`
naming the tokenizer that made it (type, vocabulary size, end-of-document id, a fingerprint of
its vocabulary) with the document and token counts and the largest id. A prefix made with a
different tokenizer than the run's is an error; one without a sidecar (made by Megatron-LM
itself) passes with a warning once its largest id (sampled) fits the model's vocabulary.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass

import numpy as np

SIDECAR_SUFFIX = ".tokenizer.json"
SIDECAR_FORMAT = "megatron-early-exit-data"
_INDEX_HEADER = b"MMIDIDX\x00\x00"
_HEADER_BYTES = len(_INDEX_HEADER) + 8 + 1 + 8 + 8
_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16}
SCAN_ALL_TOKENS = 1 << 24  # below this many tokens the whole .bin is scanned for its largest id
SAMPLE_CHUNKS, SAMPLE_CHUNK_TOKENS = 64, 1 << 16


@dataclass
class IndexInfo:
    dtype: type
    sequences: int
    documents: int
    tokens: int


def read_index(prefix: str) -> IndexInfo:
    """Read PREFIX.idx and check that it and PREFIX.bin have the sizes it implies; a ValueError
    naming the damaged file otherwise."""
    idx, bin_path = prefix + ".idx", prefix + ".bin"
    size = os.path.getsize(idx)
    with open(idx, "rb") as f:
        head = f.read(_HEADER_BYTES)
        if len(head) < _HEADER_BYTES or not head.startswith(_INDEX_HEADER):
            raise ValueError(f"--data-path: {idx} is not a Megatron index file (bad or truncated header)")
        version, code, seqs, docs = struct.unpack("<QBQQ", head[len(_INDEX_HEADER) :])
        if version != 1 or code not in _DTYPES:
            raise ValueError(f"--data-path: {idx} has an unknown version ({version}) or dtype code ({code})")
        expected = _HEADER_BYTES + 12 * seqs + 8 * docs
        if size not in (expected, expected + seqs):  # + one mode byte per sequence when multimodal
            raise ValueError(f"--data-path: {idx} is damaged: {size} bytes where its header implies {expected}")
        lengths = np.frombuffer(f.read(4 * seqs), dtype=np.int32)
    tokens = int(lengths.sum(dtype=np.int64))
    if seqs == 0 or tokens == 0:
        raise ValueError(f"--data-path: {idx} holds no tokens (an empty corpus?)")
    itemsize = np.dtype(_DTYPES[code]).itemsize
    actual = os.path.getsize(bin_path)
    if actual != tokens * itemsize:
        raise ValueError(
            f"--data-path: {bin_path} is damaged: {actual} bytes where {idx} implies {tokens * itemsize} "
            f"({tokens} tokens)"
        )
    return IndexInfo(_DTYPES[code], seqs, max(docs - 1, 0), tokens)


def max_token_id(prefix: str, info: IndexInfo) -> int:
    """The largest id in PREFIX.bin: all of it when small, else SAMPLE_CHUNKS evenly spread chunks."""
    data = np.memmap(prefix + ".bin", dtype=info.dtype, mode="r")
    if info.tokens <= SCAN_ALL_TOKENS:
        return int(data.max())
    starts = np.linspace(0, info.tokens - SAMPLE_CHUNK_TOKENS, SAMPLE_CHUNKS).astype(np.int64)
    return int(max(data[s : s + SAMPLE_CHUNK_TOKENS].max() for s in starts))


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of what every id means (each id's text) and of the vocabulary size and eod:
    equal for the same tokenizer however it was loaded (flags, a checkpoint's copy)."""
    h = hashlib.sha256(f"{tokenizer.vocab_size}:{tokenizer.eod}".encode())
    for i in range(tokenizer.vocab_size):
        h.update(b"\x00" + tokenizer.detokenize([i]).encode("utf-8", errors="replace"))
    return h.hexdigest()[:16]


def tokenizer_info(tokenizer) -> dict:
    return {
        "type": type(tokenizer).__name__,
        "vocab_size": int(tokenizer.vocab_size),
        "eod": int(tokenizer.eod),
        "fingerprint": tokenizer_fingerprint(tokenizer),
    }


def describe(info: dict) -> str:
    return f"{info['type']} (vocabulary {info['vocab_size']}, eod {info['eod']}, fingerprint {info['fingerprint']})"


def write_sidecar(prefix: str, tokenizer_description: dict, documents: int, tokens: int, max_id: int) -> str:
    path = prefix + SIDECAR_SUFFIX
    body = {
        "format": SIDECAR_FORMAT,
        "tokenizer": tokenizer_description,
        "documents": documents,
        "tokens": tokens,
        "max_token_id": max_id,
    }
    with open(path, "w") as f:
        json.dump(body, f, indent=2)
        f.write("\n")
    return path


def read_sidecar(prefix: str) -> dict | None:
    path = prefix + SIDECAR_SUFFIX
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            body = json.load(f)
        if body.get("format") != SIDECAR_FORMAT:
            raise ValueError("not a data sidecar")
        for key in ("type", "vocab_size", "eod", "fingerprint"):
            body["tokenizer"][key]  # noqa: B018 - presence check
        return body
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"--data-path: corrupt sidecar {path}: {e}") from None


def check_prefix(prefix: str, tokenizer, model_vocab_size: int, run_info: dict | None = None) -> str | None:
    """Check one prefix; raise a one-line ValueError, or return a warning (None when clean)."""
    info = read_index(prefix)
    sidecar = read_sidecar(prefix)
    if sidecar is not None:
        made_with = sidecar["tokenizer"]
        run_info = run_info or tokenizer_info(tokenizer)
        same = all(made_with[k] == run_info[k] for k in ("vocab_size", "eod", "fingerprint"))
        if not same:
            raise ValueError(
                f"--data-path {prefix} was tokenized with {describe(made_with)}, but this run's tokenizer is "
                f"{describe(run_info)}: re-run tools/preprocess_data.py with the run's tokenizer, or change "
                "--tokenizer-type/--vocab-file/--tokenizer-model"
            )
        largest = int(sidecar.get("max_token_id", made_with["vocab_size"] - 1))
    else:
        largest = max_token_id(prefix, info)
    if largest >= model_vocab_size:
        raise ValueError(
            f"--data-path {prefix} has token id {largest}, beyond the model's vocabulary of {model_vocab_size}"
        )
    if sidecar is None:
        return (
            f"warning: --data-path {prefix} has no {SIDECAR_SUFFIX} sidecar, so its tokenizer cannot be checked "
            f"(largest token id {largest} fits the vocabulary of {model_vocab_size})"
        )
    return None


def check_data_paths(prefixes: list[str], tokenizer, model_vocab_size: int) -> list[str]:
    """Check every prefix against the run's tokenizer and the model's vocabulary; returns the warnings."""
    run_info = None
    warnings = []
    for prefix in prefixes:
        if run_info is None and os.path.exists(prefix + SIDECAR_SUFFIX):
            run_info = tokenizer_info(tokenizer)
        warning = check_prefix(prefix, tokenizer, model_vocab_size, run_info)
        if warning:
            warnings.append(warning)
    return warnings

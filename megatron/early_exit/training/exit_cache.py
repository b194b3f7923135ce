"""The exit-activation cache: what the frozen backbone computes for EE-Tuning, stored once.

EE-Tuning freezes the backbone, so the inputs of the exit heads and the final head's
output never change between epochs. `tools/checkpoint/cache_exit_activations.py` runs the
backbone once over a corpus and writes, per split (`train/`, `valid/`):

    DIR/manifest.json
    DIR/<split>/hidden_<layer>.npy   [num_seqs, seq_len, hidden]  exit INPUT (what the exit reads)
    DIR/<split>/topk_ids.npy         [num_seqs, seq_len, k] int32  final head's top-k, best first
    DIR/<split>/topk_logprobs.npy    [num_seqs, seq_len, k] fp32   their full-vocabulary log-probs
    DIR/<split>/labels.npy           [num_seqs, seq_len] int32
    DIR/<split>/loss_mask.npy        [num_seqs, seq_len] uint8

Rows are whole sequences (positions 0..seq_len-1), so exits that contain a transformer
block can attend over the sequence. bf16 has no numpy dtype: it is stored as int16 bits.
The manifest's `fingerprint` hashes the model config and every backbone weight (everything
but `exits.*`); tuning refuses a cache whose fingerprint or exits differ from the checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np
import torch

MANIFEST = "manifest.json"
FORMAT = "megatron-early-exit-activation-cache"
STORAGE = {"bf16": np.int16, "fp16": np.float16, "fp32": np.float32}
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# Fields that shape only the exit heads: a cache holds the backbone's states at the exits'
# depths (checked against `exit_layer_nums` and `pre_exit` on their own), so heads of any
# structure can be tuned from one cache.
EXIT_HEAD_FIELDS = (
    "use_exit_norm",
    "use_exit_mlp",
    "use_exit_block",
    "untie_exit_output_weights",
    "exit_layer_temperature",
    "use_exit_confidence_head",
    "exit_confidence_input",
    "exit_confidence_hidden_size",
)


def backbone_fingerprint(config, weights: dict[str, torch.Tensor], legacy: bool = False) -> str:
    """sha256 of the model config without the exit-head fields and of every non-exit weight.
    `legacy`: the first format's, which hashed the head fields too (only the exit temperatures
    left out, and the probe's hidden size, which came later); caches written before the change
    carry it."""
    skip = ("exit_layer_temperature", "exit_confidence_hidden_size") if legacy else EXIT_HEAD_FIELDS
    cfg = {k: v for k, v in config.to_dict().items() if k not in skip}
    h = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode())
    for name in sorted(weights):
        if name.startswith("exits."):
            continue
        t = weights[name].detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def to_storage(t: torch.Tensor, dtype: str) -> np.ndarray:
    """A tensor -> numpy array in the cache's storage dtype (bf16 as int16 bits)."""
    t = t.detach().to("cpu", TORCH_DTYPES[dtype]).contiguous()
    return t.view(torch.int16).numpy() if dtype == "bf16" else t.numpy()


def from_storage(a: np.ndarray, dtype: str) -> torch.Tensor:
    """The inverse of `to_storage` (copies, so the memory map is only read)."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.view(torch.bfloat16) if dtype == "bf16" else t


@dataclass
class SplitWriter:
    """Memory-mapped .npy files of one split, filled row by row."""

    arrays: dict[str, np.ndarray]
    dtype: str
    rows: int = 0

    @classmethod
    def create(cls, directory: str, exits: list[int], shape: tuple[int, int, int], top_k: int, dtype: str):
        n, s, hidden = shape
        os.makedirs(directory, exist_ok=True)
        specs = {f"hidden_{e}": ((n, s, hidden), STORAGE[dtype]) for e in exits}
        specs.update(
            topk_ids=((n, s, top_k), np.int32),
            topk_logprobs=((n, s, top_k), np.float32),
            labels=((n, s), np.int32),
            loss_mask=((n, s), np.uint8),
        )
        arrays = {
            k: np.lib.format.open_memmap(os.path.join(directory, f"{k}.npy"), mode="w+", dtype=dt, shape=shp)
            for k, (shp, dt) in specs.items()
        }
        return cls(arrays, dtype)

    def write(self, hidden: dict[int, torch.Tensor], top_lp, top_ids, labels, loss_mask) -> None:
        """One micro-batch: hidden {exit: [b, s, h]}, top-k [b, s, k], labels / mask [b, s]."""
        b = labels.shape[0]
        rows = slice(self.rows, self.rows + b)
        for e, h in hidden.items():
            self.arrays[f"hidden_{e}"][rows] = to_storage(h, self.dtype)
        self.arrays["topk_ids"][rows] = top_ids.cpu().numpy().astype(np.int32)
        self.arrays["topk_logprobs"][rows] = top_lp.float().cpu().numpy()
        self.arrays["labels"][rows] = labels.cpu().numpy().astype(np.int32)
        self.arrays["loss_mask"][rows] = loss_mask.cpu().numpy().astype(np.uint8)
        self.rows += b

    def close(self) -> None:
        for a in self.arrays.values():
            a.flush()


class CachedSplit:
    """One split of a cache, read through memory maps; `batch(indices)` gives tensors."""

    def __init__(self, directory: str, exits: list[int], dtype: str) -> None:
        def load(name):
            return np.load(os.path.join(directory, f"{name}.npy"), mmap_mode="r")

        self.exits, self.dtype = exits, dtype
        self.hidden = {e: load(f"hidden_{e}") for e in exits}
        self.topk_ids, self.topk_logprobs = load("topk_ids"), load("topk_logprobs")
        self.labels, self.loss_mask = load("labels"), load("loss_mask")

    def __len__(self) -> int:
        return self.labels.shape[0]

    def batch(self, indices, device="cpu") -> dict:
        """Rows `indices` (sorted for sequential reads): hidden {exit: [b, s, h]}, the rest [b, s(, k)]."""
        idx = np.asarray(indices)

        def take(a):
            return torch.from_numpy(np.ascontiguousarray(a[idx])).to(device)

        return {
            "hidden": {e: from_storage(h[idx], self.dtype).to(device) for e, h in self.hidden.items()},
            "topk_ids": take(self.topk_ids).long(),
            "topk_logprobs": take(self.topk_logprobs),
            "labels": take(self.labels).long(),
            "loss_mask": take(self.loss_mask).float(),
        }


def write_manifest(directory: str, manifest: dict) -> None:
    tmp = os.path.join(directory, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"format": FORMAT, **manifest}, f, indent=2)
    os.replace(tmp, os.path.join(directory, MANIFEST))


def read_manifest(directory: str) -> dict:
    path = os.path.join(directory, MANIFEST)
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--exit-activation-cache {directory}: no readable {MANIFEST} ({e})") from None
    if manifest.get("format") != FORMAT:
        raise ValueError(f"--exit-activation-cache {directory}: {MANIFEST} is not an exit-activation cache")
    return manifest


def check_manifest(directory: str, manifest: dict, config, fingerprint: str | tuple[str, ...]) -> None:
    """Refuse (one line naming DIR) a cache made from another backbone or other exits.
    `fingerprint`: the checkpoint's, or every form of it a cache may carry."""
    accepted = (fingerprint,) if isinstance(fingerprint, str) else tuple(fingerprint)
    exits = [int(e) for e in manifest["exits"]]
    if exits != list(config.exit_layer_nums) or bool(manifest["pre_exit"]) != config.pre_exit:
        raise ValueError(
            f"--exit-activation-cache {directory}: cached exits {exits} (pre_exit={manifest['pre_exit']}) "
            f"do not match the checkpoint's {config.exit_layer_nums} (pre_exit={config.pre_exit})"
        )
    if manifest["fingerprint"] not in accepted:
        raise ValueError(
            f"--exit-activation-cache {directory}: made from another model (backbone fingerprint "
            f"{manifest['fingerprint'][:12]} != the checkpoint's {accepted[0][:12]}); rebuild it with "
            "tools/checkpoint/cache_exit_activations.py"
        )

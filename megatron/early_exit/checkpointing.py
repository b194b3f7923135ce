"""Checkpoints: one directory per iteration, a `latest` marker, atomic writes.

    SAVE/
      latest_checkpointed_iteration.txt      # Megatron's marker: the iteration number
      iter_0000030/
        config.json                          # model config, tokenizer spec, iteration, args
        model.safetensors                    # full (unsharded) weights, readable without us
        tokenizer/                           # the tokenizer's own files
        optimizer.pt                         # optimizer state (tensors only, weights_only load)
        training_state.pt                    # LR schedule, RNG states, consumed samples

Each iteration directory is written under a temporary name and renamed when complete,
and the marker is replaced atomically afterwards, so a crash never leaves a half-written
checkpoint as the latest one, and nothing saved before is touched.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from megatron.early_exit.config import ModelConfig

FORMAT = "megatron-early-exit"
FORMAT_VERSION = 1
MARKER = "latest_checkpointed_iteration.txt"
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
OPTIM_FILE = "optimizer.pt"
STATE_FILE = "training_state.pt"
THRESHOLDS_FILE = "early_exit_thresholds.json"  # calibrated per-exit thresholds (tools/eval/calibrate_thresholds.py)


def iteration_dir(save_dir: str, iteration: int) -> str:
    return os.path.join(save_dir, f"iter_{iteration:07d}")


def _atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    save_dir: str,
    iteration: int,
    model: torch.nn.Module | None,
    tokenizer,
    *,
    weights: dict[str, torch.Tensor] | None = None,
    model_config: ModelConfig | None = None,
    optimizer_state: dict | None = None,
    scheduler=None,
    consumed_samples: int = 0,
    args: dict[str, Any] | None = None,
    rng_states: list | None = None,
    extra_state: dict[str, Any] | None = None,
) -> str:
    """Write iteration `iteration` atomically and point the marker at it; returns its path.

    Give either a single-device `model`, or the full `weights` + `model_config` gathered
    from a parallel layout. `optimizer_state` is keyed by parameter name (see
    parallel/state_dict.py) so that any layout can load it.
    """
    if model is not None:
        weights = {k: v.detach() for k, v in model.named_parameters()}
        model_config = model.config
    os.makedirs(save_dir, exist_ok=True)
    final = iteration_dir(save_dir, iteration)
    tmp = f"{final}.tmp-{os.getpid()}"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    weights = {k: v.detach().to("cpu").contiguous() for k, v in weights.items()}
    save_file(weights, os.path.join(tmp, MODEL_FILE), metadata={"format": FORMAT})
    tok_spec = tokenizer.save(os.path.join(tmp, "tokenizer")) if tokenizer is not None else None
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "iteration": iteration,
        "model": model_config.to_dict(),
        "tokenizer": tok_spec,
        "consumed_train_samples": consumed_samples,
        "args": _jsonable(args or {}),
    }
    with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
        json.dump(meta, f, indent=2)
    if optimizer_state is not None:
        torch.save(optimizer_state, os.path.join(tmp, OPTIM_FILE))
    state = {
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": rng_states if rng_states is not None else [rng_state()],
        "consumed_train_samples": consumed_samples,
        "iteration": iteration,
        "extra": extra_state or {},
    }
    torch.save(state, os.path.join(tmp, STATE_FILE))
    if os.path.exists(final):  # re-saving the same iteration: replace it
        shutil.rmtree(final)
    os.rename(tmp, final)
    _atomic_write_text(os.path.join(save_dir, MARKER), f"{iteration}\n")
    return final


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        try:
            json.dumps(v)
            out[k] = v
        except TypeError:
            out[k] = str(v)
    return out


def resolve_checkpoint_dir(path: str) -> str:
    """A save directory (follows its marker) or an iteration directory -> the iteration dir."""
    if not os.path.isdir(path):
        raise ValueError(f"--load: no such checkpoint directory: {path}")
    if os.path.exists(os.path.join(path, CONFIG_FILE)):
        return path
    marker = os.path.join(path, MARKER)
    if not os.path.exists(marker):
        raise ValueError(f"--load: {path} has neither {MARKER} nor {CONFIG_FILE}")
    text = open(marker).read().strip()
    if not text.isdigit():
        raise ValueError(f"--load: corrupt marker {marker}: {text!r} is not an iteration number")
    it_dir = iteration_dir(path, int(text))
    if not os.path.isdir(it_dir):
        raise ValueError(f"--load: {marker} points to {it_dir}, which does not exist")
    return it_dir


def has_checkpoint(path: str | None) -> bool:
    return bool(path) and (
        os.path.exists(os.path.join(path, MARKER)) or os.path.exists(os.path.join(path, CONFIG_FILE))
    )


@dataclass
class CheckpointMeta:
    directory: str
    iteration: int
    model_config: ModelConfig
    tokenizer_spec: dict | None
    consumed_train_samples: int
    args: dict[str, Any]


def read_meta(path: str) -> CheckpointMeta:
    it_dir = resolve_checkpoint_dir(path)
    cfg_path = os.path.join(it_dir, CONFIG_FILE)
    try:
        with open(cfg_path) as f:
            meta = json.load(f)
        if meta.get("format") != FORMAT:
            raise ValueError(f"{cfg_path} is not a {FORMAT} checkpoint config")
        model_config = ModelConfig.from_dict(meta["model"])
        model_config.validate()
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"--load: corrupt checkpoint config {cfg_path}: {e}") from None
    return CheckpointMeta(
        directory=it_dir,
        iteration=int(meta.get("iteration", 0)),
        model_config=model_config,
        tokenizer_spec=meta.get("tokenizer"),
        consumed_train_samples=int(meta.get("consumed_train_samples", 0)),
        args=meta.get("args", {}),
    )


def read_weights(it_dir: str) -> dict[str, torch.Tensor]:
    path = os.path.join(it_dir, MODEL_FILE)
    if not os.path.exists(path):
        raise ValueError(f"--load: missing weights file {path}")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"--load: corrupt weights file {path}: {e}") from None


def load_weights_into(model: torch.nn.Module, weights: dict[str, torch.Tensor], source: str, strict: bool = True):
    """Copy `weights` into `model`, checking names and shapes; errors name the checkpoint.

    With strict=False, only the model's own parameters must be present (a stage or a
    tuning model that lacks some of the checkpoint's modules ignores the rest), and
    parameters the checkpoint lacks are returned as `missing` instead of raising.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    if strict and (missing or unexpected):
        raise ValueError(
            f"--load: checkpoint {source} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for name, tensor in own.items():
        if name not in weights:
            continue
        if tuple(weights[name].shape) != tuple(tensor.shape):
            raise ValueError(
                f"--load: checkpoint {source}: {name} has shape {tuple(weights[name].shape)}, "
                f"the model expects {tuple(tensor.shape)}"
            )
        with torch.no_grad():
            tensor.copy_(weights[name])
    return missing


def load_training_state(it_dir: str) -> dict[str, Any]:
    """The saved LR schedule, RNG states (one per rank) and data position."""
    state_path = os.path.join(it_dir, STATE_FILE)
    try:
        return torch.load(state_path, weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"--load: missing {state_path} (use --finetune to load weights only)") from None
    except Exception as e:  # a truncated or foreign file: name it
        raise ValueError(f"--load: corrupt training state {state_path}: {e}") from None


def load_optimizer_file(it_dir: str) -> dict:
    """The name-keyed optimizer state ({param name: {key: tensor}})."""
    path = os.path.join(it_dir, OPTIM_FILE)
    try:
        state = torch.load(path, weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"--load: missing {path} (use --no-load-optim)") from None
    except Exception as e:
        raise ValueError(f"--load: corrupt optimizer state {path}: {e}") from None
    if not isinstance(state, dict):
        raise ValueError(f"--load: corrupt optimizer state {path}: not a dict")
    return state


def load_tokenizer_from(meta: CheckpointMeta):
    from megatron.early_exit.tokenizer import load_tokenizer

    if meta.tokenizer_spec is None:
        return None
    return load_tokenizer(os.path.join(meta.directory, "tokenizer"), meta.tokenizer_spec)


def read_calibrated_thresholds(path: str) -> dict | None:
    """The checkpoint's calibrated thresholds record ({"thresholds": {layer: t}, "measure", "delta",
    "epsilon", ...}), or None when it has none."""
    file = os.path.join(resolve_checkpoint_dir(path), THRESHOLDS_FILE)
    if not os.path.exists(file):
        return None
    try:
        with open(file) as f:
            record = json.load(f)
        return {**record, "thresholds": {int(k): float(v) for k, v in record["thresholds"].items()}}
    except (OSError, json.JSONDecodeError, KeyError, AttributeError, ValueError) as e:
        raise ValueError(f"--load: corrupt {file}: {e}") from None


def load_checkpoint(path: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Load any saved checkpoint onto one device for inference: returns (model, tokenizer).

    `path` is a save directory (its latest iteration is used) or an iteration directory.
    The model is in eval mode; `out = model(input_ids)` gives `out.logits` and
    `out.exit_logits` ({layer: logits}).
    """
    from megatron.early_exit.model import EarlyExitGPT

    meta = read_meta(path)
    model = EarlyExitGPT(meta.model_config)
    load_weights_into(model, read_weights(meta.directory), meta.directory)
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    model.eval()
    model.calibrated_thresholds = read_calibrated_thresholds(meta.directory)  # None unless calibrated
    return model, load_tokenizer_from(meta)

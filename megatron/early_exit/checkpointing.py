"""Checkpoints: one directory per iteration, a `latest` marker, atomic writes.

    SAVE/
      latest_checkpointed_iteration.txt      # Megatron's marker: the iteration number
      iter_0000030/
        config.json                          # model config, tokenizer spec, iteration, args
        model.safetensors                    # full (unsharded) weights, readable without us
        tokenizer/                           # the tokenizer's own files
        optimizer.pt                         # optimizer state (tensors only, weights_only load)
        training_state.pt                    # LR schedule, RNG states, consumed samples
        checksums.json                       # SHA-256 of every file above, checked on load
      .lock                                  # held (flock) by the one process writing SAVE

Each iteration directory is written under a temporary name (`iter_N.tmp-PID`) and renamed
when complete, and the marker is replaced atomically afterwards, so a crash never leaves a
half-written checkpoint as the latest one. Re-saving an iteration that exists first renames
the old directory aside (`iter_N.old-PID`) and removes it only after the new one is in place;
a crash in between leaves the old one, which loading finds and renames back. Every file's
SHA-256 is listed in `checksums.json` and verified when the file is read. One process at a
time writes a save directory (`.lock`, an flock); stale temporaries of dead processes are
removed when the lock is taken.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import random
import re
import shutil
import signal
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
CHECKSUM_FILE = "checksums.json"
LOCK_FILE = ".lock"
_TEMP = re.compile(r"^(iter_\d{7}|" + re.escape(MARKER) + r")\.(tmp|old)-(\d+)$")
_VERIFIED: set[tuple] = set()  # (path, size, mtime, sha256) of files already checked in this process
_HELD_LOCKS: dict[str, int] = {}  # realpath of a save directory -> the fd holding its flock
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
) -> str:
    """Write iteration `iteration` atomically and point the marker at it; returns its path.

    Give either a single-device `model`, or the full `weights` + `model_config` gathered
    from a parallel layout. `optimizer_state` is keyed by parameter name (see
    parallel/state_dict.py) so that any layout can load it. Takes the save directory's lock
    for the duration unless this process already holds it (the trainer holds it for its run).
    """
    if model is not None:
        weights = {k: v.detach() for k, v in model.named_parameters()}
        model_config = model.config
    held = os.path.realpath(save_dir) in _HELD_LOCKS
    lock_save_dir(save_dir)
    try:
        tmp = f"{iteration_dir(save_dir, iteration)}.tmp-{os.getpid()}"
        try:
            _write_files(tmp, iteration, weights, model_config, tokenizer, optimizer_state, scheduler,
                         consumed_samples, args, rng_states)  # fmt: skip
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, OSError):
                raise ValueError(f"--save: could not write checkpoint {tmp}: {e.strerror or e}") from None
            raise
        return _publish(save_dir, iteration, tmp)
    finally:
        if not held:
            unlock_save_dir(save_dir)


def _write_files(tmp, iteration, weights, model_config, tokenizer, optimizer_state, scheduler, consumed, args, rngs):
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
        "consumed_train_samples": consumed,
        "args": _jsonable(args or {}),
    }
    with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
        json.dump(meta, f, indent=2)
    if optimizer_state is not None:
        torch.save(optimizer_state, os.path.join(tmp, OPTIM_FILE))
    state = {
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": rngs if rngs is not None else [rng_state()],
        "consumed_train_samples": consumed,
        "iteration": iteration,
    }
    torch.save(state, os.path.join(tmp, STATE_FILE))
    _seal(tmp)


def _seal(directory: str) -> None:
    """Give every file the umask's ordinary mode, fsync it, and list its SHA-256 in checksums.json."""
    umask = os.umask(0)
    os.umask(umask)
    sums = {}
    for root, dirs, files in os.walk(directory):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777 & ~umask)
        for name in files:
            path = os.path.join(root, name)
            os.chmod(path, 0o666 & ~umask)
            sums[os.path.relpath(path, directory)] = _sha256(path, sync=True)
    path = os.path.join(directory, CHECKSUM_FILE)
    with open(path, "w") as f:
        json.dump({"sha256": dict(sorted(sums.items()))}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(path, 0o666 & ~umask)


def _sha256(path: str, sync: bool = False) -> str:
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
        if sync:
            os.fsync(f.fileno())
    return digest


def _publish(save_dir: str, iteration: int, tmp: str) -> str:
    """Rename the complete temporary directory into place, then move the marker. An existing
    directory of the same iteration is renamed aside first and removed only afterwards."""
    final = iteration_dir(save_dir, iteration)
    old = None
    if os.path.exists(final):
        old = f"{final}.old-{os.getpid()}"
        os.rename(final, old)
    _crash_point("before-rename")
    os.rename(tmp, final)
    _fsync_dir(save_dir)
    _atomic_write_text(os.path.join(save_dir, MARKER), f"{iteration}\n")
    _crash_point("before-cleanup")
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _crash_point(name: str) -> None:
    """Fault injection for the crash tests: MEGATRON_EE_CRASH_AT=<name> kills this process here."""
    if os.environ.get("MEGATRON_EE_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def lock_save_dir(save_dir: str) -> None:
    """Take the save directory's lock for this process until `unlock_save_dir` (or exit), then
    remove stale temporaries; a ValueError naming the holder if another process has it."""
    key = os.path.realpath(save_dir)
    if key in _HELD_LOCKS:
        return
    os.makedirs(save_dir, exist_ok=True)
    fd = os.open(os.path.join(save_dir, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        raise ValueError(
            f"--save {save_dir} is in use by another process (pid {holder}): one run per directory"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _HELD_LOCKS[key] = fd
    clean_stale(save_dir)


def unlock_save_dir(save_dir: str) -> None:
    fd = _HELD_LOCKS.pop(os.path.realpath(save_dir), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor releases the flock


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process is not writing it now: a leftover of an earlier save
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(save_dir: str) -> list[str]:
    """Remove the temporaries of dead processes (and this one's); an `iter_N.old-PID` whose
    `iter_N` is missing (a crash between a re-save's renames) is renamed back instead.
    Returns what was removed or restored."""
    done = []
    for name in sorted(os.listdir(save_dir)):
        m = _TEMP.match(name)
        if m is None or _pid_alive(int(m.group(3))):
            continue
        path, final = os.path.join(save_dir, name), os.path.join(save_dir, m.group(1))
        if m.group(2) == "old" and not os.path.exists(final):
            os.rename(path, final)
        elif os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.remove(path)
        done.append(name)
    return done


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
        aside = _set_aside(it_dir)
        if aside is None:
            raise ValueError(f"--load: {marker} points to {it_dir}, which does not exist")
        return aside  # a re-save crashed between its renames: the previous copy is intact
    return it_dir


def _set_aside(it_dir: str) -> str | None:
    parent, base = os.path.split(it_dir)
    for name in sorted(os.listdir(parent)):
        m = _TEMP.match(name)
        if m and m.group(1) == base and m.group(2) == "old":
            return os.path.join(parent, name)
    return None


def _live(it_dir: str) -> str:
    """An `iter_N.old-PID` path that another rank's lock has meanwhile renamed back to `iter_N`."""
    m = _TEMP.match(os.path.basename(it_dir))
    if m and m.group(2) == "old" and not os.path.exists(it_dir):
        return os.path.join(os.path.dirname(it_dir), m.group(1))
    return it_dir


def verify_file(it_dir: str, relpath: str) -> None:
    """Check one file of a checkpoint against its checksums.json (checkpoints saved before
    checksums existed have none and pass); a ValueError naming the file if it differs."""
    sums_path = os.path.join(it_dir, CHECKSUM_FILE)
    if not os.path.exists(sums_path):
        return
    try:
        with open(sums_path) as f:
            expected = json.load(f)["sha256"].get(relpath)
    except (OSError, json.JSONDecodeError, KeyError, AttributeError) as e:
        raise ValueError(f"--load: corrupt {sums_path}: {e}") from None
    path = os.path.join(it_dir, relpath)
    if expected is None or not os.path.exists(path):
        return
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns, expected)
    if key in _VERIFIED:
        return
    if _sha256(path) != expected:
        raise ValueError(f"--load: {path} is corrupt: its SHA-256 differs from the one in {CHECKSUM_FILE}")
    _VERIFIED.add(key)


def verify_checkpoint(it_dir: str) -> None:
    """Check every file listed in the directory's checksums.json (trainers do this before any work)."""
    sums_path = os.path.join(it_dir, CHECKSUM_FILE)
    if not os.path.exists(sums_path):
        return
    try:
        with open(sums_path) as f:
            names = list(json.load(f)["sha256"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"--load: corrupt {sums_path}: {e}") from None
    for name in names:
        if not os.path.exists(os.path.join(it_dir, name)):
            raise ValueError(f"--load: {os.path.join(it_dir, name)} is missing (listed in {CHECKSUM_FILE})")
        verify_file(it_dir, name)


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
    verify_file(it_dir, CONFIG_FILE)
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
    it_dir = _live(it_dir)
    path = os.path.join(it_dir, MODEL_FILE)
    if not os.path.exists(path):
        raise ValueError(f"--load: missing weights file {path}")
    verify_file(it_dir, MODEL_FILE)
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
    it_dir = _live(it_dir)
    state_path = os.path.join(it_dir, STATE_FILE)
    verify_file(it_dir, STATE_FILE)
    try:
        return torch.load(state_path, weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"--load: missing {state_path} (use --finetune to load weights only)") from None
    except Exception as e:  # a truncated or foreign file: name it
        raise ValueError(f"--load: corrupt training state {state_path}: {e}") from None


def load_optimizer_file(it_dir: str) -> dict:
    """The name-keyed optimizer state ({param name: {key: tensor}})."""
    it_dir = _live(it_dir)
    path = os.path.join(it_dir, OPTIM_FILE)
    verify_file(it_dir, OPTIM_FILE)
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
    tok_dir = os.path.join(meta.directory, "tokenizer")
    for root, _, files in os.walk(tok_dir):
        for name in files:
            verify_file(meta.directory, os.path.relpath(os.path.join(root, name), meta.directory))
    return load_tokenizer(os.path.join(meta.directory, "tokenizer"), meta.tokenizer_spec)


def read_calibrated_thresholds(path: str) -> dict | None:
    """The checkpoint's calibrated thresholds record ({"thresholds": {layer: t}, "measure", "delta",
    "epsilon", "agreement": {layer: share}, ...}), or None when it has none. "agreement" (each
    exit's top-1 agreement with the final head on the calibration text) and "draft_vocabulary"
    ({"tokens": ascending ids, "coverage", ...}: `calibration.draft_vocabulary`) are absent from
    records written before they existed; readers treat them as optional."""
    file = os.path.join(resolve_checkpoint_dir(path), THRESHOLDS_FILE)
    if not os.path.exists(file):
        return None
    try:
        with open(file) as f:
            record = json.load(f)
        out = {**record, "thresholds": {int(k): float(v) for k, v in record["thresholds"].items()}}
        if "agreement" in record:
            out["agreement"] = {int(k): float(v) for k, v in record["agreement"].items()}
        if "draft_vocabulary" in record:
            tokens = record["draft_vocabulary"]["tokens"]
            if not tokens or not all(type(t) is int and t >= 0 for t in tokens):
                raise ValueError("draft_vocabulary.tokens is not a list of token ids")
            out["draft_vocabulary"] = {**record["draft_vocabulary"], "tokens": sorted(set(tokens))}
        return out
    except (OSError, json.JSONDecodeError, KeyError, AttributeError, ValueError, TypeError) as e:
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


def check_target(save_dir: str, overwrite: bool) -> None:
    """Conversion tools write only into an absent or empty --save-dir unless told to --overwrite,
    so converting into an existing run never moves its marker or replaces its checkpoints."""
    if os.path.exists(save_dir) and not os.path.isdir(save_dir):
        raise ValueError(f"--save-dir {save_dir}: exists and is not a directory")
    if os.path.isdir(save_dir) and os.listdir(save_dir) and not overwrite:
        raise ValueError(f"--save-dir {save_dir} is not empty (give --overwrite to write into it anyway)")

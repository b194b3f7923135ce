"""Train/valid/test GPT datasets through megatron-core (.bin/.idx, blends, splits, mock).

megatron.core is imported lazily: importing it costs seconds and prints warnings about
optional CUDA libraries, which this CPU-first project does not need. Its datasets are
imported without running `megatron/core/__init__.py` where that works (`import_core_datasets`).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import tempfile
import types
import warnings

import torch


class CoreTokenizerAdapter:
    """What megatron-core's datasets read from a tokenizer: vocab size, eod, identifiers."""

    def __init__(self, tokenizer) -> None:
        self.vocab_size = tokenizer.vocab_size
        self.eod = tokenizer.eod
        self.unique_identifiers = {"class": type(tokenizer).__name__, "vocab_size": tokenizer.vocab_size}


def _import_datasets():
    from megatron.core.datasets import blended_megatron_dataset_builder as builder
    from megatron.core.datasets import gpt_dataset

    return builder, gpt_dataset


class _LazyCorePackage(types.ModuleType):
    """`megatron.core` before its `__init__` has run. A submodule is taken from `sys.modules`
    where it is (being) imported, as Python does for a circular import, and is otherwise left to
    the import system (`from megatron.core import config` imports it); the first other
    attribute it lacks runs the real `__init__` in it, once."""

    def __getattr__(self, name: str):
        submodule = f"{self.__name__}.{name}"
        if submodule in sys.modules:
            return sys.modules[submodule]
        if name.startswith("__") or self.__dict__.get("_initialising") or importlib.util.find_spec(submodule):
            raise AttributeError(name)
        self._initialising = True
        self.__spec__.loader.exec_module(self)
        return getattr(self, name)


def _import_datasets_light():
    """megatron-core's datasets without running its package `__init__`, which imports the
    whole transformer stack and wraps ~24 functions in torch.compile (1.5-2 s of every
    process's start on a 2-core CPU; the datasets use none of it). `megatron.core` is a
    `_LazyCorePackage` until something asks it for more; `parallel_state` loads first (it and
    `utils` import each other, the order the real `__init__` takes too)."""
    spec = importlib.util.find_spec("megatron.core")
    package = _LazyCorePackage("megatron.core")
    package.__spec__, package.__path__, package.__file__ = spec, list(spec.submodule_search_locations), spec.origin
    package.__package__, package.__loader__ = "megatron.core", spec.loader
    sys.modules["megatron.core"] = package
    setattr(sys.modules["megatron"], "core", package)
    importlib.import_module("megatron.core.parallel_state")
    return _import_datasets()


def import_core_datasets():
    """megatron-core's dataset builder and GPT dataset modules (the light import where
    megatron.core is not loaded yet and it works, else the plain one)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if "megatron.core" in sys.modules:
            builder, gpt_dataset = _import_datasets()
        else:
            try:
                builder, gpt_dataset = _import_datasets_light()
            except Exception:  # another megatron-core layout: drop what loaded, import it whole
                for name in [n for n in sys.modules if n == "megatron.core" or n.startswith("megatron.core.")]:
                    del sys.modules[name]
                builder, gpt_dataset = _import_datasets()
    for name in ("megatron.core", "megatron.core.datasets"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return builder, gpt_dataset


def parse_data_path(data_path: list[str]) -> tuple[list[str], list[float] | None]:
    """Megatron's --data-path: `p1 p2 ...` (equal weights) or `w1 p1 w2 p2 ...`."""
    if not data_path:
        raise ValueError("--data-path is empty")
    def is_number(x):
        try:
            float(x)
            return True
        except ValueError:
            return False

    if len(data_path) == 1 or not is_number(data_path[0]):
        if any(is_number(x) and not os.path.exists(x + ".bin") for x in data_path):
            raise ValueError(f"--data-path mixes weights and prefixes: {' '.join(data_path)}")
        prefixes, weights = list(data_path), None
    else:
        if len(data_path) % 2:
            raise ValueError("--data-path with weights needs pairs: WEIGHT PREFIX [WEIGHT PREFIX ...]")
        try:
            weights = [float(w) for w in data_path[0::2]]
        except ValueError:
            raise ValueError(f"--data-path: weights must be numbers: {' '.join(data_path)}") from None
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError("--data-path: weights must be non-negative with a positive sum")
        prefixes = list(data_path[1::2])
    for prefix in prefixes:
        for ext in (".bin", ".idx"):
            if not os.path.isfile(prefix + ext):
                raise ValueError(f"--data-path: missing {prefix + ext} (make it with tools/preprocess_data.py)")
    return prefixes, weights


def validate_split(split: str) -> str:
    parts = split.replace("/", ",").split(",")
    try:
        values = [float(x) for x in parts]
    except ValueError:
        raise ValueError(f"--split must be comma-separated numbers, got {split!r}") from None
    if len(values) > 3 or any(v < 0 for v in values) or sum(values) <= 0:
        raise ValueError(f"--split must be up to 3 non-negative numbers with a positive sum, got {split!r}")
    return ",".join(parts)


def build_datasets(
    *,
    tokenizer,
    seq_length: int,
    seed: int,
    data_path: list[str] | None,
    split: str = "969,30,1",
    mock_data: bool = False,
    train_samples: int,
    valid_samples: int,
    test_samples: int,
    data_cache_path: str | None = None,
):
    """(train, valid, test) megatron-core GPT datasets; an unrequested or empty split is None.

    Under torch.distributed every rank must call this together: megatron-core builds its
    index caches on rank 0 first, then lets the other ranks read them.
    """
    builder_mod, gpt = import_core_datasets()
    split = validate_split(split)
    if mock_data:
        blend, cls = None, gpt.MockGPTDataset
        cache = data_cache_path or os.path.join(tempfile.gettempdir(), "megatron_early_exit_mock_cache")
    else:
        prefixes, weights = parse_data_path(data_path or [])
        blend, cls = (prefixes, weights), gpt.GPTDataset
        cache = data_cache_path or os.path.join(os.path.dirname(os.path.abspath(prefixes[0])), "cache")
        if len(prefixes) > 1 and not torch.distributed.is_initialized():
            # megatron-core's blend cache asks torch.distributed for the rank on a cache miss;
            # a single process builds its (cheap) indices in memory instead.
            cache = None
    config = gpt.GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=blend,
        split=split,
        path_to_cache=cache,
        tokenizer=CoreTokenizerAdapter(tokenizer),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        mmap_bin_files=True,
    )
    sizes = [train_samples, valid_samples, test_samples]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        built = builder_mod.BlendedMegatronDatasetBuilder(cls, sizes, lambda: True, config).build()
    return tuple(ds if ds is not None and len(ds) > 0 else None for ds in built)

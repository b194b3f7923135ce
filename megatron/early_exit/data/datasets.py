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


LOSS_MASK_SUFFIX = "_loss_mask"  # a corpus's per-token loss mask: its prefix and this (preprocess_data.py)


def loss_mask_prefix(prefix: str) -> str:
    """Where `tools/preprocess_data.py --loss-mask-key` wrote the corpus `prefix`'s loss mask."""
    return prefix + LOSS_MASK_SUFFIX


def open_loss_mask(prefix: str, tokens):
    """The loss mask of the corpus `prefix` (a megatron-core IndexedDataset of uint8, one value
    per token of each document), checked against its tokens' dataset: a clear error naming the
    file where it is missing or its documents' lengths differ."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    path = loss_mask_prefix(prefix)
    if not (os.path.exists(path + ".bin") and os.path.exists(path + ".idx")):
        raise ValueError(
            f"--data-loss-mask: no {path}.bin/.idx beside {prefix} (tools/preprocess_data.py --loss-mask-key writes it)"
        )
    try:
        mask = IndexedDataset(path, multimodal=False, mmap=True)
    except Exception as e:  # a truncated or foreign file
        raise ValueError(f"--data-loss-mask: {path}.bin/.idx unreadable: {type(e).__name__}: {e}") from None
    if not np.array_equal(np.asarray(mask.sequence_lengths), np.asarray(tokens.sequence_lengths)):
        raise ValueError(
            f"--data-loss-mask: {path} holds {len(mask.sequence_lengths)} documents whose lengths differ from "
            f"{prefix}'s {len(tokens.sequence_lengths)}: not made with these tokens"
        )
    return mask


_MASKED: dict = {}


def masked_dataset_class(gpt):
    """megatron-core's GPTDataset whose samples' loss mask is also the corpus's own (`open_loss_mask`):
    position t counts where its label, token t + 1 of the sample, is a target (mask 1), as in a
    completion-only loss (the answer of a prompt and answer). Each sample's mask is read with its
    tokens' documents and offsets (`sample_index`, `document_index`, `shuffle_index`)."""
    if gpt in _MASKED:
        return _MASKED[gpt]

    class MaskedGPTDataset(gpt.GPTDataset):
        def __init__(self, indexed_dataset, dataset_path, *args, **kwargs) -> None:
            super().__init__(indexed_dataset, dataset_path, *args, **kwargs)
            self.mask_dataset = open_loss_mask(dataset_path, indexed_dataset)

        def __getitem__(self, idx):
            item = super().__getitem__(idx)  # (loads the lazy indices too)
            if idx is None:  # a padding sample: masked whole already
                return item
            import numpy as np

            extra = int(self.config.add_extra_token_to_sequence)
            i = self.shuffle_index[idx]
            (beg, beg_off), (end, end_off) = self.sample_index[i], self.sample_index[i + 1]
            parts = []
            for j in range(int(beg), int(end) + 1):
                off = int(beg_off) if j == beg else 0
                length = int(end_off) - off + extra if j == end else None
                parts.append(self.mask_dataset.get(self.document_index[j], offset=off, length=length))
            m = np.zeros(self.config.sequence_length + extra, dtype=np.float32)
            got = np.concatenate(parts) if parts else np.zeros(0)
            m[: len(got)] = got[: len(m)]
            target = torch.from_numpy(m[1:] if extra else np.append(m[1:], 0.0))  # the mask of each label
            item["loss_mask"] = item["loss_mask"] * target.to(item["loss_mask"].dtype)
            return item

    # pickled by reference (a spawned data loader worker): this module's `__getattr__` makes it there
    MaskedGPTDataset.__module__, MaskedGPTDataset.__qualname__ = __name__, "MaskedGPTDataset"
    _MASKED[gpt] = MaskedGPTDataset
    return MaskedGPTDataset


def __getattr__(name: str):
    if name == "MaskedGPTDataset":
        return masked_dataset_class(import_core_datasets()[1])
    raise AttributeError(name)


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
    loss_mask: bool = False,
):
    """(train, valid, test) megatron-core GPT datasets; an unrequested or empty split is None.
    `loss_mask`: each sample's loss mask also the corpus's own (`masked_dataset_class`), every
    prefix's read from beside it.

    Under torch.distributed every rank must call this together: megatron-core builds its
    index caches on rank 0 first, then lets the other ranks read them.
    """
    builder_mod, gpt = import_core_datasets()
    split = validate_split(split)
    if mock_data and loss_mask:
        raise ValueError("--data-loss-mask needs --data-path (a corpus with its loss mask), not --mock-data")
    if mock_data:
        blend, cls = None, gpt.MockGPTDataset
        cache = data_cache_path or os.path.join(tempfile.gettempdir(), "megatron_early_exit_mock_cache")
    else:
        prefixes, weights = parse_data_path(data_path or [])
        blend, cls = (prefixes, weights), masked_dataset_class(gpt) if loss_mask else gpt.GPTDataset
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

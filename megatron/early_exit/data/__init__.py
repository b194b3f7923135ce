"""Data: megatron-core GPT datasets (.bin/.idx, blends, splits, mock) and a resumable loader."""

from megatron.early_exit.data.datasets import build_datasets, parse_data_path
from megatron.early_exit.data.loader import build_data_loader

__all__ = ["build_datasets", "build_data_loader", "parse_data_path"]

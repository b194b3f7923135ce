"""Loads the task's documents from the jsonl next to this file (harness tasks normally fetch
theirs from the Hugging Face hub, which these tasks must not need)."""

import json
import os

import datasets

HERE = os.path.dirname(os.path.abspath(__file__))


def load(**kwargs) -> dict:
    """{"test": Dataset}; lm-eval passes model_args and metadata as keyword arguments (unused)."""
    with open(os.path.join(HERE, "aclsum_mini.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {"test": datasets.Dataset.from_list(rows)}

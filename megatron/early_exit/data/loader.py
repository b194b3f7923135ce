"""Micro-batches in Megatron's pretraining order, resumable at any sample.

Samples are taken in index order (megatron-core's datasets are already shuffled);
a global position `consumed_samples` advances by micro_batch_size * dp_size per
micro-batch, and each data-parallel rank takes its own contiguous slice of that block.
Starting at `consumed_samples` therefore reproduces exactly the batches an
uninterrupted run would have seen next.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


def _collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    tokens = torch.stack([torch.as_tensor(s["tokens"]) for s in samples]).long()
    return {
        "tokens": tokens,
        "labels": torch.stack([torch.as_tensor(s["labels"]) for s in samples]).long(),
        "loss_mask": torch.stack([torch.as_tensor(s["loss_mask"]) for s in samples]).float(),
        "position_ids": torch.stack([torch.as_tensor(s["position_ids"]) for s in samples]).long(),
    }


class _SampleOrder(torch.utils.data.Sampler):
    def __init__(self, total: int, consumed: int, micro: int, dp_rank: int, dp_size: int) -> None:
        self.total, self.consumed, self.micro, self.dp_rank, self.dp_size = total, consumed, micro, dp_rank, dp_size

    def __iter__(self) -> Iterator[list[int]]:
        block = self.micro * self.dp_size
        start = self.consumed
        while start + block <= self.total:
            first = start + self.dp_rank * self.micro
            yield list(range(first, first + self.micro))
            start += block

    def __len__(self) -> int:
        return max(0, (self.total - self.consumed) // (self.micro * self.dp_size))


def build_data_loader(
    dataset, *, consumed_samples: int, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1, num_workers: int = 0
):
    """An iterable of micro-batch dicts: tokens, labels, position_ids [b, s] (long), loss_mask [b, s] (float)."""
    if dataset is None:
        return iter(())
    sampler = _SampleOrder(len(dataset), consumed_samples, micro_batch_size, dp_rank, dp_size)
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=_collate, pin_memory=False
    )

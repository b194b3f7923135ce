"""The one validated source of parallel layout and process groups.

Ranks are laid out on a (pp, dp, tp) grid with TP fastest, then DP, then PP, so that a
TP group is a run of consecutive ranks (inside one node on real clusters):

    rank = (pp_rank * dp + dp_rank) * tp + tp_rank

Everything else asks this object for its groups and coordinates; nobody else calls
`new_group`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class ParallelDims:
    world_size: int
    tp: int = 1
    pp: int = 1
    dp: int = field(init=False)

    def __post_init__(self) -> None:
        for name, value in (("--tensor-model-parallel-size", self.tp), ("--pipeline-model-parallel-size", self.pp)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.world_size % (self.tp * self.pp):
            raise ValueError(
                f"world size {self.world_size} is not divisible by --tensor-model-parallel-size ({self.tp}) x "
                f"--pipeline-model-parallel-size ({self.pp})"
            )
        self.dp = self.world_size // (self.tp * self.pp)

    def validate_model(self, num_layers: int, num_heads: int, num_groups: int, ffn: int, vocab: int) -> None:
        if num_layers < self.pp:
            raise ValueError(f"--pipeline-model-parallel-size ({self.pp}) exceeds --num-layers ({num_layers})")
        for what, n in (
            ("--num-attention-heads", num_heads),
            ("--num-query-groups", num_groups),
            ("--ffn-hidden-size", ffn),
            ("the padded vocabulary size", vocab),
        ):
            if n % self.tp:
                raise ValueError(f"{what} ({n}) is not divisible by --tensor-model-parallel-size ({self.tp})")

    def coords(self, rank: int) -> tuple[int, int, int]:
        """rank -> (pp_rank, dp_rank, tp_rank)."""
        return rank // (self.dp * self.tp), rank // self.tp % self.dp, rank % self.tp

    def rank_of(self, pp_rank: int, dp_rank: int, tp_rank: int) -> int:
        return (pp_rank * self.dp + dp_rank) * self.tp + tp_rank

    def pp_ranks(self, dp_rank: int, tp_rank: int) -> list[int]:
        return [self.rank_of(p, dp_rank, tp_rank) for p in range(self.pp)]


@dataclass
class ParallelState:
    """This rank's coordinates and groups (None for a size-1 axis)."""

    dims: ParallelDims
    rank: int
    pp_rank: int
    dp_rank: int
    tp_rank: int
    tp_group: object | None
    dp_group: object | None
    pp_group: object | None
    pp_group_ranks: list[int]
    device: torch.device

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.dims.pp - 1

    def stage_rank(self, pp_rank: int) -> int:
        """Global rank of pipeline stage `pp_rank` in this rank's pipeline."""
        return self.pp_group_ranks[pp_rank]


def single_process_state(device: torch.device) -> ParallelState:
    dims = ParallelDims(1)
    return ParallelState(dims, 0, 0, 0, 0, None, None, None, [0], device)


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def initialize(tp: int, pp: int, device: torch.device) -> ParallelState:
    """Start torch.distributed from torchrun's environment (if not started) and build the
    (pp, dp, tp) DeviceMesh; its per-axis groups are the only process groups we use."""
    from torch.distributed.device_mesh import init_device_mesh

    world = int(os.environ.get("WORLD_SIZE", "1"))
    dims = ParallelDims(world, tp, pp)  # validates before any process group starts
    if world == 1 and not dist.is_initialized():
        return single_process_state(device)
    if not dist.is_initialized():
        dist.init_process_group(backend_for(device))
    mesh = init_device_mesh(device.type, (dims.pp, dims.dp, dims.tp), mesh_dim_names=("pp", "dp", "tp"))
    rank = dist.get_rank()
    pp_rank, dp_rank, tp_rank = dims.coords(rank)
    assert mesh.get_local_rank("pp") == pp_rank and mesh.get_local_rank("tp") == tp_rank

    def group(axis: str, size: int):
        return mesh.get_group(axis) if size > 1 else None

    return ParallelState(
        dims,
        rank,
        pp_rank,
        dp_rank,
        tp_rank,
        group("tp", dims.tp),
        group("dp", dims.dp),
        group("pp", dims.pp),
        dims.pp_ranks(dp_rank, tp_rank),
        device,
    )

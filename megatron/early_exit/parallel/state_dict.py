"""Layout-independent state: full (unsharded) weights and optimizer state keyed by name.

A checkpoint always holds the full model, whatever TP/PP/DP layout wrote it, so any
other layout can load it: each rank takes the names its stage owns and cuts its TP shard.
Gathering goes to global rank 0 (which writes the files); fine for the model sizes a
CPU-tested framework moves through one process, and simple to reason about.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron.early_exit.parallel.data_parallel import full, reshard
from megatron.early_exit.parallel.dims import ParallelState
from megatron.early_exit.parallel.tensor_parallel import gather_full, shard_full


def _gather_to_rank0(local: dict, pstate: ParallelState, all_dp: bool = False) -> dict | None:
    """Merge dicts from the TP-rank-0 ranks of every stage onto global rank 0: of DP rank 0
    only (replicated data), or of every DP rank (`all_dp`: data sharded over DP, ZeRO)."""
    if pstate.dims.world_size == 1 or not dist.is_initialized():
        return local
    contribute = (all_dp or pstate.dp_rank == 0) and pstate.tp_rank == 0
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(local if contribute else {}, gathered, dst=0)
    if dist.get_rank() != 0:
        return None
    merged: dict = {}
    for part in gathered:
        merged.update(part)  # tied copies on several stages carry equal values under one name
    return merged


def full_state_dict(model: torch.nn.Module, pstate: ParallelState) -> dict[str, torch.Tensor] | None:
    """All parameters of the whole model on global rank 0 (None elsewhere), on the CPU.
    Collective: FSDP2 shards are gathered over DP first."""
    reshard(model)
    local = {
        name: gather_full(name, full(p.detach()), model.config, pstate.tp_group).to("cpu")
        for name, p in model.named_parameters()
    }
    return _gather_to_rank0(local, pstate)


def local_optimizer(optimizer):
    """The optimizer that holds this rank's state (ZeRO's inner one when sharded)."""
    return getattr(optimizer, "optim", optimizer)


def full_optimizer_state(model, optimizer, pstate: ParallelState) -> dict | None:
    """Optimizer state keyed by parameter name, unsharded: {name: {key: tensor}}."""
    reshard(model)  # FSDP2: the optimizer holds the sharded parameters
    local = {}
    opt = local_optimizer(optimizer) if optimizer is not None else None
    for name, p in model.named_parameters():
        state = opt.state.get(p) if opt is not None else None
        if not state:
            continue
        entry = {}
        for key, value in state.items():
            if torch.is_tensor(value) and value.shape == p.shape and value.dim() > 0:
                value = gather_full(name, full(value.detach()), model.config, pstate.tp_group)
            entry[key] = value.detach().to("cpu") if torch.is_tensor(value) else value
        local[name] = entry
    sharded = opt is not optimizer  # ZeRO: each DP rank holds the state of its own share
    return _gather_to_rank0(local, pstate, all_dp=sharded)


def load_optimizer_state(model, optimizer, full_state: dict, pstate: ParallelState, source: str) -> None:
    """Give each local parameter its slice of the saved state (any saved layout)."""
    if optimizer is None:
        return
    reshard(model)
    opt = local_optimizer(optimizer)
    owned = {id(p) for group in opt.param_groups for p in group["params"]}
    tp_rank = pstate.tp_rank
    tp = pstate.dims.tp
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) not in owned:
            continue
        if name not in full_state:
            raise ValueError(f"--load: optimizer state in {source} has no entry for {name} (use --no-load-optim)")
        entry = {}
        for key, value in full_state[name].items():
            if torch.is_tensor(value) and value.dim() > 0:
                value = shard_full(name, value, model.config, tp_rank, tp)
                if value.shape != p.shape:
                    raise ValueError(f"--load: optimizer state {key} of {name} in {source} does not fit the model")
                value = _like(p, value.to(device=p.device, dtype=torch.float32).clone())
            elif torch.is_tensor(value):
                value = value.clone()
            entry[key] = value
        opt.state[p] = entry


def _like(p: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """`value` laid out as parameter `p` (FSDP2: this DP rank's shard, no communication)."""
    if not hasattr(p, "device_mesh"):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value, p.device_mesh, p.placements, src_data_rank=None)

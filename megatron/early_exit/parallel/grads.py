"""Gradient synchronisation, clipping and metric reduction across the parallel layout.

Called once per global batch, after the schedule has accumulated every micro-batch:
- DP: gradients averaged over the data-parallel group by the DP engine
  (parallel/data_parallel.py: bucketed all-reduce overlapped with the last backward, or
  FSDP2's reduce-scatter, which leaves each DP rank its shard of every gradient);
- TP-replicated weights whose gradient each TP rank computes only in part: all of them under
  sequence parallelism, and the QK-norms (shared by the heads that TP splits) always;
- tied word-embedding copies (first stage, and any later stage whose output or exit
  heads are tied to it) summed over the embedding group, so the copies stay identical;
- the global gradient norm counts every distinct gradient once: TP shards all count,
  TP-replicated tensors only on TP rank 0, embedding copies only on the first stage.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from megatron.early_exit.parallel.data_parallel import local
from megatron.early_exit.parallel.dims import ParallelState
from megatron.early_exit.parallel.pipeline import StageSpec, embedding_holders
from megatron.early_exit.parallel.tensor_parallel import shard_spec

EMBEDDING = "embedding.word_embeddings.weight"


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def build_embedding_group(config, specs: list[StageSpec], ps: ParallelState):
    """The group of ranks (in this rank's pipeline) that hold a word-embedding copy, or
    None if only one stage holds it. Collective: every rank creates every pipeline's group."""
    holders = embedding_holders(config, specs)
    if ps.dims.pp == 1 or len(holders) < 2:
        return None
    mine = None
    for d in range(ps.dims.dp):
        for t in range(ps.dims.tp):
            ranks = [ps.dims.rank_of(p, d, t) for p in holders]
            group = dist.new_group(ranks)
            if ps.rank in ranks:
                mine = group
    return mine


def is_head_shared(name: str) -> bool:
    """A weight every attention head uses (Qwen3's QK-norm over the head dim): under TP each
    rank's heads contribute only part of its gradient."""
    return ".q_layernorm." in name or ".k_layernorm." in name


def sync_gradients(
    model: torch.nn.Module, ps: ParallelState, embedding_group, sequence_parallel: bool = False, data_parallel=None
) -> None:
    """DP average (by the engine; without one, one blocking all-reduce per tensor: the old
    sync, kept for benchmarks/data_parallel.py), then the sums over TP of replicated weights
    under sequence parallelism (`apply_tensor_parallel`'s flag) and over the embedding group.
    All are linear, so their order does not matter; under FSDP2 they act on matching local
    shards."""
    if data_parallel is not None:
        data_parallel.finish()
    elif ps.dp_group is not None:
        for p in model.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad, group=ps.dp_group)
                p.grad.div_(ps.dims.dp)
    if ps.tp_group is not None:
        # Replicated weights saw only part of the work on this rank: under sequence parallelism
        # every one of them (norms, row-parallel biases) saw only this rank's sequence chunk; the
        # QK-norms (one weight shared by all heads) always saw only this rank's heads.
        for name, p in model.named_parameters():
            if p.grad is None or shard_spec(name, model.config.swiglu) != "replicated":
                continue
            if sequence_parallel or is_head_shared(name):
                dist.all_reduce(local(p.grad), group=ps.tp_group)
    if embedding_group is not None:
        for name, p in model.named_parameters():
            if name == EMBEDDING and p.grad is not None:
                dist.all_reduce(local(p.grad), group=embedding_group)


def clip_grad_norm(model: torch.nn.Module, ps: ParallelState, max_norm: float, dp_sharded: bool = False) -> float:
    """Global L2 norm of the gradients; scales them by min(1, max_norm / (norm + 1e-6)) when
    max_norm > 0. `dp_sharded`: each DP rank holds a shard of every gradient (FSDP2)."""
    squares = []
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        if name == EMBEDDING and not model.pre_process:
            continue  # a tied copy: the first stage counts it
        if ps.tp_rank != 0 and shard_spec(name, model.config.swiglu) == "replicated":
            continue
        squares.append(local(p.grad).detach().float().pow(2).sum())
    total = torch.stack(squares).sum() if squares else torch.zeros((), device=ps.device)
    for group in (ps.tp_group, ps.pp_group, ps.dp_group if dp_sharded else None):
        if group is not None:
            dist.all_reduce(total, group=group)
    norm = math.sqrt(float(total))
    if max_norm > 0:
        coef = max_norm / (norm + 1e-6)
        if coef < 1.0:
            for p in model.parameters():
                if p.grad is not None:
                    local(p.grad).mul_(coef)
    return norm


def reduce_loss_parts(parts: dict[str, float], ps: ParallelState) -> dict[str, float]:
    """Merge each stage's head losses (pipeline) and average them over data-parallel ranks."""
    merged = dict(parts)
    if ps.pp_group is not None:
        gathered = [None] * ps.dims.pp
        dist.all_gather_object(gathered, parts, group=ps.pp_group)
        merged = {}
        for g in gathered:
            merged.update(g)
    keys = sorted(merged, key=_head_order)
    if ps.dp_group is not None and keys:
        t = torch.tensor([merged[k] for k in keys], dtype=torch.float64)
        dist.all_reduce(t, group=ps.dp_group)
        merged = {k: float(v) / ps.dims.dp for k, v in zip(keys, t)}
    return {k: merged[k] for k in keys}


def _head_order(key: str):
    if key.startswith("exit_"):
        return (0, int(key.split("_")[1].split()[0]))
    return (1, 0)


def gather_rng_states(ps: ParallelState, mine: dict) -> list | None:
    """Every rank's RNG state `mine` (`checkpointing.rng_state()`), gathered on rank 0."""
    if not dist.is_initialized() or ps.dims.world_size == 1:
        return [mine]
    out = [None] * ps.dims.world_size if ps.rank == 0 else None
    dist.gather_object(mine, out, dst=0)
    return out


def check_replicated_params(model: torch.nn.Module, ps: ParallelState, embedding_group, dp_sharded=False) -> int:
    """Assert that every replicated parameter is bit-identical on all ranks that hold it:
    DP replicas, TP ranks (for TP-replicated tensors) and the word-embedding copies of the
    embedding group. Returns the number of tensors compared; raises RuntimeError naming
    the first that differs. Under FSDP2 (`dp_sharded`) DP ranks hold different shards, and
    the TP and embedding-group copies are compared shard by shard."""
    checked = 0
    for name, p in model.named_parameters():
        p = local(p)
        groups = [("data-parallel replicas", None if dp_sharded else ps.dp_group)]
        if shard_spec(name, model.config.swiglu) == "replicated":
            groups.append(("tensor-parallel ranks", ps.tp_group))
        if name == EMBEDDING:
            groups.append(("embedding-group copies", embedding_group))
        for what, group in groups:
            if group is None:
                continue
            lo, hi = p.detach().clone(), p.detach().clone()
            dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=group)
            dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
            if not torch.equal(lo, hi):
                raise RuntimeError(f"replicated parameter {name} differs across {what}")
            checked += 1
    return checked

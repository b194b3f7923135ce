"""Tensor parallelism applied from outside the model (Megatron's sharding, gpt-fast's method).

`apply_tensor_parallel(model, group)` swaps each Linear / Embedding of a built,
initialised, single-device model for a module that holds only this rank's shard and
inserts the collectives around it:

- column-parallel (output rows sharded): QKV (by query group), MLP fc1 (gate and up
  halves sharded separately under SwiGLU);
- row-parallel (input columns sharded, outputs all-reduced): attention linear_proj, MLP fc2;
- vocab-parallel: the word embedding, the output layer, every exit's output projection
  and the cross-entropy of every head (logits are never gathered for the loss).

The collectives are Megatron's conjugate pairs, each a small autograd Function:
`_CopyToTP` (forward identity, backward all-reduce) and `reduce_from` (forward all-reduce,
backward identity); the replicated loss on every TP rank is then differentiated exactly
once. At TP=1 nothing is swapped and nothing costs extra.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megatron.early_exit.model.gpt import EarlyExitGPT, HeadOps


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _all_gather_seq(x: torch.Tensor, group) -> torch.Tensor:
    """[b, s/tp, h] on each rank -> [b, s, h] (sequence chunks in rank order)."""
    size = dist.get_world_size(group)
    x = x.transpose(0, 1).contiguous()  # (s/tp, b, h): gather along the leading dim
    out = torch.empty((size * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_gather_into_tensor(out, x, group=group)
    return out.transpose(0, 1)


def _reduce_scatter_seq(x: torch.Tensor, group) -> torch.Tensor:
    """[b, s, h] partial sums on each rank -> this rank's summed chunk [b, s/tp, h]."""
    size = dist.get_world_size(group)
    x = x.transpose(0, 1).contiguous()
    out = torch.empty((x.shape[0] // size, *x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.reduce_scatter_tensor(out, x, group=group)
    return out.transpose(0, 1)


class _GatherSeq(torch.autograd.Function):
    """Sequence parallelism, entering a TP region: all-gather the sequence (backward:
    reduce-scatter, since every rank's full-sequence gradient is a partial sum)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter_seq(grad, ctx.group), None


class _ReduceScatterSeq(torch.autograd.Function):
    """Sequence parallelism, leaving a TP region: reduce-scatter (backward: all-gather)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_seq(grad, ctx.group), None


def enter_tp(x: torch.Tensor, group, sequence_parallel: bool) -> torch.Tensor:
    return _GatherSeq.apply(x, group) if sequence_parallel else _CopyToTP.apply(x, group)


def leave_tp(x: torch.Tensor, group, sequence_parallel: bool) -> torch.Tensor:
    return _ReduceScatterSeq.apply(x, group) if sequence_parallel else _ReduceFromTP.apply(x, group)


def reduce_from(x: torch.Tensor, group) -> torch.Tensor:
    return _ReduceFromTP.apply(x, group)


def _shard_rows(t: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    return t.chunk(size, dim=0)[rank].clone()


class ColumnParallelLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group, sp: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias) if bias is not None else None
        self.group, self.sp = group, sp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(enter_tp(x, self.group, self.sp), self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """Bias is replicated and added once, after the all-reduce (or reduce-scatter)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group, sp: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias) if bias is not None else None
        self.group, self.sp = group, sp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = leave_tp(F.linear(x, self.weight), self.group, self.sp)
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(nn.Module):
    def __init__(self, weight: torch.Tensor, vocab_start: int, group, sp: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.vocab_start = vocab_start
        self.group, self.sp = group, sp

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        h = F.embedding(local.masked_fill(outside, 0), self.weight)
        h = h.masked_fill(outside.unsqueeze(-1), 0.0)
        return leave_tp(h, self.group, self.sp)


class SequenceChunkEmbedding(nn.Embedding):
    """Learned position embeddings under sequence parallelism: this rank's sequence chunk."""

    def __init__(self, weight: torch.Tensor, group) -> None:
        super().__init__(weight.shape[0], weight.shape[1], _weight=weight)
        self.group = group

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        chunk = position_ids.chunk(dist.get_world_size(self.group), dim=1)[dist.get_rank(self.group)]
        return super().forward(chunk)


class VocabParallelHeadOps(HeadOps):
    """Heads whose logits stay sharded over the vocabulary: [b, s, V/tp] on each rank."""

    def __init__(self, group, vocab_start: int, sp: bool = False) -> None:
        super().__init__()
        self.group = group
        self.vocab_start = vocab_start
        self.sp = sp

    def project(self, h, weight):
        return torch.matmul(enter_tp(h, self.group, self.sp), weight.t())

    def token_losses(self, logits, labels):
        # CE = logsumexp(all logits) - logit[label], each piece summed over the shards.
        lf = logits.float()
        with torch.no_grad():
            gmax = lf.max(-1).values
            dist.all_reduce(gmax, op=dist.ReduceOp.MAX, group=self.group)
        sum_exp = reduce_from(torch.exp(lf - gmax.unsqueeze(-1)).sum(-1), self.group)
        local = labels - self.vocab_start
        inside = (local >= 0) & (local < lf.shape[-1])
        picked = lf.gather(-1, local.clamp(0, lf.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
        target = reduce_from(picked * inside, self.group)
        return torch.log(sum_exp) + gmax - target

    def max_prob(self, logits):
        with torch.no_grad():
            lf = logits.float()
            gmax = lf.max(-1).values
            dist.all_reduce(gmax, op=dist.ReduceOp.MAX, group=self.group)
            sum_exp = torch.exp(lf - gmax.unsqueeze(-1)).sum(-1)
            dist.all_reduce(sum_exp, group=self.group)
            return 1.0 / sum_exp  # exp(max - max) / sum

    def log_softmax(self, logits):
        lf = logits.float()
        with torch.no_grad():
            gmax = lf.max(-1, keepdim=True).values
            dist.all_reduce(gmax, op=dist.ReduceOp.MAX, group=self.group)
        lse = torch.log(reduce_from(torch.exp(lf - gmax).sum(-1, keepdim=True), self.group)) + gmax
        return lf - lse

    def vocab_sum(self, x):
        return reduce_from(x.sum(-1), self.group)

    def argmax(self, logits):
        with torch.no_grad():
            value, index = logits.float().max(-1)
            size = dist.get_world_size(self.group)
            values = [torch.empty_like(value) for _ in range(size)]
            indices = [torch.empty_like(index) for _ in range(size)]
            dist.all_gather(values, value.contiguous(), group=self.group)
            dist.all_gather(indices, (index + self.vocab_start).contiguous(), group=self.group)
            best = torch.stack(values).argmax(0)  # first shard wins ties, like a plain argmax
            return torch.stack(indices).gather(0, best.unsqueeze(0)).squeeze(0)

    def full_logits(self, logits):
        parts = [torch.empty_like(logits) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(parts, logits.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)


def _shard_qkv(lin: nn.Linear, num_groups: int, rank: int, size: int, group, sp: bool) -> ColumnParallelLinear:
    # Rows are grouped by query group: [ng, (nh/ng + 2) * hd]; shard whole groups.
    w = lin.weight.detach().view(num_groups, -1, lin.in_features)
    w = w.chunk(size, dim=0)[rank].reshape(-1, lin.in_features).clone()
    b = None
    if lin.bias is not None:
        b = lin.bias.detach().view(num_groups, -1).chunk(size, dim=0)[rank].reshape(-1).clone()
    return ColumnParallelLinear(w, b, group, sp)


def _shard_fc1(lin: nn.Linear, swiglu: bool, rank: int, size: int, group, sp: bool) -> ColumnParallelLinear:
    def pick(t):
        if not swiglu:
            return _shard_rows(t, rank, size)
        gate, up = t.chunk(2, dim=0)
        return torch.cat([_shard_rows(gate, rank, size), _shard_rows(up, rank, size)], dim=0)

    bias = pick(lin.bias.detach()) if lin.bias is not None else None
    return ColumnParallelLinear(pick(lin.weight.detach()), bias, group, sp)


def _shard_row_parallel(lin: nn.Linear, rank: int, size: int, group, sp: bool) -> RowParallelLinear:
    w = lin.weight.detach().chunk(size, dim=1)[rank].clone()
    b = lin.bias.detach().clone() if lin.bias is not None else None
    return RowParallelLinear(w, b, group, sp)


def _parallelize_mlp(mlp, config, rank, size, group, sp) -> None:
    mlp.linear_fc1 = _shard_fc1(mlp.linear_fc1, config.swiglu, rank, size, group, sp)
    mlp.linear_fc2 = _shard_row_parallel(mlp.linear_fc2, rank, size, group, sp)


def _parallelize_layer(layer, config, rank, size, group, sp) -> None:
    attn = layer.self_attention
    attn.linear_qkv = _shard_qkv(attn.linear_qkv, config.num_query_groups, rank, size, group, sp)
    attn.linear_proj = _shard_row_parallel(attn.linear_proj, rank, size, group, sp)
    _parallelize_mlp(layer.mlp, config, rank, size, group, sp)


def apply_tensor_parallel(model: EarlyExitGPT, group, sequence_parallel: bool = False) -> EarlyExitGPT:
    """Shard `model` in place for this rank of `group`; returns it. Call after init/load.

    With `sequence_parallel`, activations outside the TP regions (norms, residuals, the
    activations sent between pipeline stages) hold only this rank's 1/tp of the
    sequence: all-reduces become reduce-scatters and the copies into a TP region become
    all-gathers. The replicated (norm) weights then see only part of the sequence, so
    their gradients are summed over TP afterwards (see parallel/grads.py).
    """
    if group is None:
        return model
    sp = sequence_parallel
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    config = model.config
    vocab_start = rank * (config.vocab_size // size)
    for layer in model.decoder.layers.values():
        _parallelize_layer(layer, config, rank, size, group, sp)
    for head in model.exits.values():
        if head.block is not None:
            _parallelize_layer(head.block, config, rank, size, group, sp)
        if head.mlp is not None:
            _parallelize_mlp(head.mlp, config, rank, size, group, sp)
        if head.output_layer is not None:
            head.output_layer.weight = nn.Parameter(_shard_rows(head.output_layer.weight.detach(), rank, size))
    if model.embedding is not None:
        emb = model.embedding
        input_embedding = model.pre_process
        emb.word_embeddings = VocabParallelEmbedding(
            _shard_rows(emb.word_embeddings.weight.detach(), rank, size), vocab_start, group, sp and input_embedding
        )
        if sp and emb.position_embeddings is not None:
            emb.position_embeddings = SequenceChunkEmbedding(emb.position_embeddings.weight.detach(), group)
    if model.output_layer is not None:
        model.output_layer.weight = nn.Parameter(_shard_rows(model.output_layer.weight.detach(), rank, size))
    model.head_ops = VocabParallelHeadOps(group, vocab_start, sp)
    return model


def shard_spec(name: str, swiglu: bool) -> str:
    """How the parameter called `name` is split over TP ranks, for gathering a full state
    dict: 'qkv' (rows by query group), 'fc1' (rows, per half with SwiGLU), 'rows', 'cols'
    or 'replicated' (the exits' confidence probes among them, linear or MLP)."""
    if ".confidence." in name:
        return "replicated"
    if name.endswith("linear_qkv.weight") or name.endswith("linear_qkv.bias"):
        return "qkv"
    if name.endswith("linear_fc1.weight") or name.endswith("linear_fc1.bias"):
        return "fc1_swiglu" if swiglu else "rows"
    if name.endswith("linear_proj.weight") or name.endswith("linear_fc2.weight"):
        return "cols"
    if name.endswith("word_embeddings.weight") or name.endswith("output_layer.weight"):
        return "rows"
    return "replicated"


def gather_full(name: str, local: torch.Tensor, config, group) -> torch.Tensor:
    """Reassemble a parameter from its TP shards (inverse of the sharding above)."""
    spec = shard_spec(name, config.swiglu)
    if group is None or spec == "replicated":
        return local
    size = dist.get_world_size(group)
    parts = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(parts, local.contiguous(), group=group)
    if spec == "cols":
        return torch.cat(parts, dim=1)
    if spec == "rows":
        return torch.cat(parts, dim=0)
    if spec == "fc1_swiglu":
        halves = [p.chunk(2, dim=0) for p in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    # qkv: each shard holds whole query groups, in order.
    return torch.cat(parts, dim=0)


def shard_full(name: str, full: torch.Tensor, config, rank: int, size: int) -> torch.Tensor:
    """This rank's shard of a full parameter (used when loading a checkpoint under TP)."""
    spec = shard_spec(name, config.swiglu)
    if size == 1 or spec == "replicated":
        return full
    if spec == "cols":
        return full.chunk(size, dim=1)[rank]
    if spec == "rows":
        return full.chunk(size, dim=0)[rank]
    if spec == "fc1_swiglu":
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(size, 0)[rank], up.chunk(size, 0)[rank]], dim=0)
    ng = config.num_query_groups
    tail = full.shape[1:]
    return full.reshape(ng, -1, *tail).chunk(size, dim=0)[rank].reshape(-1, *tail)

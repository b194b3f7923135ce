"""Data parallelism over the `dp` axis: a bucketed, backward-overlapped all-reduce (default)
or FSDP2 (`torch.distributed.fsdp.fully_shard`, `--use-torch-fsdp2`).

Both are applied from outside, after tensor parallelism, to this rank's pipeline stage;
both reduce once per global batch. The schedule calls `last_backward()` around the last
backward of the batch on this rank (1F1B runs several forwards before their backwards,
and exit heads run outside the module's forward, so nothing is decided at forward time);
the trainer calls `finish()` after the schedule.

**Why not torch DDP.** DDP arms its reducer in `forward` (`require_backward_grad_sync`):
under 1F1B the last micro-batch's forward runs before earlier micro-batches' backwards,
which would then reduce partial sums. `GradReducer` is what Megatron's DDP does instead:
a hook after each parameter's gradient accumulation counts it ready, and a bucket's async
all-reduce starts as soon as all its parameters are ready, during the last backward only.

**FSDP2 under the pipeline: one unit per layer.** Each transformer layer is its own
`fully_shard` unit, then the stage root holds the rest (embedding, exit heads, final norm and
output layer), so at most a layer or two are gathered at a time (the one running and the one
backward prefetches) and a rank holds 1/DP of every layer between uses.
- Layers: `reshard_after_forward=True` and reshard after every backward. Under 1F1B a
  micro-batch's forward and backward of a layer are far apart (warm-up forwards pile up), so
  keeping a layer gathered from its forward to its backward would hold every layer gathered
  through the steady state, i.e. no saving; the price is an all-gather per layer for each
  forward and each backward (ZeRO-3's traffic: 2 x micro-batches gathers per layer).
  torchtitan's PP keeps layers gathered instead (`reshard_after_forward=False`), trading
  memory for traffic; here memory is the point of choosing FSDP2 over the reducer.
- Root: gathered once per batch and kept until `finish()` (`reshard_after_forward=False`,
  no reshard after backward). Its word embedding is the tied projection of every exit and of
  the final head, which run outside any module's forward (exits lazily, right before their
  micro-batch's backward), so FSDP2's hooks could not gather it at the right moments anyway.
- Gradients: backwards accumulate full (unsharded) gradients without communication
  (`set_requires_gradient_sync(False)`); `finish()` runs FSDP2's post-backward by hand for
  every unit in registration order, the same order on every DP rank (a rank's last backward
  may touch other units than another's: exit-only fill micro-batches), so the reduce-scatters
  always pair up: one reduce-scatter per unit and batch, then reshard. Gradients after the
  reduction, parameters between steps and the optimizer state are sharded over DP.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from functools import partial

import torch
import torch.distributed as dist

from megatron.early_exit.parallel.dims import ParallelState


def build_data_parallel(model: torch.nn.Module, ps: ParallelState, args):
    """The DP engine for this stage, or None when DP is 1 (nothing to reduce)."""
    fsdp = getattr(args, "use_torch_fsdp2", False)
    if ps.dp_group is None:
        return None
    if fsdp:
        return FSDP2(model, ps, per_layer=not getattr(args, "layer_dropout_max", 0.0))
    elements = getattr(args, "ddp_bucket_size", None)
    bucket_bytes = elements * 4 if elements else 25 * 2**20  # fp32 gradients
    return GradReducer(model, ps.dp_group, ps.dims.dp, bucket_bytes)


class _Bucket:
    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        self.params = params
        self.ready: set[int] = set()
        self.flat: torch.Tensor | None = None
        self.handle = None


class GradReducer:
    """Averages gradients over the DP group in buckets of about `bucket_bytes`.

    Invariants: a hook that fires outside `last_backward()` does nothing (the gradient just
    accumulates); inside it, a parameter is ready when its gradient of the last backward has
    been accumulated, i.e. when its gradient is final. A bucket is reduced exactly once per
    batch: by its last ready hook, or by `finish()` if some of its parameters got no gradient
    in the last backward (exit-only fill micro-batches skip the final head, say).
    """

    is_sharded = False

    def __init__(self, model: torch.nn.Module, group, world: int, bucket_bytes: int) -> None:
        self.group, self.world = group, world
        # Reverse registration order approximates the order gradients become ready.
        params = [p for p in model.parameters() if p.requires_grad][::-1]
        self.buckets: list[_Bucket] = []
        current, size = [], 0
        for p in params:
            current.append(p)
            size += p.numel() * p.element_size()
            if size >= bucket_bytes:
                self.buckets.append(_Bucket(current))
                current, size = [], 0
        if current:
            self.buckets.append(_Bucket(current))
        self.bucket_of = {id(p): b for b in self.buckets for p in b.params}
        self.armed = False
        self.next_bucket = 0
        for p in params:
            p.register_post_accumulate_grad_hook(self._on_grad)

    @contextmanager
    def last_backward(self):
        self.armed = True  # stays armed until finish(): the hooks of this backward reduce
        yield

    def _on_grad(self, p: torch.Tensor) -> None:
        if not self.armed:
            return
        bucket = self.bucket_of[id(p)]
        if bucket.handle is not None:
            raise RuntimeError("a gradient arrived after its bucket was reduced (more than one last backward)")
        bucket.ready.add(id(p))
        # Buckets launch in index order only, so every DP rank issues the same sequence of
        # all-reduces even when their last backwards differ (layer dropout draws per rank).
        while self.next_bucket < len(self.buckets):
            b = self.buckets[self.next_bucket]
            if len(b.ready) < len(b.params):
                break
            self._launch(b)
            self.next_bucket += 1

    def _launch(self, bucket: _Bucket) -> None:
        # The gradients move into one flat buffer and become views of it, so the reduction
        # adds one bucket of memory, not a second copy of every gradient. (Parameters are
        # fp32 under bf16 autocast too, so a bucket has one dtype.)
        params = [p for p in bucket.params if p.grad is not None]
        if not params:
            bucket.handle = False  # every DP replica skipped these parameters alike
            return
        bucket.flat = torch.cat([p.grad.reshape(-1) for p in params])
        offset = 0
        for p in params:
            p.grad = bucket.flat[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
        bucket.handle = dist.all_reduce(bucket.flat, group=self.group, async_op=True)

    def finish(self) -> None:
        """Reduce the buckets the last backward did not complete, wait for all, leave the mean."""
        for bucket in self.buckets[self.next_bucket :]:
            self._launch(bucket)
        for bucket in self.buckets:
            if bucket.handle:
                bucket.handle.wait()
                bucket.flat.div_(self.world)  # the gradients are views of it
            bucket.ready, bucket.flat, bucket.handle = set(), None, None
        self.armed, self.next_bucket = False, 0


class FSDP2:
    """`fully_shard` over the DP group, its gradient sync driven by hand (see the module doc).

    `per_layer` (default): one FSDP unit per transformer layer, then the stage root (embedding,
    exits, final norm and head); False: the whole stage as one unit (kept for the benchmark).
    Layer dropout draws its skipped layers per DP rank, and a layer one rank skips would leave
    the other rank's all-gather without a partner, so with it the stage is one unit."""

    is_sharded = True

    def __init__(self, model: torch.nn.Module, ps: ParallelState, per_layer: bool = True) -> None:
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.fsdp import fully_shard

        # Our stage returns views (hidden states) that nothing modifies in place (the schedule
        # sends detached copies), which is what this warning, printed every forward, is about.
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        self.mesh = DeviceMesh.from_group(ps.dp_group, ps.device.type)
        layers = list(model.decoder.layers.values()) if per_layer else []
        for layer in layers:
            fully_shard(layer, mesh=self.mesh, reshard_after_forward=True)
        self.layers = layers
        self.model = fully_shard(model, mesh=self.mesh, reshard_after_forward=False)
        # Backward gathers layer i-1 while layer i runs; layer 0 names the root (gathered
        # anyway, so a no-op) instead of FSDP2's default guess from the forward order, which
        # under 1F1B is the last layer of another micro-batch.
        for i, layer in enumerate(layers):
            layer.set_modules_to_backward_prefetch([layers[i - 1] if i else self.model])
        self.model.zero_grad = partial(_zero_sharded_grads, self.model, self.model.zero_grad)
        # The schedules call the stage's pieces (embed_input first, then run_layers, the heads),
        # not its forward, so FSDP2's forward hook never gathers the root: gather it by hand,
        # once per batch (a no-op while gathered). The layers' own hooks gather each layer.
        self.model.embed_input = partial(_gather_then, self.model, self.model.embed_input)
        self._accumulate_only()

    def _accumulate_only(self) -> None:
        """Backwards accumulate full gradients; no collective until finish(). Layers reshard
        after each backward (regathered for the next use); the root stays gathered."""
        self.model.set_requires_gradient_sync(False)
        self.model.set_reshard_after_backward(True)
        self.model.set_reshard_after_backward(False, recurse=False)
        self.model.set_is_last_backward(False)

    @contextmanager
    def last_backward(self):
        yield  # the reduce-scatters run in finish(), in one order on every DP rank

    def finish(self) -> None:
        """FSDP2's post-backward, by hand, for every unit in registration order (the same on
        every DP rank, whatever each rank's last backward touched): reduce-scatter the
        accumulated gradients, then reshard."""
        from torch.distributed.fsdp import fully_shard

        self.model.set_requires_gradient_sync(True)
        self.model.set_reshard_after_backward(True)
        self.model.set_is_last_backward(True)
        state = fully_shard.state(self.model)
        for s in state._state_ctx.all_states:
            for group in s._fsdp_param_groups:
                group.post_backward()  # reduce-scatter, then reshard
        state._root_post_backward_final_callback()
        self._accumulate_only()


def _zero_sharded_grads(model, zero_grad, set_to_none: bool = True) -> None:
    """An evaluation forward leaves the stage gathered (no backward follows to reshard it), and
    `zero_grad` would then clear the gathered copies, not the sharded parameters the optimizer
    holds, whose stale gradients the next reduce-scatter would add to: reshard first."""
    reshard(model)
    zero_grad(set_to_none)


def _gather_then(model, method, *args, **kwargs):
    from torch.distributed.fsdp import fully_shard

    fully_shard.state(model)._lazy_init()  # what the first forward would do
    model.unshard()
    return method(*args, **kwargs)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor (a DTensor's local shard, or the tensor itself)."""
    return t.to_local() if hasattr(t, "to_local") else t


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (a sharded DTensor gathered over its mesh, or the tensor itself)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def reshard(model: torch.nn.Module) -> None:
    """Put an FSDP2 stage back into its sharded state (a forward leaves it gathered), so that
    its parameters are the ones the optimizer holds; a no-op for anything else. Every unit:
    FSDP2's own `reshard` is not recursive."""
    for module in model.modules():
        if hasattr(module, "reshard") and hasattr(module, "set_requires_gradient_sync"):
            module.reshard()

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

**FSDP2 under the pipeline** (what `torch.distributed.pipelining` does): parameters are
gathered at the first forward and stay gathered through the schedule
(`reshard_after_forward=False`, no reshard or reduce after each backward), so the lazily
evaluated exit heads see full weights; `finish()` runs FSDP2's post-backward by hand once:
one reduce-scatter of the accumulated gradients, then reshard. Gradients, parameters
between steps and the optimizer state are sharded over DP.
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
        return FSDP2(model, ps)
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
    """`fully_shard` over the DP group, its gradient sync driven by hand (see the module doc)."""

    is_sharded = True

    def __init__(self, model: torch.nn.Module, ps: ParallelState) -> None:
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.fsdp import fully_shard

        # Our stage returns views (hidden states) that nothing modifies in place (the schedule
        # sends detached copies), which is what this warning, printed every forward, is about.
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        self.mesh = DeviceMesh.from_group(ps.dp_group, ps.device.type)
        self.model = fully_shard(model, mesh=self.mesh, reshard_after_forward=False)
        self.model.zero_grad = partial(_zero_sharded_grads, self.model, self.model.zero_grad)
        # The schedules call the stage's pieces (embed_input first, then run_layers, the heads),
        # not its forward, so FSDP2's forward hook never gathers it: gather by hand, once per
        # batch (a no-op while gathered).
        self.model.embed_input = partial(_gather_then, self.model, self.model.embed_input)
        self._accumulate_only()

    def _accumulate_only(self) -> None:
        self.model.set_requires_gradient_sync(False)
        self.model.set_reshard_after_backward(False)
        self.model.set_is_last_backward(False)

    @contextmanager
    def last_backward(self):
        yield  # the reduce-scatter runs once, in finish()

    def finish(self) -> None:
        from torch.distributed.fsdp import fully_shard

        self.model.set_requires_gradient_sync(True)
        self.model.set_reshard_after_backward(True)
        self.model.set_is_last_backward(True)
        state = fully_shard.state(self.model)
        for s in state._state_ctx.all_states:
            if s._fsdp_param_group is not None:
                s._fsdp_param_group.post_backward()  # reduce-scatter, then reshard
        state._root_post_backward_final_callback()
        self._accumulate_only()


def _zero_sharded_grads(model, zero_grad, set_to_none: bool = True) -> None:
    """An evaluation forward leaves the stage gathered (no backward follows to reshard it), and
    `zero_grad` would then clear the gathered copies, not the sharded parameters the optimizer
    holds, whose stale gradients the next reduce-scatter would add to: reshard first."""
    model.reshard()
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
    its parameters are the ones the optimizer holds; a no-op for anything else."""
    if hasattr(model, "reshard") and hasattr(model, "set_requires_gradient_sync"):
        model.reshard()

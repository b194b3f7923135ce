"""Forward/backward schedules over the micro-batches of one global batch.

**The auxiliary-loss trick (EE-LLM).** Stage s computes x_s and sends it on; later it
receives g_s = dL/dx_s. Its own exits give weighted losses L_s. One backward of

    L_s + sum(x_s * g_s)

(done as `torch.autograd.backward([L_s, x_s], [None, g_s])`) gives every parameter of
stage s its exact gradient of the whole objective, with no communication beyond the
usual activations and gradients. Exit heads are evaluated lazily, right before the
stage's backward of that micro-batch, so their logits are not held through the warm-up.

**1F1B** (Megatron's non-interleaved schedule). Stage r of p runs
`warmup = min(p - r - 1, m)` forward passes, then alternates one forward and one
backward (steady state), then drains the remaining `warmup` backwards (cool-down).
Sends and receives between neighbours are paired into one batched non-blocking
exchange, which keeps the schedule deadlock-free. With p = 1 it reduces exactly to the
no-pipelining schedule: forward then backward, micro-batch by micro-batch.

Invariants: every micro-batch's loss is scaled by 1/m, so accumulated gradients equal
one step over the global batch; gradients are synchronised by the caller, once.

**LayerSkip in training** (`ScheduleContext.layer_dropout`): each training micro-batch
skips the layers `training.layer_dropout` draws for (iteration, global micro-batch index,
layer); evaluation and frozen-backbone tuning never skip. **Confidence probes**: exits with a
probe also train it, on the exit's detached hidden state (`losses.evaluate_exits_with_probes`).
"""

from __future__ import annotations

from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from megatron.early_exit.config import ExitLossConfig
from megatron.early_exit.model.gpt import ModelOutput
from megatron.early_exit.parallel.dims import ParallelState
from megatron.early_exit.parallel.pipeline import p2p
from megatron.early_exit.training.layer_dropout import LayerDropout
from megatron.early_exit.training.losses import combine_losses, evaluate_exits_with_probes


@dataclass
class ScheduleContext:
    model: torch.nn.Module  # this rank's stage
    pstate: ParallelState
    loss_cfg: ExitLossConfig
    exit_weights: dict[int, float]
    num_micro: int
    activation_shape: tuple[int, int, int]  # (micro batch, seq, hidden) sent between stages
    device: torch.device
    autocast: object = field(default_factory=nullcontext)
    frozen_backbone: bool = False
    last_exit_stage: int = -1  # the last pipeline stage holding an exit (bubble filling)
    grad_sync: object = None  # the data-parallel engine (parallel/data_parallel.py), if any
    backwards_left: int = 0  # backward passes still to run in this batch on this rank
    layer_dropout: LayerDropout | None = None
    iteration: int = 0  # 0-based count of completed updates (seeds layer dropout)

    def template(self) -> torch.Tensor:
        return torch.empty(self.activation_shape, dtype=torch.float32, device=self.device)


def _to_device(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


@dataclass
class StageOutput(ModelOutput):
    """A stage's forward with its exits not yet evaluated: their inputs wait in `deferred_exits`."""

    deferred_exits: list = field(default_factory=list)  # [(layer, exit input)]
    rotary: tuple | None = None
    probe_losses: dict = field(default_factory=dict)  # {layer: per-token probe BCE [b, s]}


def stage_forward(
    model, batch: dict, x_in, labels, frozen_backbone: bool, compute_final: bool, skip: frozenset[int] = frozenset()
) -> StageOutput:
    """The model's forward with the exits deferred (`compute_deferred_exits` evaluates them);
    `frozen_backbone`: embedding and layers under no_grad (EE-Tuning); `skip`: layers dropped."""
    with torch.no_grad() if frozen_backbone else nullcontext():
        ids = batch["tokens"] if model.pre_process else None
        h, rotary = model.embed_input(ids, batch["position_ids"], x_in)
        h, exit_inputs = model.run_layers(h, rotary, skip)
    out = StageOutput(hidden_states=h, deferred_exits=exit_inputs, rotary=rotary)
    if model.post_process and compute_final:
        model.final_head(out, h, labels)
    return out


def compute_deferred_exits(model, out: StageOutput, labels=None, want_conf: bool = False, probes: bool = False) -> None:
    """Evaluate the exit heads whose inputs `stage_forward` kept; fills exit logits or losses.
    `probes` (with labels): also each confidence probe's per-token loss, in `out.probe_losses`."""
    if probes and labels is not None:
        out.probe_losses = evaluate_exits_with_probes(model, out, out.deferred_exits, out.rotary, labels, want_conf)
    else:
        model.evaluate_exits(out, out.deferred_exits, out.rotary, labels, want_conf)
    out.deferred_exits = []


def has_probes(model) -> bool:
    return any(head.confidence is not None for head in model.exits.values())


def skipped_layers(ctx: ScheduleContext, micro: int, frozen: bool) -> frozenset[int]:
    """The layers this stage skips for its `micro`-th micro-batch: only when training."""
    ld = ctx.layer_dropout
    if ld is None or frozen or not (ctx.model.training and torch.is_grad_enabled()):
        return frozenset()
    ps = ctx.pstate
    return ld.skipped(ctx.iteration, micro * ps.dims.dp + ps.dp_rank, ctx.model.layer_ids)


def forward_step(
    ctx: ScheduleContext,
    batch: dict,
    x_in: torch.Tensor | None,
    exits_only: bool = False,
    frozen=None,
    micro: int = 0,
):
    """This stage's forward of one micro-batch (this rank's `micro`-th of the iteration, fills
    counted after the regular ones), exits deferred. `exits_only`: skip the final head
    (bubble-filling and tuning micro-batches only feed exit losses)."""
    frozen = ctx.frozen_backbone if frozen is None else frozen
    skip = skipped_layers(ctx, micro, frozen)
    labels = None if exits_only else batch["labels"]
    with ctx.autocast:
        return stage_forward(ctx.model, batch, x_in, labels, frozen, not exits_only, skip)


def backward_step(ctx: ScheduleContext, batch: dict, out, x_in, grad_out):
    """Exit heads now (lazily), then one backward of L_s + sum(x_s * g_s)."""
    dynamic = ctx.loss_cfg.use_dynamic_exit_layer_weight
    with ctx.autocast:
        compute_deferred_exits(ctx.model, out, batch["labels"], dynamic, has_probes(ctx.model))
    tensors, grads, parts = [], [], {}
    if out.exit_losses or out.loss is not None:
        total, parts = combine_losses(
            out, batch["loss_mask"], ctx.exit_weights, ctx.loss_cfg.final_layer_weight, dynamic, out.probe_losses
        )
        tensors.append(total / ctx.num_micro)
        grads.append(None)
    if grad_out is not None:
        tensors.append(out.hidden_states)
        grads.append(grad_out.to(out.hidden_states.dtype))
    if tensors and any(t.requires_grad for t in tensors):
        _backward(ctx, tensors, grads)
    grad_in = x_in.grad if x_in is not None and x_in.requires_grad else None
    return grad_in, parts


def _backward(ctx: ScheduleContext, tensors, grads) -> None:
    """The last backward of the batch on this rank runs under the DP engine's
    `last_backward()`, so gradient reduction overlaps it. Counted, not guessed: a backward
    skipped (nothing requires grad) only loses the overlap, `finish()` still reduces."""
    ctx.backwards_left -= 1
    last = ctx.grad_sync is not None and ctx.backwards_left == 0
    with ctx.grad_sync.last_backward() if last else nullcontext():
        torch.autograd.backward(tensors, grads)


def _accumulate(sums: dict, parts: dict, num_micro: int) -> None:
    for k, v in parts.items():
        sums[k] = sums.get(k, 0.0) + float(v) / num_micro


@dataclass
class _Run:
    """One rank's state through one 1F1B batch: its neighbours, the micro-batches whose
    backward is still due (oldest first) and the running loss sums."""

    ctx: ScheduleContext
    batches: list[dict]
    prev: int | None  # the previous stage's rank (None on the first stage)
    nxt: int | None  # the next stage's rank (None on the last stage)
    fill_warmup: list[dict]
    fill_at: int  # run the warm-up fills after this many regular forwards (-1: none)
    inflight: deque = field(default_factory=deque)  # [(micro, x_in, StageOutput)]
    sums: dict = field(default_factory=dict)

    def receive_input(self, x):
        if x is not None and not self.ctx.frozen_backbone:
            x.requires_grad_(True)
        return x

    def output_to_send(self, out):
        return out.hidden_states.detach().float() if self.nxt is not None else None

    def forward(self, k: int, x):
        out = forward_step(self.ctx, self.batches[k], x, micro=k)
        self.inflight.append((k, x, out))
        return out

    def backward_oldest(self, grad):
        """The backward of the oldest micro-batch in flight; returns dL/d(its input)."""
        k, xb, outb = self.inflight.popleft()
        grad_in, parts = backward_step(self.ctx, self.batches[k], outb, xb, grad)
        _accumulate(self.sums, parts, len(self.batches))
        return grad_in

    def fill_warmup_after(self, forwards_done: int) -> bool:
        """Whether the warm-up fills go right after this many regular forwards."""
        return forwards_done == self.fill_at


def forward_backward_1f1b(
    ctx: ScheduleContext, batches: list[dict], fill_warmup: list[dict] = (), fill_cooldown: list[dict] = ()
) -> dict[str, float]:
    """Run the schedule over `batches` (this rank's micro-batches); returns the mean loss
    of every head that lives on this stage. `fill_warmup` / `fill_cooldown` are the extra
    micro-batches of explicit-bubble filling (see `_fill_phase`)."""
    ps = ctx.pstate
    m = len(batches)
    warmup = min(ps.dims.pp - ps.pp_rank - 1, m)
    fills = ps.pp_rank <= ctx.last_exit_stage and (len(fill_warmup) or len(fill_cooldown))
    # Every filling stage runs its warm-up fills after the same number of regular forwards,
    # so neighbours agree on the order of messages: regular activations, then fill ones.
    fill_at = min(ps.dims.pp - ctx.last_exit_stage, m) if fills and len(fill_warmup) else -1
    ctx.backwards_left = m + (len(fill_warmup) + len(fill_cooldown) if fills else 0)
    run = _Run(
        ctx,
        [_to_device(b, ctx.device) for b in batches],
        ps.stage_rank(ps.pp_rank - 1) if not ps.is_first_stage else None,
        ps.stage_rank(ps.pp_rank + 1) if not ps.is_last_stage else None,
        fill_warmup,
        fill_at,
    )
    _warmup(run, warmup)
    _steady(run, warmup)
    _cooldown(run, warmup)
    if fills and len(fill_cooldown):
        _fill_phase(ctx, fill_cooldown, m, m + len(fill_warmup))
    return run.sums


def _warmup(run: _Run, warmup: int) -> None:
    """Forwards only: micro-batches 0..warmup-1 go down the pipeline, none comes back yet."""
    ctx = run.ctx
    for k in range(warmup):
        x = run.receive_input(p2p(None, None, ctx.template(), run.prev))
        out = run.forward(k, x)
        p2p(run.output_to_send(out), run.nxt, None, None)
        if run.fill_warmup_after(k + 1):
            _fill_phase(ctx, run.fill_warmup, len(run.batches), len(run.batches))


def _steady(run: _Run, warmup: int) -> None:
    """One forward (micro-batch warmup + i), then one backward (the oldest in flight).
    Each send is paired with the next receive in one exchange (see `p2p`)."""
    ctx, m = run.ctx, len(run.batches)
    steady = m - warmup
    x = run.receive_input(p2p(None, None, ctx.template(), run.prev)) if steady > 0 else None
    for i in range(steady):
        out = run.forward(warmup + i, x)
        grad_like = ctx.template() if run.nxt is not None else None
        if run.fill_warmup_after(warmup + i + 1):  # fills go between this send and the next receive
            p2p(run.output_to_send(out), run.nxt, None, None)
            _fill_phase(ctx, run.fill_warmup, m, m)
            grad = p2p(None, None, grad_like, run.nxt)
        else:
            grad = p2p(run.output_to_send(out), run.nxt, grad_like, run.nxt)
        grad_in = run.backward_oldest(grad)
        if i == steady - 1:
            p2p(grad_in, run.prev, None, None)
        else:
            x = run.receive_input(p2p(grad_in, run.prev, ctx.template(), run.prev))


def _cooldown(run: _Run, warmup: int) -> None:
    """The `warmup` backwards still in flight, oldest first."""
    for _ in range(warmup):
        grad = p2p(None, None, run.ctx.template(), run.nxt)
        p2p(run.backward_oldest(grad), run.prev, None, None)


def _fill_phase(ctx: ScheduleContext, fills: list[dict], num_micro: int, first_micro: int) -> None:
    """Explicit-bubble filling (EE-LLM): extra micro-batches that only feed exit losses.

    They run through stages 0..S (S = the last stage holding an exit) and no further:
    forward through each stage, then the backward of those stages' weighted exit losses
    (plus the auxiliary term for the stages before S), each scaled by 1/m like a regular
    micro-batch. The final head never sees them. Their losses train the exits (and the
    layers below them) and are not logged. `first_micro`: the first fill's micro-batch index
    (after the regular ones, and after the warm-up fills for the cool-down ones).
    """
    ps = ctx.pstate
    prev = ps.stage_rank(ps.pp_rank - 1) if not ps.is_first_stage else None
    nxt = ps.stage_rank(ps.pp_rank + 1) if ps.pp_rank < ctx.last_exit_stage else None
    model, dynamic = ctx.model, ctx.loss_cfg.use_dynamic_exit_layer_weight
    done = []
    for j, batch in enumerate(fills):
        batch = _to_device(batch, ctx.device)
        x = p2p(None, None, ctx.template(), prev)
        if x is not None:
            x.requires_grad_(True)
        out = forward_step(ctx, batch, x, exits_only=True, micro=first_micro + j)
        p2p(out.hidden_states.detach().float() if nxt is not None else None, nxt, None, None)
        done.append((batch, x, out))
    for batch, x, out in done:
        grad = p2p(None, None, ctx.template(), nxt) if nxt is not None else None
        with ctx.autocast:
            compute_deferred_exits(model, out, batch["labels"], dynamic, has_probes(model))
        tensors, grads = [], []
        if out.exit_losses:
            total, _ = combine_losses(out, batch["loss_mask"], ctx.exit_weights, 0.0, dynamic, out.probe_losses)
            tensors.append(total / num_micro)
            grads.append(None)
        if grad is not None:
            tensors.append(out.hidden_states)
            grads.append(grad.to(out.hidden_states.dtype))
        _backward(ctx, tensors, grads)
        p2p(x.grad if x is not None else None, prev, None, None)


@torch.no_grad()
def forward_only(ctx: ScheduleContext, batches: list[dict]) -> dict[str, float]:
    """Evaluation: every micro-batch forward through the pipeline, every head's loss."""
    ps = ctx.pstate
    prev = ps.stage_rank(ps.pp_rank - 1) if not ps.is_first_stage else None
    nxt = ps.stage_rank(ps.pp_rank + 1) if not ps.is_last_stage else None
    sums: dict[str, float] = {}
    for batch in batches:
        batch = _to_device(batch, ctx.device)
        x = p2p(None, None, ctx.template(), prev)
        out = forward_step(ctx, batch, x)
        p2p(out.hidden_states.float() if nxt is not None else None, nxt, None, None)
        with ctx.autocast:
            compute_deferred_exits(ctx.model, out, batch["labels"])
        if out.exit_losses or out.loss is not None:
            _, parts = combine_losses(out, batch["loss_mask"], ctx.exit_weights, ctx.loss_cfg.final_layer_weight)
            _accumulate(sums, parts, len(batches))
    return sums


@dataclass
class TuneSettings:
    loss_type: str = "ce"
    kd_temperature: float = 1.0


def forward_backward_tune(ctx: ScheduleContext, batches: list[dict], tune: TuneSettings) -> dict[str, float]:
    """EE-Tuning: the backbone runs forward only (no_grad); activations go forward and
    nothing comes back. Each stage backpropagates its own exits' losses locally."""
    from megatron.early_exit.training.losses import tuning_losses

    ps = ctx.pstate
    prev = ps.stage_rank(ps.pp_rank - 1) if not ps.is_first_stage else None
    nxt = ps.stage_rank(ps.pp_rank + 1) if not ps.is_last_stage else None
    sums: dict[str, float] = {}
    for batch in batches:
        batch = _to_device(batch, ctx.device)
        x = p2p(None, None, ctx.template(), prev)
        out = forward_step(ctx, batch, x, exits_only=True, frozen=True)
        p2p(out.hidden_states.float() if nxt is not None else None, nxt, None, None)
        with ctx.autocast:
            total, parts = tuning_losses(
                ctx.model,
                out,
                batch["labels"],
                batch["loss_mask"],
                ctx.exit_weights,
                tune.loss_type,
                tune.kd_temperature,
            )
        if total is not None and total.requires_grad:
            (total / len(batches)).backward()
        _accumulate(sums, parts, len(batches))
    return sums

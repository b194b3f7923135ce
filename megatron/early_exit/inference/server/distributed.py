"""Serving under torchrun: rank 0 serves HTTP and schedules; the other ranks replay its engine calls.

Under tensor parallelism every rank of the TP group must run the same engine calls with the
same arguments (their collectives pair up inside the layers). The scheduler makes every
state-changing call through an `EngineDriver`; on the leader (rank 0) each call is first
broadcast as (op, args) with `broadcast_object_list`, then run; followers sit in `follow`,
receiving and running the same ops on their own `DecodeState` until "shutdown". Sampling,
stop checks and HTTP stay on rank 0: the tokens they choose are inputs of the next call.

Pipeline parallelism (`PipelineEngine`) has no step API: the batch scheduler makes one
"generate" call per batch, broadcast over every rank (all stages, and TP ranks within them),
and each rank runs its part of the pipeline's own generation loop.

In one process (`group` None and world size 1) nothing is broadcast.

Stopping: followers leave SIGINT and SIGTERM to rank 0 while they follow. torchrun forwards a
signal to every rank, and a follower that died at once could leave rank 0 blocked in an engine
call with it; rank 0 instead finishes its iteration and broadcasts "shutdown".
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator

import torch
import torch.distributed as dist

from megatron.early_exit.inference.engine import EarlyExitEngine
from megatron.early_exit.inference.passes import DecodeState, ExitPolicy, StepOutput
from megatron.early_exit.inference.settings import GenerationResult, GenerationSettings

log = logging.getLogger(__name__)

OPS = ("new_state", "prefill", "verify", "score", "decode", "round", "reset", "generate", "shutdown")


class EngineDriver:
    """The engine plus the one `DecodeState` the scheduler decodes into; replicated on followers."""

    def __init__(self, engine: EarlyExitEngine, group=None, src: int = 0) -> None:
        self.engine = engine
        self.group, self.src = group, src
        self.state: DecodeState | None = None
        self.broadcasting = dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1

    # The scheduler's calls. Each one is an op that followers replay with the same arguments.
    def new_state(self, batch: int, capacity: int) -> None:
        self._call("new_state", batch, capacity)

    def prefill(self, prompts: dict[int, list[int]]) -> StepOutput:
        return self._call("prefill", prompts)

    def verify(self, tokens: dict[int, list[int]]) -> StepOutput:
        return self._call("verify", tokens)

    def score(self, prompts: dict[int, list[int]], policy: ExitPolicy) -> StepOutput:
        """Prefill `prompts`, each row scored where early exit under `policy` leaves (`engine.score`)."""
        return self._call("score", prompts, policy)

    def decode(self, tokens: dict[int, int], policy: ExitPolicy, argmax: bool = False) -> StepOutput:
        """One decode step; `argmax`: only greedy tokens are read (the engine may use its int8 head)."""
        return self._call("decode", tokens, policy, argmax)

    def round(self, slots: list[int], results: dict, settings, counts: dict, slot_settings=None) -> list[int]:
        """One round of the settings' strategy (those that do not share passes) for `slots`
        (`slot_settings`: each slot's own, where they belong to several requests)."""
        return self._call("round", slots, results, settings, counts, slot_settings)

    def reset(self, slots: list[int]) -> None:
        self._call("reset", slots)

    def generate(self, prompts: list[list[int]], settings: GenerationSettings) -> list[GenerationResult]:
        """A whole batch through `engine.generate` (the batch scheduler's one op)."""
        return self._call("generate", prompts, settings)

    def shutdown(self) -> None:
        if self.broadcasting:
            self._send("shutdown", ())

    def _call(self, op: str, *args):
        if self.broadcasting:
            self._send(op, args)
        return apply(self, op, args)

    def _send(self, op: str, args: tuple) -> None:
        box = [(op, args)]
        dist.broadcast_object_list(box, src=self.src, group=self.group, device=_comm_device(self.engine))


def apply(driver: EngineDriver, op: str, args: tuple):
    """Run one op on this rank's engine and state (the same code on the leader and followers)."""
    engine = driver.engine
    if op == "generate":
        return engine.generate(*args)
    if op == "new_state":
        driver.state = engine.new_state(*args)
        return None
    state = driver.state
    if op == "prefill":
        return engine.prefill(state, *args)
    if op == "verify":
        return engine.verify(state, *args)
    if op == "score":
        return engine.score(state, *args)
    if op == "decode":
        return engine.decode_one_token(state, *args)
    if op == "round":
        return engine.run_round(state, *args)
    if op == "reset":
        for b in args[0]:
            state.reset(b)
        return None
    raise ValueError(f"unknown engine op {op!r}; expected one of {', '.join(OPS)}")


def follow(driver: EngineDriver) -> int:
    """A follower's life: receive the leader's ops and run them until "shutdown"; returns how many ran.

    A failing op is logged and skipped: the leader ran the same op on the same inputs, failed
    the same way, and carries on too."""
    ran = 0
    with _signals_left_to_leader():
        while True:
            box = [None]
            dist.broadcast_object_list(box, src=driver.src, group=driver.group, device=_comm_device(driver.engine))
            op, args = box[0]
            if op == "shutdown":
                return ran
            try:
                apply(driver, op, args)
            except Exception:
                log.exception("follower: op %s failed", op)
            ran += 1


@contextlib.contextmanager
def _signals_left_to_leader() -> Iterator[None]:
    """Ignore SIGINT/SIGTERM meanwhile (see the module docstring); if rank 0 dies instead, the
    broadcast fails and this rank exits, and torchrun kills what is left after its grace period."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def _comm_device(engine: EarlyExitEngine) -> torch.device | None:
    """nccl moves pickled objects through the GPU; gloo through the CPU."""
    return engine.device if engine.device.type == "cuda" else None

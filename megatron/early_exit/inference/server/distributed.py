"""Serving under torchrun: rank 0 serves HTTP and schedules; the other ranks replay its engine calls.

Under tensor parallelism every rank of the TP group must run the same engine calls with the
same arguments (their collectives pair up inside the layers). The scheduler makes every
state-changing call through an `EngineDriver`; on the leader (rank 0) each call is first
broadcast as (op, args) with `broadcast_object_list`, then run; followers sit in `follow`,
receiving and running the same ops on their own `DecodeState` until "shutdown". Sampling,
stop checks and HTTP stay on rank 0: the tokens they choose are inputs of the next call.

In one process (`group` None and world size 1) nothing is broadcast.

Pipeline parallelism is not served: the engine runs all layers of one model replica per
rank (see the server's --pipeline-model-parallel-size check).
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from megatron.early_exit.inference.engine import DecodeState, EarlyExitEngine, ExitPolicy, StepOutput

log = logging.getLogger(__name__)

OPS = ("new_state", "prefill", "verify", "decode", "speculate", "reset", "shutdown")


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

    def decode(self, tokens: dict[int, int], policy: ExitPolicy) -> StepOutput:
        return self._call("decode", tokens, policy)

    def speculate(self, slots: list[int], results: dict, settings, counts: dict) -> list[int]:
        return self._call("speculate", slots, results, settings, counts)

    def reset(self, slots: list[int]) -> None:
        self._call("reset", slots)

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
    if op == "new_state":
        driver.state = engine.new_state(*args)
        return None
    state = driver.state
    if op == "prefill":
        return engine.prefill(state, *args)
    if op == "verify":
        return engine.verify(state, *args)
    if op == "decode":
        return engine.decode_one_token(state, *args)
    if op == "speculate":
        slots, results, settings, counts = args
        return engine._speculate(state, slots, results, settings, counts)
    if op == "reset":
        for b in args[0]:
            reset_slot(state, b)
        return None
    raise ValueError(f"unknown engine op {op!r}; expected one of {', '.join(OPS)}")


def reset_slot(state: DecodeState, b: int) -> None:
    """Forget everything slot b held, so a new sequence can start there at position 0."""
    state.cache.truncate(b, 0)
    if state.exit_cache is not None:
        state.exit_cache.truncate(b, 0)
    state.fed[b] = 0


def follow(driver: EngineDriver) -> int:
    """A follower's life: receive the leader's ops and run them until "shutdown"; returns how many ran.

    A failing op is logged and skipped: the leader ran the same op on the same inputs, failed
    the same way, and carries on too."""
    ran = 0
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


def _comm_device(engine: EarlyExitEngine) -> torch.device | None:
    """nccl moves pickled objects through the GPU; gloo through the CPU."""
    return engine.device if engine.device.type == "cuda" else None

"""Run a test function on N CPU processes (gloo), as torchrun would, and collect results.

The processes fork from a multiprocessing forkserver that imported torch and the trainer once
(`context`): started as fresh interpreters, each paid ~5 s of CPU importing them on the 2-core
development machine, more than most of these tests compute."""

from __future__ import annotations

import io
import os
import socket
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# What the forkserver imports once, so that no process it starts imports it again (torch._dynamo:
# torch's optimizers import it on first use).
PRELOAD = ["torch", "torch._dynamo", "torch.distributed", "megatron.early_exit.training.trainer"]
_context = None


def context():
    """The multiprocessing context of the suite's processes: a forkserver preloading `PRELOAD`
    (spawn where the platform has no forkserver)."""
    global _context
    if _context is None:
        if "forkserver" in mp.get_all_start_methods():
            _context = mp.get_context("forkserver")
            _context.set_forkserver_preload(PRELOAD)
        else:
            _context = mp.get_context("spawn")
    return _context


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, fn, args, queue):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        result = fn(rank, world, *args)
        buf = io.BytesIO()  # plain bytes: shared-memory tensors would die with this process
        torch.save(result, buf)
        queue.put((rank, "ok", buf.getvalue()))
    except BaseException:  # report the traceback to the parent instead of hanging it
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world: int, *args, timeout: float = 240.0) -> list:
    """fn(rank, world, *args) on `world` processes; returns the per-rank results."""
    ctx = context()
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, fn, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in range(world):
            rank, status, value = queue.get(timeout=timeout)
            if status == "error":
                raise AssertionError(f"rank {rank} failed:\n{value}")
            results[rank] = torch.load(io.BytesIO(value), weights_only=False)  # our own child's bytes
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world)]

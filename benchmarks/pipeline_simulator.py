#!/usr/bin/env python
"""Predict 1F1B iteration time and bubble fraction for early-exit pipelines.

From per-layer and per-head costs (measured on this machine, or given in layer units), an
event-driven simulation of Megatron's 1F1B schedule as our trainer runs it (exit heads
evaluated lazily right before each backward, so their forward and backward cost lands in
the stage's backward step) gives the iteration time and the share of idle stage-time.

    python benchmarks/pipeline_simulator.py            # the paper's 1.3B / 7B layouts, in layer units
    python benchmarks/pipeline_simulator.py --pp 4 --micro-batches 16 --layers 24 --exits 6 12

Costs are in units of one transformer layer's forward time; backward = `--backward-forward-ratio`
times forward (2.0 by default: two matmuls per forward one). A vocabulary head over V with
hidden h costs about V / (12 h) + ... layers (see megatron.early_exit.parallel.pipeline.head_cost).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass
class StageCost:
    forward: float  # one micro-batch's forward through the stage's layers (+ embedding / final head)
    backward: float  # its backward
    exit_work: float  # its exits: forward + backward, done right before the backward
    overhead: float = 0.0  # fixed cost of every forward and every backward step (Python, losses, p2p set-up)
    fill_forward: float = 0.0  # a bubble-filling micro-batch: forward without the final head
    fill_backward: float = 0.0  # its backward, exits included


def one_f_one_b_order(pp: int, rank: int, m: int, fill_at: int = -1, warm_fills: int = 0, cool_fills: int = 0):
    """This stage's ops in the order our schedule runs them (training/schedules.py): F/B of
    regular micro-batches; for a filling stage, the warm-up fills (all forwards, then all
    backwards) right after regular forward number `fill_at`, the cool-down fills at the end."""
    warmup = min(pp - rank - 1, m)
    fills_w = [("FF", j) for j in range(warm_fills)] + [("FB", j) for j in range(warm_fills)]
    fills_c = [("FF", warm_fills + j) for j in range(cool_fills)] + [("FB", warm_fills + j) for j in range(cool_fills)]
    order = []
    for k in range(warmup):
        order.append(("F", k))
        if k + 1 == fill_at:
            order += fills_w
    for i in range(m - warmup):
        order.append(("F", warmup + i))
        if warmup + i + 1 == fill_at:
            order += fills_w
        order.append(("B", i))
    order += [("B", k) for k in range(m - warmup, m)]
    return order + fills_c


def _producer(kind: str, r: int, k: int, last: int) -> tuple[tuple[str, int, int], bool]:
    """The op whose result op (kind, r, k) consumes, and whether it crosses a stage (a message).
    `last`: the last stage this kind of micro-batch reaches (pp - 1, or the last exit stage for fills)."""
    if kind in ("F", "FF"):
        return ((kind, r - 1, k), True) if r > 0 else (("start", 0, 0), False)
    fwd = "F" if kind == "B" else "FF"
    return ((kind, r + 1, k), True) if r < last else ((fwd, r, k), False)


def share_rate(running: int, cores: int | None, pp: int, sharing: float = 1.0) -> float:
    """Speed of each of `running` computing stages on `cores` cores (1.0 = a core of its own).
    Processor sharing: cores / running once the stages outnumber the cores, times the
    efficiency of that sharing; `sharing` is the efficiency with all `pp` stages computing
    (measured by the run: context switches and caches shared between processes cost), taken
    linearly from 1.0 at `cores` running stages to `sharing` at `pp`."""
    if cores is None or running <= cores:
        return 1.0
    efficiency = 1.0 - (1.0 - sharing) * (running - cores) / max(pp - cores, 1)
    return cores / running * efficiency


def simulate(
    stages: list[StageCost],
    m: int,
    p2p: float = 0.0,
    cores: int | None = None,
    fills: tuple[int, int] = (0, 0),
    last_exit_stage: int = -1,
    sharing: float = 1.0,
    p2p_loaded: float | None = None,
) -> dict[str, float]:
    """Event-driven 1F1B over the stages' op orders: an op starts when its input exists
    (plus a message time between stages) and its stage is free; `cores`: the stages share
    that many cores (processor sharing, see `share_rate`; None = one device per stage).
    A message costs `p2p`, or `p2p_loaded` when it leaves while the other stages keep every
    core busy (its receiver then waits for a core too). `fills`: warm-up and cool-down
    bubble-filling micro-batches, run by stages 0..last_exit_stage."""
    pp = len(stages)
    warm, cool = fills
    fill_at = min(pp - last_exit_stage, m) if warm and last_exit_stage >= 0 else -1
    orders = [
        one_f_one_b_order(pp, r, m, fill_at, warm, cool) if r <= last_exit_stage else one_f_one_b_order(pp, r, m)
        for r in range(pp)
    ]
    loaded = p2p if p2p_loaded is None else p2p_loaded
    done: dict[tuple[str, int, int], float] = {("start", 0, 0): 0.0}
    message: dict[tuple[str, int, int], float] = {}  # the time of the message each op sends
    pos, busy = [0] * pp, [0.0] * pp
    free_at = [0.0] * pp  # when the stage finished its previous op
    left: list[float | None] = [None] * pp  # work left in the running op
    now = 0.0
    while any(pos[r] < len(orders[r]) for r in range(pp)):
        ready = []  # (start time, stage) of ops whose input is known
        for r in range(pp):
            if pos[r] >= len(orders[r]):
                continue
            if left[r] is not None:
                ready.append((now, r))
                continue
            kind, k = orders[r][pos[r]]
            key, crosses = _producer(kind, r, k, pp - 1 if kind in ("F", "B") else last_exit_stage)
            if key in done:
                ready.append((max(free_at[r], done[key] + (message[key] if crosses else 0.0)), r))
        if not ready:
            raise RuntimeError("schedule deadlock in the simulator")
        for start, r in ready:
            if start <= now and left[r] is None:
                left[r] = _op_cost(stages[r], orders[r][pos[r]][0])
                busy[r] += left[r]
        running = [r for r in range(pp) if left[r] is not None]
        rate = share_rate(len(running), cores, pp, sharing)
        events = [left[r] / rate for r in running] + [s - now for s, r in ready if left[r] is None and s > now]
        step = min(events)
        now += step
        finished = []
        for r in running:
            left[r] -= step * rate
            if left[r] <= 1e-12:
                finished.append(r)
        still = len(running) - len(finished)
        for r in finished:
            kind, k = orders[r][pos[r]]
            done[(kind, r, k)] = free_at[r] = now
            message[(kind, r, k)] = loaded if cores is not None and still >= cores else p2p
            left[r] = None
            pos[r] += 1
    return {"time": now, "bubble": 1.0 - sum(busy) / (pp * now), "busy": busy}


def _op_cost(stage: StageCost, kind: str) -> float:
    cost = {
        "F": stage.forward,
        "B": stage.backward + stage.exit_work,
        "FF": stage.fill_forward,
        "FB": stage.fill_backward,
    }[kind]
    return cost + stage.overhead


def stage_costs(
    num_layers: int,
    pp: int,
    exits: list[int],
    exit_cost: float,
    final_cost: float,
    bwd_ratio: float,
    bounds: list[tuple[int, int]] | None = None,
) -> list[StageCost]:
    from megatron.early_exit.parallel.pipeline import split_stages

    if bounds is None:
        bounds = [s.layer_range for s in split_stages(num_layers, pp, uniform=num_layers % pp == 0)]
    costs = []
    for i, (a, b) in enumerate(bounds):
        fwd = float(b - a) + (final_cost if i == pp - 1 else 0.0)
        n_exits = sum(1 for n in exits if a < n <= b)
        costs.append(StageCost(fwd, bwd_ratio * fwd, n_exits * exit_cost * (1 + bwd_ratio)))
    return costs


def head_cost_layers(hidden: int, vocab: int, ffn: int, swiglu: bool) -> float:
    mlp = (3 if swiglu else 2) * hidden * ffn
    return hidden * vocab / (4 * hidden * hidden + mlp)


PAPER = {
    # name: layers, hidden, ffn, vocab, exits
    "1.3B": (24, 2048, 8192, 50304, [6, 12]),
    "7B": (32, 4096, 11008, 50304, [8, 16]),
}


@dataclass
class GpuAssumptions:
    """What the paper's table assumes, to turn the measured-on-CPU overhead and p2p terms
    into layer units for GPU clusters (none of it measured here; change with the flags)."""

    tflops: float = 150.0  # achieved bf16 matmul throughput per GPU (A100-class, ~50% of peak)
    link_gbs: float = 25.0  # inter-stage bandwidth, GB/s (one InfiniBand HDR link)
    latency_ms: float = 0.05  # per message, on top of bandwidth
    overhead_ms: float = 0.3  # per forward or backward step of a stage (launches, Python, loss)
    seq: int = 2048
    micro_batch: int = 1

    def layer_ms(self, hidden: int, ffn: int, swiglu: bool) -> float:
        tokens = self.seq * self.micro_batch
        matmul = 2 * tokens * (4 * hidden * hidden + (3 if swiglu else 2) * hidden * ffn)
        attention = 4 * tokens * self.seq * hidden
        return (matmul + attention) / (self.tflops * 1e9)

    def p2p_ms(self, hidden: int) -> float:
        return self.latency_ms + 2 * self.seq * self.micro_batch * hidden / (self.link_gbs * 1e6)  # bf16


def paper_table(bwd_ratio: float, gpu: GpuAssumptions) -> list[str]:
    rows = [
        "| model | PP | micro-batches | iteration (no exits) | with exits | exit overhead | bubble (no exits) |"
        " bubble (exits) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, (layers, hidden, ffn, vocab, exits) in PAPER.items():
        swiglu = name == "7B"
        head = head_cost_layers(hidden, vocab, ffn, swiglu)
        unit = gpu.layer_ms(hidden, ffn, swiglu)
        p2p, overhead = gpu.p2p_ms(hidden) / unit, gpu.overhead_ms / unit
        for pp in (4, 8, 16):
            if layers % pp:
                continue
            for m in (8, 32, 128):
                runs = []
                for ex in ([], exits):
                    costs = stage_costs(layers, pp, ex, head, head, bwd_ratio)
                    for c in costs:
                        c.overhead = overhead
                    runs.append(simulate(costs, m, p2p))
                base, ee = runs
                rows.append(
                    f"| {name} | {pp} | {m} | {base['time']:.0f} | {ee['time']:.0f} | "
                    f"{ee['time'] / base['time'] - 1:+.1%} | {base['bubble']:.1%} | {ee['bubble']:.1%} |"
                )
    return rows


def assumptions_text(bwd_ratio: float, gpu: GpuAssumptions) -> str:
    units = []
    for name, (_, hidden, ffn, _, _) in PAPER.items():
        unit = gpu.layer_ms(hidden, ffn, name == "7B")
        units.append(
            f"{name}: one layer forward {unit:.2f} ms, p2p {gpu.p2p_ms(hidden) / unit:.3f} units, "
            f"overhead {gpu.overhead_ms / unit:.3f} units per step"
        )
    return (
        f"Simulated 1F1B, times in layer-forward units; backward/forward = {bwd_ratio}; exits are norm + "
        f"vocabulary heads, evaluated lazily right before each backward; uniform layer split (the last stage also "
        f"carries the final head); one device per stage. Calibrated terms, as on the measured CPU runs: a fixed "
        f"overhead per forward and per backward step, and a transfer time per message between stages; for GPUs "
        f"they are assumed: {gpu.tflops:g} TFLOPS achieved, {gpu.link_gbs:g} GB/s + {gpu.latency_ms:g} ms per "
        f"message (bf16 activations, seq {gpu.seq}, micro-batch {gpu.micro_batch}), {gpu.overhead_ms:g} ms per "
        f"step. " + "; ".join(units) + "."
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pp", type=int)
    p.add_argument("--micro-batches", type=int, default=16)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--exits", type=int, nargs="*", default=[6, 12])
    p.add_argument("--exit-cost", type=float, default=1.0, help="one exit head, in layer-forward units")
    p.add_argument("--final-cost", type=float, default=1.0, help="the final head, in layer-forward units")
    p.add_argument("--backward-forward-ratio", type=float, default=2.0)
    p.add_argument("--gpu-tflops", type=float, default=GpuAssumptions.tflops, help="paper table: achieved TFLOPS")
    p.add_argument("--link-gbs", type=float, default=GpuAssumptions.link_gbs, help="paper table: GB/s between stages")
    p.add_argument("--overhead-ms", type=float, default=GpuAssumptions.overhead_ms, help="paper table: ms per step")
    a = p.parse_args()
    if a.pp is None:
        gpu = GpuAssumptions(tflops=a.gpu_tflops, link_gbs=a.link_gbs, overhead_ms=a.overhead_ms)
        print(assumptions_text(a.backward_forward_ratio, gpu) + "\n")
        print("\n".join(paper_table(a.backward_forward_ratio, gpu)))
        return
    for label, exits in (("no exits", []), ("exits", a.exits)):
        costs = stage_costs(a.layers, a.pp, exits, a.exit_cost, a.final_cost, a.backward_forward_ratio)
        r = simulate(costs, a.micro_batches)
        print(
            f"{label:9s} iteration {r['time']:.1f}  bubble {r['bubble']:.1%}  busy per stage "
            + " ".join(f"{b:.1f}" for b in r["busy"])
        )


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Exit heads in a pipeline: do they cost anything? (EE-LLM: exits placed on early stages run
in those stages' implicit bubbles, since the last stage also carries the final head.)

Runs PP2 and PP4 under torchrun (gloo, 1 thread per rank), side by side: the same model
without exits, with exits (`--exits`, default one after layer 2) on the first stage, and with
those exits plus explicit-bubble filling (`--fill` extra micro-batches); prints per-stage time
per iteration and peak memory, and their ratios. Each run also calibrates the simulator
(benchmarks/pipeline_simulator.py) on itself, before its timed iterations:
- every stage times its forward and backward steps (regular and bubble-filling) through the
  schedule's own functions (so the fixed per-micro-batch overhead of Python, losses and
  autograd is in; shown against the per-layer and per-head costs measured in this process),
  as many stages at once as there are cores (each with a core of its own);
- when the stages outnumber the cores, all stages run those steps at once for a while: the
  work done against the cores' capacity is the efficiency of processor sharing (context
  switches, caches shared by processes), which the simulator applies whenever more stages
  compute than there are cores;
- stages 0 and 1 time one activation message (ping-pong), idle, and again while the other
  stages compute (a receiver then waits for a core); the simulator charges the loaded time
  to a message sent while the other stages keep every core busy;
- every rank times the part of an iteration spent outside the schedule (data, gradient
  sync, optimizer step).
The simulator then predicts each run's iteration time. Next to it, a replay: the same
simulation fed with the op times each stage recorded inside its own timed schedule (said so:
these come from the very iterations being predicted; they include whatever contention the
run met, so the replay has no sharing model). Replay right and prediction wrong means the
calibrated op costs are off (the per-stage ratios in-schedule / calibrated show which);
replay wrong too means the schedule model is. Cores are the ones this process may run on
(`taskset -c 0,1 python ...` gives a 2-core run on a bigger machine).

    python benchmarks/pipeline_exits.py                   # ~6 minutes on 2 cores
    python benchmarks/pipeline_exits.py --pp-sizes 2      # PP2 only
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
CORES = len(os.sched_getaffinity(0))  # what taskset allows, not the machine's count

MODEL = ["--num-layers", "8", "--hidden-size", "256", "--num-attention-heads", "8", "--seq-length", "128",
         "--normalization", "RMSNorm", "--swiglu", "--position-embedding-type", "rope", "--disable-bias-linear",
         "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "8000"]  # fmt: skip


def worker(ns) -> None:
    """Under torchrun: train, time, report (rank 0 prints one JSON line for all ranks)."""
    import torch
    import torch.distributed as dist

    from megatron.early_exit.arguments import parse_args
    from megatron.early_exit.training import trainer as trainer_module

    torch.set_num_threads(1)
    schedule_ms = []  # the schedule's share of each iteration; the rest (data, sync, step) is the tail
    schedule = trainer_module.forward_backward_1f1b

    def timed_schedule(*args, **kwargs):
        start = time.perf_counter()
        result = schedule(*args, **kwargs)
        schedule_ms.append(1000 * (time.perf_counter() - start))
        return result

    trainer_module.forward_backward_1f1b = timed_schedule
    op_ms = record_op_times()
    argv = [*MODEL, "--pipeline-model-parallel-size", str(ns.pp), "--micro-batch-size", str(ns.micro_batch_size),
            "--global-batch-size", str(ns.micro_batch_size * ns.micro_batches), "--train-iters", "1000",
            "--lr", "1e-4", "--eval-interval", "0", "--device", "cpu", "--pipeline-split", "uniform"]  # fmt: skip
    if ns.exits:
        argv += ["--exit-layer-nums", *map(str, ns.exits), "--use-exit-norm"]
    if ns.fill:
        argv += ["--fill-explicit-bubbles", "--num-fill-warmup-microbatches", str(ns.fill)]
    trainer = trainer_module.Trainer(parse_args(argv))
    for _ in range(ns.warmup):
        trainer.train_step()
    calibration = calibrate(trainer, ns)
    dist.barrier()
    schedule_ms.clear()
    op_ms.clear()
    start = time.perf_counter()
    for _ in range(ns.iters):
        trainer.train_step()
    ms = 1000 * (time.perf_counter() - start) / ns.iters
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tail = ms - sum(schedule_ms) / len(schedule_ms)
    ops = {f"sched_{kind}": (total / n, n / ns.iters) for kind, (total, n) in op_ms.items()}
    mine = {"rank": dist.get_rank(), "ms": ms, "peak_mib": peak, "tail_ms": tail, **calibration, **ops}
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, mine)
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps(out), flush=True)
    dist.destroy_process_group()


def record_op_times() -> dict[str, list[float]]:
    """Time the schedule's steps as it runs them: {kind: [total ms, count]} for regular
    forwards F and backward steps B, fill forwards FF, whole fill phases (forwards, backwards
    and their messages) and p2p calls (transfer and waiting)."""
    from megatron.early_exit.training import schedules

    times: dict[str, list[float]] = {}

    def timed(kind_of, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            result = fn(*args, **kwargs)
            entry = times.setdefault(kind_of(args, kwargs), [0.0, 0])
            entry[0] += 1000 * (time.perf_counter() - start)
            entry[1] += len(args[1]) if fn is fill_phase else 1
            return result

        return wrapper

    fill_phase = schedules._fill_phase
    schedules.forward_step = timed(lambda a, k: "FF" if k.get("exits_only") else "F", schedules.forward_step)
    schedules.backward_step = timed(lambda a, k: "B", schedules.backward_step)
    schedules._fill_phase = timed(lambda a, k: "fill", fill_phase)
    schedules.p2p = timed(lambda a, k: "p2p", schedules.p2p)
    return times


def _time_ms(fn, n: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return 1000 * (time.perf_counter() - start) / n


def calibrate(trainer, ns) -> dict[str, float]:
    """The simulator's inputs, measured in the run itself: this stage's forward, backward
    (exits included), and fill forward / backward per micro-batch, through the schedule's own
    step functions (so Python, loss and autograd overheads are in), with as many stages
    measuring at once as there are cores (a core each); with more stages than cores, the work
    all of them get done at once (the sharing efficiency); and the time of one activation-sized
    message between stages 0 and 1 (ping-pong), idle and while the other stages compute."""
    import torch
    import torch.distributed as dist

    from megatron.early_exit.training.schedules import backward_step, forward_step

    ctx, ps = trainer._context(), trainer.pstate
    batch = {k: v.to(ctx.device) for k, v in trainer._next_batches(trainer.train_iter, 1)[0].items()}
    x = None if ps.is_first_stage else torch.randn(ctx.activation_shape, requires_grad=True)
    grad = None if ps.is_last_stage else torch.randn(ctx.activation_shape) * 1e-3

    def fwd(exits_only=False):
        return forward_step(ctx, batch, x, exits_only=exits_only)

    def step():
        backward_step(ctx, batch, fwd(), x, grad)

    out = {}
    cores = min(CORES, ps.dims.pp)
    for group in range(0, ps.dims.pp, cores):
        if group <= ps.pp_rank < group + cores:
            out["forward_ms"] = _time_ms(fwd, ns.calib_reps)
            # forward + backward step (exits evaluated lazily inside, as in the schedule)
            out["step_ms"] = _time_ms(step, ns.calib_reps)
            out["fill_forward_ms"] = _time_ms(lambda: fwd(True), ns.calib_reps)
            out["fill_step_ms"] = _time_ms(lambda: backward_step(ctx, batch, fwd(True), x, grad), ns.calib_reps)
        dist.barrier()
    if ps.dims.pp > CORES:
        out["shared_work_ms"], out["shared_wall_ms"] = _all_at_once(step, out["step_ms"], ns.calib_reps, ps.dims.pp)
    trainer.model.zero_grad(set_to_none=True)
    out["p2p_ms"] = _ping_pong(ctx.template(), ps, ns.calib_reps)
    out["p2p_loaded_ms"] = _ping_pong(ctx.template(), ps, ns.calib_reps, load=step) if ps.dims.pp > 2 else out["p2p_ms"]
    trainer.model.zero_grad(set_to_none=True)
    dist.barrier()
    return out


def _all_at_once(step, step_ms: float, reps: int, pp: int) -> tuple[float, float]:
    """Every stage runs its steps at once, for about `reps` steps' worth of time at the
    cores-shared speed: (CPU work done, in ms of the step measured with a core of its own;
    wall ms). Summed over stages, work / (cores x wall) is the efficiency of the sharing."""
    import torch
    import torch.distributed as dist

    longest = torch.tensor([step_ms])
    dist.all_reduce(longest, op=dist.ReduceOp.MAX)
    budget = reps * float(longest) * pp / CORES / 1000  # seconds: every stage busy throughout
    dist.barrier()
    start, done = time.perf_counter(), 0
    while time.perf_counter() - start < budget:
        step()
        done += 1
    wall = 1000 * (time.perf_counter() - start)
    dist.barrier()
    return done * step_ms, wall


def _ping_pong(template, ps, reps: int, load=None) -> float:
    """ms per activation message between stages 0 and 1 (two per round); with `load`, the
    other stages run it meanwhile, until stage 0 posts in the rendezvous store that the
    ping-pong is over (gloo's irecv never reports completion to a poll, so not a message)."""
    import torch.distributed as dist

    from megatron.early_exit.parallel.pipeline import p2p

    store = dist.distributed_c10d._get_default_store()
    dist.barrier()
    if ps.pp_rank > 1:
        if load is not None:  # one step before saying so: stages 0 and 1 start once every loader runs
            load()
            store.set(f"loading_{ps.pp_rank}", "1")
        while load is not None and not store.check(["ping_pong_done"]):
            load()
        return 0.0
    if load is not None:  # else a fast ping-pong could end before the loaders were scheduled at all
        store.wait([f"loading_{r}" for r in range(2, ps.dims.pp)])
    start = time.perf_counter()
    for _ in range(reps):  # stage 0 sends, stage 1 answers: two messages per round
        if ps.pp_rank == 0:
            p2p(template, ps.stage_rank(1), None, None)
            p2p(None, None, template, ps.stage_rank(1))
        else:
            p2p(None, None, template, ps.stage_rank(0))
            p2p(template, ps.stage_rank(0), None, None)
    ms = 1000 * (time.perf_counter() - start) / (2 * reps)
    if load is not None and ps.pp_rank == 0:
        store.set("ping_pong_done", "1")
    return ms


def run(ns, exits, fill=0, pp=2) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={pp}", __file__, "--worker",
           "--pp", str(pp), "--calib-reps", str(ns.calib_reps),
           "--iters", str(ns.iters), "--warmup", str(ns.warmup), "--micro-batches", str(ns.micro_batches),
           "--micro-batch-size", str(ns.micro_batch_size), "--fill", str(fill),
           "--exits", *map(str, exits)]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(proc.stdout[-2000:] + proc.stderr[-3000:])
    return json.loads(lines[0][len("RESULT ") :])


def measured_costs(ns) -> dict[str, float]:
    """Forward and backward time (ms) of one layer and one vocabulary head, 1 thread."""
    import torch

    from megatron.early_exit.config import ModelConfig
    from megatron.early_exit.model.layer import TransformerLayer

    torch.set_num_threads(1)
    cfg = ModelConfig(num_layers=8, hidden_size=256, num_attention_heads=8, vocab_size=8064,
                      max_position_embeddings=128, normalization="RMSNorm", swiglu=True,
                      position_embedding_type="rope", add_bias_linear=False)  # fmt: skip
    layer = TransformerLayer(cfg)
    weight = torch.nn.Parameter(torch.randn(cfg.vocab_size, 256) * 0.02)
    x = torch.randn(ns.micro_batch_size, 128, 256, requires_grad=True)
    labels = torch.randint(0, 8000, (ns.micro_batch_size, 128))
    from megatron.early_exit.model.rotary import RotaryEmbedding

    rot = RotaryEmbedding(32, 10000.0)(torch.arange(128)[None])

    def time_it(fn, n=10):
        fn()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        return 1000 * (time.perf_counter() - t) / n

    def head_loss():
        return torch.nn.functional.cross_entropy((x @ weight.t()).view(-1, cfg.vocab_size), labels.view(-1))

    layer_f = time_it(lambda: layer(x, rot))
    layer_fb = time_it(lambda: layer(x, rot).sum().backward())
    head_f = time_it(head_loss)
    head_fb = time_it(lambda: head_loss().backward())
    return {"layer_f": layer_f, "layer_b": layer_fb - layer_f, "head_f": head_f, "head_b": head_fb - head_f}


def sharing_efficiency(runs: list[dict]) -> float:
    """Work done / capacity used while all stages computed at once (1.0 when they never
    outnumbered the cores)."""
    if "shared_work_ms" not in runs[0]:
        return 1.0
    wall = max(r["shared_wall_ms"] for r in runs)
    return sum(r["shared_work_ms"] for r in runs) / (min(CORES, len(runs)) * wall)


def predict(runs: list[dict], m: int, fill: int, exits: list[int], replay: bool = False) -> dict[str, float]:
    """The calibrated simulator for one measured run: per-stage costs, sharing efficiency and
    message times measured in that run, the stages sharing this machine's cores. `replay`:
    the op times each stage recorded inside its timed schedule instead (contention included,
    so one device per stage), for telling op-cost errors from schedule-model errors."""
    from pipeline_simulator import StageCost, simulate

    if replay:
        stages = [_replayed_costs(r) for r in runs]
    else:
        # The step timings ran a forward each (a backward needs one): take it out.
        stages = [
            StageCost(
                r["forward_ms"],
                r["step_ms"] - r["forward_ms"],
                0.0,
                fill_forward=r["fill_forward_ms"],
                fill_backward=r["fill_step_ms"] - r["fill_forward_ms"],
            )
            for r in runs
        ]
    layers_per_stage = 8 // len(runs)
    last_exit_stage = max((n - 1) // layers_per_stage for n in exits) if exits else -1
    shared = {"cores": CORES, "sharing": sharing_efficiency(runs), "p2p_loaded": runs[0]["p2p_loaded_ms"]}
    shared = {} if replay else shared
    result = simulate(stages, m, runs[0]["p2p_ms"], fills=(fill, 0), last_exit_stage=last_exit_stage, **shared)
    # Outside the schedule (data, gradient sync and norm, optimizer step, loss logging): the
    # least tail of any rank is the work itself; the others' include waiting for the slowest.
    result["time"] += min(r["tail_ms"] for r in runs)
    return result


def _replayed_costs(r: dict):
    """A stage's mean op times inside its timed schedule (fill backward: the fill phase less
    its forwards, per fill micro-batch, fill messages included)."""
    from pipeline_simulator import StageCost

    f, b = r["sched_F"][0], r["sched_B"][0]
    if "sched_fill" not in r:
        return StageCost(f, b, 0.0)
    (ff, n_ff), (phase, n_fill) = r["sched_FF"], r["sched_fill"]
    return StageCost(f, b, 0.0, fill_forward=ff, fill_backward=(phase * n_fill - ff * n_ff) / n_fill)


def op_ratio_line(runs: list[dict]) -> str:
    """Per stage, mean op time inside the schedule / calibrated: above 1, the run met
    contention (or cold caches) the calibration did not."""
    parts = []
    for i, r in enumerate(runs):
        f, b = r["sched_F"][0] / r["forward_ms"], r["sched_B"][0] / (r["step_ms"] - r["forward_ms"])
        parts.append(f"stage {i} F {f:.2f} B {b:.2f}")
    return "in schedule / calibrated: " + ", ".join(parts)


def overhead_line(runs: list[dict], c: dict[str, float]) -> str:
    """What the stage steps cost beyond their layers and heads: the fixed per-micro-batch overhead."""
    n = 8 // len(runs)
    first = runs[0]["forward_ms"] - n * c["layer_f"]
    last = runs[-1]["forward_ms"] - n * c["layer_f"] - c["head_f"]
    first_b = runs[0]["step_ms"] - runs[0]["forward_ms"] - n * c["layer_b"]
    return (
        f"per-micro-batch overhead beyond layers and heads: stage 0 forward {first:+.1f} ms, backward step "
        f"{first_b:+.1f} ms; last stage forward {last:+.1f} ms; p2p {runs[0]['p2p_ms']:.2f} ms per message; "
        f"per iteration outside the schedule {min(r['tail_ms'] for r in runs):.0f} ms"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--pp", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--pp-sizes", type=int, nargs="+", default=[2, 4], help="pipeline sizes to run (8 layers)")
    p.add_argument("--fill", type=int, default=1, help="fill micro-batches per iteration for the filling run")
    p.add_argument("--exits", type=int, nargs="*", default=[2], help="exit layers of the with-exits run (stage 0)")
    p.add_argument("--iters", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--calib-reps", type=int, default=5, help="repetitions of each calibration measurement")
    p.add_argument("--micro-batches", type=int, default=8)
    p.add_argument("--micro-batch-size", type=int, default=2)
    ns = p.parse_args()
    if ns.worker:
        worker(ns)
        return
    print(
        f"PP under torchrun on {CORES} cores, 1 thread per rank; 8 layers, hidden 256, vocab 8000, "
        f"seq 128, {ns.micro_batches} micro-batches of {ns.micro_batch_size}; exits {ns.exits}: norm + tied head"
    )
    c = measured_costs(ns)
    print(
        f"measured in one process (1 thread, ms per micro-batch): layer fwd {c['layer_f']:.1f} bwd "
        f"{c['layer_b']:.1f}; head fwd {c['head_f']:.1f} bwd {c['head_b']:.1f}"
    )
    rows = []
    for pp in ns.pp_sizes:
        base = run(ns, [], pp=pp)
        ee = run(ns, ns.exits, pp=pp)
        print(f"\nPP{pp}: " + overhead_line(base, c))
        head = f"{'stage':6s} {'ms/iter no exits':>17s} {'with exits':>11s} {'ratio':>6s} {'peak MiB':>9s}"
        print(head + f" {'ratio':>6s}")
        for a, b in zip(base, ee):
            print(
                f"{a['rank']:<6d} {a['ms']:17.0f} {b['ms']:11.0f} {b['ms'] / a['ms']:6.3f} {a['peak_mib']:9.0f} "
                f"{b['peak_mib'] / a['peak_mib']:6.3f}"
            )
        cases = [("no exits", base, [], 0), (f"{len(ns.exits)} exit(s)", ee, ns.exits, 0)]
        if ns.fill:
            cases.append((f"exits + {ns.fill} fill", run(ns, ns.exits, ns.fill, pp=pp), ns.exits, ns.fill))
        for label, runs, exits, fill in cases:
            measured = max(r["ms"] for r in runs)
            predicted = predict(runs, ns.micro_batches, fill, exits)["time"]
            replayed = predict(runs, ns.micro_batches, fill, exits, replay=True)["time"]
            rows.append((pp, label, measured, predicted, replayed))
            print(
                f"{label}: sharing efficiency {sharing_efficiency(runs):.3f}, p2p idle {runs[0]['p2p_ms']:.2f} ms / "
                f"loaded {runs[0]['p2p_loaded_ms']:.2f} ms; " + op_ratio_line(runs)
            )
    base_of = {row[0]: row[2] for row in rows if row[1] == "no exits"}
    print(
        f"\n{'layout':6s} {'run':16s} {'measured ms':>11s} {'vs no exits':>11s} {'simulated':>9s} {'error':>7s} "
        f"{'replay':>7s} {'error':>7s}"
    )
    for pp, label, measured, predicted, replayed in rows:
        print(
            f"PP{pp:<4d} {label:16s} {measured:11.0f} {measured / base_of[pp]:11.3f} {predicted:9.0f} "
            f"{predicted / measured - 1:+7.1%} {replayed:7.0f} {replayed / measured - 1:+7.1%}"
        )


if __name__ == "__main__":
    main()

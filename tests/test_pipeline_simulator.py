"""The 1F1B simulator (benchmarks/pipeline_simulator.py) against closed forms."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

from pipeline_simulator import StageCost, one_f_one_b_order, simulate  # noqa: E402


def test_uniform_stages_take_m_plus_p_minus_1_slots():
    # Equal stages, one device each: (m + p - 1) * (f + b). Messages add at least one
    # trip down and back through the pipeline (more: the steady state waits on them too).
    stages = [StageCost(1.0, 2.0, 0.0) for _ in range(4)]
    assert simulate(stages, 8)["time"] == pytest.approx((8 + 3) * 3.0)
    assert simulate(stages, 8, p2p=0.5)["time"] >= (8 + 3) * 3.0 + 2 * 3 * 0.5


def test_overhead_is_paid_by_every_step():
    stages = [StageCost(1.0, 2.0, 0.0, overhead=0.25) for _ in range(2)]
    assert simulate(stages, 4)["time"] == pytest.approx((4 + 1) * 3.5)


def test_stages_sharing_one_core_take_the_total_work():
    # Processor sharing on one core: some stage always has work, so the iteration is the sum of all work.
    stages = [StageCost(1.0, 2.0, 0.5), StageCost(1.5, 3.0, 0.0)]
    assert simulate(stages, 6, cores=1)["time"] == pytest.approx(6 * (3.5 + 4.5))


def test_fill_order_matches_the_schedule():
    # Stage 0 of PP2 with exits only there: fill forwards and backwards right after the
    # regular forward number min(pp - last_exit_stage, m) = 2 (training/schedules.py).
    order = one_f_one_b_order(2, 0, 3, fill_at=2, warm_fills=2, cool_fills=1)
    assert order == [
        ("F", 0), ("F", 1), ("FF", 0), ("FF", 1), ("FB", 0), ("FB", 1), ("B", 0),
        ("F", 2), ("B", 1), ("B", 2), ("FF", 2), ("FB", 2),
    ]  # fmt: skip
    stages = [StageCost(1.0, 2.0, 0.5, fill_forward=1.0, fill_backward=2.5), StageCost(1.5, 3.0, 0.0)]
    plain = simulate(stages, 3, last_exit_stage=0)["time"]
    assert simulate(stages, 3, fills=(2, 1), last_exit_stage=0)["time"] > plain


def test_share_rate_is_processor_sharing_with_the_measured_efficiency():
    from pipeline_simulator import share_rate

    assert share_rate(2, 2, 4, sharing=0.8) == 1.0  # a core each
    assert share_rate(4, 2, 4, sharing=0.8) == pytest.approx(0.5 * 0.8)  # all stages: the measured efficiency
    assert share_rate(3, 2, 4, sharing=0.8) == pytest.approx(2 / 3 * 0.9)  # halfway: linear in between
    assert share_rate(4, None, 4, sharing=0.8) == 1.0  # one device per stage


def test_sharing_efficiency_only_costs_when_stages_outnumber_cores():
    stages = [StageCost(1.0, 2.0, 0.0) for _ in range(4)]
    ideal = simulate(stages, 8, cores=2)["time"]
    lossy = simulate(stages, 8, cores=2, sharing=0.8)["time"]
    # Slower, but by less than 1/0.8: the warm-up and cool-down run fewer stages than cores.
    assert ideal < lossy < ideal / 0.8
    two = [StageCost(1.0, 2.0, 0.0) for _ in range(2)]
    assert simulate(two, 8, cores=2, sharing=0.5)["time"] == simulate(two, 8, cores=2)["time"]


def test_loaded_message_time_applies_only_while_the_cores_are_busy():
    two = [StageCost(1.0, 2.0, 0.0), StageCost(1.0, 2.0, 0.0)]
    # One micro-batch: no stage computes while another's message travels, so the loaded time never applies.
    assert simulate(two, 1, p2p=0.5, cores=1, p2p_loaded=5.0)["time"] == pytest.approx(3.0 + 3.0 + 2 * 0.5)
    # Many: stage 1 computes while stage 0's activations leave, on the only core.
    assert simulate(two, 6, p2p=0.5, cores=1, p2p_loaded=5.0)["time"] > simulate(two, 6, p2p=0.5, cores=1)["time"]
    # One device per stage: never loaded.
    assert simulate(two, 6, p2p=0.5, p2p_loaded=5.0)["time"] == simulate(two, 6, p2p=0.5)["time"]


def _run(rank, f, b, ff, fb, m, fill):
    """One rank's record as benchmarks/pipeline_exits.py's worker reports it."""
    r = {"rank": rank, "forward_ms": f, "step_ms": f + b, "fill_forward_ms": ff, "fill_step_ms": ff + fb,
         "p2p_ms": 0.5, "p2p_loaded_ms": 0.5, "tail_ms": 7.0 + rank, "sched_F": (f, m), "sched_B": (b, m)}  # fmt: skip
    if fill:
        r["sched_FF"], r["sched_fill"] = (ff, fill), (ff + fb, fill)
    return r


def test_benchmark_prediction_and_replay(monkeypatch):
    import pipeline_exits

    monkeypatch.setattr(pipeline_exits, "CORES", 2)
    m = 4
    runs = [_run(0, 10.0, 25.0, 9.0, 20.0, m, 1), _run(1, 12.0, 30.0, 0.0, 0.0, m, 0)]
    sim = simulate(
        [StageCost(10.0, 25.0, 0.0, fill_forward=9.0, fill_backward=20.0), StageCost(12.0, 30.0, 0.0)],
        m, 0.5, cores=2, fills=(1, 0), last_exit_stage=0,
    )["time"]  # fmt: skip
    predicted = pipeline_exits.predict(runs, m, 1, [2])["time"]
    assert predicted == pytest.approx(sim + 7.0)  # plus the least tail outside the schedule
    # Op times in the schedule equal to the calibrated ones, two stages on two cores: the replay agrees.
    assert pipeline_exits.predict(runs, m, 1, [2], replay=True)["time"] == pytest.approx(predicted)
    # Ops slower in the schedule than calibrated: the replay sees it, the prediction cannot.
    runs[1]["sched_B"] = (36.0, m)
    assert pipeline_exits.predict(runs, m, 1, [2], replay=True)["time"] > predicted + 5
    assert "stage 1 F 1.00 B 1.20" in pipeline_exits.op_ratio_line(runs)


def test_sharing_efficiency_from_the_all_at_once_measurement(monkeypatch):
    import pipeline_exits

    monkeypatch.setattr(pipeline_exits, "CORES", 2)
    runs = [{"shared_work_ms": 100.0, "shared_wall_ms": 240.0 + i} for i in range(4)]
    assert pipeline_exits.sharing_efficiency(runs) == pytest.approx(400 / (2 * 243))  # slowest wall
    assert pipeline_exits.sharing_efficiency([{}, {}]) == 1.0  # never outnumbered the cores


def _calibration_protocol(rank, world):
    """benchmarks/pipeline_exits.py's loaded ping-pong and all-at-once measurement on 4 gloo
    processes, with a toy step: both must end (the loaders stop when stage 0 says so)."""
    import time
    import types

    import pipeline_exits
    import torch

    from megatron.early_exit.parallel.pipeline import p2p

    pipeline_exits.CORES = 2
    ps = types.SimpleNamespace(pp_rank=rank, dims=types.SimpleNamespace(pp=world), stage_rank=lambda r: r)
    steps = []

    def step():
        time.sleep(0.002)
        steps.append(1)

    template = torch.zeros(4, 8)
    idle = pipeline_exits._ping_pong(template, ps, 3)
    loaded = pipeline_exits._ping_pong(template, ps, 3, load=step)
    loads = len(steps)
    work, wall = pipeline_exits._all_at_once(step, 2.0, 3, world)
    p2p(None, None, None, None)  # still in step with each other: a barrier-free no-op
    return idle, loaded, loads, work, wall


def test_calibration_protocol_ends_and_measures():
    from tests.distributed import run_distributed

    results = run_distributed(_calibration_protocol, 4)
    assert all(r[0] > 0 and r[1] > 0 for r in results[:2]) and results[2][:2] == (0.0, 0.0)
    assert all(r[2] > 0 for r in results[2:]) and all(r[2] == 0 for r in results[:2])  # only stages 2, 3 load
    for _, _, _, work, wall in results:
        assert work >= 2.0 and wall >= 3 * 2.0 * 4 / 2 * 0.9  # ran for the budget: reps x step x pp / cores

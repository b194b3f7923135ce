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

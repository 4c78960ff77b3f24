"""Reconcile plan: scaling on a load signal (`scheduling.scaling`) through `autoscale.decide`."""

from __future__ import annotations

import pytest
from plans import CFG, LOADING, NOW, D, model, node, rep, start, state, stop

from corral.domain.actions import MarkUnloading, ReportScaling, SetCooldown
from corral.domain.autoscale import Sample, ScalingTarget, Signal
from corral.domain.reconcile import ClusterState, PlanAction, plan
from factories import GB

INFLIGHT = ScalingTarget(Signal.INFLIGHT, target=2.0, window=10.0)
IDLE = ScalingTarget(Signal.QUEUE_WAIT, target=1.0, window=10.0, idle_timeout=60.0)
UP = "inflight_per_replica 6 above target 2 for 10s"
DOWN = "inflight_per_replica 0.2 below target 2 for 300s"
HIGH = {"m": [Sample(NOW - 20, 5.0), Sample(NOW - 5, 6.0)]}  # 6 inside the window
LOW = {"m": [Sample(NOW - 400, 0.1), Sample(NOW - 5, 0.2)]}
SETTLED = {"m": NOW - 1000}  # the count changed long ago
BIG = 40 * GB

CASES: list[tuple[str, ClusterState, list[PlanAction]]] = [
    (
        "above-target-for-the-window-scales-up-proportionally",
        state(
            [node("a", budget=BIG)],
            [model(min_replicas=1, scaling=INFLIGHT)],
            [rep(0), rep(1)],
            signals=HIGH,
            last_change=SETTLED,
        ),
        [
            *(start("a", i, f"scale up: {UP}") for i in (2, 3, 4, 5)),
            ReportScaling("m", 2, 6, UP),
        ],
    ),
    (
        "scale-up-stops-where-memory-ends",
        state(
            [node("a", budget=12 * GB)],
            [model(min_replicas=1, scaling=INFLIGHT)],
            [rep(0), rep(1)],
            signals=HIGH,
            last_change=SETTLED,
        ),
        [
            start("a", 2, f"scale up: {UP}"),
            SetCooldown(
                "m",
                NOW + CFG.capacity_cooldown,
                "no node fits m: a: needs 4.0 GB, 0 B free of 12.0 GB budget",
            ),
            ReportScaling("m", 2, 3, UP),
        ],
    ),
    (
        "scale-up-never-above-max-replicas",
        state(
            [node("a", budget=BIG)],
            [model(min_replicas=1, max_replicas=3, scaling=INFLIGHT)],
            [rep(0), rep(1)],
            signals=HIGH,
            last_change=SETTLED,
        ),
        [start("a", 2, f"scale up: {UP}"), ReportScaling("m", 2, 3, UP)],
    ),
    (
        "a-recent-change-restarts-the-window",
        state(
            [node("a", budget=BIG)],
            [model(min_replicas=1, scaling=INFLIGHT)],
            [rep(0), rep(1)],
            signals=HIGH,
            last_change={"m": NOW - 5},
        ),
        [],
    ),
    (
        "no-decision-while-a-replica-starts",
        state(
            [node("a", budget=BIG)],
            [model(min_replicas=1, scaling=INFLIGHT)],
            [rep(0), rep(1, "a", LOADING)],
            signals=HIGH,
            last_change=SETTLED,
        ),
        [],
    ),
    (
        "below-target-for-the-delay-stops-the-highest-indexes",
        state(
            [node("a", budget=BIG)],
            [model(min_replicas=1, scaling=INFLIGHT)],
            [rep(0), rep(1), rep(2)],
            signals=LOW,
            last_change=SETTLED,
        ),
        [
            stop(rep(2), f"scale down: {DOWN}"),
            stop(rep(1), f"scale down: {DOWN}"),
            ReportScaling("m", 3, 1, DOWN),
        ],
    ),
    (
        "a-busy-replica-scaled-down-leaves-routing-first",
        state(
            [node("a", budget=BIG)],
            [model(min_replicas=2, scaling=INFLIGHT)],
            [rep(0), rep(1), rep(2)],
            inflight={("m", 2): 1},
            signals=LOW,
            last_change=SETTLED,
        ),
        [MarkUnloading("m", 2, "a", f"scale down: {DOWN}"), ReportScaling("m", 3, 2, DOWN)],
    ),
    (
        "draining-replicas-are-not-the-scalers",
        state(
            [node("a", budget=BIG), node("b", status=D)],
            [model(min_replicas=1, scaling=INFLIGHT)],
            [rep(0), rep(1, "b")],
            signals=LOW,
            last_change=SETTLED,
        ),
        [],
    ),
    (
        "idle-past-the-timeout-scales-to-zero",
        state(
            [node("a")],
            [model(scaling=IDLE)],
            [rep(0, idle=100)],
            last_change=SETTLED,
        ),
        [
            stop(rep(0, idle=100), "scale down: idle for 100s (idle_timeout 60s)"),
            ReportScaling("m", 1, 0, "idle for 100s (idle_timeout 60s)"),
        ],
    ),
    (
        "a-recent-request-keeps-it",
        state([node("a")], [model(scaling=IDLE)], [rep(0, idle=30)], last_change=SETTLED),
        [],
    ),
    (
        "requests-queued-for-a-model-at-zero-wake-it",
        state([node("a")], [model(scaling=IDLE)], queued={"m": 3}),
        [
            start("a", 0, "scale up: scale from zero: 3 requests waiting"),
            ReportScaling("m", 0, 1, "scale from zero: 3 requests waiting"),
        ],
    ),
    (
        "no-samples-no-decision",
        state([node("a", budget=BIG)], [model(min_replicas=1, scaling=INFLIGHT)], [rep(0), rep(1)]),
        [],
    ),
    (
        "the-minimum-still-comes-first",
        state([node("a", budget=BIG)], [model(min_replicas=2, scaling=INFLIGHT)], [rep(0)]),
        [start("a", 1)],
    ),
]


@pytest.mark.parametrize(("st", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_plan(st: ClusterState, expected: list[PlanAction]) -> None:
    assert list(plan(st, NOW, CFG).actions) == expected

"""Reconcile plan: the actions one tick returns, per rule and in combination."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
from plans import (
    CFG,
    FAILED,
    LOADING,
    NOW,
    OFF,
    D,
    H,
    U,
    cooldown,
    model,
    node,
    proc,
    rep,
    start,
    state,
    stop,
)

from corral.domain.actions import (
    AdoptReplica,
    MarkNode,
    MarkUnloading,
    RemoveNodeReplicas,
    RemoveReplicaRow,
    ReportWaiting,
    StartReplica,
    StopOrphan,
)
from corral.domain.reconcile import ClusterState, PlanAction, ReportedProcess, plan
from factories import GB

FULL = "no node fits m: a: needs 4.0 GB, 0 B free of 4.0 GB budget"

CASES: list[tuple[str, ClusterState, list[PlanAction]]] = [
    # --- nodes ---------------------------------------------------------------------------
    ("steady-nothing-to-do", state([node("a")], [model(min_replicas=1)], [rep(0)]), []),
    ("late-node-unhealthy", state([node("a", age=20)], []), [MarkNode("a", U, H)]),
    ("fresh-node-healthy-again", state([node("a", status=U)], []), [MarkNode("a", H, U)]),
    (
        "offline-node-replicas-removed-and-replaced",
        state([node("a", age=100), node("b")], [model(min_replicas=1)], [rep(0, "a")]),
        [MarkNode("a", OFF, H), RemoveNodeReplicas("a"), start("b", 1)],
    ),
    (
        "already-offline-leftover-rows-removed",
        state([node("a", status=OFF, age=100)], [], [rep(0, "a")]),
        [RemoveNodeReplicas("a")],
    ),
    (
        "unhealthy-node-replicas-not-counted",
        state([node("a", status=U, age=20), node("b")], [model(min_replicas=1)], [rep(0, "a")]),
        [start("b", 1)],
    ),
    (
        "draining-node-replicas-still-count",
        state([node("a", status=D), node("b")], [model(min_replicas=1)], [rep(0, "a")]),
        [],
    ),
    (
        "offline-node-with-fresh-heartbeat-stays-offline",  # deregistered: only the API revives
        state([node("a", status=OFF)], [model(min_replicas=1)]),
        [cooldown("no healthy node: a: node is offline")],
    ),
    (
        "downtime-before-leading-not-held-against-nodes",
        state([node("a", age=100)], [model(min_replicas=1)], [rep(0)], monitor_since=NOW - 2),
        [],
    ),
    (
        "late-since-leading-unhealthy",
        state([node("a", age=100)], [], monitor_since=NOW - 20),
        [MarkNode("a", U, H)],
    ),
    # --- below minimum -------------------------------------------------------------------
    (
        "below-minimum-starts-lowest-free-indexes",
        state([node("a", budget=20 * GB)], [model(min_replicas=3)], [rep(1)]),
        [start("a", 0), start("a", 2)],
    ),
    (
        "failed-row-keeps-its-index",
        state([node("a")], [model(min_replicas=1)], [rep(0, state=FAILED)]),
        [start("a", 1)],
    ),
    (
        "min-above-capacity-starts-what-fits-and-cools-down",
        state([node("a", budget=8 * GB)], [model(min_replicas=3)]),
        [
            start("a", 0),
            start("a", 1),
            cooldown("no node fits m: a: needs 4.0 GB, 0 B free of 8.0 GB budget"),
        ],
    ),
    (
        "other-models-memory-counts",
        state([node("a")], [model(min_replicas=1)], [rep(0, name="o"), rep(1, name="o")]),
        [cooldown("no node fits m: a: needs 4.0 GB, 2.0 GB free of 10.0 GB budget")],
    ),
    (
        "cooldown-active-no-start",
        state([node("a")], [model(min_replicas=1)], cooldowns={"m": NOW + 1}),
        [],
    ),
    (
        "cooldown-expired-starts",
        state([node("a")], [model(min_replicas=1)], cooldowns={"m": NOW - 1}),
        [start("a", 0)],
    ),
    (
        "node-where-a-start-failed-avoided",
        state([node("a"), node("b")], [model(min_replicas=1)], avoid={"m": frozenset({"a"})}),
        [start("b", 0)],
    ),
    (
        "avoid-is-per-model",
        state(
            [node("a")],
            [model(min_replicas=1), model("n", min_replicas=1)],
            avoid={"n": frozenset({"a"})},
        ),
        [start("a", 0), cooldown("no healthy node: a: excluded by the caller", name="n")],
    ),
    (
        "no-healthy-node-cools-down",
        state([node("a", status=U, age=20)], [model(min_replicas=1)]),
        [cooldown("no healthy node: a: node is unhealthy")],
    ),
    (
        "declared-model-preloads-from-its-spec",  # no request, no load information needed
        state([node("a", budget=20 * GB)], [model(min_replicas=2)]),
        [start("a", 0), start("a", 1)],
    ),
    (
        "empty-backend-never-started",
        state([node("a")], [model(backend="", min_replicas=1)]),
        [ReportWaiting("m", "the model has no backend configured")],
    ),
    (
        "empty-backend-reported-once",
        state([node("a")], [model(backend="", min_replicas=1)], reported=frozenset({"m"})),
        [],
    ),
    (
        "min-zero-starts-nothing",
        state([node("a")], [model()]),
        [],
    ),
    # --- selector ------------------------------------------------------------------------
    (
        "relabelled-node-replica-stopped-and-replaced",
        state(
            [node("a", gpu="t4"), node("b", gpu="a100")],
            [model(min_replicas=1, selector={"gpu": "a100"})],
            [rep(0, "a")],
        ),
        [stop(rep(0, "a"), "node labels no longer match the selector"), start("b", 1)],
    ),
    (
        "relabelled-busy-replica-kept-but-not-counted",
        state(
            [node("a", gpu="t4"), node("b", gpu="a100")],
            [model(min_replicas=1, selector={"gpu": "a100"})],
            [rep(0, "a")],
            inflight={("m", 0): 1},
        ),
        [start("b", 1)],
    ),
    # --- spread_all ----------------------------------------------------------------------
    (
        "spread-all-one-per-matching-node",
        state(
            [node("a", zone="x"), node("b", zone="x"), node("c", zone="x"), node("d", zone="y")],
            [model(spread_all=True, selector={"zone": "x"})],
            [rep(0, "a"), rep(1, "b"), rep(2, "b", LOADING)],
        ),
        [
            stop(rep(2, "b", LOADING), "spread_all keeps one replica per node"),
            start("c", 3, "spread_all"),
        ],
    ),
    (
        "spread-all-keeps-loaded-duplicate-over-lower-index",
        state([node("a")], [model(spread_all=True)], [rep(0, "a", LOADING), rep(1, "a")]),
        [stop(rep(0, "a", LOADING), "spread_all keeps one replica per node")],
    ),
    (
        "spread-all-busy-duplicate-kept",
        state([node("a")], [model(spread_all=True)], [rep(0), rep(1)], inflight={("m", 1): 1}),
        [],
    ),
    (
        "spread-all-node-without-room-cools-down-others-start",
        state([node("a", budget=GB), node("b")], [model(spread_all=True)]),
        [
            start("b", 0, "spread_all"),
            cooldown("no node fits m: a: needs 4.0 GB, 1.0 GB free of 1.0 GB budget"),
        ],
    ),
    (
        "spread-all-ignores-scale-down",
        state(
            [node("a"), node("b")],
            [model(spread_all=True)],
            [rep(0, "a", idle=1e6), rep(1, "b", idle=1e6)],
        ),
        [],
    ),
    # --- scale up ------------------------------------------------------------------------
    (
        "all-busy-one-more",
        state(
            [node("a", budget=20 * GB)],
            [model(min_replicas=1)],
            [rep(0), rep(1)],
            inflight={("m", 0): 1, ("m", 1): 3},
        ),
        [start("a", 2, "all replicas busy")],
    ),
    (
        "all-busy-at-max-nothing",
        state(
            [node("a")], [model(min_replicas=1, max_replicas=1)], [rep(0)], inflight={("m", 0): 5}
        ),
        [],
    ),
    (
        "one-idle-nothing",
        state([node("a")], [model(min_replicas=1)], [rep(0), rep(1)], inflight={("m", 0): 1}),
        [],
    ),
    (
        "all-busy-but-one-starting-nothing",
        state(
            [node("a", budget=20 * GB)],
            [model(min_replicas=1)],
            [rep(0), rep(1, state=LOADING)],
            inflight={("m", 0): 1},
        ),
        [],
    ),
    (
        "all-busy-no-room-cools-down",
        state(
            [node("a", budget=4 * GB)], [model(min_replicas=1)], [rep(0)], inflight={("m", 0): 1}
        ),
        [cooldown(FULL)],
    ),
    (
        "min-zero-with-busy-replica-scales-up",
        state([node("a")], [model()], [rep(0)], inflight={("m", 0): 1}),
        [start("a", 1, "all replicas busy")],
    ),
    # --- scale down ----------------------------------------------------------------------
    (
        "idle-above-minimum-stops-highest-index",
        state(
            [node("a", budget=20 * GB)],
            [model(min_replicas=1)],
            [rep(0, idle=400), rep(1, idle=400), rep(2, idle=400)],
        ),
        [stop(rep(2, idle=400), "idle above minimum")],
    ),
    (
        "staggered-idle-times-stop-the-highest-index",  # not the one idle longest: no holes
        state(
            [node("a", budget=20 * GB)],
            [model(min_replicas=1)],
            [rep(0, idle=400), rep(1, idle=100), rep(2, idle=10)],
        ),
        [stop(rep(2, idle=10), "idle above minimum")],
    ),
    (
        "highest-index-busy-is-unloaded-first",
        state(
            [node("a")],
            [model(min_replicas=1)],
            [rep(0, idle=400), rep(1)],
            inflight={("m", 1): 1},
        ),
        [MarkUnloading("m", 1, "a", "idle above minimum")],
    ),
    (
        "no-scale-down-while-one-starts",
        state([node("a")], [model(min_replicas=1)], [rep(0, idle=400), rep(1, LOADING, idle=400)]),
        [],
    ),
    (
        "recent-state-change-counts-as-activity",
        state(
            [node("a")], [model(min_replicas=1)], [rep(0, idle=400, age=5), rep(1, idle=400, age=5)]
        ),
        [],
    ),
    (
        "draining-replica-is-no-surplus",  # its drain started a replacement: keep the others
        state(
            [node("a", status=D), node("b", budget=20 * GB)],
            [model(min_replicas=2)],
            [rep(0, "a", idle=400), rep(1, "b", idle=400), rep(2, "b", LOADING)],
        ),
        [],
    ),
    (
        "draining-replica-never-scaled-down-by-the-loop",
        state(
            [node("a", status=D), node("b", budget=20 * GB)],
            [model(min_replicas=1)],
            [rep(0, "b", idle=400), rep(1, "b", idle=400), rep(2, "a", idle=400)],
        ),
        [stop(rep(1, "b", idle=400), "idle above minimum")],
    ),
    (
        "at-minimum-kept",
        state([node("a")], [model(min_replicas=2)], [rep(0, idle=400), rep(1, idle=400)]),
        [],
    ),
    # --- rows whose process is gone -----------------------------------------------------
    (
        "row-without-process-removed-and-replaced",
        state([node("a")], [model(min_replicas=1)], [rep(0)], processes={"a": []}),
        [RemoveReplicaRow("m", 0, "a", "process not running"), start("a", 1)],
    ),
    (
        "row-without-process-within-grace-kept",
        state([node("a")], [model(min_replicas=1)], [rep(0, age=10)], processes={"a": []}),
        [],
    ),
    (
        "row-on-node-without-report-kept",
        state([node("a")], [model(min_replicas=1)], [rep(0)], processes={}),
        [],
    ),
    (
        "row-on-unhealthy-node-kept",
        state([node("a", status=U, age=20)], [], [rep(0)], processes={"a": []}),
        [],
    ),
    (
        "row-on-draining-node-removed",
        state([node("a", status=D)], [], [rep(0)], processes={"a": []}),
        [RemoveReplicaRow("m", 0, "a", "process not running")],
    ),
    (
        "loading-row-without-process-within-grace-kept",
        state(
            [node("a")],
            [model(min_replicas=1)],
            [rep(0, state=LOADING, age=10)],
            processes={"a": []},
        ),
        [],
    ),
    (
        "loading-row-its-node-knows-nothing-of-removed",  # the start died with its frontend
        state(
            [node("a")],
            [model(min_replicas=1)],
            [rep(0, state=LOADING, age=100)],
            processes={"a": []},
        ),
        [
            RemoveReplicaRow("m", 0, "a", "start lost: its node is not working on it"),
            start("a", 1),
        ],
    ),
    (
        "loading-row-while-its-node-stages-kept",
        state(
            [node("a")],
            [model(min_replicas=1)],
            [rep(0, state=LOADING, age=5000)],
            processes={"a": [ReportedProcess("m", 0, None, NOW - 5000, ready=False)]},
        ),
        [],
    ),
    (
        "loading-row-with-ready-process-adopted",  # the frontend that started it died
        state(
            [node("a")],
            [model(min_replicas=1)],
            [replace(rep(0, state=LOADING, age=100), address=None)],
            processes={"a": [proc(0)]},
        ),
        [AdoptReplica("m", 0, "a", "a:9000")],
    ),
    (
        "loading-row-with-ready-process-within-grace-kept",
        state(
            [node("a")],
            [model(min_replicas=1)],
            [rep(0, state=LOADING, age=10)],
            processes={"a": [proc(0)]},
        ),
        [],
    ),
    (
        "loading-row-with-starting-process-kept",
        state(
            [node("a")],
            [model(min_replicas=1)],
            [rep(0, state=LOADING, age=5000)],
            processes={"a": [replace(proc(0), ready=False)]},
        ),
        [],
    ),
    (
        "row-matches-its-process",
        state([node("a")], [model(min_replicas=1)], [rep(0)], processes={"a": [proc(0)]}),
        [],
    ),
    # --- processes without a row --------------------------------------------------------
    (
        "orphan-past-grace-stopped",
        state([node("a")], [], processes={"a": [proc(7, name="old")]}),
        [StopOrphan("a", "old", 7, "a:9007")],
    ),
    (
        "orphan-younger-than-grace-nothing",
        state([node("a")], [], processes={"a": [proc(7, name="old", age=10)]}),
        [],
    ),
    (
        "process-with-failed-row-is-orphan",
        state([node("a")], [], [rep(0, state=FAILED)], processes={"a": [proc(0)]}),
        [StopOrphan("a", "m", 0, "a:9000")],
    ),
    (
        "row-on-other-node-does-not-claim-process",
        state(
            [node("a"), node("b")],
            [model(min_replicas=1)],
            [rep(0, "b")],
            processes={"a": [proc(0, "b")]},
        ),
        [StopOrphan("a", "m", 0, "b:9000")],
    ),
    (
        "address-mismatch-row-removed-and-process-stopped",
        state(
            [node("a")],
            [model(min_replicas=1)],
            [rep(0)],
            processes={"a": [ReportedProcess("m", 0, "a:1234", NOW - 100)]},
        ),
        [
            RemoveReplicaRow("m", 0, "a", "process not running"),
            StopOrphan("a", "m", 0, "a:1234"),
            start("a", 1),
        ],
    ),
    (
        "orphan-index-not-reused",
        state([node("a")], [model(min_replicas=1)], processes={"a": [proc(0, age=10)]}),
        [start("a", 1)],
    ),
]


@pytest.mark.parametrize(("st", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_plan(st: ClusterState, expected: list[PlanAction]) -> None:
    assert list(plan(st, NOW, CFG).actions) == expected


def test_busy_threshold_from_config() -> None:
    st = state([node("a")], [model(min_replicas=1)], [rep(0)], inflight={("m", 0): 1})
    assert plan(st, NOW, CFG).of(StartReplica) == [start("a", 1, "all replicas busy")]
    assert plan(st, NOW, replace(CFG, busy_inflight=2)).actions == ()


def test_spread_strategy_from_config() -> None:
    st = state([node("a", budget=20 * GB), node("b")], [model(min_replicas=2)])
    assert plan(st, NOW, CFG).of(StartReplica) == [start("b", 0), start("b", 1)]
    spread = replace(CFG, placement="spread")
    assert plan(st, NOW, spread).of(StartReplica) == [start("a", 0), start("b", 1)]


def test_plan_is_deterministic_whatever_the_input_order() -> None:
    nodes = [node("a", age=100), node("b"), node("c", age=20), node("d", zone="y")]
    models = [model("m", min_replicas=2), model("n", spread_all=True), model("o", min_replicas=1)]
    replicas = [rep(0, "a"), rep(1, "b", idle=400), rep(0, "b", name="n"), rep(5, "d", name="o")]
    processes = {"b": [proc(1, "b"), proc(0, "b", name="n"), proc(9, "b", name="z")]}
    expected = plan(state(nodes, models, replicas, processes=processes), NOW, CFG)
    assert len(expected.actions) >= 5
    rng = random.Random(7)
    for _ in range(20):
        shuffled = state(
            rng.sample(nodes, len(nodes)),
            rng.sample(models, len(models)),
            rng.sample(replicas, len(replicas)),
            processes={"b": rng.sample(processes["b"], 3)},
        )
        assert plan(shuffled, NOW, CFG) == expected


def test_plan_of_filters_by_kind() -> None:
    st = state([node("a", age=100), node("b")], [model(min_replicas=1)], [rep(0, "a")])
    p = plan(st, NOW, CFG)
    assert p.of(MarkNode) == [MarkNode("a", OFF, H)]
    assert p.of(StartReplica) == [start("b", 1)]

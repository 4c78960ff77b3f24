"""Reconcile plan: rollouts of a changed spec, retired replicas, and the rollout status view.

The model "m" was declared as `model()`; its spec now has other options, so the replicas built
by `rep()` run an older revision unless they are given `NEW`.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from plans import CFG, LOADED, LOADING, NOW, D, cooldown, model, node, rep, start, state, stop

from corral.domain.actions import MarkUnloading, ReportRollout, StartReplica, StopReplica
from corral.domain.entities import ReplicaState, Rollout, RolloutStrategy
from corral.domain.reconcile import ClusterState, PlanAction, plan
from corral.domain.rollout import LoadFailure, rollout_status
from factories import GB

UNLOADING = ReplicaState.UNLOADING
SPEC = model(options={"ctx": 2})  # the changed spec
NEW = SPEC.config_revision
OLD = model().config_revision
RECREATE = Rollout(RolloutStrategy.RECREATE)


def spec(**kw: object) -> object:
    return model(options={"ctx": 2}, **kw)  # type: ignore[arg-type]


def new(index: int, nid: str = "a", st: ReplicaState = LOADED, **kw: object) -> object:
    return rep(index, nid, st, revision=NEW, **kw)  # type: ignore[arg-type]


def roll(name: str = "m", n: int = 3, how: str = "rolling") -> ReportRollout:
    return ReportRollout(name, "rolling", NEW, f"{n} replicas move to {NEW} ({how})")


def retire(index: int, nid: str = "a", reason: str = f"replaced by its {NEW} replica") -> object:
    return MarkUnloading("m", index, nid, reason)


REPORTED = {"m": ("rolling", NEW)}
BIG = 20 * GB
CASES: list[tuple[str, ClusterState, list[PlanAction]]] = [
    # --- rolling -------------------------------------------------------------------------
    (
        "changed-spec-starts-one-replacement-for-the-highest-old-index",
        state([node("a", budget=BIG)], [spec(min_replicas=1)], [rep(0), rep(1), rep(2)]),
        [start("a", 3, f"rollout to {NEW}", replaces=2), roll()],
    ),
    (
        "one-at-a-time-while-the-replacement-starts",
        state(
            [node("a", budget=BIG)],
            [spec(min_replicas=1)],
            [rep(0), rep(1), rep(2), new(3, st=LOADING, replaces=2)],
            rollouts=REPORTED,
        ),
        [],
    ),
    (
        "ready-replacement-retires-its-old-replica-and-the-next-one-starts",
        state(
            [node("a", budget=BIG)],
            [spec(min_replicas=1)],
            [rep(0), rep(1), rep(2), new(3, replaces=2)],
            rollouts=REPORTED,
        ),
        [retire(2), start("a", 4, f"rollout to {NEW}", replaces=1)],
    ),
    (
        "a-current-replica-that-replaces-nothing-retires-nothing",  # a scale-up, not a swap
        state(
            [node("a", budget=BIG)],
            [spec(min_replicas=1)],
            [rep(0), new(1)],
            rollouts=REPORTED,
        ),
        [start("a", 2, f"rollout to {NEW}", replaces=0)],
    ),
    (
        "last-old-retired-then-the-rollout-is-reported-finished",
        state(
            [node("a", budget=BIG)],
            [spec(min_replicas=1)],
            [rep(0, "a", UNLOADING, age=0.5), new(1, replaces=0)],
            rollouts=REPORTED,
        ),
        [ReportRollout("m", "finished", NEW, f"every replica runs {NEW}")],
    ),
    (
        "below-minimum-during-a-rollout-starts-current-replicas",
        state(
            [node("a", budget=BIG)],
            [spec(min_replicas=3)],
            [rep(0), rep(1)],
            rollouts=REPORTED,
        ),
        [start("a", 2)],
    ),
    (
        "no-room-for-the-replacement-evicts-an-idle-replica-of-another-model",
        state(
            [node("a", budget=8 * GB)],
            [spec(min_replicas=1), model("o")],
            [rep(0), rep(0, name="o", idle=50)],
        ),
        [
            StopReplica.of(rep(0, name="o", idle=50), "evicted to make room for the rollout of m"),
            roll(n=1),
        ],
    ),
    (
        "no-room-and-nothing-to-evict-cools-down-old-keeps-serving",
        state([node("a", budget=4 * GB)], [spec(min_replicas=1)], [rep(0)], rollouts=REPORTED),
        [cooldown("no node fits m: a: needs 4.0 GB, 0 B free of 4.0 GB budget")],
    ),
    (
        "no-scaling-during-a-rollout",
        state(
            [node("a", budget=BIG)],
            [spec()],
            [rep(0, idle=1000), new(1, idle=1000, replaces=5)],
            rollouts=REPORTED,
        ),
        [start("a", 2, f"rollout to {NEW}", replaces=0)],
    ),
    # --- halted ----------------------------------------------------------------------------
    (
        "a-failed-new-revision-halts-the-rollout",
        state(
            [node("a", budget=BIG)],
            [spec(min_replicas=1)],
            [rep(0), rep(1)],
            failures={"m": LoadFailure(NEW, "sim: unrecognized arguments", NOW - 10)},
            rollouts=REPORTED,
        ),
        [
            ReportRollout(
                "m",
                "halted",
                NEW,
                f"the load of {NEW} failed, 2 replicas keep serving: sim: unrecognized arguments",
            )
        ],
    ),
    (
        "a-halted-rollout-is-reported-once",
        state(
            [node("a", budget=BIG)],
            [spec(min_replicas=1)],
            [rep(0), rep(1)],
            failures={"m": LoadFailure(NEW, "boom", NOW - 10)},
            rollouts={"m": ("halted", NEW)},
        ),
        [],
    ),
    (
        "a-halted-rollout-retries-after-the-retry-delay",
        state(
            [node("a", budget=BIG)],
            [spec(min_replicas=1)],
            [rep(0), rep(1)],
            failures={"m": LoadFailure(NEW, "boom", NOW - CFG.revision_retry - 1)},
            rollouts={"m": ("halted", NEW)},
        ),
        [start("a", 2, f"rollout to {NEW}", replaces=1), roll(n=2)],
    ),
    (
        "a-failure-of-another-revision-does-not-halt",  # the spec was fixed
        state(
            [node("a", budget=BIG)],
            [spec(min_replicas=1)],
            [rep(0)],
            failures={"m": LoadFailure("broken", "boom", NOW - 10)},
            rollouts={"m": ("halted", "broken")},
        ),
        [start("a", 1, f"rollout to {NEW}", replaces=0), roll(n=1)],
    ),
    # --- recreate -------------------------------------------------------------------------
    (
        "recreate-retires-every-old-replica-first",
        state(
            [node("a", budget=BIG)],
            [spec(min_replicas=2, rollout=RECREATE)],
            [rep(0), rep(1, "a", LOADING)],
        ),
        [
            retire(0, reason=f"rollout to {NEW}"),
            StopReplica.of(rep(1, "a", LOADING), f"rollout to {NEW}"),
            roll(n=2, how="recreate"),
        ],
    ),
    (
        "recreate-starts-nothing-while-old-replicas-unload",
        state(
            [node("a", budget=BIG)],
            [spec(min_replicas=2, rollout=RECREATE)],
            [rep(0, "a", UNLOADING, age=0.5)],
            rollouts=REPORTED,
        ),
        [],
    ),
    (
        "recreate-stops-unloaded-old-and-starts-nothing-in-the-same-tick",
        state(
            [node("a", budget=BIG)],
            [spec(min_replicas=2, rollout=RECREATE)],
            [rep(0, "a", UNLOADING, age=5)],
            rollouts=REPORTED,
        ),
        [stop(rep(0, "a", UNLOADING, age=5), "unloaded: nothing in flight")],
    ),
    (
        "recreate-starts-the-minimum-once-the-old-are-gone",
        state(
            [node("a", budget=BIG)],
            [spec(min_replicas=2, rollout=RECREATE)],
            rollouts=REPORTED,
        ),
        [
            start("a", 0),
            start("a", 1),
            ReportRollout("m", "finished", NEW, f"every replica runs {NEW}"),
        ],
    ),
    # --- spread_all -----------------------------------------------------------------------
    (
        "spread-all-rolls-one-node-at-a-time",
        state([node("a"), node("b")], [spec(spread_all=True)], [rep(0, "a"), rep(1, "b")]),
        [start("a", 2, f"rollout to {NEW}", replaces=0), roll(n=2)],
    ),
    (
        "spread-all-retires-a-nodes-old-replica-once-its-new-one-is-ready",
        state(
            [node("a"), node("b")],
            [spec(spread_all=True)],
            [rep(0, "a"), new(2, "a", replaces=0), rep(1, "b")],
            rollouts=REPORTED,
        ),
        [retire(0), start("b", 3, f"rollout to {NEW}", replaces=1)],
    ),
    # --- retired (unloading) replicas ----------------------------------------------------
    (
        "unloading-idle-past-the-grace-is-stopped",
        state([node("a")], [], [rep(0, "a", UNLOADING, age=5)]),
        [stop(rep(0, "a", UNLOADING, age=5), "unloaded: nothing in flight")],
    ),
    (
        "unloading-within-the-grace-is-kept",  # other frontends may still report requests
        state([node("a")], [], [rep(0, "a", UNLOADING, age=0.5)]),
        [],
    ),
    (
        "unloading-busy-is-kept",
        state([node("a")], [], [rep(0, "a", UNLOADING, age=5)], inflight={("m", 0): 1}),
        [],
    ),
    (
        "unloading-busy-past-the-timeout-is-stopped",
        state([node("a")], [], [rep(0, "a", UNLOADING, age=500)], inflight={("m", 0): 1}),
        [stop(rep(0, "a", UNLOADING, age=500), "unloaded past the timeout")],
    ),
    (
        "unloading-on-a-draining-node-is-the-drainers",
        state([node("a", status=D)], [], [rep(0, "a", UNLOADING, age=5)]),
        [],
    ),
]


@pytest.mark.parametrize(("st", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_plan(st: ClusterState, expected: list[PlanAction]) -> None:
    assert list(plan(st, NOW, CFG).actions) == expected


def test_a_replacement_runs_the_current_revision() -> None:
    st = state([node("a", budget=BIG)], [spec(min_replicas=1)], [rep(0)])
    (first,) = plan(st, NOW, CFG).of(StartReplica)
    assert first.replaces == 0
    assert OLD != NEW, "options are part of the revision"


def test_scheduling_and_rollout_settings_are_not_part_of_the_revision() -> None:
    base = model(options={"ctx": 2})
    assert spec(min_replicas=5, rollout=RECREATE).config_revision == base.config_revision
    assert replace(base, memory=GB).config_revision != base.config_revision
    assert replace(base, backend="sim").config_revision != base.config_revision
    assert replace(base, artifact="x.gguf").config_revision != base.config_revision
    assert replace(base, spec_hash="stored").config_revision == "stored"


STATUS = [
    ("idle", [new(0), new(1)], None, ("idle", 2, 0, None)),
    ("rolling", [rep(0), new(1)], None, ("rolling", 1, 1, None)),
    ("halted", [rep(0)], LoadFailure(NEW, "boom", NOW - 1), ("halted", 0, 1, "boom")),
    ("retry-due", [rep(0)], LoadFailure(NEW, "boom", NOW - 1000), ("rolling", 0, 1, "boom")),
    ("old-failure", [new(0)], LoadFailure("x", "boom", NOW - 1), ("idle", 1, 0, None)),
    ("unloading-not-counted", [rep(0, "a", UNLOADING), new(1)], None, ("idle", 1, 0, None)),
]


@pytest.mark.parametrize(
    ("replicas", "failure", "expected"), [c[1:] for c in STATUS], ids=[c[0] for c in STATUS]
)
def test_rollout_status(
    replicas: list[object], failure: LoadFailure | None, expected: tuple[object, ...]
) -> None:
    got = rollout_status(spec(), replicas, failure, NOW, CFG.revision_retry)  # type: ignore[arg-type]
    assert (got.phase, got.current, got.old, got.error) == expected
    assert got.revision == NEW

"""Warm-path replica choice: eligibility and the pick order."""

from __future__ import annotations

from collections import Counter

import pytest

import factories
from corral.domain.entities import Node, NodeStatus, Replica, ReplicaKey, ReplicaState, Scheduling
from corral.domain.pick import eligible, pick_replica


def rep(
    index: int,
    node: str = "n1",
    last_used: float = 0.0,
    *,
    state: ReplicaState = ReplicaState.LOADED,
    address: str | None = "auto",
) -> Replica:
    return factories.replica("m", index, node, state, address=address, last_used=last_used)


R0, R1, R2 = rep(0, "n1"), rep(1, "n2"), rep(2, "n3")

PICKS: list[tuple[str, list[Replica], dict[ReplicaKey, int], dict[str, int], int, int | None]] = [
    ("none", [], {}, {}, 0, None),
    ("single", [R0], {("m", 0): 99}, {}, 0, 0),
    ("fewest-inflight", [R0, R1, R2], {("m", 0): 2, ("m", 1): 1, ("m", 2): 3}, {}, 0, 1),
    ("missing-inflight-is-zero", [R0, R1], {("m", 0): 1}, {}, 0, 1),
    (
        "inflight-beats-lru",
        [rep(0, last_used=1.0), rep(1, last_used=9.0)],
        {("m", 0): 1},
        {},
        0,
        1,
    ),
    ("least-recently-used", [rep(0, last_used=5.0), rep(1, last_used=3.0)], {}, {}, 0, 1),
    (
        "lru-beats-free-memory",
        [rep(0, "n1", 5.0), rep(1, "n2", 3.0)],
        {},
        {"n1": 100, "n2": 1},
        0,
        1,
    ),
    ("most-free-memory", [R0, R1, R2], {}, {"n1": 1, "n2": 5, "n3": 3}, 0, 1),
    ("tie-rotates-0", [R0, R1, R2], {}, {}, 0, 0),
    ("tie-rotates-1", [R0, R1, R2], {}, {}, 1, 1),
    ("tie-rotates-2", [R0, R1, R2], {}, {}, 2, 2),
    ("tie-rotates-wraps", [R0, R1, R2], {}, {}, 4, 1),
    ("tie-order-not-input-order", [R2, R0, R1], {}, {}, 0, 0),
    ("tie-only-among-best", [R0, R1, R2], {("m", 1): 1}, {}, 1, 2),
]


@pytest.mark.parametrize(
    ("candidates", "inflight", "free", "tie", "expected"),
    [c[1:] for c in PICKS],
    ids=[c[0] for c in PICKS],
)
def test_pick_replica(
    candidates: list[Replica],
    inflight: dict[ReplicaKey, int],
    free: dict[str, int],
    tie: int,
    expected: int | None,
) -> None:
    got = pick_replica(candidates, inflight, free, tie)
    assert (got.index if got else None) == expected


def test_burst_of_300_spreads_evenly_over_3_equal_replicas() -> None:
    inflight: dict[ReplicaKey, int] = {}
    chosen: Counter[int] = Counter()
    for tie in range(300):  # all arrive before any completes: each reserves a slot
        r = pick_replica([R0, R1, R2], inflight, {}, tie)
        assert r is not None
        inflight[r.key] = inflight.get(r.key, 0) + 1
        chosen[r.index] += 1
    assert chosen == {0: 100, 1: 100, 2: 100}


def test_sequential_requests_in_same_instant_take_turns() -> None:
    # Each request completes before the next (in-flight back to 0) and last-used times are
    # equal (same millisecond): only the tie-breaker rotates them.
    chosen = Counter(
        r.index for tie in range(9) if (r := pick_replica([R0, R1, R2], {}, {}, tie)) is not None
    )
    assert chosen == {0: 3, 1: 3, 2: 3}


def node(nid: str, status: NodeStatus = NodeStatus.HEALTHY, **labels: str) -> Node:
    return factories.node(nid, status=status, labels=labels)


GPU = Scheduling(node_selector={"gpu": "a100"})
NODES = {
    "h": node("h", gpu="a100"),
    "d": node("d", NodeStatus.DRAINING, gpu="a100"),
    "u": node("u", NodeStatus.UNHEALTHY, gpu="a100"),
    "x": node("x", gpu="t4"),  # relabelled out of the selector
}

ELIGIBLE = [
    ("loaded-on-healthy", rep(0, "h"), True),
    ("draining-still-serves", rep(0, "d"), True),
    ("unhealthy-node-excluded", rep(0, "u"), False),
    ("relabelled-node-excluded", rep(0, "x"), False),
    ("unknown-node-excluded", rep(0, "gone"), False),
    ("loading-excluded", rep(0, "h", state=ReplicaState.LOADING), False),
    ("unloading-excluded", rep(0, "h", state=ReplicaState.UNLOADING), False),
    ("no-address-excluded", rep(0, "h", address=None), False),
]


@pytest.mark.parametrize(
    ("replica", "expected"), [c[1:] for c in ELIGIBLE], ids=[c[0] for c in ELIGIBLE]
)
def test_eligible(replica: Replica, expected: bool) -> None:
    assert eligible([replica], NODES, GPU) == ([replica] if expected else [])


def test_eligible_without_selector_keeps_any_label() -> None:
    assert eligible([rep(0, "x")], NODES, Scheduling()) == [rep(0, "x")]


# --- speed weights and large candidate lists ------------------------------------------------

FAST = {("m", 0): 0.020, ("m", 1): 0.020, ("m", 2): 0.060}  # replica 2 is 3x slower

SPEED: list[tuple[str, dict[ReplicaKey, int], dict[ReplicaKey, float], int]] = [
    # the slow replica (3x) waits until the fast ones have three times its backlog
    ("idle-prefers-fast", {}, FAST, 0),
    ("slow-skipped-at-1-vs-0", {("m", 0): 1, ("m", 1): 1}, FAST, 0),
    ("slow-skipped-at-2-vs-0", {("m", 0): 2, ("m", 1): 2}, FAST, 0),
    ("slow-taken-at-3-vs-0", {("m", 0): 3, ("m", 1): 3}, FAST, 2),
    # within about 12 % the replicas count as equal: in-flight and rotation decide
    ("noise-is-equal", {("m", 0): 1}, {("m", 0): 0.020, ("m", 1): 0.021, ("m", 2): 0.019}, 1),
    ("unknown-latency-is-fast", {("m", 0): 1, ("m", 1): 1}, {("m", 0): 0.02, ("m", 1): 0.02}, 2),
]


@pytest.mark.parametrize(
    ("inflight", "latency", "expected"), [c[1:] for c in SPEED], ids=[c[0] for c in SPEED]
)
def test_pick_weighs_replicas_by_speed(
    inflight: dict[ReplicaKey, int], latency: dict[ReplicaKey, float], expected: int
) -> None:
    chosen = pick_replica([R0, R1, R2], inflight, {}, 0, latency=latency)
    assert chosen is not None and chosen.index == expected


def test_pick_on_huge_lists_looks_at_a_moving_window() -> None:
    many = [rep(i, f"n{i}") for i in range(10_000)]
    busy = {("m", i): 1 for i in range(10_000) if i != 9_999}
    seen = {pick_replica(many, busy, {}, turn).index for turn in range(400)}  # type: ignore[union-attr]
    assert len(seen) > 300  # the window moves with the turn: load spreads over the list
    # the one idle replica is found whenever the window covers it
    assert any(
        pick_replica(many, busy, {}, turn).index == 9_999  # type: ignore[union-attr]
        for turn in range(400)
    )

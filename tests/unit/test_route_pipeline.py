"""Routing pipeline: static filters, the not-full filter, scorers, pick and the moving window."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from corral.domain.entities import Node, NodeStatus, Replica, ReplicaKey, ReplicaState, Scheduling
from corral.domain.routing import Candidates, RoutingWeights, route, supports
from corral.errors import ConfigError


def rep(index: int, node: str = "n1", state: ReplicaState = ReplicaState.LOADED) -> Replica:
    return Replica("m", index, node, state, address=f"{node}:{9000 + index}")


def cands(n: int) -> Candidates:
    return Candidates.of(rep(i, f"n{i}") for i in range(n))


def k(i: int) -> ReplicaKey:
    return ("m", i)


# --- static filters ---------------------------------------------------------------------

NODES = {
    "h": Node(id="h", name="h", status=NodeStatus.HEALTHY, labels={"gpu": "a100"}),
    "u": Node(id="u", name="u", status=NodeStatus.UNHEALTHY, labels={"gpu": "a100"}),
    "x": Node(id="x", name="x", status=NodeStatus.HEALTHY, labels={"gpu": "t4"}),
}
GPU = Scheduling(node_selector={"gpu": "a100"})


def test_build_applies_the_eligibility_filters_and_orders_by_index() -> None:
    found = Candidates.build(
        [rep(3, "h"), rep(1, "h"), rep(2, "u"), rep(4, "x"), rep(5, "h", ReplicaState.LOADING)],
        NODES,
        GPU,
    )
    assert [r.index for r in found.replicas] == [1, 3]
    assert found.keys == (k(1), k(3)) and found.positions == {k(1): 0, k(3): 1}


REVISIONS: list[tuple[str, dict[ReplicaKey, int], int | None, bool, list[int]]] = [
    ("off-keeps-all", {k(0): 1, k(1): 2}, None, False, [0, 1, 2]),
    ("newest-known-only", {k(0): 1, k(1): 2, k(2): 2}, None, True, [1, 2]),
    ("spec-revision-ready", {k(0): 1, k(1): 2}, 2, True, [1]),
    ("spec-revision-not-ready-keeps-all", {k(0): 1, k(1): 2}, 3, True, [0, 1, 2]),
    ("unknown-counts-as-old", {k(0): 2}, None, True, [0]),
    ("nothing-known-keeps-all", {}, None, True, [0, 1, 2]),
]


@pytest.mark.parametrize(
    ("revisions", "revision", "newest_only", "expected"),
    [c[1:] for c in REVISIONS],
    ids=[c[0] for c in REVISIONS],
)
def test_revision_filter(
    revisions: dict[ReplicaKey, int], revision: int | None, newest_only: bool, expected: list[int]
) -> None:
    found = Candidates.build(
        [rep(i, "h") for i in range(3)],
        NODES,
        GPU,
        revisions=revisions,
        revision=revision,
        newest_only=newest_only,
    )
    assert [r.index for r in found.replicas] == expected


CAPABILITIES: list[tuple[str, tuple[str, ...] | None, str, bool]] = [
    ("declared", ("chat", "completions"), "chat", True),
    ("not-declared", ("chat", "completions"), "embeddings", False),
    ("embeddings-only", ("embeddings",), "chat", False),
    ("unknown-allows", None, "rerank", True),
]


@pytest.mark.parametrize(
    ("caps", "endpoint", "expected"),
    [c[1:] for c in CAPABILITIES],
    ids=[c[0] for c in CAPABILITIES],
)
def test_supports(caps: tuple[str, ...] | None, endpoint: str, expected: bool) -> None:
    assert supports(caps, endpoint) is expected


# --- pick: table ---------------------------------------------------------------------------

C3 = cands(3)
W = RoutingWeights()  # concurrency 8, affinity slack 0.5 x 8 = 4 requests

# (id, inflight, turn, route keyword arguments, expected index or None)
PICKS: list[tuple[str, dict[ReplicaKey, int], int, dict[str, object], int | None]] = [
    ("fewest-inflight", {k(0): 2, k(1): 1, k(2): 3}, 0, {}, 1),
    ("missing-inflight-is-zero", {k(0): 1, k(1): 1}, 0, {}, 2),
    ("queued-counts-as-load", {k(0): 1}, 0, {"queued": {k(1): 2, k(2): 2}}, 0),
    ("tie-rotates-0", {}, 0, {}, 0),
    ("tie-rotates-1", {}, 1, {}, 1),
    ("tie-rotates-wraps", {}, 4, {}, 1),
    ("tie-only-among-best", {k(1): 1}, 1, {}, 2),
    ("full-skipped", {k(0): 1, k(2): 1}, 0, {"max_concurrency": 1}, 1),
    ("not-full-wins", {k(0): 0, k(1): 2, k(2): 2}, 0, {"max_concurrency": 2}, 0),
    ("all-full", {k(0): 2, k(1): 2, k(2): 2}, 0, {"max_concurrency": 2}, None),
    # prefix affinity outweighs a small load difference...
    ("prefix-beats-small-load", {k(1): 2}, 0, {"prefix": {k(1): 0.9}}, 1),
    ("longer-prefix-wins", {}, 0, {"prefix": {k(0): 0.25, k(2): 0.75}}, 2),
    # ...but not past the load guard (least loaded + 0.5 x 8)
    ("prefix-within-guard", {k(1): 4}, 0, {"prefix": {k(1): 1.0}}, 1),
    ("prefix-past-guard", {k(1): 5}, 0, {"prefix": {k(1): 1.0}}, 0),
    ("prefix-weight-zero", {k(1): 1}, 0,
     {"prefix": {k(1): 1.0}, "weights": RoutingWeights(prefix=0)}, 0),
    ("prefix-of-full-replica", {k(1): 2}, 0, {"prefix": {k(1): 1.0}, "max_concurrency": 2}, 0),
    ("session-sticks", {k(2): 3}, 0, {"session": k(2)}, 2),
    ("session-past-guard", {k(2): 5}, 0, {"session": k(2)}, 0),
    ("session-unknown-replica", {}, 1, {"session": k(7)}, 1),
    ("session-weight-zero", {k(2): 1}, 0,
     {"session": k(2), "weights": RoutingWeights(session=0)}, 0),
    # speed: replica 2 is 2.75x (a 3x slower one after the dead zone); expected delay
    # (in-flight + 1) x slowness decides: 2 x 1 < 2.75 < 3 x 1
    ("idle-prefers-fast", {}, 2, {"speed": {k(2): 2.75}}, 0),
    ("slow-waits-at-1-vs-0", {k(0): 1, k(1): 1}, 0, {"speed": {k(2): 2.75}}, 0),
    ("slow-taken-at-2-vs-0", {k(0): 2, k(1): 2}, 0, {"speed": {k(2): 2.75}}, 2),
    ("slow-load-counts-more", {k(0): 4, k(1): 4, k(2): 2}, 0, {"speed": {k(2): 2.75}}, 0),
    ("speed-weight-prefers-fast-beyond-delay", {k(0): 2, k(1): 2}, 0,
     {"speed": {k(2): 2.75}, "weights": RoutingWeights(speed=1.0)}, 0),
]  # fmt: skip


@pytest.mark.parametrize(
    ("inflight", "turn", "kwargs", "expected"),
    [c[1:] for c in PICKS],
    ids=[c[0] for c in PICKS],
)
def test_route(
    inflight: dict[ReplicaKey, int], turn: int, kwargs: dict[str, object], expected: int | None
) -> None:
    chosen = route(C3, inflight, turn, **kwargs)  # type: ignore[arg-type]
    assert (chosen.index if chosen else None) == expected


def test_no_candidates() -> None:
    assert route(Candidates(), {}, 0) is None


def test_single_candidate_even_when_busy() -> None:
    assert route(cands(1), {k(0): 99}, 5) == rep(0, "n0")


def test_max_concurrency_sets_the_load_scale() -> None:
    # with C = 2 one request is half a replica: a full prefix match no longer outweighs it...
    assert route(C3, {k(1): 1}, 0, prefix={k(1): 0.2}, max_concurrency=2) == C3.replicas[0]
    # ...with the default scale (8) it does
    assert route(C3, {k(1): 1}, 0, prefix={k(1): 0.2}) == C3.replicas[1]


WEIGHTS_INVALID = [
    ("negative", {"load": -1.0}),
    ("nan", {"prefix": math.nan}),
    ("slack-negative", {"affinity_slack": -0.1}),
    ("concurrency-zero", {"concurrency": 0}),
]


@pytest.mark.parametrize(
    "fields", [c[1] for c in WEIGHTS_INVALID], ids=[c[0] for c in WEIGHTS_INVALID]
)
def test_weights_are_validated(fields: dict[str, float]) -> None:
    with pytest.raises(ConfigError, match="routing"):
        RoutingWeights(**fields)  # type: ignore[arg-type]


# --- spreading ------------------------------------------------------------------------------


def test_burst_of_300_spreads_evenly_over_3_equal_replicas() -> None:
    inflight: dict[ReplicaKey, int] = {}
    chosen: Counter[int] = Counter()
    for turn in range(300):  # all arrive before any completes: each reserves a slot
        r = route(C3, inflight, turn)
        assert r is not None
        inflight[r.key] = inflight.get(r.key, 0) + 1
        chosen[r.index] += 1
    assert chosen == {0: 100, 1: 100, 2: 100}


def test_sequential_requests_take_turns() -> None:
    chosen = Counter(r.index for t in range(9) if (r := route(C3, {}, t)) is not None)
    assert chosen == {0: 3, 1: 3, 2: 3}


def test_hot_prefix_spills_to_other_replicas_past_the_guard() -> None:
    inflight: dict[ReplicaKey, int] = {}
    for turn in range(30):  # every request matches replica 0 fully; none completes
        r = route(C3, inflight, turn, prefix={k(0): 1.0})
        assert r is not None
        inflight[r.key] = inflight.get(r.key, 0) + 1
    assert max(inflight.values()) - min(inflight.values()) <= 5  # within the guard (+1)
    assert inflight[k(0)] > inflight[k(1)]  # but the affine replica takes more


# --- huge candidate lists --------------------------------------------------------------------

MANY = cands(10_000)


def test_window_moves_with_the_turn() -> None:
    busy = {k(i): 1 for i in range(10_000)}
    seen = {route(MANY, busy, turn).index for turn in range(400)}  # type: ignore[union-attr]
    assert len(seen) > 300


def test_affine_replicas_outside_the_window_are_scored() -> None:
    for turn in range(0, 400, 37):
        assert route(MANY, {}, turn, prefix={k(9_999): 1.0}).index == 9_999  # type: ignore[union-attr]
        assert route(MANY, {}, turn, session=k(7_777)).index == 7_777  # type: ignore[union-attr]


def test_full_window_falls_back_to_a_full_scan() -> None:
    busy = {k(i): 1 for i in range(10_000) if i != 5_000}
    for turn in (0, 1, 2):
        chosen = route(MANY, busy, turn, max_concurrency=1)
        assert chosen is not None and chosen.index == 5_000
    assert route(MANY, busy | {k(5_000): 1}, 0, max_concurrency=1) is None


def test_window_with_many_slow_replicas_prefers_the_fast_ones() -> None:
    slow = {k(i): 3.0 for i in range(10_000) if i % 2}  # larger than the window
    for turn in range(5):
        chosen = route(MANY, {}, turn, speed=slow)
        assert chosen is not None and chosen.index % 2 == 0

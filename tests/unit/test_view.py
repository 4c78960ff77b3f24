"""The cluster view: candidates, their cache, change events and resyncs."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from corral.domain.entities import (
    ModelSpec,
    NodeStatus,
    Replica,
    ReplicaState,
    Rollout,
)
from corral.frontend.view import ClusterView
from factories import model, node, replica


def _model(name: str = "m", selector: dict[str, str] | None = None) -> ModelSpec:
    return model(name, selector=selector)


def _replica(
    index: int,
    node: str = "n1",
    *,
    model: str = "m",
    state: ReplicaState = ReplicaState.LOADED,
    last_used: float = 0.0,
) -> Replica:
    return replica(model, index, node, state, last_used=last_used)


def _keys(replicas: list[Replica]) -> list[tuple[str, int]]:
    return sorted(r.key for r in replicas)


@pytest.fixture
def view() -> ClusterView:
    v = ClusterView()
    v.put_node(node("n1", labels={"zone": "a"}))
    v.put_node(node("n2", labels={"zone": "b"}))
    v.put_model(_model("m"))
    v.put_model(_model("other"))
    v.put_replica(_replica(0, "n1"))
    v.put_replica(_replica(1, "n2"))
    v.put_replica(_replica(0, "n1", model="other"))
    return v


def test_view_candidates_filter_state_and_unknown_model(view: ClusterView) -> None:
    view.put_replica(_replica(2, "n1", state=ReplicaState.LOADING))
    view.put_replica(_replica(3, "n-unknown"))
    assert _keys(view.candidates("m")) == [("m", 0), ("m", 1)]
    assert view.candidates("nope") == []
    assert view.loaded_count("m") == 3
    assert len(view.replicas_of("m")) == 4


def test_view_candidates_are_cached_until_a_change(view: ClusterView) -> None:
    first = view.candidates("m")
    assert view.candidates("m") is first, "no change: the cached list is returned"
    other = view.candidates("other")
    view.put_replica(_replica(2, "n2"))
    after = view.candidates("m")
    assert after is not first
    assert _keys(after) == [("m", 0), ("m", 1), ("m", 2)]
    assert view.candidates("other") is other, "a replica of m does not invalidate other"


MUTATIONS: list[tuple[str, Any, list[tuple[str, int]]]] = [
    ("drop-replica", lambda v: v.drop_replica("m", 0), [("m", 1)]),
    (
        "replica-unloading",
        lambda v: v.put_replica(_replica(0, "n1", state=ReplicaState.UNLOADING)),
        [("m", 1)],
    ),
    ("drop-node", lambda v: v.drop_node("n2"), [("m", 0)]),
    (
        "node-unhealthy",
        lambda v: v.put_node(node("n1", status=NodeStatus.UNHEALTHY, labels={"zone": "a"})),
        [("m", 1)],
    ),
    (
        "node-draining-still-serves",
        lambda v: v.put_node(node("n1", status=NodeStatus.DRAINING, labels={"zone": "a"})),
        [("m", 0), ("m", 1)],
    ),
    ("selector-change", lambda v: v.put_model(_model("m", {"zone": "b"})), [("m", 1)]),
    ("drop-model", lambda v: v.drop_model("m"), []),
]


@pytest.mark.parametrize(
    ("change", "expected"), [m[1:] for m in MUTATIONS], ids=[m[0] for m in MUTATIONS]
)
def test_view_change_invalidates_cached_candidates(
    view: ClusterView, change: Any, expected: list[tuple[str, int]]
) -> None:
    assert _keys(view.candidates("m")) == [("m", 0), ("m", 1)]  # fill the cache
    change(view)
    assert _keys(view.candidates("m")) == expected


def test_view_node_relabel_out_of_selector_removes_candidate(view: ClusterView) -> None:
    view.put_model(_model("m", {"zone": "a"}))
    assert _keys(view.candidates("m")) == [("m", 0)]
    view.put_node(node("n1", labels={"zone": "x"}))
    assert view.candidates("m") == []
    view.put_node(node("n2", labels={"zone": "a"}))
    assert _keys(view.candidates("m")) == [("m", 1)]


def test_view_drop_node_removes_its_replicas(view: ClusterView) -> None:
    view.drop_node("n1")
    assert ("m", 0) not in view.replicas
    assert ("other", 0) not in view.replicas
    assert ("m", 0) not in view.last_used
    assert _keys(view.replicas_of("m")) == [("m", 1)]


CHANGES_FOR_M: list[tuple[str, Any, bool]] = [
    ("put-replica-m", lambda v: v.put_replica(_replica(5, "n1")), True),
    ("drop-replica-m", lambda v: v.drop_replica("m", 0), True),
    ("put-model-m", lambda v: v.put_model(_model("m", {"zone": "a"})), True),
    ("drop-model-m", lambda v: v.drop_model("m"), True),
    ("put-node", lambda v: v.put_node(node("n3")), True),
    ("drop-node", lambda v: v.drop_node("n2"), True),
    ("replace-all", lambda v: v.replace_all([], [], []), True),
    ("put-replica-other", lambda v: v.put_replica(_replica(5, "n1", model="other")), False),
    ("put-model-other", lambda v: v.put_model(_model("other", {"zone": "b"})), False),
]


@pytest.mark.parametrize(
    ("change", "fires"), [c[1:] for c in CHANGES_FOR_M], ids=[c[0] for c in CHANGES_FOR_M]
)
async def test_view_changed_event(view: ClusterView, change: Any, fires: bool) -> None:
    event = view.changed("m")
    assert not event.is_set()
    assert view.changed("m") is event, "waiters of one model share the pending event"
    change(view)
    assert event.is_set() is fires
    if fires:
        fresh = view.changed("m")
        assert fresh is not event and not fresh.is_set()


async def test_view_changed_wakes_a_waiter(view: ClusterView) -> None:
    waiter = asyncio.create_task(view.changed("m").wait())
    await asyncio.sleep(0)
    assert not waiter.done()
    view.put_replica(_replica(7, "n2"))
    await asyncio.wait_for(waiter, timeout=1)


def test_view_replace_all_keeps_newer_local_last_used(view: ClusterView) -> None:
    view.last_used[("m", 0)] = 500.0  # a request just used it; not flushed yet
    view.last_used[("m", 1)] = 100.0
    view.replace_all(
        [node("n1"), node("n2")],
        [_model("m")],
        [_replica(0, "n1", last_used=200.0), _replica(1, "n2", last_used=300.0)],
    )
    assert view.last_used[("m", 0)] == 500.0, "the local time is newer than the database's"
    assert view.last_used[("m", 1)] == 300.0, "the database's time is newer than the local one"
    assert ("other", 0) not in view.replicas and "other" not in view.models
    assert view.synced_at > 0
    assert _keys(view.candidates("m")) == [("m", 0), ("m", 1)]


def test_view_replace_all_drops_vanished_replicas_from_candidates(view: ClusterView) -> None:
    assert len(view.candidates("m")) == 2
    view.replace_all([node("n1"), node("n2")], [_model("m")], [_replica(1, "n2")])
    assert _keys(view.candidates("m")) == [("m", 1)]
    assert _keys(view.replicas_of("m")) == [("m", 1)]


def test_view_put_replica_keeps_local_last_used(view: ClusterView) -> None:
    view.last_used[("m", 0)] = 900.0
    view.put_replica(_replica(0, "n1", last_used=10.0))  # e.g. a state event with an old time
    assert view.last_used[("m", 0)] == 900.0


def test_view_free_memory() -> None:
    v = ClusterView()
    v.put_node(node("n1", ram_free=5))
    v.put_node(node("n2", ram_free=7))
    assert v.free_memory() == {"n1": 5, "n2": 7}


def test_candidates_are_the_current_revision_once_one_is_ready() -> None:
    spec = model("m", options={"v": 2})
    old = model("m").config_revision
    v = ClusterView()
    v.put_node(node("n1"))
    v.put_model(spec)
    v.put_replica(replica("m", 0, revision=old))
    v.put_replica(replica("m", 1, revision=old))
    v.put_replica(replica("m", 2, state=ReplicaState.LOADING, revision=spec.config_revision))
    assert _keys(v.candidates("m")) == [("m", 0), ("m", 1)], "nothing current is ready yet"
    v.put_replica(replica("m", 2, revision=spec.config_revision))
    assert _keys(v.candidates("m")) == [("m", 2)]
    v.put_model(model("m", options={"v": 2}, rollout=Rollout(newest_only=False)))
    assert _keys(v.candidates("m")) == [("m", 0), ("m", 1), ("m", 2)], "the setting is off"


async def test_view_heartbeat_keeps_candidates_and_updates_free_memory(view: ClusterView) -> None:
    cached = view.candidates("m")
    assert view.free_memory()["n1"] == 0
    event = view.changed("m")
    view.put_node(node("n1", labels={"zone": "a"}, ram_free=42))  # same status and labels
    assert view.candidates("m") is cached, "a heartbeat does not rebuild candidate lists"
    assert view.free_memory()["n1"] == 42
    assert view.nodes["n1"].resources.ram_free == 42
    assert not event.is_set()
    view.put_node(node("n1", labels={"zone": "b"}, ram_free=42))  # a relabel does
    assert view.candidates("m") is not cached and event.is_set()

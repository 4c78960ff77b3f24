"""Eviction planning: which idle replicas to stop, on which node."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

import factories
from corral.domain.entities import (
    Node,
    Replica,
    ReplicaKey,
    ReplicaState,
)
from corral.domain.eviction import EvictionPlan, plan_eviction
from corral.domain.memory import MemoryPool
from factories import GB

LOADED = ReplicaState.LOADED


def node(nid: str, budget: int = 10 * GB, vram: int = 0) -> Node:
    return factories.node(nid, budget=budget, vram=vram)


def rep(
    model: str, index: int, nid: str, memory: int, last_used: float, state: ReplicaState = LOADED
) -> Replica:
    return factories.replica(model, index, nid, state, memory=memory, last_used=last_used)


def victims(p: EvictionPlan | None) -> list[tuple[str, int]] | None:
    return None if p is None else [(v.model, v.index) for v in p.victims]


# node "a": 10 GB budget; the need is 4 GB unless a case says otherwise.
CASES: list[
    tuple[
        str,
        list[Replica],
        Mapping[ReplicaKey, int],
        Mapping[str, int],
        int,
        list[tuple[str, int]] | None,
    ]
] = [
    (
        "least-recently-used-first",
        [rep("x", 0, "a", 5 * GB, 20.0), rep("y", 0, "a", 5 * GB, 10.0)],
        {},
        {},
        4 * GB,
        [("y", 0)],
    ),
    (
        "free-budget-counts-towards-need",
        [rep("x", 0, "a", 3 * GB, 10.0), rep("y", 0, "a", 5 * GB, 20.0)],
        {},
        {},
        4 * GB,
        [("x", 0)],  # 2 GB free + 3 GB freed >= 4 GB
    ),
    (
        "busy-replica-never-evicted",
        [rep("x", 0, "a", 5 * GB, 10.0), rep("y", 0, "a", 5 * GB, 20.0)],
        {("x", 0): 1},
        {},
        4 * GB,
        [("y", 0)],
    ),
    (
        "protected-model-never-evicted",
        [rep("m", 0, "a", 5 * GB, 10.0), rep("y", 0, "a", 5 * GB, 20.0)],
        {},
        {},
        4 * GB,
        [("y", 0)],
    ),
    (
        "minimum-counts-cluster-wide",
        [
            rep("x", 0, "a", 5 * GB, 10.0),
            rep("x", 1, "b", 5 * GB, 10.0),
            rep("y", 0, "a", 5 * GB, 20.0),
        ],
        {},
        {"x": 1},
        4 * GB,
        [("x", 0)],  # x keeps its replica on b
    ),
    (
        "minimum-blocks-last-replica",
        [rep("x", 0, "a", 5 * GB, 10.0), rep("y", 0, "a", 5 * GB, 20.0)],
        {},
        {"x": 1},
        4 * GB,
        [("y", 0)],
    ),
    (
        "loading-replicas-not-evicted",
        [rep("x", 0, "a", 5 * GB, 10.0, ReplicaState.LOADING), rep("y", 0, "a", 5 * GB, 20.0)],
        {},
        {},
        4 * GB,
        [("y", 0)],
    ),
    (
        "minimal-set-drops-unneeded-old-ones",
        [
            rep("x", 0, "a", 1 * GB, 10.0),
            rep("y", 0, "a", 1 * GB, 11.0),
            rep("z", 0, "a", 8 * GB, 12.0),
        ],
        {},
        {},
        8 * GB,
        [("z", 0)],  # greedy takes x, y, z; only z is needed
    ),
    (
        "several-when-one-is-not-enough",
        [
            rep("x", 0, "a", 4 * GB, 10.0),
            rep("y", 0, "a", 4 * GB, 11.0),
            rep("z", 0, "a", 2 * GB, 12.0),
        ],
        {},
        {},
        8 * GB,
        [("x", 0), ("y", 0)],
    ),
    (
        "nothing-suffices",
        [rep("x", 0, "a", 5 * GB, 10.0), rep("y", 0, "a", 5 * GB, 20.0)],
        {("x", 0): 1, ("y", 0): 2},
        {},
        4 * GB,
        None,
    ),
    ("need-above-budget", [rep("x", 0, "a", 5 * GB, 10.0)], {}, {}, 11 * GB, None),
]


@pytest.mark.parametrize(
    ("replicas", "inflight", "minimum", "need", "expected"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_plan_on_one_node(
    replicas: list[Replica],
    inflight: Mapping[ReplicaKey, int],
    minimum: Mapping[str, int],
    need: int,
    expected: list[tuple[str, int]] | None,
) -> None:
    p = plan_eviction(need, [node("a")], replicas, inflight, minimum, "m")
    assert victims(p) == expected
    if p is not None:
        assert p.node_id == "a"
        assert p.free_after >= need
        assert p.freed == sum(v.memory for v in p.victims)


def test_victims_carry_exact_identity() -> None:
    p = plan_eviction(4 * GB, [node("a")], [rep("x", 3, "a", 9 * GB, 1.0)], {}, {}, "m")
    assert p is not None
    (v,) = p.victims
    assert (v.model, v.index, v.node_id, v.address) == ("x", 3, "a", "a:9003")


NODE_CHOICE = [
    (
        "fewest-victims",
        [
            rep("x", 0, "a", 4 * GB, 1.0),
            rep("y", 0, "a", 4 * GB, 2.0),
            rep("z", 0, "b", 9 * GB, 50.0),
        ],
        "b",
    ),
    (
        "then-oldest-victim",
        [rep("x", 0, "a", 9 * GB, 30.0), rep("y", 0, "b", 9 * GB, 20.0)],
        "b",
    ),
    (
        "then-least-freed",
        [rep("x", 0, "a", 9 * GB, 20.0), rep("y", 0, "b", 8 * GB, 20.0)],
        "b",
    ),
    (
        "only-candidate-nodes",
        [
            rep("m", 0, "a", 9 * GB, 1.0),  # a: only the protected model
            rep("x", 0, "c", 9 * GB, 1.0),
            rep("y", 0, "b", 9 * GB, 5.0),
        ],
        "b",
    ),
]


@pytest.mark.parametrize(
    ("replicas", "expected"), [c[1:] for c in NODE_CHOICE], ids=[c[0] for c in NODE_CHOICE]
)
def test_node_choice(replicas: list[Replica], expected: str) -> None:
    p = plan_eviction(8 * GB, [node("a"), node("b")], replicas, {}, {}, "m")
    assert p is not None
    assert p.node_id == expected
    assert len(p.victims) == 1


def test_other_pool_replicas_are_not_evicted() -> None:
    pools = {"cpu": MemoryPool.RAM, "gpu": MemoryPool.VRAM}
    replicas = [rep("cpu", 0, "a", 9 * GB, 1.0), rep("gpu", 0, "a", 9 * GB, 2.0)]
    a = node("a", vram=10 * GB)
    p = plan_eviction(4 * GB, [a], replicas, {}, {}, "m", model_pools=pools)
    assert victims(p) == [("cpu", 0)]
    # Freeing VRAM: the RAM replica (older) would not help.
    p = plan_eviction(4 * GB, [a], replicas, {}, {}, "m", pool=MemoryPool.VRAM, model_pools=pools)
    assert victims(p) == [("gpu", 0)]

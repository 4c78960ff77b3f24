"""Cold-path placement: filters, scores and the explanation when nothing fits."""

from __future__ import annotations

import pytest

import factories
from corral.domain.entities import (
    ModelSpec,
    Node,
    NodeStatus,
    Replica,
    ReplicaState,
    Scheduling,
)
from corral.domain.memory import MemoryPool
from corral.domain.placement import PlacementDecision, Strategy, place, unplaceable
from factories import GB


def node(
    nid: str,
    *,
    status: NodeStatus = NodeStatus.HEALTHY,
    budget: int = 10 * GB,
    labels: dict[str, str] | None = None,
    backends: frozenset[str] = frozenset({"llama"}),
    artifacts: frozenset[str] = frozenset(),
    cap: int = 0,
    disk: int = 100 * GB,
    vram: int = 0,
) -> Node:
    return factories.node(
        nid,
        status=status,
        budget=budget,
        labels=labels,
        backends=backends,
        artifacts=artifacts,
        cap=cap,
        disk=disk,
        vram=vram,
    )


def rep(
    model: str, index: int, nid: str, memory: int, state: ReplicaState = ReplicaState.LOADED
) -> Replica:
    return factories.replica(model, index, nid, state, memory=memory)


SPEC = ModelSpec(name="m", backend="llama", artifact="hf://m")


def decide(
    nodes: list[Node],
    replicas: list[Replica] | None = None,
    *,
    spec: ModelSpec = SPEC,
    estimate: int = 4 * GB,
    strategy: Strategy = "binpack",
    **kw: object,
) -> PlacementDecision:
    return place(spec, estimate, nodes, replicas or [], strategy=strategy, **kw)  # type: ignore[arg-type]


# --- filters: one node, does it fit, and why not -----------------------------------------

FILTERS: list[tuple[str, Node, list[Replica], ModelSpec, str | None, bool]] = [
    ("fits", node("a"), [], SPEC, None, False),
    ("unhealthy", node("a", status=NodeStatus.UNHEALTHY), [], SPEC, "node is unhealthy", False),
    ("draining", node("a", status=NodeStatus.DRAINING), [], SPEC, "node is draining", False),
    ("pending", node("a", status=NodeStatus.PENDING), [], SPEC, "node is pending", False),
    ("offline", node("a", status=NodeStatus.OFFLINE), [], SPEC, "node is offline", False),
    (
        "selector-mismatch",
        node("a", labels={"gpu": "t4"}),
        [],
        ModelSpec(name="m", backend="llama", scheduling=Scheduling(node_selector={"gpu": "a100"})),
        "labels do not match selector gpu=a100",
        False,
    ),
    ("backend-missing", node("a", backends=frozenset({"vllm"})), [], SPEC, "backend llama", False),
    ("backends-unknown", node("a", backends=frozenset()), [], SPEC, "backend llama", False),
    (
        "sim-runs-everywhere",
        node("a", backends=frozenset()),
        [],
        ModelSpec("m", "sim"),
        None,
        False,
    ),
    ("slot-cap-reached", node("a", cap=1), [rep("m", 0, "a", GB)], SPEC, "max 1", False),
    ("slot-cap-other-model-free", node("a", cap=1), [rep("o", 0, "a", GB)], SPEC, None, False),
    (
        "memory-full",
        node("a"),
        [rep("o", 0, "a", 7 * GB)],
        SPEC,
        "needs 4.0 GB, 3.0 GB free of 10.0 GB budget",
        True,
    ),
    (
        "failed-replica-frees",
        node("a"),
        [rep("o", 0, "a", 7 * GB, ReplicaState.FAILED)],
        SPEC,
        None,
        False,
    ),
    (
        "loading-replica-holds",
        node("a"),
        [rep("o", 0, "a", 7 * GB, ReplicaState.LOADING)],
        SPEC,
        "needs 4.0 GB",
        True,
    ),
]


@pytest.mark.parametrize(
    ("n", "replicas", "spec", "rejection", "evictable"),
    [c[1:] for c in FILTERS],
    ids=[c[0] for c in FILTERS],
)
def test_filters(
    n: Node, replicas: list[Replica], spec: ModelSpec, rejection: str | None, evictable: bool
) -> None:
    d = decide([n], replicas, spec=spec)
    if rejection is None:
        assert d.node_id == "a" and d.placed
    else:
        assert d.node_id is None and not d.placed
        assert rejection in d.rejections["a"]
    assert d.eviction_may_help is evictable
    assert d.eviction_candidates == (("a",) if evictable else ())


def test_exclude_nodes() -> None:
    d = decide([node("a"), node("b")], exclude_nodes=frozenset({"a"}))
    assert d.node_id == "b"
    assert d.rejections == {"a": "excluded by the caller"}


DISK = [
    ("no-need", node("a", disk=0), 0, "a"),
    ("enough-disk", node("a", disk=5 * GB), 5 * GB, "a"),
    ("too-little-disk", node("a", disk=GB), 5 * GB, None),
    ("artifact-already-there", node("a", disk=0, artifacts=frozenset({"hf://m"})), 5 * GB, "a"),
]


@pytest.mark.parametrize(("n", "need", "expected"), [c[1:] for c in DISK], ids=[c[0] for c in DISK])
def test_disk(n: Node, need: int, expected: str | None) -> None:
    d = decide([n], disk_need=need)
    assert d.node_id == expected
    if expected is None:
        assert "of disk for the artifact" in d.rejections["a"]
        assert not d.eviction_may_help


def test_memory_counts_only_the_same_pool() -> None:
    gpu_node = node("a", vram=16 * GB, budget=100 * GB)
    busy_ram = [rep("cpu", 0, "a", 95 * GB)]
    pools = {"cpu": MemoryPool.RAM, "m": MemoryPool.VRAM}
    d = decide([gpu_node], busy_ram, estimate=12 * GB, pool=MemoryPool.VRAM, model_pools=pools)
    assert d.node_id == "a"
    d = decide([gpu_node], [], estimate=20 * GB, pool=MemoryPool.VRAM, model_pools=pools)
    assert d.node_id is None
    assert "of VRAM" in d.rejections["a"]


def test_empty_backend_is_never_placed() -> None:
    d = decide([node("a", backends=frozenset({""}))], spec=ModelSpec("m", ""))
    assert d.node_id is None
    assert "no backend" in d.reason


# --- scores ------------------------------------------------------------------------------

SCORES: list[tuple[str, Strategy, list[Node], list[Replica], str]] = [
    (
        "binpack-least-room-left",
        "binpack",
        [node("a"), node("b"), node("c")],
        [rep("o", 0, "b", 5 * GB), rep("o", 1, "c", 2 * GB)],
        "b",
    ),
    (
        "spread-fewest-of-this-model",
        "spread",
        [node("a", budget=20 * GB), node("b")],
        [rep("m", 0, "a", GB)],
        "b",
    ),
    (
        "spread-then-fewest-replicas-overall",
        "spread",
        [node("a", budget=20 * GB), node("b")],
        [rep("o", 0, "a", GB), rep("o", 1, "a", GB)],
        "b",
    ),
    ("spread-then-most-room", "spread", [node("a"), node("b", budget=20 * GB)], [], "b"),
    (
        "binpack-prefers-artifact",
        "binpack",
        [node("a"), node("b", budget=50 * GB, artifacts=frozenset({"hf://m"}))],
        [],
        "b",
    ),
    (
        "spread-artifact-after-counts",
        "spread",
        [node("a", artifacts=frozenset({"hf://m"})), node("b")],
        [rep("m", 0, "a", GB)],
        "b",
    ),
    (
        "spread-artifact-breaks-equal-counts",
        "spread",
        [node("a", budget=50 * GB), node("b", artifacts=frozenset({"hf://m"}))],
        [],
        "b",
    ),
    ("tie-by-node-id", "binpack", [node("b"), node("a")], [], "a"),
]


@pytest.mark.parametrize(
    ("strategy", "nodes", "replicas", "expected"),
    [c[1:] for c in SCORES],
    ids=[c[0] for c in SCORES],
)
def test_scores(
    strategy: Strategy, nodes: list[Node], replicas: list[Replica], expected: str
) -> None:
    assert decide(nodes, replicas, strategy=strategy).node_id == expected


# --- explanations ------------------------------------------------------------------------

REASONS: list[tuple[str, list[Node], ModelSpec, str]] = [
    ("no-nodes", [], SPEC, "no worker node has joined"),
    (
        "no-healthy",
        [node("a", status=NodeStatus.UNHEALTHY)],
        SPEC,
        "no healthy node: a: node is unhealthy",
    ),
    (
        "selector-matches-nothing",
        [
            node("a", labels={"gpu": "t4"}),
            node("b", status=NodeStatus.OFFLINE, labels={"gpu": "a100"}),
        ],
        ModelSpec("m", "llama", scheduling=Scheduling(node_selector={"gpu": "a100"})),
        "selector gpu=a100 matches no healthy node",
    ),
    (
        "memory-names-each-node",
        [node("a", budget=GB), node("b", budget=2 * GB)],
        SPEC,
        "no node fits m: a: needs 4.0 GB, 1.0 GB free of 1.0 GB budget; "
        "b: needs 4.0 GB, 2.0 GB free of 2.0 GB budget",
    ),
]


@pytest.mark.parametrize(
    ("nodes", "spec", "reason"), [c[1:] for c in REASONS], ids=[c[0] for c in REASONS]
)
def test_reason_when_nothing_fits(nodes: list[Node], spec: ModelSpec, reason: str) -> None:
    d = decide(nodes, spec=spec)
    assert d.node_id is None
    assert d.reason == reason


def test_eviction_candidates_are_only_memory_failures() -> None:
    nodes = [
        node("full"),
        node("capped", cap=1),
        node("sick", status=NodeStatus.UNHEALTHY),
    ]
    replicas = [rep("o", 0, "full", 9 * GB), rep("m", 0, "capped", 9 * GB)]
    d = decide(nodes, replicas)
    assert d.node_id is None
    assert d.eviction_candidates == ("full",)
    assert d.eviction_may_help


@pytest.mark.parametrize(
    ("nodes", "selector", "backend", "why"),
    [
        ([], {}, "llama", "no worker node has joined"),
        ([node("a")], {}, "llama", None),
        ([node("a", budget=0, cap=1)], {}, "llama", None),  # full now, but memory can be freed
        ([node("a", status=NodeStatus.DRAINING)], {}, "llama", "no healthy node: a: node is"),
        ([node("a")], {"gpu": "h100"}, "llama", "selector gpu=h100 matches no healthy node"),
        ([node("a")], {}, "vllm", "a: backend vllm is not available on this node"),
        ([node("a"), node("b", backends=frozenset({"vllm"}))], {}, "vllm", None),
        ([node("a")], {}, "sim", None),  # built into every worker
    ],
)
def test_unplaceable_says_why_no_node_could_ever_take_the_model(
    nodes: list[Node], selector: dict[str, str], backend: str, why: str | None
) -> None:
    spec = factories.model("m", backend=backend, selector=selector)
    reason = unplaceable(spec, nodes)
    if why is None:
        assert reason is None
    else:
        assert reason is not None and why in reason

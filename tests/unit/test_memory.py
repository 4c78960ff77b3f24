"""Memory estimates, memory pools and node budgets."""

from __future__ import annotations

from typing import Any

import pytest

import factories
from corral.domain.entities import (
    ModelSpec,
    Node,
    Replica,
    ReplicaState,
)
from corral.domain.memory import (
    KV_BYTES_PER_TOKEN,
    MemoryPool,
    context_length,
    estimate_memory,
    free_budget,
    memory_pool,
    node_budget,
    reserved_memory,
)
from corral.domain.sizes import MemoryBudget
from factories import GB, MB


def spec(backend: str = "llama", memory: int | None = None, **options: Any) -> ModelSpec:
    return factories.model(backend=backend, memory=memory, options=options)


ESTIMATES = [
    ("declared-wins-over-artifact", spec(memory=5 * GB), 10 * GB, 5 * GB),
    ("artifact-plus-overhead", spec(), 10 * GB, 12 * GB),
    (
        "artifact-plus-kv-context_length",
        spec(context_length=4096),
        10 * GB,
        12 * GB + 4096 * KV_BYTES_PER_TOKEN,
    ),
    ("ctx_size-option", spec(ctx_size=1000), GB, int(1.2 * GB) + 1000 * KV_BYTES_PER_TOKEN),
    ("n_ctx-as-string", spec(n_ctx="2000"), GB, int(1.2 * GB) + 2000 * KV_BYTES_PER_TOKEN),
    ("bad-context-ignored", spec(n_ctx="lots"), GB, int(1.2 * GB)),
    ("sim-default", spec(backend="sim"), None, 64 * MB),
    ("unknown-backend-default", spec(backend="vllm"), None, GB),
    ("zero-artifact-size-falls-back", spec(backend="sim"), 0, 64 * MB),
]


@pytest.mark.parametrize(
    ("model", "size", "expected"), [c[1:] for c in ESTIMATES], ids=[c[0] for c in ESTIMATES]
)
def test_estimate_memory(model: ModelSpec, size: int | None, expected: int) -> None:
    assert estimate_memory(model, size) == expected


def test_context_length_first_option_wins() -> None:
    assert context_length({"context_length": 100, "n_ctx": 200}) == 100
    assert context_length({"context_length": True}) == 0


POOLS = [
    ("cpu-backend-ram", spec(), frozenset(), MemoryPool.RAM),
    ("gpu-option-vram", spec(gpu=True), frozenset(), MemoryPool.VRAM),
    ("gpu-backend-vram", spec(backend="vllm"), frozenset({"vllm"}), MemoryPool.VRAM),
    (
        "explicit-gpu-false-wins",
        spec(backend="vllm", gpu=False),
        frozenset({"vllm"}),
        MemoryPool.RAM,
    ),
    ("gpu-string-false", spec(gpu="false"), frozenset(), MemoryPool.RAM),
]


@pytest.mark.parametrize(
    ("model", "gpu_backends", "expected"), [c[1:] for c in POOLS], ids=[c[0] for c in POOLS]
)
def test_memory_pool(model: ModelSpec, gpu_backends: frozenset[str], expected: MemoryPool) -> None:
    assert memory_pool(model, gpu_backends) == expected


def node(budget: MemoryBudget, ram: int = 100 * GB, vram: tuple[int, ...] = ()) -> Node:
    return factories.node("n", budget=budget, ram_total=ram, vram=vram)


BUDGETS = [
    ("ram-fraction", node(MemoryBudget(fraction=0.5)), MemoryPool.RAM, 50 * GB),
    ("ram-fixed-capped-by-total", node(MemoryBudget(size=200 * GB)), MemoryPool.RAM, 100 * GB),
    (
        "vram-summed-over-gpus",
        node(MemoryBudget(fraction=1.0), vram=(8 * GB, 8 * GB)),
        MemoryPool.VRAM,
        16 * GB,
    ),
    ("no-gpu-no-vram-even-fixed", node(MemoryBudget(size=10 * GB)), MemoryPool.VRAM, 0),
]


@pytest.mark.parametrize(
    ("n", "pool", "expected"), [c[1:] for c in BUDGETS], ids=[c[0] for c in BUDGETS]
)
def test_node_budget(n: Node, pool: MemoryPool, expected: int) -> None:
    assert node_budget(n, pool) == expected


def test_reserved_counts_active_replicas_on_the_node_in_the_pool() -> None:
    reps = [
        Replica("a", 0, "n", ReplicaState.LOADED, memory=1 * GB),
        Replica("a", 1, "n", ReplicaState.LOADING, memory=2 * GB),
        Replica("a", 2, "n", ReplicaState.FAILED, memory=4 * GB),  # holds nothing
        Replica("a", 3, "other", ReplicaState.LOADED, memory=8 * GB),  # other node
        Replica("g", 0, "n", ReplicaState.LOADED, memory=16 * GB),  # VRAM model
    ]
    pools = {"a": MemoryPool.RAM, "g": MemoryPool.VRAM}
    assert reserved_memory("n", reps, MemoryPool.RAM, pools) == 3 * GB
    assert reserved_memory("n", reps, MemoryPool.VRAM, pools) == 16 * GB
    assert reserved_memory("n", reps, MemoryPool.RAM) == 19 * GB  # no pools: all count
    assert free_budget(node(MemoryBudget(fraction=0.5)), reps, MemoryPool.RAM, pools) == 47 * GB

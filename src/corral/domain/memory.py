"""Memory estimates of models and the memory pools (RAM or VRAM) and budgets of nodes.

Estimate of one replica (`estimate_memory`), first rule that applies:

1. `spec.memory` when the operator declared it;
2. with a known artifact size: `artifact_size * 1.2 + context_length * kv_bytes_per_token`,
   where 1.2 covers the runtime's own overhead (weights are mapped plus buffers) and
   `context_length` is the first positive integer among `spec.options["context_length"]`,
   `["ctx_size"]`, `["n_ctx"]` (0 when none is set), and `kv_bytes_per_token` is the KV cache
   per token of context (default 128 KiB: 2 x 32 layers x 1024 KV width x 2 bytes, an 8B
   model with grouped-query attention in fp16);
3. else a per-backend default (`sim`: 64 MB), else 1 GB.

Pool: a model needs VRAM when `spec.options["gpu"]` says so, or, when that option is absent,
when its backend is one of the GPU backends the caller names; otherwise it uses RAM. A replica
reserves its `memory` in the pool of its model; nodes without GPUs have no VRAM budget.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from enum import StrEnum
from types import MappingProxyType
from typing import Any

from corral.domain.entities import ACTIVE_REPLICA_STATES, ModelSpec, Node, Replica

#: Runtime overhead on top of the artifact's size.
OVERHEAD_FACTOR = 1.2
#: Default KV-cache bytes per token of context.
KV_BYTES_PER_TOKEN = 128 * 1024
#: Option names that carry a model's context length, first match wins.
CONTEXT_OPTIONS = ("context_length", "ctx_size", "n_ctx")
#: Estimate when nothing better is known, per backend.
BACKEND_DEFAULTS: Mapping[str, int] = MappingProxyType({"sim": 64 * 1000**2})
#: Estimate for a backend without a default.
UNKNOWN_BACKEND_DEFAULT = 1000**3


class MemoryPool(StrEnum):
    """Which memory of a node a replica fills."""

    RAM = "ram"  # system memory (CPU backends, the built-in simulator)
    VRAM = "vram"  # GPU memory, summed over the node's GPUs


def context_length(options: Mapping[str, Any]) -> int:
    """Return the context length a model's options ask for, or 0 when none is set."""
    for name in CONTEXT_OPTIONS:
        value = _positive_int(options.get(name))
        if value:
            return value
    return 0


def estimate_memory(
    spec: ModelSpec,
    artifact_size: int | None,
    *,
    kv_bytes_per_token: int = KV_BYTES_PER_TOKEN,
    defaults: Mapping[str, int] = BACKEND_DEFAULTS,
) -> int:
    """Return the bytes one replica of `spec` is expected to hold (rules in the module doc)."""
    if spec.memory is not None:
        return spec.memory
    if artifact_size is not None and artifact_size > 0:
        kv = context_length(spec.options) * kv_bytes_per_token
        return int(artifact_size * OVERHEAD_FACTOR) + kv
    return defaults.get(spec.backend, UNKNOWN_BACKEND_DEFAULT)


def memory_pool(spec: ModelSpec, gpu_backends: frozenset[str] = frozenset()) -> MemoryPool:
    """Return the pool `spec` fills: an explicit `gpu` option wins, else the backend decides."""
    if "gpu" in spec.options:
        return MemoryPool.VRAM if _truthy(spec.options["gpu"]) else MemoryPool.RAM
    return MemoryPool.VRAM if spec.backend in gpu_backends else MemoryPool.RAM


def node_memory(node: Node, pool: MemoryPool) -> int:
    """Return the total bytes of `pool` on `node` as its last heartbeat reported them."""
    if pool == MemoryPool.VRAM:
        return node.resources.vram_total
    return node.resources.ram_total


def node_budget(node: Node, pool: MemoryPool) -> int:
    """Return the bytes of `pool` Corral may fill on `node` (0 VRAM on a node without GPUs)."""
    total = node_memory(node, pool)
    if pool == MemoryPool.VRAM and total <= 0:
        return 0
    return node.memory_budget.bytes_of(total)


def reserved_memory(
    node_id: str,
    replicas: Iterable[Replica],
    pool: MemoryPool,
    model_pools: Mapping[str, MemoryPool] | None = None,
) -> int:
    """Return the bytes that active replicas on `node_id` hold in `pool`.

    `model_pools` maps model name to pool; without it every replica counts (conservative).
    A model missing from `model_pools` counts as RAM.
    """
    total = 0
    for r in replicas:
        if r.node_id != node_id or r.state not in ACTIVE_REPLICA_STATES:
            continue
        if model_pools is None or model_pools.get(r.model, MemoryPool.RAM) == pool:
            total += r.memory
    return total


def free_budget(
    node: Node,
    replicas: Iterable[Replica],
    pool: MemoryPool,
    model_pools: Mapping[str, MemoryPool] | None = None,
) -> int:
    """Return the budget of `pool` on `node` minus what its active replicas hold (may be < 0)."""
    return node_budget(node, pool) - reserved_memory(node.id, replicas, pool, model_pools)


def _positive_int(value: object) -> int:
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return max(value, 0)
    if isinstance(value, float):
        return max(int(value), 0)
    if isinstance(value, str):
        try:
            return max(int(value.strip()), 0)
        except ValueError:
            return 0
    return 0


def _truthy(value: object) -> bool:
    if isinstance(value, str):
        return value.strip().lower() not in ("", "0", "false", "no", "off", "none")
    return bool(value)

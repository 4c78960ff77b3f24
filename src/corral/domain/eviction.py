"""Eviction planning: which idle replicas to stop on one node so a new replica fits.

Rules:
- only the candidate nodes the caller passes (those placement rejected for memory alone);
- victims are LOADED replicas on that node with nothing in flight, in the pool being filled,
  never of `protected_model` (the model being placed), and never taking a model below its
  minimum, counting ALL its LOADED replicas across the cluster;
- per node, victims are taken least recently used first until their memory plus the node's
  free budget covers `need`; then any victim that is not needed is dropped again, trying the
  most recently used first, so the set is minimal (no victim can be spared) and leans towards
  the oldest replicas;
- among nodes where that works, the plan with the fewest victims wins, then the one whose most
  recently used victim is oldest, then the one freeing the least memory, then node id.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from corral.domain.entities import Node, Replica, ReplicaKey, ReplicaState
from corral.domain.memory import MemoryPool, free_budget


@dataclass(frozen=True, slots=True)
class EvictionPlan:
    """Stop exactly `victims` on `node_id`; then `need` bytes fit there."""

    node_id: str
    victims: tuple[Replica, ...]  # stop by exact identity: model, index, node_id, address
    freed: int  # bytes the victims release
    free_after: int  # free budget on the node once they are stopped


def plan_eviction(
    need: int,
    candidate_nodes: Sequence[Node],
    replicas: Sequence[Replica],
    inflight: Mapping[ReplicaKey, int],
    min_replicas: Mapping[str, int],
    protected_model: str,
    *,
    pool: MemoryPool = MemoryPool.RAM,
    model_pools: Mapping[str, MemoryPool] | None = None,
) -> EvictionPlan | None:
    """Return the eviction that makes `need` bytes of `pool` fit on one node, or None.

    `replicas` are all replica rows of the cluster; `min_replicas` maps model to its minimum
    (missing = 0); `model_pools` maps model to pool (None: every replica is in `pool`).
    """
    loaded: dict[str, int] = {}
    for r in replicas:
        if r.state == ReplicaState.LOADED:
            loaded[r.model] = loaded.get(r.model, 0) + 1

    best: tuple[tuple[int, float, int, str], EvictionPlan] | None = None
    for node in candidate_nodes:
        free = free_budget(node, replicas, pool, model_pools)
        idle = sorted(
            (
                r
                for r in replicas
                if r.node_id == node.id
                and r.state == ReplicaState.LOADED
                and r.model != protected_model
                and inflight.get(r.key, 0) <= 0
                and r.memory > 0
                and (model_pools is None or model_pools.get(r.model, MemoryPool.RAM) == pool)
            ),
            key=lambda r: (r.last_used, r.model, r.index),
        )
        victims = _minimal_victims(idle, free, need, loaded, min_replicas)
        if victims is None:
            continue
        freed = sum(v.memory for v in victims)
        newest = max((v.last_used for v in victims), default=0.0)
        key = (len(victims), newest, freed, node.id)
        if best is None or key < best[0]:
            best = (key, EvictionPlan(node.id, victims, freed, free + freed))
    return best[1] if best else None


def _minimal_victims(
    idle: Sequence[Replica],
    free: int,
    need: int,
    loaded: Mapping[str, int],
    min_replicas: Mapping[str, int],
) -> tuple[Replica, ...] | None:
    """Take `idle` (oldest first) until `need` fits, then drop the ones not needed."""
    taken: list[Replica] = []
    left = dict(loaded)
    total = free
    for r in idle:
        if total >= need:
            break
        if left.get(r.model, 0) - 1 < min_replicas.get(r.model, 0):
            continue
        left[r.model] = left.get(r.model, 0) - 1
        taken.append(r)
        total += r.memory
    if total < need:
        return None
    for r in list(reversed(taken)):
        if total - r.memory >= need:
            taken.remove(r)
            total -= r.memory
    return tuple(taken)

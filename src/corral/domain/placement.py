"""Cold-path placement: which node gets a new replica of a model, or why none can.

Filters, in this order; a node's rejection names the first it fails:

1. not in `exclude_nodes` (e.g. a node the caller just saw fail);
2. schedulable: status healthy (pending, unhealthy, offline and draining take no new replicas);
3. the node's labels match the model's node selector;
4. the backend is available: listed in `node.backends`, or one of `builtin_backends` (default
   `sim`, which ships with every worker). An empty `node.backends` means the node has not said
   what it runs, which counts as "not available" for every other backend. A model with an
   empty backend name is never placed;
5. a replica slot: this model's active replicas on the node < `node.max_replicas_per_model`
   (0 = no cap);
6. disk: when `disk_need` > 0 and the node does not hold `spec.artifact` yet, its reported
   free disk must be at least `disk_need`;
7. memory: the node's budget for the model's pool minus what active replicas (every model,
   same pool) reserve there must hold `estimate`.

A node that fails only on memory is an eviction candidate: stopping idle replicas there could
make room. Other failures are not helped by eviction.

Score among the nodes that pass, lowest first, node id last for determinism:
- binpack: (does not hold the artifact, memory left after placing);
- spread: (this model's active replicas on the node, all active replicas on the node,
  does not hold the artifact, minus memory left after placing).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from corral.domain.entities import ACTIVE_REPLICA_STATES, ModelSpec, Node, Replica
from corral.domain.memory import MemoryPool, node_budget
from corral.domain.sizes import format_size

Strategy = Literal["binpack", "spread"]
#: Backends every worker runs without an install.
BUILTIN_BACKENDS = frozenset({"sim"})


@dataclass(frozen=True, slots=True)
class PlacementDecision:
    """Where a new replica goes, or why it goes nowhere."""

    node_id: str | None  # the chosen node; None when no node fits
    rejections: Mapping[str, str] = field(default_factory=dict)  # node id -> why not chosen
    eviction_candidates: tuple[str, ...] = ()  # nodes that failed only on memory, by id
    reason: str = ""  # one line for the client/operator when node_id is None
    healthy: int = 0  # nodes that take new replicas now
    eligible: int = 0  # of those, the ones matching the selector and running the backend

    @property
    def placed(self) -> bool:
        """True when a node was chosen."""
        return self.node_id is not None

    @property
    def eviction_may_help(self) -> bool:
        """True when nothing fits but stopping idle replicas on some node could make room."""
        return self.node_id is None and bool(self.eviction_candidates)


def place(
    spec: ModelSpec,
    estimate: int,
    nodes: Sequence[Node],
    replicas: Sequence[Replica],
    *,
    strategy: Strategy = "binpack",
    exclude_nodes: frozenset[str] = frozenset(),
    disk_need: int = 0,
    pool: MemoryPool = MemoryPool.RAM,
    model_pools: Mapping[str, MemoryPool] | None = None,
    builtin_backends: frozenset[str] = BUILTIN_BACKENDS,
) -> PlacementDecision:
    """Choose a node for one more replica of `spec` needing `estimate` bytes of `pool`.

    `replicas` are all replica rows of the cluster (every model); `model_pools` maps model to
    pool so only replicas in the same pool count against memory (None: all count).
    """
    if not spec.backend.strip():
        return PlacementDecision(None, reason=f"model {spec.name} has no backend configured")
    if not nodes:
        return PlacementDecision(None, reason="no worker node has joined")

    reserved: dict[str, int] = {}
    model_count: dict[str, int] = {}
    total_count: dict[str, int] = {}
    for r in replicas:
        if r.state not in ACTIVE_REPLICA_STATES:
            continue
        total_count[r.node_id] = total_count.get(r.node_id, 0) + 1
        if r.model == spec.name:
            model_count[r.node_id] = model_count.get(r.node_id, 0) + 1
        if model_pools is None or model_pools.get(r.model, MemoryPool.RAM) == pool:
            reserved[r.node_id] = reserved.get(r.node_id, 0) + r.memory

    rejections: dict[str, str] = {}
    memory_only: list[str] = []
    fits: list[tuple[int, int, int, int, str]] = []
    healthy = matching = eligible = 0
    for node in sorted(nodes, key=lambda n: n.id):
        if node.id in exclude_nodes:
            rejections[node.id] = "excluded by the caller"
            continue
        if not node.schedulable:
            rejections[node.id] = f"node is {node.status}"
            continue
        healthy += 1
        if not spec.scheduling.matches(node.labels):
            rejections[node.id] = f"labels do not match selector {_selector(spec)}"
            continue
        matching += 1
        if spec.backend not in node.backends and spec.backend not in builtin_backends:
            rejections[node.id] = f"backend {spec.backend} is not available on this node"
            continue
        eligible += 1
        here = model_count.get(node.id, 0)
        cap = node.max_replicas_per_model
        if cap > 0 and here >= cap:
            rejections[node.id] = f"already runs {here} replica(s) of {spec.name} (max {cap})"
            continue
        has_artifact = spec.artifact is not None and spec.artifact in node.artifacts
        if disk_need > 0 and not has_artifact and node.resources.disk_free < disk_need:
            rejections[node.id] = (
                f"needs {format_size(disk_need)} of disk for the artifact, "
                f"{format_size(node.resources.disk_free)} free"
            )
            continue
        budget = node_budget(node, pool)
        free = budget - reserved.get(node.id, 0)
        if free < estimate:
            unit = " of VRAM" if pool == MemoryPool.VRAM else ""
            rejections[node.id] = (
                f"needs {format_size(estimate)}{unit}, {format_size(max(free, 0))} free "
                f"of {format_size(budget)} budget"
            )
            memory_only.append(node.id)
            continue
        left = free - estimate
        fresh = 0 if has_artifact else 1
        if strategy == "spread":
            fits.append((here, total_count.get(node.id, 0), fresh, -left, node.id))
        else:
            fits.append((fresh, left, 0, 0, node.id))

    if fits:
        return PlacementDecision(min(fits)[4], rejections, tuple(memory_only))
    named = {n.id: n.name for n in nodes}
    return PlacementDecision(
        None,
        rejections,
        tuple(memory_only),
        _summary(spec, healthy, matching, eligible, rejections, named),
        healthy,
        eligible,
    )


def unplaceable(
    spec: ModelSpec, nodes: Sequence[Node], builtin_backends: frozenset[str] = BUILTIN_BACKENDS
) -> str | None:
    """Why no node could take a replica of `spec` now, whatever it held: the status, selector
    and backend filters above (memory, replica caps and disk can be freed, so they are not
    asked). None when some node could."""
    decision = place(spec, 0, nodes, (), builtin_backends=builtin_backends)
    return None if decision.placed else decision.reason


def _selector(spec: ModelSpec) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(spec.scheduling.node_selector.items()))


def _summary(
    spec: ModelSpec,
    healthy: int,
    matching: int,
    eligible: int,
    rejections: Mapping[str, str],
    names: Mapping[str, str],
) -> str:
    if healthy == 0:
        return "no healthy node: " + _join(rejections, names)
    if matching == 0:
        return f"selector {_selector(spec)} matches no healthy node"
    if eligible == 0:
        return f"no healthy node runs backend {spec.backend}: " + _join(rejections, names)
    return f"no node fits {spec.name}: " + _join(rejections, names)


def _join(rejections: Mapping[str, str], names: Mapping[str, str]) -> str:
    """Each rejected node as "name (id): why" (just "id: why" where the name is the id)."""
    return "; ".join(
        f"{_who(node_id, names.get(node_id, node_id))}: {why}"
        for node_id, why in rejections.items()
    )


def _who(node_id: str, name: str) -> str:
    return node_id if name == node_id else f"{name} ({node_id})"

"""Entities of the cluster as the policies see them: nodes, models, replicas and their states.

All are frozen dataclasses; the store and the bus convert to and from them. Times are
seconds since the epoch (float) so policies can be tested with a fixed `now`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from corral.domain.autoscale import ScalingTarget
from corral.domain.routing_weights import DEFAULT_WEIGHTS, RoutingWeights
from corral.domain.sizes import MemoryBudget


class NodeStatus(StrEnum):
    """Lifecycle of a worker node."""

    PENDING = "pending"  # registered, no heartbeat seen yet; takes no work
    HEALTHY = "healthy"  # heartbeats arrive on time; takes new replicas
    UNHEALTHY = "unhealthy"  # heartbeat late; keeps serving its replicas, takes no new ones
    OFFLINE = "offline"  # heartbeat long gone; its replicas are removed from the registry
    DRAINING = "draining"  # an operator asked it to empty; serves in-flight work, takes no new


class ReplicaState(StrEnum):
    """Lifecycle of one replica (one backend process serving one model on one node)."""

    SCHEDULED = "scheduled"  # placed; the start command is being sent
    STAGING = "staging"  # the node copies the model's artifact
    LOADING = "loading"  # the backend process runs and loads the model
    LOADED = "loaded"  # health check passed; takes requests
    UNLOADING = "unloading"  # being stopped; takes no new requests
    FAILED = "failed"  # the start failed; `load_error` says why


#: Replica states that hold (or are about to hold) memory on their node.
ACTIVE_REPLICA_STATES = frozenset(
    {ReplicaState.SCHEDULED, ReplicaState.STAGING, ReplicaState.LOADING, ReplicaState.LOADED}
)


@dataclass(frozen=True, slots=True)
class Gpu:
    """One GPU of a node, as its worker reported it."""

    index: int
    name: str
    memory_total: int  # bytes
    memory_free: int  # bytes


@dataclass(frozen=True, slots=True)
class Resources:
    """What a node reported in its latest heartbeat."""

    cpu_count: int = 0
    ram_total: int = 0  # bytes
    ram_free: int = 0  # bytes
    disk_free: int = 0  # bytes, on the worker's data directory
    gpus: tuple[Gpu, ...] = ()

    @property
    def vram_total(self) -> int:
        return sum(g.memory_total for g in self.gpus)

    @property
    def vram_free(self) -> int:
        return sum(g.memory_free for g in self.gpus)


@dataclass(frozen=True, slots=True)
class Node:
    """A worker machine as the scheduler sees it."""

    id: str
    name: str
    status: NodeStatus
    address: str = "127.0.0.1"  # host the node's backends are reachable at
    labels: Mapping[str, str] = field(default_factory=dict)
    resources: Resources = Resources()
    memory_budget: MemoryBudget = MemoryBudget(fraction=0.8)  # noqa: RUF009 - frozen
    max_replicas_per_model: int = 0  # 0 = no cap
    backends: frozenset[str] = frozenset()  # backends this node can run
    artifacts: frozenset[str] = frozenset()  # artifact references/digests it already holds
    last_heartbeat: float = 0.0

    @property
    def schedulable(self) -> bool:
        """True when the node may take new replicas."""
        return self.status == NodeStatus.HEALTHY

    @property
    def servable(self) -> bool:
        """True when requests may still be routed to replicas already loaded on this node."""
        return self.status in (NodeStatus.HEALTHY, NodeStatus.DRAINING)


@dataclass(frozen=True, slots=True)
class Scheduling:
    """How many replicas of a model to keep, and where."""

    min_replicas: int = 0
    max_replicas: int = 0  # 0 = no cap
    spread_all: bool = False  # exactly one replica on every matching node
    node_selector: Mapping[str, str] = field(default_factory=dict)
    scale_down_delay: float = 300.0  # seconds a replica above the minimum may stay idle
    scaling: ScalingTarget | None = None  # scale on a load signal; None: when all are busy
    #: requests one replica may have in flight, cluster-wide (0 = unlimited; None: the
    #: backend's default, `corral.backends.catalog.Catalog.max_concurrency_of`)
    max_concurrency: int | None = None
    deadline: float | None = None  # seconds a request may wait for a slot (None: server default)

    def matches(self, labels: Mapping[str, str]) -> bool:
        """True when a node with `labels` satisfies the node selector."""
        return all(labels.get(k) == v for k, v in self.node_selector.items())


class RolloutStrategy(StrEnum):
    """How replicas move to a changed spec."""

    ROLLING = "rolling"  # one at a time: start a new one, wait until it is ready, retire an old one
    RECREATE = "recreate"  # retire every old replica first, then start new ones (too big for two)


@dataclass(frozen=True, slots=True)
class Rollout:
    """How a model's replicas move to a new revision of its spec."""

    strategy: RolloutStrategy = RolloutStrategy.ROLLING
    newest_only: bool = True  # once a current-revision replica is ready, route only to those


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A declared model: what to run and how to schedule it."""

    name: str
    backend: str
    artifact: str | None = None  # path on the model store, hf:// reference, or shared path
    options: Mapping[str, Any] = field(default_factory=dict)
    memory: int | None = None  # declared memory estimate in bytes
    scheduling: Scheduling = Scheduling()
    revision: int = 1  # counts every change of the row (spec, scheduling, rollout)
    spec_hash: str = ""  # the revision replicas run (`domain.revision`); "": of the spec itself
    rollout: Rollout = Rollout()
    # when the model was first declared (seconds since the epoch; 0 = not stored yet): a fact
    # about the row, not part of the spec, so two specs that differ only here are equal
    created_at: float = field(default=0.0, compare=False)
    #: endpoints it may serve (corral.backends.capabilities names), a subset of its backend's;
    #: None: every endpoint the backend serves
    capabilities: tuple[str, ...] | None = None
    #: how routing weighs load, prefix and session affinity and speed (`routing:` in YAML);
    #: not part of the revision: changing it moves no replica
    routing: RoutingWeights = DEFAULT_WEIGHTS

    @property
    def config_revision(self) -> str:
        """The revision new replicas of this spec run: what a replica's `revision` is compared
        with (the stored hash, which may include the artifact's digest, else the spec's own)."""
        return self.spec_hash or spec_revision(self)


@dataclass(frozen=True, slots=True)
class Replica:
    """One replica of a model on a node."""

    model: str
    index: int  # unique per model across the cluster
    node_id: str
    state: ReplicaState
    address: str | None = None  # host:port of the backend once loaded
    memory: int = 0  # bytes reserved on the node
    last_used: float = 0.0
    load_error: str | None = None
    updated: float = 0.0  # when the row last changed state (seconds since the epoch); 0 = unknown
    revision: str = ""  # the spec revision it was started with ("" = unknown: older than any)
    replaces: int | None = None  # a rollout started it to replace this index of the model

    @property
    def key(self) -> ReplicaKey:
        return (self.model, self.index)


#: Identity of a replica: (model name, replica index).
ReplicaKey = tuple[str, int]


def spec_revision(spec: ModelSpec, artifact_digest: str | None = None) -> str:
    """The revision of a spec: a digest of what its replicas run (backend, the artifact's
    content digest or else its reference, options, memory); scheduling and rollout settings are
    not part of it. Equal specs have equal revisions on every frontend."""
    canonical = {
        "backend": spec.backend,
        "artifact": artifact_digest or spec.artifact,
        "options": spec.options,
        "memory": spec.memory,
    }
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:REVISION_LENGTH]


#: Hex digits of a revision (48 bits: collisions among one model's revisions are not a concern).
REVISION_LENGTH = 12

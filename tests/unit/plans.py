"""Builders of reconcile-plan tables: a fixed `NOW`, nodes, models, replicas and states."""

from __future__ import annotations

from typing import Any

import factories
from corral.domain.actions import SetCooldown, StartReplica, StopReplica
from corral.domain.entities import ModelSpec, Node, NodeStatus, Replica, ReplicaKey, ReplicaState
from corral.domain.reconcile import ClusterState, ReconcileConfig, ReportedProcess
from factories import GB

NOW = 10_000.0
CFG = ReconcileConfig()  # stale after 15 s, offline after 60 s, graces 30 s, cooldown 30 s
LOADED, LOADING, FAILED = ReplicaState.LOADED, ReplicaState.LOADING, ReplicaState.FAILED


def node(
    nid: str,
    *,
    status: NodeStatus = NodeStatus.HEALTHY,
    age: float = 1.0,
    budget: int = 10 * GB,
    **labels: str,
) -> Node:
    return factories.node(
        nid,
        status=status,
        labels=labels,
        budget=budget,
        backends={"llama"},
        last_heartbeat=NOW - age,
    )


def model(name: str = "m", **scheduling: Any) -> ModelSpec:
    return factories.model(name, **{"backend": "llama", "memory": 4 * GB, **scheduling})


def rep(
    index: int,
    nid: str = "a",
    state: ReplicaState = LOADED,
    *,
    name: str = "m",
    idle: float = 0.0,
    age: float = 1000.0,
    revision: str | None = None,
    replaces: int | None = None,
) -> Replica:
    """A replica; it runs the revision of `model(name)` unless told otherwise."""
    return factories.replica(
        name,
        index,
        nid,
        state,
        memory=4 * GB,
        last_used=NOW - idle,
        updated=NOW - age,
        revision=model(name).config_revision if revision is None else revision,
        replaces=replaces,
    )


def proc(index: int, nid: str = "a", *, name: str = "m", age: float = 1000.0) -> ReportedProcess:
    return ReportedProcess(name, index, f"{nid}:{9000 + index}", NOW - age)


def state(
    nodes: list[Node],
    models: list[ModelSpec],
    replicas: list[Replica] | None = None,
    *,
    inflight: dict[ReplicaKey, int] | None = None,
    processes: dict[str, list[ReportedProcess]] | None = None,
    cooldowns: dict[str, float] | None = None,
    reported: frozenset[str] = frozenset(),
    avoid: dict[str, frozenset[str]] | None = None,
    monitor_since: float = 0.0,
    **more: Any,
) -> ClusterState:
    return ClusterState(
        nodes=nodes,
        models=models,
        replicas=replicas or [],
        inflight=inflight or {},
        processes=processes or {},
        cooldowns=cooldowns or {},
        already_reported=reported,
        avoid=avoid or {},
        monitor_since=monitor_since,
        **more,
    )


def start(
    nid: str,
    index: int,
    reason: str = "below minimum",
    name: str = "m",
    replaces: int | None = None,
) -> StartReplica:
    return StartReplica(name, nid, index, "llama", 4 * GB, reason, replaces)


def stop(r: Replica, reason: str) -> StopReplica:
    return StopReplica(r.model, r.index, r.node_id, r.address, reason)


def cooldown(reason: str, name: str = "m") -> SetCooldown:
    return SetCooldown(name, NOW + CFG.capacity_cooldown, reason)


H, U, OFF, D = NodeStatus.HEALTHY, NodeStatus.UNHEALTHY, NodeStatus.OFFLINE, NodeStatus.DRAINING

"""Reconcile plan: one tick of the leader's loop, desired versus observed state, as actions.

`plan(state, now, cfg)` is pure and deterministic (nodes by id, models by name, replicas by
(model, index)); an actuator applies the actions in order. Rules, in the order they run:

1. Nodes: each node gets `health.node_status`, with its heartbeat age counted from no earlier
   than `state.monitor_since` (when the leader began watching: while every frontend was down no
   heartbeat could land, and that is not held against the workers); a change is a `MarkNode`.
   Every offline node that still has replica rows gets `RemoveNodeReplicas`; those rows are gone
   for the rest of the tick (so replacements start in the same tick).
2. Rows whose process is gone: a LOADED or UNLOADING row on a servable node (healthy or
   draining: its heartbeats, and so its process report, are fresh) whose process report
   is known (the node id is a key of `state.processes`, even with an empty list) but does not
   list it, and whose state is older than `cfg.missing_grace` (`now - replica.updated`), gets
   `RemoveReplicaRow`. A process matches a row on the same node with the same model and index
   and the same address (a missing address on either side matches any).
   A starting row (scheduled, staging, loading) on such a node, in its state for longer than
   `cfg.missing_grace`: when the node reports a ready process for it, `AdoptReplica` (a
   frontend alive to finish the start marks it loaded moments after the process is ready, so
   the one that started it is gone); when the node reports nothing for it (workers report
   the starts they work on, installs and staging included, as not-ready processes), the start
   command was lost with its frontend: `RemoveReplicaRow`.
3. Processes without a row: a process a non-offline node has reported for longer than
   `cfg.orphan_grace` that matches no row on that node (FAILED rows do not count) gets
   `StopOrphan` with its exact identity.
4. Retired replicas: an UNLOADING row (a rollout or a scale-down took it out of routing on
   every frontend) on a known, non-offline node, unloading for at least `cfg.unload_grace`
   (the other frontends heard of it and reported what they still had in flight there) with
   nothing in flight, gets `StopReplica`; so does one unloading for longer than
   `cfg.unload_timeout` whatever it still serves. On a draining node the drainer stops its own
   unless it has been unloading for longer than `cfg.unload_timeout`.
5. Per model, by name: the rules of `corral.domain.model_rules` (selector, spread_all, the
   minimum (declared models preload: nothing waits for a first request), rollouts of a changed
   spec, scaling).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TypeVar

from corral.domain.actions import (
    AdoptReplica,
    MarkNode,
    MarkUnloading,
    RemoveNodeReplicas,
    RemoveReplicaRow,
    ReportRollout,
    ReportScaling,
    ReportWaiting,
    RolloutState,
    SetCooldown,
    StartReplica,
    StopOrphan,
    StopReplica,
)
from corral.domain.autoscale import Sample
from corral.domain.entities import ModelSpec, Node, NodeStatus, Replica, ReplicaKey, ReplicaState
from corral.domain.health import node_status
from corral.domain.model_rules import ModelRules
from corral.domain.placement import BUILTIN_BACKENDS, Strategy
from corral.domain.rollout import LoadFailure

# --- inputs ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReportedProcess:
    """A backend process a worker reports running (or starting)."""

    model: str
    index: int
    address: str | None  # host:port it serves on; None while it starts
    first_seen: float  # when the worker first reported it (seconds since the epoch)
    ready: bool = True  # its health endpoint answered (False: still starting)


@dataclass(frozen=True, slots=True)
class ClusterState:
    """What the leader observes at the start of a tick."""

    nodes: Sequence[Node]
    models: Sequence[ModelSpec]
    replicas: Sequence[Replica]
    inflight: Mapping[ReplicaKey, int] = field(default_factory=dict)  # summed over frontends
    processes: Mapping[str, Sequence[ReportedProcess]] = field(
        default_factory=dict
    )  # node id -> its processes; a node missing here has sent no report (nothing is judged)
    cooldowns: Mapping[str, float] = field(default_factory=dict)  # model -> no starts until
    already_reported: frozenset[str] = frozenset()  # models already reported as waiting
    estimates: Mapping[str, int] = field(
        default_factory=dict
    )  # model -> memory estimate of its current revision; missing: estimate_memory(spec, None)
    monitor_since: float = 0.0  # when the leader began watching; older heartbeats count as then
    avoid: Mapping[str, frozenset[str]] = field(
        default_factory=dict
    )  # model -> nodes where a start of it just failed: no new replica of it there for now
    failures: Mapping[str, LoadFailure] = field(
        default_factory=dict
    )  # model -> the last failed load of a revision of it (the rules compare the revision)
    rollouts: Mapping[str, tuple[RolloutState, str]] = field(
        default_factory=dict
    )  # model -> the rollout state and revision last reported
    signals: Mapping[str, Sequence[Sample]] = field(
        default_factory=dict
    )  # model -> its scaling signal's samples, oldest first
    queued: Mapping[str, int] = field(default_factory=dict)  # model -> requests waiting now
    last_change: Mapping[str, float] = field(
        default_factory=dict
    )  # model -> when its replica count last changed


@dataclass(frozen=True, slots=True)
class ReconcileConfig:
    """Knobs of the reconcile loop (the frontend settings carry the same names)."""

    heartbeat_interval: float = 5.0
    unhealthy_after: int = 3  # heartbeat intervals before a node is unhealthy
    offline_after: float = 60.0  # seconds without heartbeat before a node is offline
    capacity_cooldown: float = 30.0  # seconds without starts after capacity ran out
    busy_inflight: int = 1  # in-flight requests at which a replica counts as busy
    missing_grace: float = 30.0  # seconds a row may lack its process before it is removed
    orphan_grace: float = 30.0  # seconds a process may lack its row before it is stopped
    unload_grace: float = 1.0  # seconds an unloading replica is kept before its stop
    unload_timeout: float = 120.0  # seconds its in-flight requests may take to finish
    revision_retry: float = 300.0  # seconds a rollout stays halted after its revision failed
    placement: Strategy = "binpack"
    gpu_backends: frozenset[str] = frozenset()  # backends whose models fill VRAM
    builtin_backends: frozenset[str] = BUILTIN_BACKENDS


#: What a plan may contain (the actions themselves live in `corral.domain.actions`).
PlanAction = (
    MarkNode
    | RemoveNodeReplicas
    | StartReplica
    | StopReplica
    | MarkUnloading
    | RemoveReplicaRow
    | AdoptReplica
    | StopOrphan
    | SetCooldown
    | ReportWaiting
    | ReportRollout
    | ReportScaling
)


_A = TypeVar("_A")


@dataclass(frozen=True, slots=True)
class Plan:
    """The actions of one tick, in the order they should be applied."""

    actions: tuple[PlanAction, ...] = ()

    def of(self, kind: type[_A]) -> list[_A]:
        """Return the actions of one kind, in order."""
        return [a for a in self.actions if isinstance(a, kind)]


# --- planning ----------------------------------------------------------------------------


def plan(state: ClusterState, now: float, cfg: ReconcileConfig) -> Plan:
    """Return the actions that move the cluster towards its desired state (rules: module doc)."""
    actions: list[PlanAction] = []
    nodes = _node_health(state, now, cfg, actions)
    gone = _offline_rows(state, nodes, actions)
    gone |= _missing_processes(state, nodes, now, cfg, gone, actions)
    _orphans(state, nodes, now, cfg, gone, actions)
    _unloaded(state, nodes, now, cfg, gone, actions)  # their rows go once they stopped
    rules = ModelRules(state, now, cfg, nodes, gone)
    for spec in sorted(state.models, key=lambda m: m.name):
        actions.extend(rules.model(spec))
    return Plan(tuple(actions))


def _node_health(
    state: ClusterState, now: float, cfg: ReconcileConfig, actions: list[PlanAction]
) -> dict[str, Node]:
    nodes: dict[str, Node] = {}
    for node in sorted(state.nodes, key=lambda n: n.id):
        last = node.last_heartbeat
        if last > 0:
            last = max(last, state.monitor_since)
        status = node_status(
            node.status,
            last,
            now,
            heartbeat_interval=cfg.heartbeat_interval,
            unhealthy_after=cfg.unhealthy_after,
            offline_after=cfg.offline_after,
        )
        if status != node.status:
            actions.append(MarkNode(node.id, status, node.status))
            node = replace(node, status=status)
        nodes[node.id] = node
    return nodes


def _offline_rows(
    state: ClusterState, nodes: Mapping[str, Node], actions: list[PlanAction]
) -> set[ReplicaKey]:
    gone: set[ReplicaKey] = set()
    for node in nodes.values():
        if node.status != NodeStatus.OFFLINE:
            continue
        rows = {r.key for r in state.replicas if r.node_id == node.id}
        if rows:
            actions.append(RemoveNodeReplicas(node.id))
            gone |= rows
    return gone


def _matches(p: ReportedProcess, r: Replica) -> bool:
    return (
        p.model == r.model
        and p.index == r.index
        and (p.address is None or r.address is None or p.address == r.address)
    )


def _missing_processes(
    state: ClusterState,
    nodes: Mapping[str, Node],
    now: float,
    cfg: ReconcileConfig,
    gone: set[ReplicaKey],
    actions: list[PlanAction],
) -> set[ReplicaKey]:
    removed: set[ReplicaKey] = set()
    for r in sorted(state.replicas, key=lambda r: r.key):
        if r.key in gone or r.state == ReplicaState.FAILED:
            continue
        node = nodes.get(r.node_id)
        procs = state.processes.get(r.node_id)
        if node is None or not node.servable or procs is None:
            continue
        age = now - r.updated
        found = [p for p in procs if _matches(p, r)]
        if r.state in (ReplicaState.LOADED, ReplicaState.UNLOADING):
            if age > cfg.missing_grace and not found:
                actions.append(RemoveReplicaRow(r.model, r.index, r.node_id, "process not running"))
                removed.add(r.key)
            continue
        if age <= cfg.missing_grace:
            continue
        ready = [p.address for p in found if p.ready and p.address]
        if ready:
            actions.append(AdoptReplica(r.model, r.index, r.node_id, ready[0]))
        elif not found:
            reason = "start lost: its node is not working on it"
            actions.append(RemoveReplicaRow(r.model, r.index, r.node_id, reason))
            removed.add(r.key)
    return removed


def _orphans(
    state: ClusterState,
    nodes: Mapping[str, Node],
    now: float,
    cfg: ReconcileConfig,
    gone: set[ReplicaKey],
    actions: list[PlanAction],
) -> None:
    for node_id in sorted(state.processes):
        node = nodes.get(node_id)
        if node is None or node.status == NodeStatus.OFFLINE:
            continue
        rows = [
            r
            for r in state.replicas
            if r.node_id == node_id and r.key not in gone and r.state != ReplicaState.FAILED
        ]
        for p in sorted(
            state.processes[node_id], key=lambda p: (p.model, p.index, p.address or "")
        ):
            if now - p.first_seen <= cfg.orphan_grace or any(_matches(p, r) for r in rows):
                continue
            actions.append(StopOrphan(node_id, p.model, p.index, p.address))


def _unloaded(
    state: ClusterState,
    nodes: Mapping[str, Node],
    now: float,
    cfg: ReconcileConfig,
    gone: set[ReplicaKey],
    actions: list[PlanAction],
) -> None:
    for r in sorted(state.replicas, key=lambda r: r.key):
        if r.state != ReplicaState.UNLOADING or r.key in gone:
            continue
        node = nodes.get(r.node_id)
        if node is None or node.status == NodeStatus.OFFLINE:
            continue
        age = now - r.updated
        overdue = age > cfg.unload_timeout
        if age < cfg.unload_grace or (node.status == NodeStatus.DRAINING and not overdue):
            continue
        if state.inflight.get(r.key, 0) > 0 and not overdue:
            continue
        reason = "unloaded past the timeout" if overdue else "unloaded: nothing in flight"
        actions.append(StopReplica.of(r, reason))

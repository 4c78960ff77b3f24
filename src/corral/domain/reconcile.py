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
4. Per model, by name. Counted replicas: active rows (scheduled..loaded) on servable nodes
   (healthy or draining) whose labels match the model's node selector now.
   a. Active replicas on servable nodes whose labels no longer match the selector, with nothing
      in flight, get `StopReplica` ("node labels no longer match the selector"); they do not
      count. Replicas on unhealthy or pending nodes neither count nor are stopped.
   b. `spread_all`: desired is exactly one replica on every schedulable matching node; start
      where one is missing (each node tried through `place`), stop duplicates on a node
      (keeping a LOADED one, then the lowest index; busy ones are never stopped). min/max and
      scaling do not apply.
   c. Below `min_replicas`: start `min - counted` replicas, choosing nodes with `place`
      repeatedly; each planned replica reserves its estimate for the next choice.
   d. Otherwise, every routable replica (see `pick.eligible`) has at least `cfg.busy_inflight`
      requests in flight, none is still starting, and counted < `max_replicas` (0 = no cap):
      start one more.
   e. Otherwise, more than `min_replicas` counted replicas are on nodes that are not draining
      (a drain replaces and stops its own) and some LOADED one of them has had nothing in
      flight and no use for `scale_down_delay` (`now - max(last_used, updated)`): stop the one
      with the highest index (one per model per tick).
   Starting (b, c, d) first checks, in order: a model with an empty backend or whose load
   information was never recorded is not started but gets `ReportWaiting`, only when its name
   is not in `state.already_reported`; a model whose cooldown (`state.cooldowns`) lies after
   `now` is not started; nodes in `state.avoid[model]` (a start of the model failed there a
   moment ago) are left out of its placement; when fewer replicas fit than wanted, what fits
   starts and the model gets `SetCooldown(now + cfg.capacity_cooldown)`. New replicas take the
   lowest index that no row (any state, even the ones removed this tick) and no reported
   process of the model uses.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TypeVar

from corral.domain.actions import (
    AdoptReplica,
    MarkNode,
    RemoveNodeReplicas,
    RemoveReplicaRow,
    ReportWaiting,
    SetCooldown,
    StartReplica,
    StopOrphan,
    StopReplica,
)
from corral.domain.entities import (
    ACTIVE_REPLICA_STATES,
    ModelSpec,
    Node,
    NodeStatus,
    Replica,
    ReplicaKey,
    ReplicaState,
)
from corral.domain.health import node_status
from corral.domain.memory import MemoryPool, estimate_memory, memory_pool
from corral.domain.pick import eligible
from corral.domain.placement import BUILTIN_BACKENDS, Strategy, place

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
    load_info: frozenset[str] = frozenset()  # models whose load information was ever recorded
    cooldowns: Mapping[str, float] = field(default_factory=dict)  # model -> no starts until
    already_reported: frozenset[str] = frozenset()  # models already reported as waiting
    estimates: Mapping[str, int] = field(
        default_factory=dict
    )  # model -> memory estimate; missing: estimate_memory(spec, None)
    monitor_since: float = 0.0  # when the leader began watching; older heartbeats count as then
    avoid: Mapping[str, frozenset[str]] = field(
        default_factory=dict
    )  # model -> nodes where a start of it just failed: no new replica of it there for now


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
    placement: Strategy = "binpack"
    gpu_backends: frozenset[str] = frozenset()  # backends whose models fill VRAM
    builtin_backends: frozenset[str] = BUILTIN_BACKENDS


#: What a plan may contain (the actions themselves live in `corral.domain.actions`).
PlanAction = (
    MarkNode
    | RemoveNodeReplicas
    | StartReplica
    | StopReplica
    | RemoveReplicaRow
    | AdoptReplica
    | StopOrphan
    | SetCooldown
    | ReportWaiting
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
    tick = _Tick(state, now, cfg, nodes, gone)
    for spec in sorted(state.models, key=lambda m: m.name):
        actions.extend(tick.model(spec))
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


class _Tick:
    """Working state of the per-model rules of one tick (replicas planned so far)."""

    def __init__(
        self,
        state: ClusterState,
        now: float,
        cfg: ReconcileConfig,
        nodes: Mapping[str, Node],
        gone: set[ReplicaKey],
    ) -> None:
        self.state = state
        self.now = now
        self.cfg = cfg
        self.nodes = nodes
        self.node_list = list(nodes.values())
        self.work = [r for r in state.replicas if r.key not in gone]
        self.pools = {m.name: memory_pool(m, cfg.gpu_backends) for m in state.models}
        self.taken: dict[str, set[int]] = {}
        for r in state.replicas:
            self.taken.setdefault(r.model, set()).add(r.index)
        for procs in state.processes.values():
            for p in procs:
                self.taken.setdefault(p.model, set()).add(p.index)

    def busy(self, r: Replica) -> int:
        return self.state.inflight.get(r.key, 0)

    def model(self, spec: ModelSpec) -> list[PlanAction]:
        sched = spec.scheduling
        out: list[PlanAction] = []
        counted: list[Replica] = []
        for r in sorted(self.work, key=lambda r: r.index):
            node = self.nodes.get(r.node_id)
            if r.model != spec.name or r.state not in ACTIVE_REPLICA_STATES:
                continue
            if node is None or not node.servable:
                continue
            if sched.matches(node.labels):
                counted.append(r)
            elif self.busy(r) <= 0:
                reason = "node labels no longer match the selector"
                out.append(StopReplica(r.model, r.index, r.node_id, r.address, reason))
        if sched.spread_all:
            out.extend(self._spread(spec, counted))
            return out
        if len(counted) < sched.min_replicas:
            out.extend(self._start(spec, sched.min_replicas - len(counted), "below minimum"))
        elif self._all_busy(spec, counted):
            out.extend(self._start(spec, 1, "all replicas busy"))
        else:
            out.extend(self._scale_down(spec, counted))
        return out

    def _all_busy(self, spec: ModelSpec, counted: list[Replica]) -> bool:
        cap = spec.scheduling.max_replicas
        if cap > 0 and len(counted) >= cap:
            return False
        if any(r.state != ReplicaState.LOADED for r in counted):
            return False  # one is still starting: its capacity is on the way
        routable = eligible(counted, self.nodes, spec.scheduling)
        return bool(routable) and all(self.busy(r) >= self.cfg.busy_inflight for r in routable)

    def _scale_down(self, spec: ModelSpec, counted: list[Replica]) -> list[PlanAction]:
        sched = spec.scheduling
        staying = [r for r in counted if self.nodes[r.node_id].status != NodeStatus.DRAINING]
        if len(staying) <= sched.min_replicas:
            return []
        idle = [
            r
            for r in staying
            if r.state == ReplicaState.LOADED
            and self.busy(r) <= 0
            and self.now - max(r.last_used, r.updated) > sched.scale_down_delay
        ]
        if not idle:
            return []
        r = max(idle, key=lambda r: r.index)
        return [StopReplica(r.model, r.index, r.node_id, r.address, "idle above minimum")]

    def _spread(self, spec: ModelSpec, counted: list[Replica]) -> list[PlanAction]:
        out: list[PlanAction] = []
        by_node: dict[str, list[Replica]] = {}
        for r in counted:
            by_node.setdefault(r.node_id, []).append(r)
        for node_id in sorted(by_node):
            keep = min(by_node[node_id], key=lambda r: (r.state != ReplicaState.LOADED, r.index))
            for r in by_node[node_id]:
                if r is not keep and self.busy(r) <= 0:
                    reason = "spread_all keeps one replica per node"
                    out.append(StopReplica(r.model, r.index, r.node_id, r.address, reason))
        missing = [
            n
            for n in self.node_list
            if n.schedulable and spec.scheduling.matches(n.labels) and n.id not in by_node
        ]
        if missing:
            out.extend(self._start(spec, len(missing), "spread_all", targets=missing))
        return out

    def _start(
        self, spec: ModelSpec, count: int, reason: str, *, targets: list[Node] | None = None
    ) -> list[PlanAction]:
        """Plan up to `count` starts (one per target node when `targets` is given)."""
        state = self.state
        if not spec.backend.strip() or spec.name not in state.load_info:
            if spec.name in state.already_reported:
                return []
            if not spec.backend.strip():
                return [ReportWaiting(spec.name, "the model has no backend configured")]
            return [ReportWaiting(spec.name, "no load information yet: waiting for a first load")]
        if state.cooldowns.get(spec.name, 0.0) > self.now:
            return []
        estimate = state.estimates.get(spec.name)
        if estimate is None:
            estimate = estimate_memory(spec, None)
        pool = self.pools.get(spec.name, MemoryPool.RAM)
        out: list[PlanAction] = []
        failure = ""
        for i in range(count):
            candidates = [targets[i]] if targets is not None else self.node_list
            decision = place(
                spec,
                estimate,
                candidates,
                self.work,
                strategy=self.cfg.placement,
                exclude_nodes=state.avoid.get(spec.name, frozenset()),
                pool=pool,
                model_pools=self.pools,
                builtin_backends=self.cfg.builtin_backends,
            )
            if decision.node_id is None:
                failure = failure or decision.reason
                if targets is None:
                    break
                continue
            index = self._next_index(spec.name)
            out.append(
                StartReplica(spec.name, decision.node_id, index, spec.backend, estimate, reason)
            )
            self.work.append(
                Replica(spec.name, index, decision.node_id, ReplicaState.SCHEDULED, memory=estimate)
            )
        if failure:
            out.append(SetCooldown(spec.name, self.now + self.cfg.capacity_cooldown, failure))
        return out

    def _next_index(self, model: str) -> int:
        taken = self.taken.setdefault(model, set())
        index = next(i for i in range(len(taken) + 1) if i not in taken)
        taken.add(index)
        return index

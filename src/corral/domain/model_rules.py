"""Per-model rules of the reconcile plan: selector, spread_all, minimum, rollouts and scaling.

`ModelRules.model(spec)` returns one model's actions for the tick (rule 5 of
`corral.domain.reconcile.plan`). Counted replicas: active rows (scheduled..loaded) on servable
nodes (healthy or draining) whose labels match the model's node selector now. A replica is
current when its `revision` is the spec's `config_revision`, old otherwise.

a. Selector: active replicas on servable nodes whose labels no longer match, with nothing in
   flight, get `StopReplica` ("node labels no longer match the selector"); they do not count.
   Replicas on unhealthy or pending nodes neither count nor are stopped.
b. `spread_all`: one replica on every schedulable matching node; start where one is missing
   (each node tried through `place`), stop idle duplicates on a node (keeping a current one,
   then a LOADED one, then the lowest index). A node whose replica is old gets a current one
   beside it (one node at a time, `replaces` = the old index), and the old one is retired once
   the new one is LOADED; with `rollout: recreate` the old one is retired first. min/max and
   scaling do not apply.
c. Rollout, while some counted replica is old (no scaling meanwhile):
   - rolling: an old replica whose replacement (a LOADED current replica with `replaces` = its
     index) exists is retired: `MarkUnloading` (the plan's rule 4 stops it once idle); below
     the minimum, current replicas start; when no current replica is still starting, one more
     starts, replacing the old replica with the highest index that has no replacement yet, so
     the count never drops and one replica moves at a time. When it does not fit, idle
     replicas of other models are evicted (never below their minimum; the start follows once
     they are gone), else the model cools down;
   - recreate: every old replica is retired (`MarkUnloading` when loaded, `StopReplica` while
     starting), and nothing starts while an old replica is active or unloading;
   - halted: the current revision's last load failed less than `cfg.revision_retry` ago:
     nothing of it starts, the old replicas keep serving; a changed spec is a new revision;
   - `ReportRollout` when the state (rolling or halted) or the revision differs from the one
     last reported (`state.rollouts`), and "finished" once no counted replica is old.
d. Below `min_replicas`: start `min - counted`, choosing nodes with `place` repeatedly; each
   planned replica reserves its estimate for the next choice. Declared models preload: they
   start from their spec, at startup and after any change, without waiting for a request.
e. With `scheduling.scaling`: `corral.domain.autoscale.decide` on the counted replicas on
   non-draining nodes (a drain replaces and stops its own), the signal's samples, the requests
   in flight and queued, the last request and the last change of the count. Up: start the
   difference (capped by `max_replicas` in the decision, by memory in placement); down: retire
   the indexes it names, highest first (`StopReplica` when idle, `MarkUnloading` when busy).
   A change is reported (`ReportScaling`, with the decision's reason).
f. Without it: every routable replica (see `pick.eligible`) has at least `cfg.busy_inflight`
   requests in flight, none is still starting, and counted < `max_replicas` (0 = no cap):
   start one more.
g. Without it: more than `min_replicas` counted replicas on nodes that are not draining, and
   one of them LOADED with nothing in flight and no use for `scale_down_delay`
   (`now - max(last_used, updated)`): retire the one with the HIGHEST index among them (idle or
   not), one per model per tick, so the indexes in use stay dense.

Starting (b to f) first checks, in order: a model with an empty backend is not started but gets
`ReportWaiting`, only when its name is not in `state.already_reported`; a model whose cooldown
(`state.cooldowns`) lies after `now` is not started; nodes in `state.avoid[model]` (a start of
the model failed there a moment ago) are left out of its placement; when fewer replicas fit
than wanted, what fits starts and the model gets `SetCooldown(now + cfg.capacity_cooldown)`.
New replicas take the lowest index that no row (any state, even the ones removed this tick)
and no reported process of the model uses.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from corral.domain.actions import (
    MarkUnloading,
    ReportRollout,
    ReportScaling,
    ReportWaiting,
    RolloutState,
    SetCooldown,
    StartReplica,
    StopReplica,
)
from corral.domain.autoscale import Observed, ScaleAction, decide
from corral.domain.entities import (
    ACTIVE_REPLICA_STATES,
    ModelSpec,
    Node,
    NodeStatus,
    Replica,
    ReplicaKey,
    ReplicaState,
    RolloutStrategy,
)
from corral.domain.eviction import plan_eviction
from corral.domain.memory import MemoryPool, estimate_memory, memory_pool
from corral.domain.pick import eligible
from corral.domain.placement import place
from corral.domain.rollout import halted_by

if TYPE_CHECKING:
    from corral.domain.reconcile import ClusterState, PlanAction, ReconcileConfig

LOADED = ReplicaState.LOADED


class ModelRules:
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
                out.append(StopReplica.of(r, reason))
        rev = spec.config_revision
        old = [r for r in counted if r.revision != rev]
        recreating = spec.rollout.strategy == RolloutStrategy.RECREATE
        if sched.spread_all:
            out.extend(self._spread(spec, counted))
        elif old or (recreating and self._old_unloading(spec)):
            out.extend(self._roll(spec, counted, old))
        elif len(counted) < sched.min_replicas:
            out.extend(self._start(spec, sched.min_replicas - len(counted), "below minimum"))
        elif sched.scaling is not None:
            out.extend(self._autoscale(spec, counted))
        elif self._all_busy(spec, counted):
            out.extend(self._start(spec, 1, "all replicas busy"))
        else:
            out.extend(self._scale_down(spec, counted))
        out.extend(self._report_rollout(spec, old))
        return out

    # --- rollouts -------------------------------------------------------------------------
    def _halted(self, spec: ModelSpec) -> str | None:
        """The error of the current revision's last load, while it halts the rollout."""
        failure = self.state.failures.get(spec.name)
        return halted_by(failure, spec.config_revision, self.now, self.cfg.revision_retry)

    def _old_unloading(self, spec: ModelSpec) -> list[Replica]:
        rev = spec.config_revision
        return [
            r
            for r in self.work
            if r.model == spec.name and r.state == ReplicaState.UNLOADING and r.revision != rev
        ]

    def _roll(
        self, spec: ModelSpec, counted: list[Replica], old: list[Replica]
    ) -> list[PlanAction]:
        rev = spec.config_revision
        reason = f"rollout to {rev}"
        if spec.rollout.strategy == RolloutStrategy.RECREATE:
            return [self._retire(r, reason, drain=True) for r in old]
        current = [r for r in counted if r.revision == rev]
        replaced = {r.replaces for r in current if r.state == LOADED}
        out: list[PlanAction] = [
            self._retire(r, f"replaced by its {rev} replica", drain=True)
            for r in old
            if r.index in replaced
        ]
        serving = len(counted) - len(out)
        if self._halted(spec) is not None:
            return out
        if serving < spec.scheduling.min_replicas:
            out.extend(self._start(spec, spec.scheduling.min_replicas - serving, "below minimum"))
        elif all(r.state == LOADED for r in current):
            waiting = [r for r in old if r.index not in replaced]
            if waiting:
                target = max(waiting, key=lambda r: r.index)
                out.extend(self._start(spec, 1, reason, replaces=target.index, evict=True))
        return out

    def _report_rollout(self, spec: ModelSpec, old: list[Replica]) -> list[PlanAction]:
        rev = spec.config_revision
        last = self.state.rollouts.get(spec.name)
        recreating = spec.rollout.strategy == RolloutStrategy.RECREATE
        moving = bool(old) or (recreating and bool(self._old_unloading(spec)))
        if not moving:
            if last is not None and last[0] != "finished":
                return [ReportRollout(spec.name, "finished", rev, f"every replica runs {rev}")]
            return []
        error = self._halted(spec)
        now: RolloutState = "halted" if error is not None else "rolling"
        if last == (now, rev):
            return []
        if error is not None:
            detail = f"the load of {rev} failed, {len(old)} replicas keep serving: {error}"
        else:
            detail = f"{len(old)} replicas move to {rev} ({spec.rollout.strategy.value})"
        return [ReportRollout(spec.name, now, rev, detail)]

    def _retire(self, r: Replica, reason: str, *, drain: bool) -> PlanAction:
        """Take a replica away: loaded ones leave routing first when `drain` or busy."""
        if r.state == LOADED and (drain or self.busy(r) > 0):
            return MarkUnloading.of(r, reason)
        return StopReplica.of(r, reason)

    # --- spread_all -----------------------------------------------------------------------
    def _spread(self, spec: ModelSpec, counted: list[Replica]) -> list[PlanAction]:
        rev = spec.config_revision
        recreate = spec.rollout.strategy == RolloutStrategy.RECREATE
        out: list[PlanAction] = []
        by_node: dict[str, list[Replica]] = {}
        for r in counted:
            by_node.setdefault(r.node_id, []).append(r)
        rolling = any(r.revision == rev and r.state != LOADED for r in counted)
        halted = self._halted(spec) is not None
        for node_id in sorted(by_node):
            current = [r for r in by_node[node_id] if r.revision == rev]
            old = [r for r in by_node[node_id] if r.revision != rev]
            kept = current or old
            keep = min(kept, key=lambda r: (r.state != LOADED, r.index))
            for r in kept:
                if r is not keep and self.busy(r) <= 0:
                    out.append(StopReplica.of(r, "spread_all keeps one replica per node"))
            if current and old and keep.state == LOADED:
                why = f"replaced by its {rev} replica"
                out.extend(self._retire(r, why, drain=True) for r in old)
            elif old and not current and recreate:
                out.extend(self._retire(r, f"rollout to {rev}", drain=True) for r in old)
            elif old and not current and not rolling and not halted:
                rolling = True
                node = self.nodes[node_id]
                out.extend(
                    self._start(spec, 1, f"rollout to {rev}", targets=[node], replaces=keep.index)
                )
        unloading = {r.node_id for r in self._old_unloading(spec)} if recreate else set()
        missing = [
            n
            for n in self.node_list
            if n.schedulable
            and spec.scheduling.matches(n.labels)
            and n.id not in by_node
            and n.id not in unloading
        ]
        if missing:
            out.extend(self._start(spec, len(missing), "spread_all", targets=missing))
        return out

    # --- scaling --------------------------------------------------------------------------
    def _staying(self, counted: list[Replica]) -> list[Replica]:
        """Counted replicas on nodes that are not draining (a drain replaces its own)."""
        return [r for r in counted if self.nodes[r.node_id].status != NodeStatus.DRAINING]

    def _autoscale(self, spec: ModelSpec, counted: list[Replica]) -> list[PlanAction]:
        sched = spec.scheduling
        assert sched.scaling is not None
        policy = sched.scaling.policy(
            min_replicas=sched.min_replicas,
            max_replicas=sched.max_replicas,
            scale_down_delay=sched.scale_down_delay,
        )
        staying = self._staying(counted)
        rows = [r for r in self.work if r.model == spec.name]
        observed = Observed(
            replicas=[r.index for r in staying],
            starting=sum(1 for r in staying if r.state != LOADED),
            samples=self.state.signals.get(spec.name, ()),
            busy=sum(self.busy(r) for r in counted) + self.state.queued.get(spec.name, 0),
            last_request=max((r.last_used for r in rows), default=0.0),
            last_change=self.state.last_change.get(spec.name, 0.0),
        )
        decision = decide(policy, observed, self.now)
        before = len(staying)
        if decision.action == ScaleAction.UP:
            why = f"scale up: {decision.reason}"
            out = self._start(spec, decision.desired - before, why)
            started = sum(1 for a in out if isinstance(a, StartReplica))
            if started:
                out.append(ReportScaling(spec.name, before, before + started, decision.reason))
            return out
        if decision.action == ScaleAction.DOWN:
            by_index = {r.index: r for r in staying}
            why = f"scale down: {decision.reason}"
            out = [self._retire(by_index[i], why, drain=False) for i in decision.stop]
            out.append(ReportScaling(spec.name, before, decision.desired, decision.reason))
            return out
        return []

    def _all_busy(self, spec: ModelSpec, counted: list[Replica]) -> bool:
        cap = spec.scheduling.max_replicas
        if cap > 0 and len(counted) >= cap:
            return False
        if any(r.state != LOADED for r in counted):
            return False  # one is still starting: its capacity is on the way
        routable = eligible(counted, self.nodes, spec.scheduling)
        return bool(routable) and all(self.busy(r) >= self.cfg.busy_inflight for r in routable)

    def _scale_down(self, spec: ModelSpec, counted: list[Replica]) -> list[PlanAction]:
        sched = spec.scheduling
        staying = self._staying(counted)
        if len(staying) <= sched.min_replicas or any(r.state != LOADED for r in staying):
            return []
        spare = any(
            r.state == LOADED
            and self.busy(r) <= 0
            and self.now - max(r.last_used, r.updated) > sched.scale_down_delay
            for r in staying
        )
        if not spare:
            return []
        highest = max(staying, key=lambda r: r.index)
        return [self._retire(highest, "idle above minimum", drain=False)]

    # --- starting -------------------------------------------------------------------------
    def _start(
        self,
        spec: ModelSpec,
        count: int,
        reason: str,
        *,
        targets: list[Node] | None = None,
        replaces: int | None = None,
        evict: bool = False,
    ) -> list[PlanAction]:
        """Plan up to `count` starts (one per target node when `targets` is given); with
        `evict`, a start that does not fit evicts idle replicas of other models instead."""
        state = self.state
        if not spec.backend.strip():
            if spec.name in state.already_reported:
                return []
            return [ReportWaiting(spec.name, "the model has no backend configured")]
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
                if evict and decision.eviction_may_help:
                    stops = self._evict(spec, estimate, decision.eviction_candidates, pool)
                    if stops:
                        return out + stops
                failure = failure or decision.reason
                if targets is None:
                    break
                continue
            index = self._next_index(spec.name)
            out.append(
                StartReplica(
                    spec.name, decision.node_id, index, spec.backend, estimate, reason, replaces
                )
            )
            self.work.append(
                Replica(
                    spec.name,
                    index,
                    decision.node_id,
                    ReplicaState.SCHEDULED,
                    memory=estimate,
                    revision=spec.config_revision,
                    replaces=replaces,
                )
            )
        if failure:
            out.append(SetCooldown(spec.name, self.now + self.cfg.capacity_cooldown, failure))
        return out

    def _evict(
        self, spec: ModelSpec, estimate: int, node_ids: tuple[str, ...], pool: MemoryPool
    ) -> list[PlanAction]:
        """Stop the idle replicas of other models that make room on one node (the start
        follows on a later tick, once their memory is free)."""
        eviction = plan_eviction(
            estimate,
            [self.nodes[n] for n in node_ids if n in self.nodes],
            self.work,
            self.state.inflight,
            {m.name: m.scheduling.min_replicas for m in self.state.models},
            spec.name,
            pool=pool,
            model_pools=self.pools,
        )
        if eviction is None:
            return []
        victims = {v.key for v in eviction.victims}
        self.work = [r for r in self.work if r.key not in victims]
        why = f"evicted to make room for the rollout of {spec.name}"
        return [StopReplica.of(v, why) for v in eviction.victims]

    def _next_index(self, model: str) -> int:
        taken = self.taken.setdefault(model, set())
        index = next(i for i in range(len(taken) + 1) if i not in taken)
        taken.add(index)
        return index

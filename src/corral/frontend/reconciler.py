"""The control loop: one frontend at a time (advisory lock) observes, plans and hands out actions.

Observation reads the registry's snapshot; `corral.domain.reconcile.plan` decides; the actuator
applies every action. Starts, stops and orphan stops run in the background (one at a time per
replica), so a slow load never stalls the tick; a start in flight counts as a SCHEDULED replica
in the next observations until its row exists, so a fast tick never plans it twice. A node
where a start failed is avoided for that model for one capacity cooldown. A capacity shortage
is reported once per episode (until the model is satisfied again), not once per tick or
cooldown; a rollout's state once per change. Health probes (`frontend/health.py`) run beside
each tick.

What the plan reads besides the snapshot: each model's memory estimate for its current
revision (that revision's recorded load, else the spec with its model-store artifact's size),
the last failed load of each revision, one sample per tick of each scaling model's signal
(`frontend/signals.py`; kept as long as the model's windows need), the requests queued per
model and when each model's count of active or loaded replicas last changed (all in memory: a
new leader starts the windows afresh).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from corral.config import FrontendSettings
from corral.domain.actions import (
    ReportLeader,
    ReportRollout,
    ReportWaiting,
    RolloutState,
    SetCooldown,
    StartReplica,
    StopOrphan,
    StopReplica,
)
from corral.domain.autoscale import Sample
from corral.domain.entities import ACTIVE_REPLICA_STATES, ModelSpec, Replica, ReplicaState
from corral.domain.memory import estimate_memory
from corral.domain.reconcile import ClusterState, Plan, PlanAction, ReconcileConfig, plan
from corral.errors import CorralError
from corral.frontend.artifacts_api import ArtifactStore
from corral.frontend.health import ReplicaHealth
from corral.frontend.parts import Parts
from corral.frontend.signals import LoadSignals
from corral.store.db import RECONCILER_LOCK
from corral.store.registry import Lease
from corral.store.replicas import LoadInfo, revision_failures

log = logging.getLogger(__name__)


class Reconciler:
    """Leader election plus the reconcile tick."""

    def __init__(
        self,
        parts: Parts,
        *,
        health: ReplicaHealth,
        signals: LoadSignals,
        settings: FrontendSettings,
        gpu_backends: frozenset[str],
        artifacts: ArtifactStore | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = parts.registry
        self.view = parts.view
        self.inflight = parts.inflight
        self.actuator = parts.actuator
        self.health = health
        self.signals = signals
        self.settings = settings
        self.artifacts = artifacts
        self.clock = clock
        self.config = ReconcileConfig(
            heartbeat_interval=settings.heartbeat_interval,
            unhealthy_after=settings.unhealthy_after,
            offline_after=settings.offline_after,
            capacity_cooldown=settings.capacity_cooldown,
            missing_grace=settings.orphan_grace,
            orphan_grace=settings.orphan_grace,
            unload_grace=settings.unload_grace,
            unload_timeout=settings.drain_timeout,
            revision_retry=settings.revision_retry,
            placement=settings.placement,
            gpu_backends=gpu_backends,
        )
        self.leader = False
        self.leader_since = 0.0
        self.ticks = 0
        self.actions: dict[str, int] = {}  # actions handed out, by kind (metrics)
        self.cooldowns: dict[str, float] = {}
        self.reported: set[str] = set()  # models reported as waiting for a backend
        self.short: set[str] = set()  # models whose capacity shortage was reported
        self.rollouts: dict[str, tuple[RolloutState, str]] = {}  # last reported, per model
        self.avoid: dict[tuple[str, str], float] = {}  # (model, node) -> avoided until
        self.history: dict[str, deque[Sample]] = {}  # model -> its signal, one sample a tick
        self._revisions: dict[str, str] = {}  # model -> its revision at the last observation
        self._counts: dict[str, tuple[int, int]] = {}  # model -> (active, loaded) replicas
        self._changed: dict[str, float] = {}  # model -> when that count last changed
        self._starting: dict[tuple[str, int], Replica] = {}  # starts whose row may not exist
        self.last_plan = Plan()
        self._wake = asyncio.Event()

    # --- leadership ---------------------------------------------------------------------
    async def run(self) -> None:
        """Forever: become leader when the lock is free, then tick until it is lost.

        A follower tries the lock twice per tick interval, so it takes over within one tick
        of the leader's death (PostgreSQL frees the lock when the leader's connection drops).
        """
        retry = self.settings.reconcile_interval / 2
        while True:
            try:
                async with self.registry.advisory_lock(RECONCILER_LOCK) as lease:
                    if lease is not None:
                        self.leader = True
                        self.leader_since = self.clock()
                        await self.actuator.apply(ReportLeader(self.settings.frontend_id))
                        await self._lead(lease)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("reconciler lost its footing; retrying")
            finally:
                self.leader = False
            await asyncio.sleep(retry)

    async def _lead(self, lease: Lease) -> None:
        while True:
            await lease.renew()  # the lock lives as long as this connection
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("reconcile tick failed")
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), self.settings.reconcile_interval)
            except TimeoutError:
                pass

    def poke(self) -> None:
        """Capacity changed (node joined, labels changed, replica freed): clear cooldowns."""
        if self.cooldowns:
            self.cooldowns.clear()
            self._wake.set()

    # --- one tick -------------------------------------------------------------------------
    async def observe(self) -> ClusterState:
        snap = await self.registry.snapshot()
        self._forget_changed_specs(snap.models)
        replicas = list(snap.replicas)
        rows = {r.key for r in replicas}
        replicas += [r for key, r in self._starting.items() if key not in rows]
        inflight = {r.key: self.inflight.total(r.key) for r in replicas}
        now = self.clock()
        avoid: dict[str, set[str]] = {}
        for (model, node_id), until in list(self.avoid.items()):
            if until > now:
                avoid.setdefault(model, set()).add(node_id)
            else:
                del self.avoid[(model, node_id)]
        return ClusterState(
            nodes=snap.nodes,
            models=snap.models,
            replicas=replicas,
            inflight=inflight,
            processes=snap.processes,
            cooldowns=dict(self.cooldowns),
            already_reported=frozenset(self.reported),
            estimates=await self._estimates(snap.models, snap.load_info),
            monitor_since=self.leader_since,
            avoid={m: frozenset(n) for m, n in avoid.items()},
            failures=revision_failures(snap.models, snap.load_info),
            rollouts=dict(self.rollouts),
            signals=self._signals(snap.models, now),
            queued={m.name: self.inflight.queued(m.name) for m in snap.models},
            last_change=self._last_change(replicas, now),
        )

    def _forget_changed_specs(self, models: Sequence[ModelSpec]) -> None:
        """A model whose revision changed starts afresh: its cooldown and the nodes avoided
        after failed starts were about the spec before."""
        revisions = {m.name: m.config_revision for m in models}
        for name, revision in revisions.items():
            before = self._revisions.get(name)
            if before is not None and before != revision:
                self.cooldowns.pop(name, None)
                self.short.discard(name)
                for key in [k for k in self.avoid if k[0] == name]:
                    del self.avoid[key]
        self._revisions = revisions

    async def _estimates(
        self, models: Sequence[ModelSpec], load_info: Mapping[tuple[str, str], LoadInfo]
    ) -> dict[str, int]:
        """Memory per model for its current revision: what its last load of that revision
        reserved, else the spec's estimate with its model-store artifact's size."""
        out: dict[str, int] = {}
        for spec in models:
            info = load_info.get((spec.name, spec.config_revision))
            if info is not None and info.loaded_at > 0 and info.memory > 0:
                out[spec.name] = info.memory
            elif self.artifacts is not None and spec.artifact:
                out[spec.name] = estimate_memory(spec, await self.artifacts.size(spec.artifact))
        return out

    def _signals(self, models: Sequence[ModelSpec], now: float) -> dict[str, list[Sample]]:
        """This tick's sample of each scaling model's signal, added to the history kept for
        the longest window the model needs (plus the sample in force when it starts)."""
        taken = self.signals.take(now)
        names = {m.name for m in models}
        for gone in [m for m in self.history if m not in names]:
            del self.history[gone]
        out: dict[str, list[Sample]] = {}
        for spec in models:
            scaling = spec.scheduling.scaling
            if scaling is None:
                self.history.pop(spec.name, None)
                continue
            history = self.history.setdefault(spec.name, deque())
            if spec.name in taken:
                history.append(taken[spec.name])
            horizon = now - max(scaling.window, spec.scheduling.scale_down_delay)
            while len(history) > 1 and history[1].at <= horizon:
                history.popleft()
            out[spec.name] = list(history)
        return out

    def _last_change(self, replicas: Sequence[Replica], now: float) -> dict[str, float]:
        """When each model's capacity last changed: its active or its loaded replicas (a
        signal measured while new replicas loaded measured the capacity before them)."""
        counts: dict[str, tuple[int, int]] = {}
        for r in replicas:
            if r.state in ACTIVE_REPLICA_STATES:
                active, loaded = counts.get(r.model, (0, 0))
                counts[r.model] = (active + 1, loaded + (r.state == ReplicaState.LOADED))
        for model in set(counts) | set(self._counts):
            if counts.get(model) != self._counts.get(model) or model not in self._changed:
                self._changed[model] = now
        self._counts = counts
        return dict(self._changed)

    async def tick(self) -> Plan:
        state = await self.observe()
        decided = plan(state, self.clock(), self.config)
        self.last_plan = decided
        self.ticks += 1
        for action in decided.actions:
            kind = type(action).__name__
            self.actions[kind] = self.actions.get(kind, 0) + 1
            try:
                await self._hand_out(action)
            except CorralError as exc:
                log.warning("applying %s failed: %s", action, exc.message)
        self._end_shortages(decided, self.clock())
        servable = {n.id for n in state.nodes if n.servable}
        self.health.start_round([r for r in state.replicas if r.node_id in servable])
        return decided

    async def _hand_out(self, action: PlanAction) -> None:
        """Give one planned action to the actuator: slow ones in the background, reports only
        once per episode; the rest at once."""
        match action:
            case StartReplica():
                self._start(action)
            case StopReplica() | StopOrphan():
                self.actuator.submit(action)
            case SetCooldown():
                self.cooldowns[action.model] = action.until
                if action.model in self.short:
                    log.debug("model %s still short: %s", action.model, action.reason)
                    return
                self.short.add(action.model)
                await self.actuator.apply(action)
            case ReportWaiting():
                self.reported.add(action.model)
                await self.actuator.apply(action)
            case ReportRollout():
                if action.state == "finished":
                    self.rollouts.pop(action.model, None)
                else:
                    self.rollouts[action.model] = (action.state, action.revision)
                await self.actuator.apply(action)
            case _:
                await self.actuator.apply(action)

    def _start(self, action: StartReplica) -> None:
        """Start in the background; remember the start until its row exists, and avoid the
        node for a while when it fails there."""
        if action.index is None:
            return
        key = (action.model, action.index)
        task = self.actuator.submit(action)
        if task is None:
            return
        self._starting[key] = Replica(
            action.model,
            action.index,
            action.node_id,
            ReplicaState.SCHEDULED,
            memory=action.memory,
            updated=self.clock(),
            revision=self._revision(action.model),
            replaces=action.replaces,
        )

        def done(task: asyncio.Task[Any]) -> None:
            self._starting.pop(key, None)
            if not task.cancelled() and isinstance(task.exception(), CorralError):
                # try the other nodes first; the model itself is not to blame for one node
                until = self.clock() + self.config.capacity_cooldown
                self.avoid[(action.model, action.node_id)] = until

        task.add_done_callback(done)

    def _revision(self, model: str) -> str:
        spec = self.view.models.get(model)
        return spec.config_revision if spec is not None else ""

    def _end_shortages(self, decided: Plan, now: float) -> None:
        """A reported model that planned without running short (and is not cooling down) is
        satisfied again: its next shortage is a new episode, reported again."""
        short_now = {a.model for a in decided.of(SetCooldown)}
        for model in list(self.short):
            if model not in short_now and self.cooldowns.get(model, 0.0) <= now:
                self.short.discard(model)
                log.info("model %s: enough capacity again", model)

    async def close(self) -> None:
        await self.health.close()

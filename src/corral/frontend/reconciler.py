"""The control loop: one frontend at a time (advisory lock) observes, plans and hands out actions.

Observation reads the registry's snapshot; `corral.domain.reconcile.plan` decides; the actuator
applies every action. Starts, stops and orphan stops run in the background (one at a time per
replica), so a slow load never stalls the tick; a start in flight counts as a SCHEDULED replica
in the next observations until its row exists, so a fast tick never plans it twice. A node
where a start failed is avoided for that model for one capacity cooldown. A capacity shortage
is reported once per episode (until the model is satisfied again), not once per tick or
cooldown. Health probes (`frontend/health.py`) run beside each tick.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from corral.config import FrontendSettings
from corral.domain.actions import (
    ReportLeader,
    ReportWaiting,
    SetCooldown,
    StartReplica,
    StopOrphan,
    StopReplica,
)
from corral.domain.entities import Replica, ReplicaState
from corral.domain.reconcile import ClusterState, Plan, PlanAction, ReconcileConfig, plan
from corral.errors import CorralError
from corral.frontend.health import ReplicaHealth
from corral.frontend.parts import Parts
from corral.store.db import RECONCILER_LOCK
from corral.store.registry import Lease
from corral.store.replicas import LoadInfo

log = logging.getLogger(__name__)


class Reconciler:
    """Leader election plus the reconcile tick."""

    def __init__(
        self,
        parts: Parts,
        *,
        health: ReplicaHealth,
        settings: FrontendSettings,
        gpu_backends: frozenset[str],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = parts.registry
        self.inflight = parts.inflight
        self.actuator = parts.actuator
        self.health = health
        self.settings = settings
        self.clock = clock
        self.config = ReconcileConfig(
            heartbeat_interval=settings.heartbeat_interval,
            unhealthy_after=settings.unhealthy_after,
            offline_after=settings.offline_after,
            capacity_cooldown=settings.capacity_cooldown,
            missing_grace=settings.orphan_grace,
            orphan_grace=settings.orphan_grace,
            placement=settings.placement,
            gpu_backends=gpu_backends,
        )
        self.leader = False
        self.leader_since = 0.0
        self.ticks = 0
        self.cooldowns: dict[str, float] = {}
        self.reported: set[str] = set()  # models reported as waiting for a first load
        self.short: set[str] = set()  # models whose capacity shortage was reported
        self.avoid: dict[tuple[str, str], float] = {}  # (model, node) -> avoided until
        self._starting: dict[tuple[str, int], Replica] = {}  # starts whose row may not exist
        self._info: dict[str, LoadInfo] = {}  # load information as of the last observation
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
        self._info = dict(snap.load_info)
        return ClusterState(
            nodes=snap.nodes,
            models=snap.models,
            replicas=replicas,
            inflight=inflight,
            processes=snap.processes,
            load_info=frozenset(snap.load_info),
            cooldowns=dict(self.cooldowns),
            already_reported=frozenset(self.reported),
            estimates={m: i.memory for m, i in snap.load_info.items() if i.memory > 0},
            monitor_since=self.leader_since,
            avoid={m: frozenset(n) for m, n in avoid.items()},
        )

    async def tick(self) -> Plan:
        state = await self.observe()
        decided = plan(state, self.clock(), self.config)
        self.last_plan = decided
        self.ticks += 1
        for action in decided.actions:
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
            case _:
                await self.actuator.apply(action)

    def _start(self, action: StartReplica) -> None:
        """Start from the recorded load information; remember the start until its row exists,
        and avoid the node for a while when it fails there."""
        info = self._info.get(action.model)
        if info is None or action.index is None:
            return
        key = (action.model, action.index)
        start = replace(action, backend=info.backend or action.backend, options=info.options)
        task = self.actuator.submit(start)
        if task is None:
            return
        self._starting[key] = Replica(
            action.model,
            action.index,
            action.node_id,
            ReplicaState.SCHEDULED,
            memory=action.memory,
            updated=self.clock(),
        )

        def done(task: asyncio.Task[Any]) -> None:
            self._starting.pop(key, None)
            if not task.cancelled() and isinstance(task.exception(), CorralError):
                # try the other nodes first; the model itself is not to blame for one node
                until = self.clock() + self.config.capacity_cooldown
                self.avoid[(action.model, action.node_id)] = until

        task.add_done_callback(done)

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

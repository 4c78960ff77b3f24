"""The control loop: one frontend at a time (advisory lock) observes, plans and acts each tick.

Observation reads PostgreSQL; `corral.domain.reconcile.plan` decides; this module applies the
actions. Starts and stops run as background tasks so a slow load never stalls the tick; a start
in flight counts as a SCHEDULED replica in the next observations until its row exists, so a
fast tick never plans it twice. A node where a start failed is avoided for that model for one
capacity cooldown. A capacity shortage is reported once per episode (until the model is
satisfied again), not once per tick or cooldown. It also probes loaded replicas: several
consecutive misses drop one, a busy one is never probed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine, Sequence
from typing import Any

from corral.bus.messages import StopReplicaCommand, StopReplicaReply
from corral.config import FrontendSettings
from corral.domain.entities import ModelSpec, Replica, ReplicaState
from corral.domain.reconcile import (
    Action,
    AdoptReplica,
    ClusterState,
    MarkNode,
    Plan,
    ReconcileConfig,
    RemoveNodeReplicas,
    RemoveReplicaRow,
    ReportWaiting,
    RunningProcess,
    SetCooldown,
    StartReplica,
    StopOrphan,
    StopReplica,
    plan,
)
from corral.errors import CorralError
from corral.frontend.actuator import ReplicaActuator
from corral.frontend.inflight import InflightTracker
from corral.frontend.probe import ProbeCache
from corral.frontend.view import ClusterView
from corral.store.db import RECONCILER_LOCK
from corral.store.registry import Registry
from corral.store.replicas import LoadInfo

log = logging.getLogger(__name__)

PROBE_MISSES = 3  # consecutive failed probes before a loaded replica is dropped


class Reconciler:
    """Leader election plus the reconcile tick."""

    def __init__(
        self,
        *,
        registry: Registry,
        view: ClusterView,
        inflight: InflightTracker,
        actuator: ReplicaActuator,
        probes: ProbeCache,
        settings: FrontendSettings,
        gpu_backends: frozenset[str],
        publish_node: Any,
    ) -> None:
        self.registry = registry
        self.view = view
        self.inflight = inflight
        self.actuator = actuator
        self.probes = probes
        self.settings = settings
        self.publish_node = publish_node
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
        self._misses: dict[tuple[str, int, str], int] = {}
        self._busy: dict[tuple[str, int], asyncio.Task[Any]] = {}
        self._wake = asyncio.Event()
        self._probing: asyncio.Future[None] | None = None

    # --- leadership ---------------------------------------------------------------------
    async def run(self) -> None:
        """Forever: become leader when the lock is free, then tick until it is lost.

        A follower tries the lock twice per tick interval, so it takes over within one tick
        of the leader's death (PostgreSQL frees the lock when the leader's connection drops).
        """
        retry = self.settings.reconcile_interval / 2
        while True:
            try:
                async with self.registry.advisory_lock(RECONCILER_LOCK) as conn:
                    if conn is not None:
                        self.leader = True
                        self.leader_since = time.time()
                        log.info("this frontend leads the reconciler")
                        await self.registry.audit.add(
                            "reconciler.leader", self.settings.frontend_id
                        )
                        await self._lead(conn)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("reconciler lost its footing; retrying")
            finally:
                self.leader = False
            await asyncio.sleep(retry)

    async def _lead(self, conn: Any) -> None:
        from sqlalchemy import text

        while True:
            await conn.execute(text("SELECT 1"))  # the lock lives as long as this connection
            await conn.commit()  # never sit idle in a transaction between ticks
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
        nodes = await self.registry.nodes.all()
        models = await self.registry.models.all()
        replicas = await self.registry.replicas.all()
        info = await self.registry.replicas.load_info()
        reported = await self.registry.nodes.all_processes()
        processes = {
            node.id: [
                RunningProcess(
                    model=str(p["model"]),
                    index=int(p["index"]),
                    address=p.get("address"),
                    first_seen=float(p.get("first_seen", 0.0)),
                    ready=p.get("state", "ready") == "ready",
                )
                for p in reported.get(node.id, [])
            ]
            for node in nodes
            if node.last_heartbeat > 0
        }
        rows = {r.key for r in replicas}
        replicas += [r for key, r in self._starting.items() if key not in rows]
        inflight = {r.key: self.inflight.total(r.key) for r in replicas}
        now = time.time()
        avoid: dict[str, set[str]] = {}
        for (model, node_id), until in list(self.avoid.items()):
            if until > now:
                avoid.setdefault(model, set()).add(node_id)
            else:
                del self.avoid[(model, node_id)]
        self._info = info
        return ClusterState(
            nodes=nodes,
            models=models,
            replicas=replicas,
            inflight=inflight,
            processes=processes,
            load_info=frozenset(info),
            cooldowns=dict(self.cooldowns),
            already_reported=frozenset(self.reported),
            estimates={m: i.memory for m, i in info.items() if i.memory > 0},
            monitor_since=self.leader_since,
            avoid={m: frozenset(n) for m, n in avoid.items()},
        )

    async def tick(self) -> Plan:
        state = await self.observe()
        decided = plan(state, time.time(), self.config)
        self.last_plan = decided
        self.ticks += 1
        specs = {m.name: m for m in state.models}
        rows = {r.key: r for r in state.replicas}
        for action in decided.actions:
            try:
                await self._apply(action, specs, rows)
            except CorralError as exc:
                log.warning("applying %s failed: %s", action, exc.message)
        self._end_shortages(decided, time.time())
        if self._probing is None or self._probing.done():  # a hung backend never stalls ticks
            servable = {n.id for n in state.nodes if n.servable}
            replicas = [r for r in state.replicas if r.node_id in servable]
            self._probing = asyncio.ensure_future(self._guard(self._probe_loaded(replicas)))
        return decided

    def _end_shortages(self, decided: Plan, now: float) -> None:
        """A reported model that planned without running short (and is not cooling down) is
        satisfied again: its next shortage is a new episode, reported again."""
        short_now = {a.model for a in decided.of(SetCooldown)}
        for model in list(self.short):
            if model not in short_now and self.cooldowns.get(model, 0.0) <= now:
                self.short.discard(model)
                log.info("model %s: enough capacity again", model)

    async def _apply(
        self, action: Action, specs: dict[str, ModelSpec], rows: dict[tuple[str, int], Replica]
    ) -> None:
        if isinstance(action, MarkNode):
            # only from the status observed: a heartbeat, drain or deregistration that landed
            # since the observation wins over this tick's judgement
            if not await self.registry.nodes.set_status(
                action.node_id, action.status, only_from=[action.previous]
            ):
                return
            log.info("node %s: %s -> %s", action.node_id, action.previous, action.status)
            await self.registry.audit.add(
                "node.status",
                f"{action.node_id}: {action.previous} -> {action.status}",
                subject=action.node_id,
            )
            await self.publish_node(action.node_id, "status")
        elif isinstance(action, RemoveNodeReplicas):
            for gone in await self.registry.replicas.remove_on_node(action.node_id):
                await self.actuator.announce_removed(gone, "node offline")
        elif isinstance(action, RemoveReplicaRow):
            removed = await self.registry.replicas.remove(
                action.model, action.index, node_id=action.node_id
            )
            if removed is not None:
                await self.actuator.announce_removed(removed, action.reason)
                await self.registry.audit.add(
                    "replica.gone", f"{action.model}#{action.index}: {action.reason}"
                )
        elif isinstance(action, AdoptReplica):
            row = rows.get((action.model, action.index))
            if row is not None and await self.actuator.mark(
                row, ReplicaState.LOADED, address=action.address
            ):
                log.warning("adopted %s#%d at %s", action.model, action.index, action.address)
                await self.registry.audit.add(
                    "replica.adopted",
                    f"{action.model}#{action.index} on {action.node_id} at {action.address}: "
                    "its start outlived the frontend that began it",
                    subject=action.model,
                )
        elif isinstance(action, StartReplica):
            key = (action.model, action.index)
            if self._background(key, self._start(action, specs)):
                self._starting[key] = Replica(
                    action.model,
                    action.index,
                    action.node_id,
                    ReplicaState.SCHEDULED,
                    memory=action.memory,
                    updated=time.time(),
                )
        elif isinstance(action, StopReplica):
            replica = rows.get((action.model, action.index))
            if replica is not None:
                self._background(replica.key, self.actuator.stop(replica, action.reason))
        elif isinstance(action, StopOrphan):
            self._background(
                (action.model, action.index),
                self._stop_orphan(action.node_id, action.model, action.index, action.address),
            )
        elif isinstance(action, SetCooldown):
            self.cooldowns[action.model] = action.until
            if action.model in self.short:
                log.debug("model %s still short: %s", action.model, action.reason)
                return
            self.short.add(action.model)
            log.warning("model %s: %s", action.model, action.reason)
            await self.registry.audit.add("model.capacity", action.reason, subject=action.model)
        elif isinstance(action, ReportWaiting):
            self.reported.add(action.model)
            log.warning("model %s waits: %s", action.model, action.reason)
            await self.registry.audit.add("model.waiting", action.reason, subject=action.model)

    async def _start(self, action: StartReplica, specs: dict[str, ModelSpec]) -> None:
        key = (action.model, action.index)
        spec = specs.get(action.model)
        info = self._info.get(action.model)
        try:
            if spec is None or info is None:
                return
            await self.actuator.start(
                spec,
                action.node_id,
                memory=action.memory,
                index=action.index,
                backend=info.backend or spec.backend,
                options=info.options,
            )
        except CorralError as exc:
            # try the other nodes first; the model itself is not to blame for one node
            until = time.time() + self.config.capacity_cooldown
            self.avoid[(action.model, action.node_id)] = until
            log.warning("reconciler start of %s failed: %s", action.model, exc.message)
        finally:
            self._starting.pop(key, None)

    async def _stop_orphan(self, node_id: str, model: str, index: int, address: str | None) -> None:
        reply = await self.actuator.bus.request(
            self.actuator.bus.subjects.replica_stop(node_id),
            StopReplicaCommand(model=model, index=index, address=address),
            StopReplicaReply,
            timeout=30,
        )
        if not reply.stopped:
            return  # a report from before its row went: that process was already stopped
        log.info("stopped orphan %s#%d on %s (%s)", model, index, node_id, address)
        await self.registry.audit.add(
            "replica.orphan", f"{model}#{index} on {node_id} at {address}", subject=model
        )

    def _background(self, key: tuple[str, int], coro: Coroutine[Any, Any, Any]) -> bool:
        """Run `coro` unless that replica is already being acted on; True when it runs."""
        running = self._busy.get(key)
        if running is not None and not running.done():
            coro.close()
            return False
        task = asyncio.ensure_future(self._guard(coro))
        self._busy[key] = task
        task.add_done_callback(
            lambda t: self._busy.pop(key, None) if self._busy.get(key) is t else None
        )
        return True

    async def _guard(self, coro: Coroutine[Any, Any, Any]) -> None:
        try:
            await coro
        except CorralError as exc:
            log.warning("reconciler action failed: %s", exc.message)
        except Exception:
            log.exception("reconciler action failed")

    # --- replica probes -------------------------------------------------------------------
    async def _probe_loaded(self, replicas: Sequence[Replica]) -> None:
        targets = [
            r
            for r in replicas
            if r.state == ReplicaState.LOADED
            and r.address
            and self.inflight.total(r.key) == 0  # busy is not dead: never probe it
            and not self.probes.fresh(r.node_id, r.address)
        ]
        if not targets:
            return
        reasons = await asyncio.gather(
            *(self.probes.check(r.node_id, r.address or "", r.model) for r in targets)
        )
        seen = set()
        for replica, reason in zip(targets, reasons, strict=True):
            key = (replica.model, replica.index, replica.address or "")
            seen.add(key)
            if reason is None:
                self._misses.pop(key, None)
                continue
            misses = self._misses.get(key, 0) + 1
            self._misses[key] = misses
            if misses >= PROBE_MISSES:
                self._misses.pop(key, None)
                await self.actuator.drop(replica, f"{misses} probes failed: {reason}")
        for key in [k for k in self._misses if k not in seen]:
            del self._misses[key]

    async def close(self) -> None:
        tasks = [*self._busy.values(), *([self._probing] if self._probing else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

"""The only writer of cluster state: `Actuator.apply(action)` for every domain action.

Each action's registry write, this frontend's view update, the event the other frontends
follow and the audit entry happen in one place per action (`corral.domain.actions`): here
for models and reports, in `replica_writes` for replicas, in `node_writes` for nodes, all
announcing through `announce`.
The reconciler, the cold path, the drainer, the health probes and the admin and node APIs
decide; they never write. Slow actions (starts, stops) can run in the background, one at a
time per replica (`submit`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any, assert_never, overload

from corral.bus.client import Bus
from corral.domain.actions import (
    Action,
    AdoptReplica,
    DeregisterNode,
    DrainNode,
    DropReplica,
    MarkNode,
    MarkUnloading,
    PatchNodeLabels,
    PatchScheduling,
    RecordHeartbeat,
    RecordUse,
    RegisterNode,
    RemoveModel,
    RemoveNode,
    RemoveNodeReplicas,
    RemoveReplicaRow,
    ReplicaChange,
    ReplicaExited,
    ReportDrained,
    ReportLeader,
    ReportLoad,
    ReportRollout,
    ReportScaling,
    ReportWaiting,
    SetCooldown,
    SetNodeLabels,
    SetScheduling,
    StartReplica,
    StopOrphan,
    StopReplica,
    UndrainNode,
    UpsertModel,
)
from corral.domain.entities import NodeStatus, Replica, Scheduling, spec_revision
from corral.errors import CorralError, NotFound
from corral.frontend.announce import Announcer
from corral.frontend.node_client import NodeClient
from corral.frontend.node_writes import NodeWrites
from corral.frontend.replica_writes import ReplicaWrites
from corral.frontend.view import ClusterView
from corral.modelfile import patch_scheduling
from corral.store.models import scheduling_to_row
from corral.store.registry import Registry

log = logging.getLogger(__name__)

#: Slow actions that may run in the background.
Background = StartReplica | StopReplica | StopOrphan


class Actuator:
    """Applies domain actions: registry, view, events and audit log, each in one place."""

    def __init__(
        self,
        *,
        registry: Registry,
        bus: Bus,
        view: ClusterView,
        nodes: NodeClient,
        frontend_id: str,
        on_load: Callable[[str, str, float], None] | None = None,
    ) -> None:
        self.registry = registry
        self.nodes = nodes
        self.on_load = on_load  # (model, "loaded" | "failed", seconds) of each start (metrics)
        self.announce = Announcer(registry=registry, bus=bus, view=view, frontend_id=frontend_id)
        self.replicas = ReplicaWrites(
            registry=registry, view=view, nodes=nodes, announce=self.announce, spawn=self._spawn
        )
        self.node_writes = NodeWrites(
            registry=registry, announce=self.announce, replicas=self.replicas
        )
        self._busy: dict[tuple[str, int | None], asyncio.Task[Any]] = {}  # by replica
        self._background: set[asyncio.Task[Any]] = set()

    # --- the one entry point --------------------------------------------------------------
    @overload
    async def apply(self, action: StartReplica) -> Replica: ...
    @overload
    async def apply(self, action: ReplicaChange | MarkNode | UpsertModel | RemoveNode) -> bool: ...
    @overload
    async def apply(self, action: RemoveNodeReplicas | DeregisterNode) -> int: ...
    @overload
    async def apply(self, action: RecordHeartbeat) -> NodeStatus: ...
    @overload
    async def apply(self, action: PatchNodeLabels) -> dict[str, str]: ...
    @overload
    async def apply(self, action: PatchScheduling) -> Scheduling: ...
    @overload
    async def apply(self, action: Action) -> object: ...

    async def apply(self, action: Action) -> object:
        """Apply one action. Starts return the loaded replica (LoadFailed otherwise); stops,
        drops and removals whether something was there; node and model changes raise NotFound
        for an unknown node or model."""
        match action:
            case StartReplica():
                return await self._start(action)
            case StopReplica():
                return await self.replicas.stop(action)
            case DropReplica():
                return await self.replicas.drop(action)
            case MarkUnloading():
                return await self.replicas.unload(action)
            case AdoptReplica():
                return await self.replicas.adopt(action)
            case RemoveReplicaRow() | ReplicaExited():
                return await self.replicas.remove_row(action)
            case StopOrphan():
                return await self.replicas.stop_orphan(action)
            case RemoveNodeReplicas():
                return await self.replicas.remove_on_node(action.node_id, action.reason)
            case RegisterNode():
                await self.node_writes.register(action)
            case RecordHeartbeat():
                return await self.node_writes.heartbeat(action)
            case MarkNode():
                return await self.node_writes.mark(action)
            case SetNodeLabels():
                await self.node_writes.set_labels(action)
            case PatchNodeLabels():
                return await self.node_writes.patch_labels(action)
            case DrainNode():
                await self.node_writes.drain(action)
            case UndrainNode():
                await self.node_writes.undrain(action)
            case DeregisterNode():
                return await self.node_writes.deregister(action)
            case RemoveNode():
                return await self.node_writes.remove(action)
            case UpsertModel():
                return await self._upsert_model(action)
            case SetScheduling():
                await self._set_scheduling(action)
            case PatchScheduling():
                return await self._patch_scheduling(action)
            case RemoveModel():
                await self._remove_model(action)
            case ReportLoad():
                await self.announce.load(action)
            case SetCooldown():
                log.warning("model %s: %s", action.model, action.reason)
                await self.announce.audit("model.capacity", action.reason, action.model)
            case ReportWaiting():
                log.warning("model %s waits: %s", action.model, action.reason)
                await self.announce.audit("model.waiting", action.reason, action.model)
            case ReportRollout():
                text = f"{action.model} {action.state} ({action.revision}): {action.detail}"
                log.info("rollout of %s", text)
                await self.announce.audit("model.rollout", text, action.model)
            case ReportScaling():
                way = "up" if action.after > action.before else "down"
                text = f"scaled {way} {action.before} -> {action.after}: {action.reason}"
                log.info("model %s %s", action.model, text)
                await self.announce.audit("model.scaled", text, action.model)
            case ReportDrained():
                text = f"{self.announce.node_name(action.node_id)}: {action.moved} replicas moved"
                await self.announce.audit("node.drained", text, action.node_id)
            case ReportLeader():
                log.info("this frontend leads the reconciler")
                await self.announce.audit("reconciler.leader", action.frontend_id, "")
            case RecordUse():
                await self.registry.replicas.touch(action.last_used)
            case _:
                assert_never(action)
        return None

    async def _start(self, action: StartReplica) -> Replica:
        started = time.monotonic()
        outcome = "failed"
        try:
            replica = await self.replicas.start(action)
            outcome = "loaded"
            return replica
        finally:
            if self.on_load is not None:
                self.on_load(action.model, outcome, time.monotonic() - started)

    def submit(self, action: Background) -> asyncio.Task[Any] | None:
        """Apply `action` in a background task unless its replica is already being acted on
        (None then). A failure is logged; the task keeps it for whoever waits on it."""
        key = (action.model, action.index)
        running = self._busy.get(key)
        if running is not None and not running.done():
            return None
        task = self._spawn(self.apply(action), action)
        self._busy[key] = task
        task.add_done_callback(
            lambda t: self._busy.pop(key, None) if self._busy.get(key) is t else None
        )
        return task

    def pending(self) -> int:
        """How many actions still run in the background."""
        return len(self._background)

    async def close(self) -> None:
        """Cancel what still runs in the background and wait for it to end."""
        tasks = list(self._background)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # --- models ---------------------------------------------------------------------------
    async def _upsert_model(self, action: UpsertModel) -> bool:
        """Store the spec with its revision (the artifact's content digest counts, when the
        model store has it)."""
        name = action.spec.name
        try:
            fetch = await self.nodes.artifact_fetch(action.spec.artifact)
        except CorralError:  # not in the store (yet): the reference stands for it
            fetch = {}
        digest = fetch.get("artifact_digest")
        spec = dataclasses.replace(action.spec, spec_hash=spec_revision(action.spec, digest))
        if not await self.registry.models.upsert(spec, source=action.source):
            return False
        await self.announce.model(name)
        origin = "via API" if action.source == "api" else f"from {action.source}"
        text = f"{name} {origin}, revision {spec.config_revision}"
        await self.announce.audit("model.updated", text, name)
        return True

    async def _set_scheduling(self, action: SetScheduling) -> None:
        if not await self.registry.models.set_scheduling(action.model, action.scheduling):
            raise NotFound(f"model {action.model!r} not found", param="name")
        await self.announce.model(action.model)
        text = f"{action.model}: {scheduling_to_row(action.scheduling)}"
        await self.announce.audit("model.scheduling", text, action.model)

    async def _patch_scheduling(self, action: PatchScheduling) -> Scheduling:
        """The model's scheduling with only `changes` applied (atomic with other patches)."""
        after = await self.registry.models.update_scheduling(
            action.model,
            lambda current: patch_scheduling(scheduling_to_row(current), action.changes),
        )
        if after is None:
            raise NotFound(f"model {action.model!r} not found", param="name")
        await self.announce.model(action.model)
        text = f"{action.model}: {dict(action.changes)}"
        await self.announce.audit("model.scheduling", text, action.model)
        return after

    async def _remove_model(self, action: RemoveModel) -> None:
        for replica in await self.registry.replicas.all(action.model):
            await self.replicas.stop(StopReplica.of(replica, "model deleted"))
        if not await self.registry.models.delete(action.model):
            return  # removed already (another frontend watching the same models directory)
        await self.announce.model(action.model)
        await self.announce.audit("model.deleted", action.model, action.model)

    def _spawn(self, coro: Coroutine[Any, Any, Any], action: object = None) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(lambda t: _log_failure(t, action))
        return task


def _log_failure(task: asyncio.Task[Any], action: object) -> None:
    if task.cancelled() or task.exception() is None:
        return
    exc = task.exception()
    if isinstance(exc, CorralError):
        log.warning("applying %s failed: %s", action, exc.message)
    else:
        log.error("applying %s failed", action, exc_info=exc)

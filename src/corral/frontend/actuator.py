"""The only writer of cluster state: `Actuator.apply(action)` for every domain action.

Each action's registry write, this frontend's view update, the event the other frontends
follow and the audit entry happen here, in one place per action (`corral.domain.actions`).
The reconciler, the cold path, the drainer, the health probes and the admin and node APIs
decide; they never write. Slow actions (starts, stops) can run in the background, one at a
time per replica (`submit`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine, Mapping
from typing import Any, Literal, assert_never, overload

from corral.bus.client import Bus
from corral.bus.messages import LoadProgress, ModelEvent, NodeEvent, ReplicaEvent
from corral.domain.actions import (
    Action,
    AdoptReplica,
    DeregisterNode,
    DrainNode,
    DropReplica,
    MarkNode,
    MarkUnloading,
    RecordHeartbeat,
    RecordUse,
    RegisterNode,
    RemoveModel,
    RemoveNodeReplicas,
    RemoveReplicaRow,
    ReplicaExited,
    ReportDrained,
    ReportLeader,
    ReportLoad,
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
from corral.domain.entities import ModelSpec, NodeStatus, Replica, ReplicaState
from corral.errors import (
    Conflict,
    CorralError,
    LoadFailed,
    ModelNotFound,
    NodeUnreachable,
    NotFound,
)
from corral.frontend.node_client import NodeClient
from corral.frontend.view import ClusterView
from corral.store.models import scheduling_to_row
from corral.store.registry import Registry
from corral.store.replicas import LoadInfo

log = logging.getLogger(__name__)

ReplicaEventKind = Literal["loaded", "removed", "failed", "updated"]
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
    ) -> None:
        self.registry = registry
        self.bus = bus
        self.view = view
        self.nodes = nodes
        self.frontend_id = frontend_id
        self._busy: dict[tuple[str, int | None], asyncio.Task[Any]] = {}  # by replica
        self._background: set[asyncio.Task[Any]] = set()
        self._installs: dict[str, Mapping[str, Any]] = {}  # install states last written per node

    # --- the one entry point --------------------------------------------------------------
    @overload
    async def apply(self, action: StartReplica) -> Replica: ...
    @overload
    async def apply(
        self,
        action: StopReplica
        | DropReplica
        | MarkUnloading
        | AdoptReplica
        | RemoveReplicaRow
        | ReplicaExited
        | StopOrphan
        | MarkNode
        | UpsertModel,
    ) -> bool: ...
    @overload
    async def apply(self, action: RemoveNodeReplicas | DeregisterNode) -> int: ...
    @overload
    async def apply(self, action: RecordHeartbeat) -> NodeStatus: ...
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
                return await self._stop(action)
            case DropReplica():
                return await self._drop(action)
            case MarkUnloading():
                marked = await self._mark(
                    action.model, action.index, action.node_id, unloading=True
                )
                return marked is not None
            case AdoptReplica():
                return await self._adopt(action)
            case RemoveReplicaRow():
                text = f"{action.model}#{action.index}: {action.reason}"
                return await self._remove_row(action, None, action.reason, "replica.gone", text)
            case ReplicaExited():
                return await self._exited(action)
            case StopOrphan():
                return await self._stop_orphan(action)
            case RemoveNodeReplicas():
                return await self._remove_node_replicas(action.node_id, action.reason)
            case RegisterNode():
                await self._register(action)
            case RecordHeartbeat():
                return await self._heartbeat(action)
            case MarkNode():
                return await self._mark_node(action)
            case SetNodeLabels():
                await self._set_labels(action)
            case DrainNode():
                await self._drain(action)
            case UndrainNode():
                await self._undrain(action)
            case DeregisterNode():
                return await self._deregister(action)
            case UpsertModel():
                return await self._upsert_model(action)
            case SetScheduling():
                await self._set_scheduling(action)
            case RemoveModel():
                await self._remove_model(action)
            case ReportLoad():
                await self._report_load(action)
            case SetCooldown():
                log.warning("model %s: %s", action.model, action.reason)
                await self._audit("model.capacity", action.reason, action.model)
            case ReportWaiting():
                log.warning("model %s waits: %s", action.model, action.reason)
                await self._audit("model.waiting", action.reason, action.model)
            case ReportDrained():
                text = f"{action.node_id}: {action.moved} replicas moved"
                await self._audit("node.drained", text, action.node_id)
            case ReportLeader():
                log.info("this frontend leads the reconciler")
                await self._audit("reconciler.leader", action.frontend_id, "")
            case RecordUse():
                await self.registry.replicas.touch(action.last_used)
            case _:
                assert_never(action)
        return None

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

    async def close(self) -> None:
        """Cancel what still runs in the background and wait for it to end."""
        tasks = list(self._background)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # --- replicas -------------------------------------------------------------------------
    async def _start(self, action: StartReplica) -> Replica:
        spec = await self._spec(action.model)
        backend = action.backend or spec.backend
        if not backend:
            raise LoadFailed(f"model {spec.name} has no backend configured")
        options = dict(spec.options if action.options is None else action.options)
        replica = await self.registry.replicas.add(
            spec.name,
            action.node_id,
            memory=action.memory,
            state=ReplicaState.LOADING,
            index=action.index,
        )
        if replica is None:
            raise Conflict(f"replica {spec.name}#{action.index} already exists")
        self.view.put_replica(replica)
        await self._event("updated", replica)
        await self._report_load(ReportLoad(spec.name, "loading", action.node_id, replica.index))
        started = time.time()
        try:
            reply = await self.nodes.start(
                action.node_id,
                model=spec.name,
                index=replica.index,
                backend=backend,
                options=options,
                artifact=spec.artifact,
                memory=action.memory,
            )
        except NodeUnreachable as exc:
            await self._forget(replica, f"node did not answer: {exc.message}")
            raise LoadFailed(
                f"starting {spec.name} on node {action.node_id} failed: {exc.message}",
                retry_after=5,
            ) from None
        except CorralError as exc:  # the model-store artifact is unusable
            await self._forget(replica, exc.message)
            raise LoadFailed(f"artifact of {spec.name}: {exc.message}") from None
        if not reply.ok or not reply.address:
            error = reply.error or "the node gave no address"
            await self._forget(replica, error)
            raise LoadFailed(
                f"starting {spec.name} on node {action.node_id} failed: {error}", retry_after=5
            )
        loaded = await self.registry.replicas.update(
            spec.name,
            replica.index,
            state=ReplicaState.LOADED,
            address=reply.address,
            node_id=action.node_id,
        )
        if loaded is None:  # the row vanished meanwhile (node went offline): undo the process
            self._spawn(self.nodes.stop(action.node_id, spec.name, replica.index, reply.address))
            raise LoadFailed(f"replica {spec.name}#{replica.index} was removed while loading")
        now = time.time()
        await self.registry.replicas.record_load_info(
            LoadInfo(
                model=spec.name,
                backend=backend,
                artifact=spec.artifact,
                options=options,
                memory=action.memory,
                node_id=action.node_id,
                load_seconds=now - started,
                loaded_at=now,
            )
        )
        self.view.put_replica(loaded)
        await self._event("loaded", loaded)
        await self._report_load(ReportLoad(spec.name, "loaded", action.node_id, loaded.index))
        await self._audit(
            "replica.loaded",
            f"{spec.name}#{loaded.index} loaded on {action.node_id} at {reply.address} "
            f"in {now - started:.2f}s",
            spec.name,
        )
        return loaded

    async def _stop(self, action: StopReplica) -> bool:
        self.view.drop_replica(action.model, action.index)
        stopped = await self.nodes.stop(action.node_id, action.model, action.index, action.address)
        await self._forget(_ident(action), action.reason, kind="removed")
        return stopped

    async def _drop(self, action: DropReplica) -> bool:
        if self.view.replicas.get((action.model, action.index)) is None:
            return False  # another request already dropped it
        log.warning("dropping replica %s#%d: %s", action.model, action.index, action.reason)
        self.view.drop_replica(action.model, action.index)
        await self._forget(_ident(action), action.reason, kind="removed")
        self._spawn(self.nodes.stop(action.node_id, action.model, action.index, action.address))
        return True

    async def _mark(
        self,
        model: str,
        index: int,
        node_id: str,
        *,
        unloading: bool = False,
        address: str | None = None,
    ) -> Replica | None:
        """UNLOADING takes a replica out of routing before a stop; LOADED adopts one whose
        starter died. Returns the new row, None when it is gone."""
        state = ReplicaState.UNLOADING if unloading else ReplicaState.LOADED
        changed = await self.registry.replicas.update(
            model, index, state=state, address=address, node_id=node_id
        )
        if changed is not None:
            self.view.put_replica(changed)
            await self._event("updated" if unloading else "loaded", changed)
        return changed

    async def _adopt(self, action: AdoptReplica) -> bool:
        if (
            await self._mark(action.model, action.index, action.node_id, address=action.address)
            is None
        ):
            return False
        log.warning("adopted %s#%d at %s", action.model, action.index, action.address)
        await self._audit(
            "replica.adopted",
            f"{action.model}#{action.index} on {action.node_id} at {action.address}: "
            "its start outlived the frontend that began it",
            action.model,
        )
        return True

    async def _exited(self, action: ReplicaExited) -> bool:
        reason = f"process exited with {action.returncode}: {action.log_tail[-500:]}"
        text = f"{action.model}#{action.index} on {action.node_id}: {reason}"
        return await self._remove_row(action, action.address, reason, "replica.exited", text)

    async def _remove_row(
        self,
        action: RemoveReplicaRow | ReplicaExited,
        address: str | None,
        reason: str,
        kind: str,
        text: str,
    ) -> bool:
        """Delete the row when it is still on that node (and at that address, if given)."""
        removed = await self.registry.replicas.remove(
            action.model, action.index, node_id=action.node_id, address=address
        )
        if removed is None:
            return False
        self.view.drop_replica(removed.model, removed.index)
        await self._event("removed", removed, error=reason)
        await self._audit(kind, text, action.model)
        return True

    async def _stop_orphan(self, action: StopOrphan) -> bool:
        if not await self.nodes.stop(action.node_id, action.model, action.index, action.address):
            return False  # a report from before its row went: that process was already stopped
        log.info(
            "stopped orphan %s#%d on %s (%s)",
            action.model,
            action.index,
            action.node_id,
            action.address,
        )
        await self._audit(
            "replica.orphan",
            f"{action.model}#{action.index} on {action.node_id} at {action.address}",
            action.model,
        )
        return True

    async def _remove_node_replicas(self, node_id: str, reason: str) -> int:
        removed = await self.registry.replicas.remove_on_node(node_id)
        for gone in removed:
            self.view.drop_replica(gone.model, gone.index)
            await self._event("removed", gone, error=reason)
        return len(removed)

    async def _forget(
        self, replica: Replica, reason: str, *, kind: ReplicaEventKind = "failed"
    ) -> None:
        removed = await self.registry.replicas.remove(
            replica.model, replica.index, node_id=replica.node_id
        )
        self.view.drop_replica(replica.model, replica.index)
        await self._event(kind, replica, error=reason)
        if removed is not None:
            await self._audit(
                f"replica.{kind}",
                f"{replica.model}#{replica.index} on {replica.node_id}: {reason}",
                replica.model,
            )

    # --- nodes ----------------------------------------------------------------------------
    async def _register(self, action: RegisterNode) -> None:
        await self.registry.nodes.upsert(
            node_id=action.node_id,
            name=action.name,
            address=action.address,
            token_hash=action.token_hash,
            labels=action.labels,
            memory_budget=action.memory_budget,
            max_replicas_per_model=action.max_replicas_per_model,
            backends=action.backends,
        )
        text = f"{action.name} ({action.node_id}) at {action.address}"
        await self._audit("node.registered", text, action.node_id)
        await self._node_event(action.node_id, "joined")

    async def _heartbeat(self, action: RecordHeartbeat) -> NodeStatus:
        before = await self.registry.nodes.heartbeat(
            action.node_id,
            resources=action.resources,
            processes=action.processes,
            backends=action.backends,
            artifacts=action.artifacts,
            now=action.at,
        )
        if before is None:
            raise NotFound(f"node {action.node_id} is not registered")
        installs = action.installs
        if installs and self._installs.get(action.node_id) != installs:  # only changes
            await self.registry.installs.report(action.node_id, installs)
            self._installs[action.node_id] = installs
        node = await self.registry.nodes.get(action.node_id)
        status = node.status if node else NodeStatus.HEALTHY
        if before != status:
            await self._node_event(action.node_id, "status")
        elif node is not None:
            self.view.put_node(node)
        return status

    async def _mark_node(self, action: MarkNode) -> bool:
        if not await self.registry.nodes.set_status(
            action.node_id, action.status, only_from=[action.previous]
        ):
            return False
        log.info("node %s: %s -> %s", action.node_id, action.previous, action.status)
        text = f"{action.node_id}: {action.previous} -> {action.status}"
        await self._audit("node.status", text, action.node_id)
        await self._node_event(action.node_id, "status")
        return True

    async def _set_labels(self, action: SetNodeLabels) -> None:
        if not await self.registry.nodes.set_labels(action.node_id, action.labels):
            raise NotFound(f"node {action.node_id} not found")
        await self._node_event(action.node_id, "labels")
        await self._audit("node.labels", f"{action.node_id}: {dict(action.labels)}", action.node_id)

    async def _drain(self, action: DrainNode) -> None:
        if not await self.registry.nodes.set_status(action.node_id, NodeStatus.DRAINING):
            raise NotFound(f"node {action.node_id} not found")
        await self._node_event(action.node_id, "status")
        await self._audit("node.draining", action.node_id, action.node_id)

    async def _undrain(self, action: UndrainNode) -> None:
        if not await self.registry.nodes.set_status(
            action.node_id, NodeStatus.HEALTHY, only_from=[NodeStatus.DRAINING]
        ):
            raise NotFound(f"node {action.node_id} is not draining")
        await self._node_event(action.node_id, "status")
        await self._audit("node.undrained", action.node_id, action.node_id)

    async def _deregister(self, action: DeregisterNode) -> int:
        await self.registry.nodes.set_status(action.node_id, NodeStatus.OFFLINE)
        removed = await self._remove_node_replicas(action.node_id, "node deregistered")
        await self._audit("node.deregistered", action.node_id, action.node_id)
        await self._node_event(action.node_id, "status")
        return removed

    # --- models ---------------------------------------------------------------------------
    async def _upsert_model(self, action: UpsertModel) -> bool:
        name = action.spec.name
        if not await self.registry.models.upsert(action.spec, source=action.source):
            return False
        await self._model_event(name)
        origin = "via API" if action.source == "api" else f"from {action.source}"
        await self._audit("model.updated", f"{name} {origin}", name)
        return True

    async def _set_scheduling(self, action: SetScheduling) -> None:
        if not await self.registry.models.set_scheduling(action.model, action.scheduling):
            raise NotFound(f"model {action.model!r} not found", param="name")
        await self._model_event(action.model)
        text = f"{action.model}: {scheduling_to_row(action.scheduling)}"
        await self._audit("model.scheduling", text, action.model)

    async def _remove_model(self, action: RemoveModel) -> None:
        for replica in await self.registry.replicas.all(action.model):
            await self._stop(StopReplica.of(replica, "model deleted"))
        await self.registry.models.delete(action.model)
        await self._model_event(action.model)
        await self._audit("model.deleted", action.model, action.model)

    async def _spec(self, name: str) -> ModelSpec:
        spec = self.view.models.get(name) or await self.registry.models.get(name)
        if spec is None:
            raise ModelNotFound(f"The model '{name}' does not exist", param="model")
        return spec

    # --- events, audit, background ----------------------------------------------------------
    async def _report_load(self, action: ReportLoad) -> None:
        message = LoadProgress(
            model=action.model,
            state=action.state,
            node_id=action.node_id,
            index=action.index,
            error=action.error,
            origin=self.frontend_id,
        )
        self.view.progress[action.model] = message
        await self.bus.publish(self.bus.subjects.load_events(action.model), message)

    async def _event(
        self, kind: ReplicaEventKind, replica: Replica, *, error: str | None = None
    ) -> None:
        await self.bus.publish(
            self.bus.subjects.replica_events,
            ReplicaEvent(
                kind=kind,
                model=replica.model,
                index=replica.index,
                node_id=replica.node_id,
                address=replica.address,
                state=replica.state.value,
                memory=replica.memory,
                error=error,
                origin=self.frontend_id,
            ),
        )

    async def _node_event(self, node_id: str, kind: Literal["joined", "status", "labels"]) -> None:
        node = await self.registry.nodes.get(node_id)
        if node is None:
            self.view.drop_node(node_id)
        else:
            self.view.put_node(node)
        event = NodeEvent(kind=kind, node_id=node_id, origin=self.frontend_id)
        await self.bus.publish(self.bus.subjects.node_events, event)

    async def _model_event(self, name: str) -> None:
        spec = await self.registry.models.get(name)
        if spec is None:
            self.view.drop_model(name)
        else:
            self.view.put_model(spec)
        kind: Literal["updated", "removed"] = "updated" if spec else "removed"
        event = ModelEvent(kind=kind, name=name, origin=self.frontend_id)
        await self.bus.publish(self.bus.subjects.model_events, event)

    async def _audit(self, kind: str, message: str, subject: str) -> None:
        await self.registry.audit.add(kind, message, subject=subject)

    def _spawn(self, coro: Coroutine[Any, Any, Any], action: object = None) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(lambda t: _log_failure(t, action))
        return task


def _ident(action: StopReplica | DropReplica) -> Replica:
    """The replica an action names, as far as the action knows it."""
    return Replica(
        action.model, action.index, action.node_id, ReplicaState.UNLOADING, address=action.address
    )


def _log_failure(task: asyncio.Task[Any], action: object) -> None:
    if task.cancelled() or task.exception() is None:
        return
    exc = task.exception()
    if isinstance(exc, CorralError):
        log.warning("applying %s failed: %s", action, exc.message)
    else:
        log.error("applying %s failed", action, exc_info=exc)

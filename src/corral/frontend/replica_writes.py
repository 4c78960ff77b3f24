"""The actuator's replica actions: start, stop, drop, mark, adopt, remove, stop orphans.

Each method is the one place its action writes: the registry row, this frontend's view, the
replica event and the audit entry (through `Announcer`), and the node's process (through
`NodeClient`, by exact identity).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from corral.domain.actions import (
    AdoptReplica,
    DropReplica,
    MarkUnloading,
    RemoveReplicaRow,
    ReplicaExited,
    ReportLoad,
    StartReplica,
    StopOrphan,
    StopReplica,
)
from corral.domain.entities import ModelSpec, Replica, ReplicaState
from corral.errors import Conflict, CorralError, LoadFailed, ModelNotFound, NodeUnreachable
from corral.frontend.announce import Announcer, ReplicaEventKind
from corral.frontend.node_client import NodeClient
from corral.frontend.view import ClusterView
from corral.store.registry import Registry
from corral.store.replicas import LoadInfo

log = logging.getLogger(__name__)

#: Runs a coroutine in the background (the actuator's, so it is waited for at close).
Spawn = Callable[[Coroutine[Any, Any, Any]], asyncio.Task[Any]]


class ReplicaWrites:
    """Replica rows and processes, with their announcements."""

    def __init__(
        self,
        *,
        registry: Registry,
        view: ClusterView,
        nodes: NodeClient,
        announce: Announcer,
        spawn: Spawn,
    ) -> None:
        self.registry = registry
        self.view = view
        self.nodes = nodes
        self.announce = announce
        self.spawn = spawn

    async def start(self, action: StartReplica) -> Replica:
        """Row LOADING at the spec's current revision, the node starts the process, row LOADED
        at its address, the revision's load information recorded. LoadFailed (row gone, the
        node's own error, recorded as the revision's failed load) otherwise."""
        spec = await self._spec(action.model)
        if not spec.backend:
            raise LoadFailed(f"model {spec.name} has no backend configured")
        record = LoadInfo(
            model=spec.name,
            backend=spec.backend,
            artifact=spec.artifact,
            options=dict(spec.options),
            memory=action.memory,
            node_id=action.node_id,
            load_seconds=0.0,
            loaded_at=0.0,
            revision=spec.config_revision,
        )
        replica = await self.registry.replicas.add(
            spec.name,
            action.node_id,
            memory=action.memory,
            state=ReplicaState.LOADING,
            index=action.index,
            revision=record.revision,
            replaces=action.replaces,
        )
        if replica is None:
            raise Conflict(f"replica {spec.name}#{action.index} already exists")
        await self.announce.replica_put(replica, "updated")
        await self.announce.load(ReportLoad(spec.name, "loading", action.node_id, replica.index))
        started = time.time()
        try:
            reply = await self.nodes.start(
                action.node_id,
                model=spec.name,
                index=replica.index,
                backend=spec.backend,
                options=record.options,
                artifact=spec.artifact,
                memory=action.memory,
            )
        except NodeUnreachable as exc:
            await self._forget(replica, f"node did not answer: {exc.message}")
            raise LoadFailed(
                f"starting {spec.name} on node {action.node_id} failed: {exc.message}",
                retry_after=5,
                no_responders=bool(exc.extra.get("no_responders")),  # not back yet: place again
            ) from None
        except CorralError as exc:  # the model-store artifact is unusable
            await self._failed(replica, record, f"artifact of {spec.name}: {exc.message}")
            raise LoadFailed(f"artifact of {spec.name}: {exc.message}") from None
        if not reply.ok or not reply.address:
            error = reply.error or "the node gave no address"
            await self._failed(replica, record, error)
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
            self.spawn(self.nodes.stop(action.node_id, spec.name, replica.index, reply.address))
            raise LoadFailed(f"replica {spec.name}#{replica.index} was removed while loading")
        now = time.time()
        await self.registry.replicas.record_load_info(
            dataclasses.replace(record, load_seconds=now - started, loaded_at=now)
        )
        await self.announce.replica_put(loaded, "loaded")
        await self.announce.load(ReportLoad(spec.name, "loaded", action.node_id, loaded.index))
        on = self.announce.node_name(action.node_id)
        await self.announce.audit(
            "replica.loaded",
            f"{spec.name}#{loaded.index} loaded on {on} at {reply.address} "
            f"in {now - started:.2f}s (revision {loaded.revision})",
            spec.name,
        )
        return loaded

    async def _failed(self, replica: Replica, record: LoadInfo, error: str) -> None:
        """The revision did not load: its row goes, and its load record says why."""
        await self._forget(replica, error)
        failed = dataclasses.replace(record, error=error[-2000:], failed_at=time.time())
        await self.registry.replicas.record_load_failure(failed)

    async def stop(self, action: StopReplica) -> bool:
        """Out of routing, stopped on its node, row deleted; True when a process stopped.
        A stop planned from a row that is gone since (another stop of it finished between
        the plan's observation and now) does nothing: the replica was stopped already."""
        row = await self.registry.replicas.get(action.model, action.index)
        if row is None or (row.node_id, row.address) != (action.node_id, action.address):
            return False
        self.view.drop_replica(action.model, action.index)
        stopped = await self.nodes.stop(action.node_id, action.model, action.index, action.address)
        await self._forget(_named(action), action.reason, kind="removed")
        return stopped

    async def drop(self, action: DropReplica) -> bool:
        """Row deleted now, process stopped in the background; False when already dropped."""
        if self.view.replicas.get((action.model, action.index)) is None:
            return False  # another request already dropped it
        log.warning("dropping replica %s#%d: %s", action.model, action.index, action.reason)
        self.view.drop_replica(action.model, action.index)
        await self._forget(_named(action), action.reason, kind="removed")
        self.spawn(self.nodes.stop(action.node_id, action.model, action.index, action.address))
        return True

    async def mark(
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
            await self.announce.replica_put(changed, "updated" if unloading else "loaded")
        return changed

    async def unload(self, action: MarkUnloading) -> bool:
        """Out of routing on every frontend; its in-flight requests finish before its stop."""
        marked = await self.mark(action.model, action.index, action.node_id, unloading=True)
        if marked is None:
            return False
        if action.reason:
            on = self.announce.node_name(action.node_id)
            text = f"{action.model}#{action.index} on {on}: {action.reason}"
            await self.announce.audit("replica.unloading", text, action.model)
        return True

    async def adopt(self, action: AdoptReplica) -> bool:
        adopted = await self.mark(
            action.model, action.index, action.node_id, address=action.address
        )
        if adopted is None:
            return False
        log.warning("adopted %s#%d at %s", action.model, action.index, action.address)
        on = self.announce.node_name(action.node_id)
        await self.announce.audit(
            "replica.adopted",
            f"{action.model}#{action.index} on {on} at {action.address}: "
            "its start outlived the frontend that began it",
            action.model,
        )
        return True

    async def remove_row(self, action: RemoveReplicaRow | ReplicaExited) -> bool:
        """Delete the row when it is still on that node (and, for an exit, at that address)."""
        if isinstance(action, ReplicaExited):
            address: str | None = action.address
            reason = f"process exited with {action.returncode}: {action.log_tail[-500:]}"
            kind, text = (
                "replica.exited",
                f"{action.model}#{action.index} on {self.announce.node_name(action.node_id)}",
            )
        else:
            address, reason = None, action.reason
            kind, text = "replica.gone", f"{action.model}#{action.index}"
        removed = await self.registry.replicas.remove(
            action.model, action.index, node_id=action.node_id, address=address
        )
        if removed is None:
            return False
        await self.announce.replica_gone(removed, "removed", reason)
        await self.announce.audit(kind, f"{text}: {reason}", action.model)
        return True

    async def stop_orphan(self, action: StopOrphan) -> bool:
        if not await self.nodes.stop(action.node_id, action.model, action.index, action.address):
            return False  # a report from before its row went: that process was already stopped
        on = self.announce.node_name(action.node_id)
        where = f"{action.model}#{action.index} on {on} at {action.address}"
        log.info("stopped orphan %s", where)
        await self.announce.audit("replica.orphan", where, action.model)
        return True

    async def remove_on_node(self, node_id: str, reason: str) -> int:
        """Delete every replica row of the node; returns how many there were."""
        removed = await self.registry.replicas.remove_on_node(node_id)
        for gone in removed:
            await self.announce.replica_gone(gone, "removed", reason)
        return len(removed)

    async def _forget(
        self, replica: Replica, reason: str, *, kind: ReplicaEventKind = "failed"
    ) -> None:
        removed = await self.registry.replicas.remove(
            replica.model, replica.index, node_id=replica.node_id
        )
        await self.announce.replica_gone(replica, kind, reason)
        if removed is not None:
            where = f"{replica.model}#{replica.index} on {self.announce.node_name(replica.node_id)}"
            await self.announce.audit(f"replica.{kind}", f"{where}: {reason}", replica.model)

    async def _spec(self, name: str) -> ModelSpec:
        spec = self.view.models.get(name) or await self.registry.models.get(name)
        if spec is None:
            raise ModelNotFound(f"The model '{name}' does not exist", param="model")
        return spec


def _named(action: StopReplica | DropReplica) -> Replica:
    """The replica an action names, as far as the action knows it."""
    return Replica(
        action.model, action.index, action.node_id, ReplicaState.UNLOADING, address=action.address
    )

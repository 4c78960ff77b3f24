"""Applies replica decisions: start on a node, stop by exact identity, drop a gone replica.

Shared by the cold path, the reconciler and the self-heal path, so every replica change
updates the registry, this frontend's view and the other frontends (events) the same way.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from corral.bus.client import Bus
from corral.bus.messages import (
    LoadProgress,
    ReplicaEvent,
    StartReplicaCommand,
    StartReplicaReply,
    StopReplicaCommand,
    StopReplicaReply,
)
from corral.domain.entities import ModelSpec, Replica, ReplicaState
from corral.errors import Conflict, CorralError, LoadFailed, NodeUnreachable
from corral.frontend.artifacts_api import ArtifactStore
from corral.frontend.view import ClusterView
from corral.store.registry import Registry
from corral.store.replicas import LoadInfo

log = logging.getLogger(__name__)


def is_store_path(artifact: str) -> bool:
    """A relative path: served from the frontends' model store."""
    return "://" not in artifact and not artifact.startswith("/")


class ReplicaActuator:
    """Starts and stops replicas through their nodes and keeps registry, view and peers in step."""

    def __init__(
        self,
        *,
        registry: Registry,
        bus: Bus,
        view: ClusterView,
        frontend_id: str,
        start_timeout: float,
        stop_timeout: float = 30.0,
        artifacts: ArtifactStore | None = None,
    ) -> None:
        self.registry = registry
        self.artifacts = artifacts
        self.bus = bus
        self.view = view
        self.frontend_id = frontend_id
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self._background: set[asyncio.Task[Any]] = set()

    async def start(
        self,
        spec: ModelSpec,
        node_id: str,
        *,
        memory: int,
        index: int | None = None,
        backend: str | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> Replica:
        """Start one replica of `spec` on `node_id` and wait until it is loaded.

        `backend`/`options` override the spec's (the reconciler replays load information).
        Raises LoadFailed with the node's own error text when the start fails.
        """
        backend = backend or spec.backend
        if not backend:
            raise LoadFailed(f"model {spec.name} has no backend configured")
        options = dict(spec.options if options is None else options)
        replica = await self.registry.replicas.add(
            spec.name, node_id, memory=memory, state=ReplicaState.LOADING, index=index
        )
        if replica is None:
            raise Conflict(f"replica {spec.name}#{index} already exists")
        self.view.put_replica(replica)
        await self._announce("updated", replica)
        await self.progress(spec.name, "loading", node_id=node_id, index=replica.index)
        started = time.time()
        try:
            fetch = await self.artifact_fetch(spec.artifact)
        except CorralError as exc:
            await self._forget(replica, exc.message)
            raise LoadFailed(f"artifact of {spec.name}: {exc.message}") from None
        command = StartReplicaCommand(
            model=spec.name,
            index=replica.index,
            backend=backend,
            options=options,
            artifact=spec.artifact,
            memory=memory,
            ready_timeout=self.start_timeout,
            **fetch,
        )
        try:
            reply = await self.bus.request(
                self.bus.subjects.replica_start(node_id),
                command,
                StartReplicaReply,
                timeout=self.start_timeout + 5,
            )
        except NodeUnreachable as exc:
            await self._forget(replica, f"node did not answer: {exc.message}")
            raise LoadFailed(
                f"starting {spec.name} on node {node_id} failed: {exc.message}", retry_after=5
            ) from None
        if not reply.ok or not reply.address:
            error = reply.error or "the node gave no address"
            await self._forget(replica, error)
            raise LoadFailed(
                f"starting {spec.name} on node {node_id} failed: {error}", retry_after=5
            )
        loaded = await self.registry.replicas.update(
            spec.name,
            replica.index,
            state=ReplicaState.LOADED,
            address=reply.address,
            node_id=node_id,
        )
        if loaded is None:  # the row vanished meanwhile (node went offline): undo the process
            self._spawn(self._stop_on_node(node_id, spec.name, replica.index, reply.address))
            raise LoadFailed(f"replica {spec.name}#{replica.index} was removed while loading")
        now = time.time()
        await self.registry.replicas.record_load_info(
            LoadInfo(
                model=spec.name,
                backend=backend,
                artifact=spec.artifact,
                options=options,
                memory=memory,
                node_id=node_id,
                load_seconds=now - started,
                loaded_at=now,
            )
        )
        self.view.put_replica(loaded)
        await self._announce("loaded", loaded)
        await self.progress(spec.name, "loaded", node_id=node_id, index=loaded.index)
        await self.registry.audit.add(
            "replica.loaded",
            f"{spec.name}#{loaded.index} loaded on {node_id} at {reply.address} "
            f"in {now - started:.2f}s",
            subject=spec.name,
        )
        return loaded

    async def artifact_fetch(self, artifact: str | None) -> dict[str, Any]:
        """Where a node fetches a model-store artifact (relative path) from, with its digest.

        Absolute paths (shared storage) and hf:// references travel as they are.
        """
        if not artifact or not is_store_path(artifact) or self.artifacts is None:
            return {}
        info = await self.artifacts.info(artifact)
        return {
            "artifact_url": "/api/artifacts/" + quote(artifact),
            "artifact_digest": info.digest,
            "artifact_size": info.size,
        }

    async def artifact_size(self, artifact: str | None) -> int | None:
        """Bytes of a model-store artifact (for the memory estimate), when known."""
        if not artifact or not is_store_path(artifact) or self.artifacts is None:
            return None
        try:
            return (await self.artifacts.info(artifact)).size
        except CorralError:
            return None

    async def stop(self, replica: Replica, reason: str) -> bool:
        """Stop exactly this replica on its node, then remove its row and announce it."""
        self.view.drop_replica(replica.model, replica.index)
        stopped = await self._stop_on_node(
            replica.node_id, replica.model, replica.index, replica.address
        )
        await self._forget(replica, reason, kind="removed")
        return stopped

    async def mark(
        self, replica: Replica, state: ReplicaState, *, address: str | None = None
    ) -> Replica | None:
        """Set a replica's state (and address) in the registry, this view and the other
        frontends' views; returns the new row, None when it is gone. UNLOADING takes it out of
        routing before a stop; LOADED adopts a replica whose starter died."""
        changed = await self.registry.replicas.update(
            replica.model, replica.index, state=state, address=address, node_id=replica.node_id
        )
        if changed is not None:
            self.view.put_replica(changed)
            await self._announce("loaded" if state == ReplicaState.LOADED else "updated", changed)
        return changed

    async def drop(self, replica: Replica, reason: str) -> None:
        """A replica turned out gone: remove it now, and stop its process in the background."""
        if self.view.replicas.get(replica.key) is None:
            return  # another request already dropped it
        log.warning("dropping replica %s#%d: %s", replica.model, replica.index, reason)
        self.view.drop_replica(replica.model, replica.index)
        await self._forget(replica, reason, kind="removed")
        self._spawn(
            self._stop_on_node(replica.node_id, replica.model, replica.index, replica.address)
        )

    async def announce_removed(self, replica: Replica, reason: str) -> None:
        """Tell the other frontends a replica row is gone (the caller removed it)."""
        self.view.drop_replica(replica.model, replica.index)
        await self._announce("removed", replica, error=reason)

    async def progress(self, model: str, state: Any, **fields: Any) -> None:
        message = LoadProgress(model=model, state=state, origin=self.frontend_id, **fields)
        self.view.progress[model] = message
        await self.bus.publish(self.bus.subjects.load_events(model), message)

    async def _forget(self, replica: Replica, reason: str, *, kind: Any = "failed") -> None:
        removed = await self.registry.replicas.remove(
            replica.model, replica.index, node_id=replica.node_id
        )
        self.view.drop_replica(replica.model, replica.index)
        await self._announce(kind, replica, error=reason)
        if removed is not None:
            await self.registry.audit.add(
                f"replica.{kind}",
                f"{replica.model}#{replica.index} on {replica.node_id}: {reason}",
                subject=replica.model,
            )

    async def _stop_on_node(
        self, node_id: str, model: str, index: int, address: str | None
    ) -> bool:
        try:
            reply = await self.bus.request(
                self.bus.subjects.replica_stop(node_id),
                StopReplicaCommand(model=model, index=index, address=address),
                StopReplicaReply,
                timeout=self.stop_timeout,
            )
        except NodeUnreachable as exc:
            log.info("stop %s#%d on %s: %s", model, index, node_id, exc.message)
            return False
        return reply.stopped

    async def _announce(self, kind: Any, replica: Replica, *, error: str | None = None) -> None:
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

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

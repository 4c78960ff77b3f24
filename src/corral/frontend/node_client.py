"""The frontend's side of the per-node command subjects: start and stop replicas, by exact identity.

A start names the model-store artifact by a URL on the frontends with its digest and size, so
the node fetches and verifies it; absolute paths and hf:// references travel as they are.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from corral.bus.client import Bus
from corral.bus.messages import (
    StartReplicaCommand,
    StartReplicaReply,
    StopReplicaCommand,
    StopReplicaReply,
)
from corral.errors import NodeUnreachable
from corral.frontend.artifacts_api import ArtifactStore, is_store_path

log = logging.getLogger(__name__)


class NodeClient:
    """Sends replica commands to nodes over NATS."""

    def __init__(
        self,
        bus: Bus,
        *,
        start_timeout: float,
        stop_timeout: float = 30.0,
        artifacts: ArtifactStore | None = None,
    ) -> None:
        self.bus = bus
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.artifacts = artifacts

    async def start(
        self,
        node_id: str,
        *,
        model: str,
        index: int,
        backend: str,
        options: Mapping[str, Any],
        artifact: str | None,
        memory: int,
    ) -> StartReplicaReply:
        """Ask the node to start (model, index) and wait for its answer (it waits until the
        backend is ready). ArtifactError-like CorralErrors when the artifact is unusable,
        NodeUnreachable when the node does not answer."""
        command = StartReplicaCommand(
            model=model,
            index=index,
            backend=backend,
            options=dict(options),
            artifact=artifact,
            memory=memory,
            ready_timeout=self.start_timeout,
            **await self.artifact_fetch(artifact),
        )
        return await self.bus.request(
            self.bus.subjects.replica_start(node_id),
            command,
            StartReplicaReply,
            timeout=self.start_timeout + 5,
        )

    async def stop(self, node_id: str, model: str, index: int, address: str | None) -> bool:
        """Stop exactly (model, index) at `address` on the node; True when a process stopped.
        An unreachable node stops nothing (its processes go with it, or come back as orphans
        the reconciler stops)."""
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

    async def artifact_fetch(self, artifact: str | None) -> dict[str, Any]:
        """Where a node fetches a model-store artifact (relative path) from, with its digest."""
        if not artifact or not is_store_path(artifact) or self.artifacts is None:
            return {}
        info = await self.artifacts.info(artifact)
        return {
            "artifact_url": "/api/artifacts/" + quote(artifact),
            "artifact_digest": info.digest,
            "artifact_size": info.size,
        }

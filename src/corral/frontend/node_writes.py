"""The actuator's node actions: registration, heartbeats, status, labels, drain and departure.

Each method is the one place its action writes: the node row (and what hangs off it), this
frontend's view, the node event and the audit entry.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from corral.domain.actions import (
    DeregisterNode,
    DrainNode,
    MarkNode,
    PatchNodeLabels,
    RecordHeartbeat,
    RegisterNode,
    RemoveNode,
    SetNodeLabels,
    UndrainNode,
)
from corral.domain.entities import NodeStatus
from corral.errors import NotFound
from corral.frontend.announce import Announcer
from corral.frontend.replica_writes import ReplicaWrites
from corral.store.registry import Registry

log = logging.getLogger(__name__)

#: `revoke(node_id, credential_digest)`: cut the NATS connections made with that credential.
Revoke = Callable[[str, str], Awaitable[object]]


class NodeWrites:
    """Node rows, with their announcements."""

    def __init__(self, *, registry: Registry, announce: Announcer, replicas: ReplicaWrites) -> None:
        self.registry = registry
        self.announce = announce
        self.replicas = replicas
        self.revoke: Revoke | None = None  # set when NATS authentication is on
        self._installs: dict[str, Mapping[str, Any]] = {}  # install states last written per node

    async def register(self, action: RegisterNode) -> None:
        """Create the node or update what its worker declares (its fields are the row's); a
        new NATS credential replaces the old one, whose connections are cut."""
        replaced = await self.registry.nodes.upsert(**dataclasses.asdict(action))
        text = f"{action.name} ({action.node_id}) at {action.address}"
        await self.announce.audit("node.registered", text, action.node_id)
        await self.announce.node(action.node_id, "joined")
        if replaced and replaced != action.nats_credential_hash:
            await self._revoke(action.node_id, replaced)

    async def remove(self, action: RemoveNode) -> bool:
        """The node's replica rows, then its row, go; its credentials stop working (the NATS
        connections made with them are cut). False when there was no such node."""
        who = self.announce.node_name(action.node_id)
        await self.replicas.remove_on_node(action.node_id, "node deleted")
        nats_digest = await self.registry.nodes.remove(action.node_id)
        if nats_digest is None:
            return False
        self._installs.pop(action.node_id, None)
        await self.announce.audit("node.removed", who, action.node_id)
        await self.announce.node(action.node_id, "removed")
        if nats_digest:
            await self._revoke(action.node_id, nats_digest)
        return True

    async def _revoke(self, node_id: str, credential_digest: str) -> None:
        if self.revoke is None:
            return
        try:
            await self.revoke(node_id, credential_digest)
        except Exception:  # the digest is gone: new connections are refused all the same
            log.exception("cutting the NATS connections of node %s failed", node_id)

    async def heartbeat(self, action: RecordHeartbeat) -> NodeStatus:
        """Record a heartbeat; returns the node's status after it (NotFound when unknown)."""
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
            await self.announce.node(action.node_id, "status")
        elif node is not None:
            self.announce.node_refreshed(node)
        return status

    async def mark(self, action: MarkNode) -> bool:
        """Set the status only from the one observed; False when something else won."""
        if not await self.registry.nodes.set_status(
            action.node_id, action.status, only_from=[action.previous]
        ):
            return False
        log.info("node %s: %s -> %s", action.node_id, action.previous, action.status)
        text = f"{self.announce.node_name(action.node_id)}: {action.previous} -> {action.status}"
        await self.announce.audit("node.status", text, action.node_id)
        await self.announce.node(action.node_id, "status")
        return True

    async def set_labels(self, action: SetNodeLabels) -> None:
        if not await self.registry.nodes.set_labels(action.node_id, action.labels):
            raise NotFound(f"node {action.node_id} not found")
        await self.announce.node(action.node_id, "labels")
        text = f"{self.announce.node_name(action.node_id)}: {dict(action.labels)}"
        await self.announce.audit("node.labels", text, action.node_id)

    async def patch_labels(self, action: PatchNodeLabels) -> dict[str, str]:
        """Merge the changes into the node's labels; returns its labels after."""
        after = await self.registry.nodes.patch_labels(action.node_id, action.changes)
        if after is None:
            raise NotFound(f"node {action.node_id} not found")
        await self.announce.node(action.node_id, "labels")
        changed = ", ".join(
            f"{k}={v}" if v is not None else f"{k}-" for k, v in action.changes.items()
        )
        text = f"{self.announce.node_name(action.node_id)}: {changed}"
        await self.announce.audit("node.labels", text, action.node_id)
        return after

    async def drain(self, action: DrainNode) -> None:
        if not await self.registry.nodes.set_status(action.node_id, NodeStatus.DRAINING):
            raise NotFound(f"node {action.node_id} not found")
        await self.announce.node(action.node_id, "status")
        who = self.announce.node_name(action.node_id)
        await self.announce.audit("node.draining", who, action.node_id)

    async def undrain(self, action: UndrainNode) -> None:
        if not await self.registry.nodes.set_status(
            action.node_id, NodeStatus.HEALTHY, only_from=[NodeStatus.DRAINING]
        ):
            who = self.announce.node_name(action.node_id)
            raise NotFound(f"node {who} is not draining")
        await self.announce.node(action.node_id, "status")
        who = self.announce.node_name(action.node_id)
        await self.announce.audit("node.undrained", who, action.node_id)

    async def deregister(self, action: DeregisterNode) -> int:
        """Offline now, its replica rows gone; returns how many there were."""
        await self.registry.nodes.set_status(action.node_id, NodeStatus.OFFLINE)
        removed = await self.replicas.remove_on_node(action.node_id, "node deregistered")
        who = self.announce.node_name(action.node_id)
        await self.announce.audit("node.deregistered", who, action.node_id)
        await self.announce.node(action.node_id, "status")
        return removed

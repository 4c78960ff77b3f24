"""What the actuator tells after a registry write: this frontend's view, the event the other
frontends follow (they update their views from it), and the audit log."""

from __future__ import annotations

from typing import Literal

from corral.bus.client import Bus
from corral.bus.messages import LoadProgress, ModelEvent, NodeEvent, ReplicaEvent
from corral.domain.actions import ReportLoad
from corral.domain.entities import Node, Replica
from corral.frontend.view import ClusterView
from corral.store.registry import Registry

ReplicaEventKind = Literal["loaded", "removed", "failed", "updated"]
NodeEventKind = Literal["joined", "status", "labels", "removed"]


class Announcer:
    """Keeps the view, the other frontends and the audit log in step with the registry."""

    def __init__(
        self, *, registry: Registry, bus: Bus, view: ClusterView, frontend_id: str
    ) -> None:
        self.registry = registry
        self.bus = bus
        self.view = view
        self.frontend_id = frontend_id

    async def replica_put(self, replica: Replica, kind: ReplicaEventKind) -> None:
        """The replica (new or changed) is routable as its state says."""
        self.view.put_replica(replica)
        await self._replica_event(kind, replica)

    async def replica_gone(
        self, replica: Replica, kind: ReplicaEventKind, reason: str | None = None
    ) -> None:
        """The replica is no more (its row is deleted, or never came to be)."""
        self.view.drop_replica(replica.model, replica.index)
        await self._replica_event(kind, replica, error=reason)

    async def node(self, node_id: str, kind: NodeEventKind) -> None:
        """The node's row changed: the view takes it from the registry, the others follow.

        Failed loads were judged on the nodes as they were: their verdicts go, so the next
        request on any frontend places anew instead of repeating a stale error."""
        await self.registry.jobs.forget_failed()
        node = await self.registry.nodes.get(node_id)
        if node is None:
            self.view.drop_node(node_id)
        else:
            self.view.put_node(node)
        event = NodeEvent(kind=kind, node_id=node_id, origin=self.frontend_id)
        await self.bus.publish(self.bus.subjects.node_events, event)

    def node_refreshed(self, node: Node) -> None:
        """A heartbeat that changed no status: only this view takes the fresh resources (the
        others read them at their next resync)."""
        self.view.put_node(node)

    async def model(self, name: str) -> None:
        """The model's row changed (or is gone): the view takes it from the registry, and a
        failed load of its old spec or scheduling is forgotten."""
        await self.registry.jobs.forget_failed(name)
        spec = await self.registry.models.get(name)
        if spec is None:
            self.view.drop_model(name)
        else:
            self.view.put_model(spec)
        kind: Literal["updated", "removed"] = "updated" if spec else "removed"
        event = ModelEvent(kind=kind, name=name, origin=self.frontend_id)
        await self.bus.publish(self.bus.subjects.model_events, event)

    async def load(self, action: ReportLoad) -> None:
        """How a load goes, for requests waiting on any frontend."""
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

    def node_name(self, node_id: str) -> str:
        """How messages name a node: "name (id)" when this view knows a name other than the
        id, else the id."""
        node = self.view.nodes.get(node_id)
        return f"{node.name} ({node_id})" if node is not None and node.name != node_id else node_id

    async def audit(self, kind: str, message: str, subject: str) -> None:
        await self.registry.audit.add(kind, message, subject=subject)

    async def _replica_event(
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
                revision=replica.revision,
                replaces=replica.replaces,
            ),
        )

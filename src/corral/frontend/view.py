"""The frontend's in-memory snapshot of the cluster: what the warm path routes on, with no DB trip.

Events from NATS update it as they arrive; a periodic resync from PostgreSQL repairs anything
missed. Candidate lists are cached per model and rebuilt only after a change that can alter
them; a heartbeat (new resources, same status and labels) only updates the free-memory map.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable

from corral.bus.messages import LoadProgress
from corral.domain.entities import ModelSpec, Node, Replica, ReplicaKey, ReplicaState
from corral.domain.routing import Candidates
from corral.store.registry import Registry


class ClusterView:
    """Nodes, models and replicas as this frontend last saw them."""

    def __init__(self) -> None:
        self.nodes: dict[str, Node] = {}
        self.models: dict[str, ModelSpec] = {}
        self.replicas: dict[ReplicaKey, Replica] = {}
        self.last_used: dict[ReplicaKey, float] = {}
        # moving averages of time to first byte, apart for streamed and whole answers
        self.latency: dict[bool, dict[ReplicaKey, float]] = {False: {}, True: {}}
        self.progress: dict[str, LoadProgress] = {}
        self.synced_at = 0.0
        self._candidates: dict[str, list[Replica]] = {}
        self._changed: dict[str, asyncio.Event] = {}
        self._by_model: dict[str, dict[ReplicaKey, Replica]] = {}
        self._free: dict[str, int] | None = None

    # --- reads (hot path) ---------------------------------------------------------------
    def candidates(self, model: str) -> list[Replica]:
        """Loaded replicas of `model` on servable nodes that match its selector now; once one
        runs the spec's current revision, only those (unless the model's rollout routes to
        every revision: `newest_only` off)."""
        cached = self._candidates.get(model)
        if cached is not None:
            return cached
        spec = self.models.get(model)
        if spec is None:
            return []
        replicas = self._by_model.get(model, {}).values()
        found = list(
            Candidates.build(
                replicas,
                self.nodes,
                spec.scheduling,
                revisions={r.key: r.revision for r in replicas},
                revision=spec.config_revision,
                newest_only=spec.rollout.newest_only,
            ).replicas
        )
        self._candidates[model] = found
        return found

    def observe_latency(
        self, key: ReplicaKey, stream: bool, seconds: float, *, weight: float = 0.2
    ) -> None:
        """Fold one time-to-first-byte into the replica's moving average (per answer kind)."""
        averages = self.latency[stream]
        old = averages.get(key)
        averages[key] = seconds if old is None else old + weight * (seconds - old)

    def free_memory(self) -> dict[str, int]:
        """Free memory per node (the pick's third criterion), rebuilt only when nodes change."""
        if self._free is None:
            self._free = {nid: n.resources.ram_free for nid, n in self.nodes.items()}
        return self._free

    def replicas_of(self, model: str) -> list[Replica]:
        return list(self._by_model.get(model, {}).values())

    # --- writes ---------------------------------------------------------------------
    def put_replica(self, replica: Replica) -> None:
        self.replicas[replica.key] = replica
        self._by_model.setdefault(replica.model, {})[replica.key] = replica
        self.last_used.setdefault(replica.key, replica.last_used)
        self._touch(replica.model)

    def drop_replica(self, model: str, index: int) -> Replica | None:
        key = (model, index)
        gone = self.replicas.pop(key, None)
        self._by_model.get(model, {}).pop(key, None)
        self.last_used.pop(key, None)
        for averages in self.latency.values():
            averages.pop(key, None)
        self._touch(model)
        return gone

    def put_node(self, node: Node) -> None:
        old = self.nodes.get(node.id)
        self.nodes[node.id] = node
        if old is not None and old.status == node.status and old.labels == node.labels:
            # a heartbeat: resources and times changed, nothing a candidate list depends on
            if self._free is not None:
                self._free[node.id] = node.resources.ram_free
            return
        self._touch_all()

    def drop_node(self, node_id: str) -> None:
        self.nodes.pop(node_id, None)
        for key in [k for k, r in self.replicas.items() if r.node_id == node_id]:
            self.drop_replica(*key)
        self._touch_all()

    def put_model(self, spec: ModelSpec) -> None:
        self.models[spec.name] = spec
        self._touch(spec.name)

    def drop_model(self, name: str) -> None:
        self.models.pop(name, None)
        self._touch(name)

    def replace_all(
        self, nodes: Iterable[Node], models: Iterable[ModelSpec], replicas: Iterable[Replica]
    ) -> None:
        """Swap in a full snapshot (resync), keeping newer local last-used times."""
        self.nodes = {n.id: n for n in nodes}
        self.models = {m.name: m for m in models}
        old_used = self.last_used
        self.replicas = {}
        self._by_model = {}
        self.last_used = {}
        for r in replicas:
            self.replicas[r.key] = r
            self._by_model.setdefault(r.model, {})[r.key] = r
            self.last_used[r.key] = max(r.last_used, old_used.get(r.key, 0.0))
        for kind, averages in self.latency.items():
            self.latency[kind] = {k: v for k, v in averages.items() if k in self.replicas}
        self.synced_at = time.time()
        self._touch_all()

    async def resync(self, registry: Registry) -> None:
        nodes = await registry.nodes.all()
        models = await registry.models.all()
        replicas = await registry.replicas.all()
        self.replace_all(nodes, models, replicas)

    # --- change notification (cold path waiters) --------------------------------------
    def changed(self, model: str) -> asyncio.Event:
        """An event set on the next change of `model`'s replicas, models or nodes."""
        event = self._changed.get(model)
        if event is None or event.is_set():
            event = self._changed[model] = asyncio.Event()
        return event

    def _touch(self, model: str) -> None:
        self._candidates.pop(model, None)
        event = self._changed.pop(model, None)
        if event is not None:
            event.set()

    def _touch_all(self) -> None:
        self._candidates.clear()
        self._free = None
        events = list(self._changed.values())
        self._changed.clear()
        for event in events:
            event.set()

    def loaded_count(self, model: str) -> int:
        return sum(
            1 for r in self._by_model.get(model, {}).values() if r.state == ReplicaState.LOADED
        )

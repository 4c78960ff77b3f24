"""Draining a node: replacements first, then each replica stops once its in-flight reaches zero.

The node is marked draining before this runs, so it takes no new replicas while its loaded
ones keep serving until their replacements are up. Then each replica is marked UNLOADING on
every frontend (no new request goes to it), its in-flight requests finish (bounded by the
drain timeout), and it stops; no request fails because of a drain.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable

from corral.domain.entities import ModelSpec, Replica, ReplicaState
from corral.errors import CorralError
from corral.frontend.actuator import ReplicaActuator
from corral.frontend.coldpath import ColdLoader
from corral.frontend.inflight import InflightTracker
from corral.frontend.view import ClusterView
from corral.store.registry import Registry

log = logging.getLogger(__name__)


def needs_replacement(
    replica: Replica, spec: ModelSpec | None, others: int, inflight: int, now: float
) -> bool:
    """Whether moving `replica` off its node calls for a new replica elsewhere.

    Yes when the model would fall below its minimum, or when this is its last loaded replica
    and it is in use (busy now or used within the scale-down delay).
    """
    if spec is None:
        return False
    if others < spec.scheduling.min_replicas:
        return True
    recently_used = now - replica.last_used < spec.scheduling.scale_down_delay
    return others == 0 and (inflight > 0 or recently_used)


class Drainer:
    """Moves every replica off one node."""

    def __init__(
        self,
        *,
        registry: Registry,
        view: ClusterView,
        inflight: InflightTracker,
        actuator: ReplicaActuator,
        cold: ColdLoader,
        timeout: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = registry
        self.view = view
        self.inflight = inflight
        self.actuator = actuator
        self.cold = cold
        self.timeout = timeout
        self.clock = clock

    async def drain(self, node_id: str) -> int:
        """Drain `node_id`; returns how many replicas were stopped."""
        replicas = [r for r in await self.registry.replicas.all() if r.node_id == node_id]
        results = await asyncio.gather(*(self._move(r) for r in replicas), return_exceptions=True)
        for replica, result in zip(replicas, results, strict=True):
            if isinstance(result, BaseException):
                log.warning("draining %s#%d failed: %s", replica.model, replica.index, result)
        await self.registry.audit.add(
            "node.drained", f"{node_id}: {len(replicas)} replicas moved", subject=node_id
        )
        return sum(1 for r in results if r is True)

    async def _move(self, replica: Replica) -> bool:
        spec = self.view.models.get(replica.model)
        others = [
            r
            for r in await self.registry.replicas.all(replica.model)
            if r.node_id != replica.node_id and r.state == ReplicaState.LOADED
        ]
        used = self.view.last_used.get(replica.key, replica.last_used)
        current = dataclasses.replace(replica, last_used=used)
        if spec is not None and needs_replacement(
            current, spec, len(others), self.inflight.total(replica.key), time.time()
        ):
            try:
                node_id, estimate = await self.cold.choose_node(spec)
                await self.actuator.start(spec, node_id, memory=estimate)
            except CorralError as exc:
                log.warning("no replacement for %s#%d: %s", *replica.key, exc.message)
        if await self.actuator.mark(replica, ReplicaState.UNLOADING) is None:
            return False  # gone meanwhile (its process exited, or the node went offline)
        deadline = self.clock() + self.timeout
        while self.inflight.total(replica.key) > 0 and self.clock() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)  # in-flight counts change with every response
        return await self.actuator.stop(replica, "node drained")

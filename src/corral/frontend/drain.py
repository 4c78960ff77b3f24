"""Draining a node: replacements first, then each replica stops once its in-flight reaches zero.

The node is marked draining first, so it takes no new replicas while its loaded ones keep
serving until their replacements are up. Then each replica is marked UNLOADING on every
frontend (no new request goes to it), its in-flight requests finish (bounded by the drain
timeout), and it stops; no request fails because of a drain. Every change is an action.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable

from corral.bus.contracts import DrainReply
from corral.domain.actions import (
    DrainNode,
    MarkUnloading,
    ReportDrained,
    StartReplica,
    StopReplica,
)
from corral.domain.entities import ModelSpec, Replica, ReplicaState
from corral.errors import CorralError
from corral.frontend.coldpath import ColdLoader
from corral.frontend.parts import Parts

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
        parts: Parts,
        *,
        cold: ColdLoader,
        timeout: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = parts.registry
        self.view = parts.view
        self.inflight = parts.inflight
        self.actuator = parts.actuator
        self.cold = cold
        self.timeout = timeout
        self.clock = clock
        self._drains: set[asyncio.Task[int]] = set()

    async def request(self, node_id: str, *, wait: bool) -> DrainReply:
        """Mark the node draining (NotFound for an unknown node) and move its replicas away,
        now or in the background."""
        await self.actuator.apply(DrainNode(node_id))
        if wait:
            stopped = await self.drain(node_id)
            return DrainReply(node_id=node_id, status="drained", stopped_replicas=stopped)
        task = asyncio.create_task(self.drain(node_id), name=f"drain:{node_id}")
        self._drains.add(task)
        task.add_done_callback(self._drains.discard)
        return DrainReply(node_id=node_id, status="draining")

    async def drain(self, node_id: str) -> int:
        """Move every replica off `node_id` (already draining); returns how many stopped."""
        replicas = [r for r in await self.registry.replicas.all() if r.node_id == node_id]
        results = await asyncio.gather(*(self._move(r) for r in replicas), return_exceptions=True)
        for replica, result in zip(replicas, results, strict=True):
            if isinstance(result, BaseException):
                log.warning("draining %s#%d failed: %s", replica.model, replica.index, result)
        await self.actuator.apply(ReportDrained(node_id, len(replicas)))
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
                node_id, estimate = await self.cold.choose_node(spec, wait_for_nodes=False)
                reason = f"replaces {replica.model}#{replica.index} (drain)"
                await self.actuator.apply(
                    StartReplica(spec.name, node_id, None, spec.backend, estimate, reason)
                )
            except CorralError as exc:
                log.warning("no replacement for %s#%d: %s", *replica.key, exc.message)
        unloading = MarkUnloading(replica.model, replica.index, replica.node_id)
        if not await self.actuator.apply(unloading):
            return False  # gone meanwhile (its process exited, or the node went offline)
        deadline = self.clock() + self.timeout
        while self.inflight.total(replica.key) > 0 and self.clock() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)  # in-flight counts change with every response
        return await self.actuator.apply(StopReplica.of(replica, "node drained"))

    async def close(self) -> None:
        for task in list(self._drains):
            task.cancel()
        await asyncio.gather(*self._drains, return_exceptions=True)

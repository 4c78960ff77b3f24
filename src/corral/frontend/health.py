"""Replica health probes beside the reconcile tick: several misses in a row drop a replica.

Only LOADED replicas with nothing in flight are probed (busy is not dead: a busy replica is
never probed), and only when the probe cache holds no fresh success for them. A replica that
misses `PROBE_MISSES` probes in a row gets a `DropReplica`. One round runs at a time, in the
background, so a hung backend never stalls a tick.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from corral.domain.actions import DropReplica
from corral.domain.entities import Replica, ReplicaState
from corral.frontend.actuator import Actuator
from corral.frontend.inflight import InflightTracker
from corral.frontend.probe import ProbeCache

log = logging.getLogger(__name__)

PROBE_MISSES = 3  # consecutive failed probes before a loaded replica is dropped


class ReplicaHealth:
    """Counts consecutive probe misses per replica (model, index, address)."""

    def __init__(
        self, *, probes: ProbeCache, inflight: InflightTracker, actuator: Actuator
    ) -> None:
        self.probes = probes
        self.inflight = inflight
        self.actuator = actuator
        self._misses: dict[tuple[str, int, str], int] = {}
        self._round: asyncio.Task[None] | None = None

    def start_round(self, replicas: Sequence[Replica]) -> None:
        """Probe `replicas` in the background, unless the previous round still runs."""
        if self._round is None or self._round.done():
            self._round = asyncio.create_task(self._guarded(replicas))

    async def _guarded(self, replicas: Sequence[Replica]) -> None:
        try:
            await self.probe(replicas)
        except Exception:
            log.exception("probing replicas failed")

    async def probe(self, replicas: Sequence[Replica]) -> None:
        """One round: probe the idle loaded replicas among `replicas`, drop the ones that
        missed too often, forget the misses of replicas no longer among them."""
        targets = [
            r
            for r in replicas
            if r.state == ReplicaState.LOADED
            and r.address
            and self.inflight.total(r.key) == 0  # busy is not dead: never probe it
            and not self.probes.fresh(r.node_id, r.address)
        ]
        if not targets:
            return
        reasons = await asyncio.gather(
            *(self.probes.check(r.node_id, r.address or "", r.model) for r in targets)
        )
        seen = set()
        for replica, reason in zip(targets, reasons, strict=True):
            key = (replica.model, replica.index, replica.address or "")
            seen.add(key)
            if reason is None:
                self._misses.pop(key, None)
                continue
            misses = self._misses.get(key, 0) + 1
            self._misses[key] = misses
            if misses >= PROBE_MISSES:
                self._misses.pop(key, None)
                why = f"{misses} probes failed: {reason}"
                await self.actuator.apply(DropReplica.of(replica, why))
        for key in [k for k in self._misses if k not in seen]:
            del self._misses[key]

    async def close(self) -> None:
        if self._round is not None:
            self._round.cancel()
            await asyncio.gather(self._round, return_exceptions=True)

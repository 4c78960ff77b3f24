"""Routing's prompt-prefix index shared by the frontends: batches out, other frontends' batches in.

Every `prefix_share_interval` (0.2 s by default) a frontend publishes what it routed since the
last batch (`PrefixIndex.export`: per replica, the hashes it newly wrote, at most `max_export`)
on `Subjects.prefix_index`, and folds the other frontends' batches into its own index
(`PrefixIndex.merge`), so a prompt family routed through one frontend is found warm through
another. A batch is a hint: a lost one costs cache hits, not correctness. Nothing is sent while
nothing was routed among two or more replicas.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from corral.bus.client import Bus, decode
from corral.bus.messages import PrefixReport
from corral.domain.prefix import PrefixBatch, PrefixIndex


class PrefixShare:
    """Publishes this frontend's prefix observations and merges the others' (module doc)."""

    def __init__(
        self,
        bus: Bus,
        index: PrefixIndex,
        frontend_id: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.bus = bus
        self.index = index
        self.frontend_id = frontend_id
        self.clock = clock
        self.sent = 0  # batches published
        self.merged = 0  # batches from other frontends folded in

    async def open(self) -> None:
        """Start merging the other frontends' batches."""
        await self.bus.subscribe(self.bus.subjects.prefix_index, self.on_report)

    async def publish(self) -> None:
        """Send what was routed since the last call (nothing when nothing was)."""
        batch = self.index.export()
        if batch is None:
            return
        report = PrefixReport(
            origin=self.frontend_id,
            at=batch.at,
            items=[(m, i, list(hs)) for m, i, hs in batch.items],
        )
        await self.bus.publish(self.bus.subjects.prefix_index, report)
        self.sent += 1

    async def on_report(self, payload: bytes) -> None:
        report = decode(payload, PrefixReport)
        if report is None or report.origin == self.frontend_id:
            return
        batch = PrefixBatch(report.at, tuple((m, i, tuple(hs)) for m, i, hs in report.items))
        self.index.merge(batch, self.clock())
        self.merged += 1

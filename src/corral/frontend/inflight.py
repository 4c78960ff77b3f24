"""In-flight request counts per replica: this frontend's own, plus what other frontends report."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping

from corral.bus.messages import LoadReport
from corral.domain.entities import ReplicaKey


class Slot:
    """One reserved request slot on a replica; `release()` is safe to call any number of times."""

    __slots__ = ("_tracker", "key", "released")

    def __init__(self, tracker: InflightTracker, key: ReplicaKey) -> None:
        self._tracker = tracker
        self.key = key
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._tracker._decrement(self.key)


class InflightTracker:
    """Counts requests in flight; a Mapping-like view of the cluster-wide totals for `pick`."""

    def __init__(
        self, frontend_id: str, *, stale_after: float = 2.0, clock: Callable[[], float] = time.time
    ) -> None:
        self.frontend_id = frontend_id
        self.stale_after = stale_after
        self.clock = clock
        self.local: dict[ReplicaKey, int] = {}
        self._remote: dict[str, tuple[float, dict[ReplicaKey, int]]] = {}
        self._remote_sum: dict[ReplicaKey, int] = {}
        self.version = 0  # bumped on every local change; reporters skip unchanged states
        self._view = TotalView(self)

    # --- local --------------------------------------------------------------------------
    def acquire(self, key: ReplicaKey) -> Slot:
        self.local[key] = self.local.get(key, 0) + 1
        self.version += 1
        return Slot(self, key)

    def _decrement(self, key: ReplicaKey) -> None:
        count = self.local.get(key, 0) - 1
        if count > 0:
            self.local[key] = count
        else:
            self.local.pop(key, None)
        self.version += 1

    def local_total(self) -> int:
        return sum(self.local.values())

    # --- remote -------------------------------------------------------------------------
    def report(self) -> LoadReport:
        """This frontend's counts, to broadcast."""
        return LoadReport(
            frontend_id=self.frontend_id,
            inflight=[(m, i, c) for (m, i), c in self.local.items()],
            at=self.clock(),
        )

    def merge(self, report: LoadReport) -> None:
        """Take another frontend's report (our own echo is ignored)."""
        if report.frontend_id == self.frontend_id:
            return
        self._remote[report.frontend_id] = (
            self.clock(),
            {(m, i): c for m, i, c in report.inflight if c > 0},
        )
        self._recompute()

    def expire(self) -> None:
        """Forget reports from frontends that stopped reporting (they died)."""
        cutoff = self.clock() - self.stale_after
        stale = [fid for fid, (at, _) in self._remote.items() if at < cutoff]
        for fid in stale:
            del self._remote[fid]
        if stale:
            self._recompute()

    def _recompute(self) -> None:
        total: dict[ReplicaKey, int] = {}
        for _, counts in self._remote.values():
            for key, count in counts.items():
                total[key] = total.get(key, 0) + count
        self._remote_sum = total

    # --- the view pick() reads ----------------------------------------------------------
    def total(self, key: ReplicaKey) -> int:
        return self.local.get(key, 0) + self._remote_sum.get(key, 0)

    def view(self) -> TotalView:
        return self._view


class TotalView(Mapping[ReplicaKey, int]):
    """Read-only Mapping of cluster-wide in-flight counts (local + remote)."""

    __slots__ = ("_t",)

    def __init__(self, tracker: InflightTracker) -> None:
        self._t = tracker

    def __getitem__(self, key: ReplicaKey) -> int:
        return self._t.local.get(key, 0) + self._t._remote_sum.get(key, 0)

    def get(self, key: ReplicaKey, default: int | None = 0) -> int:  # type: ignore[override]
        return self._t.local.get(key, 0) + self._t._remote_sum.get(key, 0)

    def __iter__(self) -> Iterator[ReplicaKey]:
        return iter(set(self._t.local) | set(self._t._remote_sum))

    def __len__(self) -> int:
        return len(set(self._t.local) | set(self._t._remote_sum))

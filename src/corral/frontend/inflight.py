"""Load per replica and per model: this frontend's own, plus what the other frontends report.

Per replica: requests in flight. Per model: requests waiting in the admission queue (depth and
the longest wait, set by the queue through `set_queue`) and the 90th percentile of recent
times to first byte (fed by `observe_ttft`); the autoscaler reads the cluster-wide sums and
maxima.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping

from corral.bus.messages import LoadReport, ModelLoad
from corral.domain.entities import ReplicaKey

#: Times to first byte kept per model for its p90.
TTFT_WINDOW = 128


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
        self._queues: dict[str, tuple[int, float]] = {}  # model -> (depth, longest wait)
        self._ttft: dict[str, deque[float]] = {}
        self._remote_models: dict[str, dict[str, ModelLoad]] = {}

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

    # --- per model ----------------------------------------------------------------------
    def set_queue(self, model: str, depth: int, wait: float) -> None:
        """This frontend's admission queue for `model`: its depth and its longest wait."""
        if depth > 0:
            self._queues[model] = (depth, wait)
        else:
            self._queues.pop(model, None)
        self.version += 1

    def observe_ttft(self, model: str, seconds: float) -> None:
        """One answer's time to first byte."""
        window = self._ttft.get(model)
        if window is None:
            window = self._ttft[model] = deque(maxlen=TTFT_WINDOW)
        window.append(seconds)

    def local_models(self) -> list[ModelLoad]:
        """This frontend's per-model signals."""
        out: dict[str, ModelLoad] = {}
        for model, (depth, wait) in self._queues.items():
            out[model] = ModelLoad(model=model, queued=depth, queue_wait=wait)
        for model, window in self._ttft.items():
            p90 = percentile(window, 0.9)
            base = out.get(model) or ModelLoad(model=model)
            out[model] = base.model_copy(update={"ttft_p90": p90})
        return list(out.values())

    def queued(self, model: str) -> int:
        """Requests waiting for `model` on every frontend."""
        return sum(m.queued for m in self._model_loads(model))

    def queue_wait(self, model: str) -> float:
        """The longest wait of a request for `model` on any frontend (0 when none waits)."""
        return max((m.queue_wait for m in self._model_loads(model)), default=0.0)

    def ttft_p90(self, model: str) -> float | None:
        """The highest p90 time to first byte any frontend reports for `model`."""
        values = [m.ttft_p90 for m in self._model_loads(model) if m.ttft_p90 is not None]
        return max(values, default=None)

    def _model_loads(self, model: str) -> list[ModelLoad]:
        found = [m for m in self.local_models() if m.model == model]
        for loads in self._remote_models.values():
            if model in loads:
                found.append(loads[model])
        return found

    # --- remote -------------------------------------------------------------------------
    def report(self) -> LoadReport:
        """This frontend's counts, to broadcast."""
        return LoadReport(
            frontend_id=self.frontend_id,
            inflight=[(m, i, c) for (m, i), c in self.local.items()],
            at=self.clock(),
            models=self.local_models(),
        )

    def merge(self, report: LoadReport) -> None:
        """Take another frontend's report (our own echo is ignored)."""
        if report.frontend_id == self.frontend_id:
            return
        self._remote[report.frontend_id] = (
            self.clock(),
            {(m, i): c for m, i, c in report.inflight if c > 0},
        )
        self._remote_models[report.frontend_id] = {m.model: m for m in report.models}
        self._recompute()

    def expire(self) -> None:
        """Forget reports from frontends that stopped reporting (they died)."""
        cutoff = self.clock() - self.stale_after
        stale = [fid for fid, (at, _) in self._remote.items() if at < cutoff]
        for fid in stale:
            del self._remote[fid]
            self._remote_models.pop(fid, None)
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

    def totals(self) -> tuple[Mapping[ReplicaKey, int], Mapping[ReplicaKey, int]]:
        """(this frontend's counts, the other frontends' summed), for loops over replicas."""
        return self.local, self._remote_sum

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


def percentile(values: Iterable[float], q: float) -> float | None:
    """The `q` quantile (nearest rank) of `values`, None when there are none."""
    ordered = sorted(values)
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]

"""The autoscaler's load signals per model, averaged between reconcile ticks.

`sample()` runs with every load report (a few times a second) and reads, for each model that
scales on a signal, its value now from the cluster-wide load (`InflightTracker`: this
frontend's counts plus the other frontends' reports):

- `inflight_per_replica`: requests in flight on the model's loaded replicas plus requests
  waiting for it, divided by the number of loaded replicas (at least one);
- `queue_wait`: the longest wait of a request in any frontend's admission queue (0 when none
  waits, or while no frontend has an admission queue);
- `ttft_p90`: the highest p90 time to first byte a frontend reports (no value while none
  does: the autoscaler then holds).

`take(now)` returns each model's mean since the previous `take` as one `Sample` (a model never
sampled since then is sampled once now), so the reconciler gets one smoothed sample per tick.
Nothing here is on the request path.
"""

from __future__ import annotations

from corral.domain.autoscale import Sample, Signal
from corral.domain.entities import ModelSpec, ReplicaState
from corral.frontend.inflight import InflightTracker
from corral.frontend.view import ClusterView


class LoadSignals:
    """Running means of each scaling model's signal."""

    def __init__(self, view: ClusterView, inflight: InflightTracker) -> None:
        self.view = view
        self.inflight = inflight
        self._sums: dict[str, tuple[float, int]] = {}  # model -> (sum, count) since take
        self.latest: dict[str, float] = {}  # model -> its value at the last sample

    def value(self, spec: ModelSpec) -> float | None:
        """The model's signal now (None: no value, or the model does not scale on one)."""
        scaling = spec.scheduling.scaling
        if scaling is None:
            return None
        if scaling.metric == Signal.QUEUE_WAIT:
            return self.inflight.queue_wait(spec.name)
        if scaling.metric == Signal.TTFT_P90:
            return self.inflight.ttft_p90(spec.name)
        loaded = [r for r in self.view.replicas_of(spec.name) if r.state == ReplicaState.LOADED]
        busy = sum(self.inflight.total(r.key) for r in loaded) + self.inflight.queued(spec.name)
        return busy / max(1, len(loaded))

    def sample(self) -> None:
        """Add every scaling model's value now to its running mean."""
        for spec in self.view.models.values():
            self._add(spec)

    def take(self, now: float) -> dict[str, Sample]:
        """Each model's mean since the last take, as a sample at `now`; restarts the means."""
        for spec in self.view.models.values():
            if spec.name not in self._sums:
                self._add(spec)
        sums, self._sums = self._sums, {}
        return {m: Sample(now, total / count) for m, (total, count) in sums.items() if count}

    def _add(self, spec: ModelSpec) -> None:
        value = self.value(spec)
        if value is None:
            return
        total, count = self._sums.get(spec.name, (0.0, 0))
        self._sums[spec.name] = (total + value, count + 1)
        self.latest[spec.name] = value

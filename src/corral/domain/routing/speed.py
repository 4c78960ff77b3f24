"""Learned speed of a model's replicas: time to first byte, decayed, explored, with a dead zone.

One `SpeedTracker` per model (and per answer kind if the caller tells streamed and whole
answers apart). Pure: every call takes `now`. Call contract:

- `observe(replica, seconds, now)` with a time to first byte that reflects the replica's own
  speed (today's proxy samples requests a replica served alone, so queueing does not count);
- `ratios(now)` on each request -> {replica: slowness >= 1}, only for replicas measurably slower
  than the fastest (missing = 1.0). The map is recomputed in full at most every `refresh`
  seconds (or after a sample that is a new fastest); any other sample updates its own replica's
  ratio in O(1), so neither a request nor a sample costs O(replicas);
- `forget(replica)` when it goes away.

Why a replica cannot starve (the old pick let one early sample 12.5 % slower lose every tie
forever, splitting 30 sequential requests 9/20/1 over three equal replicas):

- decay: an estimate not refreshed for `half_life` seconds moves half way to the model's mean,
  so an old verdict fades;
- exploration: a replica without a sample for `explore_after` seconds counts as fast (ratio 1)
  until it gets one, so it takes its turn and is measured again;
- dead zone: the ratio is `max(1, (estimate + floor) / (fastest + floor) - (tolerance - 1))`,
  so replicas within `tolerance` of the fastest are exactly equal (ties rotate evenly) and the
  ratio grows continuously past it (no cliff at the boundary): 3x slower is 2.75 with the
  default 1.25. `floor` (seconds, default 0) is an absolute allowance: the frontend sets a few
  milliseconds, so replicas answering in 1 ms are not told apart by a GC pause or a connection
  set up (at concurrency 1 any ratio above 1 loses every tie until exploration).

Samples are folded into an exponential moving average (`alpha` per sample, `alpha_up` for a
sample above the estimate when set) after decaying the old estimate to `now`. With
`min_samples` > 1 a replica's estimate is the fastest of its first `min_samples` samples and it
gets no ratio before then: timing noise is upward (a GC pause, a busy core, a connection set
up), so one unlucky early sample cannot make an equal replica lose every tie.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from corral.domain.entities import ReplicaKey

LN2 = math.log(2.0)


class SpeedTracker:
    """Time-to-first-byte estimates of one model's replicas (contract in the module doc)."""

    def __init__(
        self,
        *,
        alpha: float = 0.3,
        half_life: float = 30.0,
        explore_after: float = 10.0,
        tolerance: float = 1.25,
        refresh: float = 1.0,
        floor: float = 0.0,
        alpha_up: float | None = None,
        min_samples: int = 1,
    ) -> None:
        self.alpha = alpha
        self.half_life = half_life
        self.explore_after = explore_after
        self.tolerance = tolerance
        self.refresh = refresh
        self.floor = floor
        self.alpha_up = alpha if alpha_up is None else alpha_up
        self.min_samples = min_samples
        self._samples: dict[ReplicaKey, int] = {}
        self._estimate: dict[ReplicaKey, float] = {}
        self._sampled: dict[ReplicaKey, float] = {}
        self._sum = 0.0  # of the estimates: the mean in O(1)
        self._ratios: dict[ReplicaKey, float] = {}
        self._fastest = 0.0  # as of the last full computation
        self._computed = float("-inf")
        self._dirty = True

    def observe(self, replica: ReplicaKey, seconds: float, now: float) -> None:
        """Fold one time to first byte of `replica` into its estimate (O(1))."""
        if seconds < 0:
            return
        old = self.estimate(replica, now)
        count = self._samples[replica] = self._samples.get(replica, 0) + 1
        if old is None:
            new = seconds
        elif count <= self.min_samples:
            new = min(old, seconds)
        else:
            new = old + (self.alpha if seconds <= old else self.alpha_up) * (seconds - old)
        self._sum += new - self._estimate.get(replica, 0.0)
        self._estimate[replica] = new
        self._sampled[replica] = now
        if count < self.min_samples:
            self._ratios.pop(replica, None)
        elif count == self.min_samples or self._dirty or not 0 < self._fastest < new:
            self._dirty = True  # a new fastest moves every ratio: recompute them all
        else:
            self._set_ratio(replica, new)

    def forget(self, replica: ReplicaKey) -> None:
        """`replica` went away: drop what was learned about it."""
        est = self._estimate.pop(replica, None)
        if est is not None:
            self._sum -= est
        self._sampled.pop(replica, None)
        self._samples.pop(replica, None)
        self._dirty = True

    def estimate(self, replica: ReplicaKey, now: float) -> float | None:
        """The replica's estimate decayed to `now` toward the model's mean (None: no sample)."""
        est = self._estimate.get(replica)
        if est is None:
            return None
        return self._decayed(est, self._sampled[replica], now, self._mean())

    def ratios(self, now: float) -> Mapping[ReplicaKey, float]:
        """Replica -> slowness relative to the fastest, for the measurably slower ones only.

        Recomputed in full at most every `refresh` seconds (decay and exploration move slowly)
        or when a sample set a new fastest; a sample updates its own replica's ratio at once.
        """
        if not self._dirty and now - self._computed < self.refresh:
            return self._ratios
        self._dirty = False
        self._computed = now
        mean = self._mean()
        enough = self.min_samples
        samples = self._samples
        current = {
            k: self._decayed(e, self._sampled[k], now, mean)
            for k, e in self._estimate.items()
            if samples[k] >= enough
        }
        self._fastest = min((e for e in current.values() if e > 0), default=0.0)
        self._ratios.clear()
        if self._fastest > 0:
            for k, e in current.items():
                if now - self._sampled[k] <= self.explore_after:  # else exploring: counts as fast
                    self._set_ratio(k, e)
        return self._ratios

    def _set_ratio(self, replica: ReplicaKey, estimate: float) -> None:
        floor = self.floor
        ratio = (estimate + floor) / (self._fastest + floor) - (self.tolerance - 1.0)
        if ratio > 1.0:
            self._ratios[replica] = ratio
        else:
            self._ratios.pop(replica, None)

    def _mean(self) -> float:
        n = len(self._estimate)
        return self._sum / n if n else 0.0

    def _decayed(self, est: float, sampled: float, now: float, mean: float) -> float:
        age = now - sampled
        if age <= 0 or self.half_life <= 0:
            return est
        return mean + (est - mean) * math.exp(-LN2 * age / self.half_life)

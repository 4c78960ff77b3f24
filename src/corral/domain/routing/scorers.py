"""The scorers of the routing pipeline and the per-model weights that combine them.

Each scorer gives every candidate a score in [0, 1], higher is better; `route` sums them
weighted by `RoutingWeights`. Load is dense (a list parallel to the candidates); the others are
sparse, a map from replica to score for the few candidates that differ from the scorer's
`default` (affinity 0, speed 1), so a request pays for what it matches, not for every candidate.

- load: the expected wait of one more request, relative to the model's concurrency `C`
  (`max_concurrency`, or `RoutingWeights.concurrency` when it has none):
  `C / (C + (load + 1) * slowness - 1)`, with `load` = in-flight (cluster-wide) + queued and
  `slowness` >= 1 from `SpeedTracker.ratios`. For a replica as fast as the fastest it is
  `C / (C + load)`: 1 when idle, 1/2 at one full concurrency, always decreasing, so a burst
  spreads. A slower replica ranks as its expected completion time, (load + 1) x slowness
  (shortest expected delay): idle it loses to an idle fast one, and under a burst a replica 3x
  slower takes about a third of a fast one's share instead of an equal one, or none.
- prefix affinity (default 0): the fraction of the request's prefix blocks the replica served
  recently, which is what `PrefixIndex.match` returns.
- session affinity (default 0): 1 for the replica that served the request's session last.
- speed (default 1): `1 / slowness`. Slowness already ranks replicas inside the load score, so
  the default weight is 0; a positive weight prefers fast replicas beyond their expected wait
  (a constant bonus, so under a deep backlog it can starve a slow replica: use with care).
Load guard: an affinity score counts only on a candidate whose load is at most the least loaded
candidate's plus `affinity_slack * C`; past that the replica is treated as any other, so a hot
prefix or session cannot pile work on one replica while others idle.
"""

from __future__ import annotations

from collections.abc import Sequence

from corral.domain.routing_weights import DEFAULT_WEIGHTS, RoutingWeights

__all__ = ["DEFAULT_WEIGHTS", "RoutingWeights", "load_score", "load_scores", "within_guard"]


def load_scores(loads: Sequence[int], concurrency: float, weight: float = 1.0) -> list[float]:
    """`weight * C / (C + load)` per candidate: the load score at slowness 1."""
    c = concurrency
    wc = weight * c
    return [wc / (c + x) for x in loads]


def load_score(load: int, slowness: float, concurrency: float) -> float:
    """`C / (C + (load + 1) * slowness - 1)` for one candidate."""
    return concurrency / (concurrency + (load + 1) * slowness - 1.0)


def within_guard(load: int, least: int, slack: float) -> bool:
    """True when an affinity may count on a candidate with `load` (least loaded: `least`)."""
    return load <= least + slack

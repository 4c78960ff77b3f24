"""Each candidate's scores as `route` weighs them: what the opt-in debug header shows.

`explain` repeats `route`'s arithmetic per candidate (load with slowness, the speed bonus, the
affinities behind their load guard, the not-full filter) and returns the parts, so an operator
can see why a replica won. It is O(candidates) and allocates per candidate: only for requests
that ask for it, never on the ordinary path.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from corral.domain.entities import ReplicaKey
from corral.domain.routing.candidates import Candidates
from corral.domain.routing.scorers import DEFAULT_WEIGHTS, RoutingWeights, load_score, within_guard


@dataclass(frozen=True, slots=True)
class Scores:
    """One candidate's unweighted scores, its load, and its weighted total (None: full)."""

    replica: ReplicaKey
    node_id: str
    load: int
    load_score: float
    prefix: float
    session: float
    speed: float
    total: float | None


def explain(
    cands: Candidates,
    inflight: Mapping[ReplicaKey, int],
    *,
    weights: RoutingWeights = DEFAULT_WEIGHTS,
    max_concurrency: int | None = None,
    queued: Mapping[ReplicaKey, int] | None = None,
    prefix: Mapping[ReplicaKey, float] | None = None,
    session: ReplicaKey | None = None,
    speed: Mapping[ReplicaKey, float] | None = None,
    limit: int = 64,
) -> list[Scores]:
    """The scores of the first `limit` candidates (index order), as `route` computes them."""
    keys = cands.keys[:limit]
    loads = [inflight.get(k, 0) + (queued.get(k, 0) if queued else 0) for k in keys]
    if not keys:
        return []
    scale = float(max_concurrency or weights.concurrency)
    least = min(inflight.get(k, 0) + (queued.get(k, 0) if queued else 0) for k in cands.keys)
    slack = weights.affinity_slack * scale
    out: list[Scores] = []
    for replica, k, load in zip(cands.replicas, keys, loads, strict=False):
        slowness = speed.get(k, 1.0) if speed else 1.0
        ls = load_score(load, slowness, scale)
        guarded = within_guard(load, least, slack)
        p = prefix.get(k, 0.0) if prefix and guarded else 0.0
        s = 1.0 if session == k and guarded else 0.0
        total: float | None = (
            weights.load * ls
            + weights.speed * (1.0 / slowness - 1.0)
            + weights.prefix * p
            + weights.session * s
        )
        if max_concurrency and load >= max_concurrency:
            total = None
        out.append(Scores(k, replica.node_id, load, ls, p, s, 1.0 / slowness, total))
    return out

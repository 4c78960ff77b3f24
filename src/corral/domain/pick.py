"""Warm-path replica choice as the proxy makes it today (superseded by `domain.routing`).

`eligible` lives in `domain.routing.candidates` (re-exported here) and the window constants
in `domain.routing.route`; `pick_replica` stays until the proxy calls `domain.routing.route`
(the call is in that module's docstring), then goes. Its speed weights have no decay and no
exploration: a replica measured once as slower can lose every tie for good, the starvation
that `route` fixes.

`pick_replica` runs on every request, so it is one pass over the candidates with no sorting
except among exact ties. Order of preference:

1. fewest in-flight requests (the caller sums this frontend's and the other frontends' counts,
   and reserves the slot right after the pick, so a burst spreads by itself) — weighted by
   speed when the caller knows each replica's typical latency: the load is
   (in-flight + 1) x (latency / fastest latency, rounded to quarters), so a replica three times
   slower takes a request only when the fast ones have three times its backlog, and equal
   replicas (within about 12 %) still count as equal;
2. least recently used (smallest `last_used`);
3. most free memory on the replica's node;
4. among the replicas still tied, the one at `tie_breaker % len(ties)` in (model, index, node)
   order; the caller increments `tie_breaker` per request, so equal replicas take turns instead
   of the first one always winning (what happens when requests arrive in the same instant and
   last-used times are equal).

With more than `SCAN_LIMIT` candidates only a window of `WINDOW` of them, starting at a
position that moves with `tie_breaker`, is considered, so a decision costs the same at 10,000
replicas as at 50.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from corral.domain.entities import Replica, ReplicaKey
from corral.domain.routing.candidates import eligible
from corral.domain.routing.route import SCAN_LIMIT, WINDOW

__all__ = ["SCAN_LIMIT", "WINDOW", "eligible", "pick_replica"]


def pick_replica(
    candidates: Sequence[Replica],
    inflight: Mapping[ReplicaKey, int],
    free_memory: Mapping[str, int],
    tie_breaker: int,
    last_used: Mapping[ReplicaKey, float] | None = None,
    latency: Mapping[ReplicaKey, float] | None = None,
) -> Replica | None:
    """Return the replica to send the next request to, or None when there is no candidate.

    `inflight` maps (model, index) to requests in flight (missing = 0); `free_memory` maps node
    id to free bytes (missing = 0). `last_used`, when given, overrides the replicas' own
    `last_used` (the caller's fresher per-request times). `latency` maps replicas to their
    typical response time (missing: as fast as the fastest). Rules in the module docstring.
    """
    n = len(candidates)
    if n <= 1:
        return candidates[0] if candidates else None
    if n > SCAN_LIMIT:
        start = (tie_breaker * WINDOW) % n
        candidates = [candidates[(start + i) % n] for i in range(WINDOW)]
    weights = _speed_weights(candidates, latency) if latency else None
    best: tuple[float, float, int] | None = None
    ties: list[Replica] = []
    get_inflight = inflight.get
    get_free = free_memory.get
    get_used = last_used.get if last_used is not None else None
    for r in candidates:
        rkey = (r.model, r.index)
        used = r.last_used if get_used is None else get_used(rkey, r.last_used)
        load: float = get_inflight(rkey, 0)
        if weights is not None:
            load = (load + 1) * weights.get(rkey, 1.0)
        key = (load, used, -get_free(r.node_id, 0))
        if best is None or key < best:
            best = key
            ties = [r]
        elif key == best:
            ties.append(r)
    if len(ties) == 1:
        return ties[0]
    ties.sort(key=_order)
    return ties[tie_breaker % len(ties)]


def _speed_weights(
    candidates: Sequence[Replica], latency: Mapping[ReplicaKey, float]
) -> dict[ReplicaKey, float] | None:
    """Each candidate's latency relative to the fastest, rounded to quarters (>= 1)."""
    known = [latency[(r.model, r.index)] for r in candidates if (r.model, r.index) in latency]
    fastest = min((t for t in known if t > 0), default=0.0)
    if fastest <= 0:
        return None
    return {
        (r.model, r.index): max(
            1.0, round(latency.get((r.model, r.index), fastest) / fastest * 4) / 4
        )
        for r in candidates
    }


def _order(r: Replica) -> tuple[str, int, str]:
    return (r.model, r.index, r.node_id)

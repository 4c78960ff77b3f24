"""Warm-path replica choice: which loaded replicas may serve a request, and which one does.

`pick_replica` runs on every request, so it is one pass over the candidates with no sorting
except among exact ties. Order of preference:

1. fewest in-flight requests (the caller sums this frontend's and the other frontends' counts,
   and reserves the slot right after the pick, so a burst spreads by itself);
2. least recently used (smallest `last_used`);
3. most free memory on the replica's node;
4. among the replicas still tied, the one at `tie_breaker % len(ties)` in (model, index, node)
   order; the caller increments `tie_breaker` per request, so equal replicas take turns instead
   of the first one always winning (what happens when requests arrive in the same instant and
   last-used times are equal).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from corral.domain.entities import Node, Replica, ReplicaKey, ReplicaState, Scheduling


def eligible(
    replicas: Iterable[Replica], nodes: Mapping[str, Node], scheduling: Scheduling
) -> list[Replica]:
    """Return the replicas that may take a request now, in their given order.

    A replica qualifies when it is LOADED, has an address, its node is known and servable
    (healthy or draining), and the node's labels match the model's node selector as they are
    now, so a loaded replica on a node relabelled out of the selector gets no more requests.
    """
    out: list[Replica] = []
    for r in replicas:
        if r.state != ReplicaState.LOADED or r.address is None:
            continue
        node = nodes.get(r.node_id)
        if node is None or not node.servable or not scheduling.matches(node.labels):
            continue
        out.append(r)
    return out


def pick_replica(
    candidates: Sequence[Replica],
    inflight: Mapping[ReplicaKey, int],
    free_memory: Mapping[str, int],
    tie_breaker: int,
    last_used: Mapping[ReplicaKey, float] | None = None,
) -> Replica | None:
    """Return the replica to send the next request to, or None when there is no candidate.

    `inflight` maps (model, index) to requests in flight (missing = 0); `free_memory` maps node
    id to free bytes (missing = 0). `last_used`, when given, overrides the replicas' own
    `last_used` (the caller's fresher per-request times). Rules in the module docstring.
    """
    if len(candidates) <= 1:
        return candidates[0] if candidates else None
    best: tuple[int, float, int] | None = None
    ties: list[Replica] = []
    get_inflight = inflight.get
    get_free = free_memory.get
    get_used = last_used.get if last_used is not None else None
    for r in candidates:
        rkey = (r.model, r.index)
        used = r.last_used if get_used is None else get_used(rkey, r.last_used)
        key = (get_inflight(rkey, 0), used, -get_free(r.node_id, 0))
        if best is None or key < best:
            best = key
            ties = [r]
        elif key == best:
            ties.append(r)
    if len(ties) == 1:
        return ties[0]
    ties.sort(key=_order)
    return ties[tie_breaker % len(ties)]


def _order(r: Replica) -> tuple[str, int, str]:
    return (r.model, r.index, r.node_id)

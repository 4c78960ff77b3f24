"""The static filters of the routing pipeline: which replicas of a model may serve at all.

Everything here changes only when the cluster snapshot changes (a replica loads or goes, a node
changes status or labels, the spec's revision moves), so the caller builds a `Candidates` once
per snapshot change and per model, caches it (as `ClusterView.candidates` caches `eligible`
today), and hands it to `route` on every request. Filters, in order:

1. loaded, with an address, on a known servable node (healthy or draining) whose labels match
   the model's node selector now (`eligible`);
2. revision: with `newest_only`, once at least one eligible replica runs the newest revision
   (`revision`, default the highest any eligible replica runs), only those replicas; until then
   every eligible replica, so a roll-out never leaves a model without a route. A replica whose
   revision is unknown (missing from `revisions`) counts as older than any known one.

The capability filter is per model, not per replica: `supports(capabilities, endpoint)` is one
set lookup per request, before routing (a model that cannot serve the endpoint is a 400, not a
cold load). The not-full filter depends on in-flight counts and runs inside `route`.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

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


#: A revision: the spec's hash (`ModelSpec.config_revision`) or, in tables, a number.
Rev = TypeVar("Rev", str, int)


@dataclass(frozen=True, slots=True)
class Candidates:
    """Replicas that passed the static filters, in (index) order, with their keys and positions."""

    replicas: tuple[Replica, ...] = ()
    keys: tuple[ReplicaKey, ...] = ()
    positions: Mapping[ReplicaKey, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.replicas)

    @classmethod
    def of(cls, replicas: Iterable[Replica]) -> Candidates:
        """Wrap replicas that are already filtered (sorted by index for a stable tie order)."""
        ordered = tuple(sorted(replicas, key=lambda r: (r.index, r.node_id)))
        keys = tuple((r.model, r.index) for r in ordered)
        return cls(ordered, keys, {k: i for i, k in enumerate(keys)})

    @classmethod
    def build(
        cls,
        replicas: Iterable[Replica],
        nodes: Mapping[str, Node],
        scheduling: Scheduling,
        *,
        revisions: Mapping[ReplicaKey, Rev] | None = None,
        revision: Rev | None = None,
        newest_only: bool = False,
    ) -> Candidates:
        """Apply the static filters (module doc) to one model's replicas."""
        found = eligible(replicas, nodes, scheduling)
        if newest_only and revisions and found:
            known = [revisions[r.key] for r in found if r.key in revisions]
            newest = revision if revision is not None else max(known, default=None)
            if newest is not None:
                current = [r for r in found if revisions.get(r.key) == newest]
                if current:
                    found = current
        return cls.of(found)


def supports(capabilities: Collection[str] | None, endpoint: str) -> bool:
    """True when a model with `capabilities` serves `endpoint` (None: not declared, allow)."""
    return capabilities is None or endpoint in capabilities

"""The routing decision: dynamic filter, weighted scorers and pick, over cached candidates.

Call contract (a request handler, per request, no I/O and no awaits in between):

    cands = view.candidates(model)                  # Candidates, cached per snapshot change
    if not supports(spec_capabilities, endpoint): 400
    hashes = block_hashes(rendered_prompt_bytes)    # domain.prefix
    matched = prefix_index.match(hashes, now)       # {replica: fraction}
    sticky = sessions.get(session_key(model, header, user), now)
    turn = turns[model] = turns.get(model, 0) + 1   # per model, so models do not interleave
    chosen = route(cands, inflight, turn, weights=w, max_concurrency=mc,
                   prefix=matched, session=sticky, speed=tracker.ratios(now))
    if chosen is None: queue the request (every candidate full) or cold path (no candidate)
    reserve the slot; prefix_index.record(chosen.key, hashes, now);
    sessions.record(session, chosen.key, now)

`inflight` is the cluster-wide count per replica (this frontend's plus the others' reports);
`queued`, when given, adds requests already assigned to a replica and waiting there.

Pipeline: not-full filter (load < `max_concurrency` when the model has one) -> scorers
(`scorers` module) summed with the model's weights -> the best total; exact ties (equal
replicas in equal state) go to `ties[turn % len(ties)]` in index order, so equal replicas take
turns at any concurrency. With more than `SCAN_LIMIT` candidates only a window of `WINDOW` of
them, starting at a position that moves with `turn`, is scored, plus the replicas the prefix
match and the session name (they would be lost outside the window); if every replica in that
set is full, every candidate is scanned once (O(n), only when the window is saturated).
Cost (CPU, the 2-core dev machine): 1.5-3.5 us for 3-10 candidates, 6-10 us at 10,000
(bench/route_bench.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

from corral.domain.entities import Replica, ReplicaKey
from corral.domain.routing.candidates import Candidates
from corral.domain.routing.scorers import (
    DEFAULT_WEIGHTS,
    RoutingWeights,
    load_score,
    load_scores,
    within_guard,
)

SCAN_LIMIT = 64
WINDOW = 32
_FULL = float("-inf")  # the total of a candidate the not-full filter removed


def route(
    cands: Candidates,
    inflight: Mapping[ReplicaKey, int],
    turn: int,
    *,
    weights: RoutingWeights = DEFAULT_WEIGHTS,
    max_concurrency: int | None = None,
    queued: Mapping[ReplicaKey, int] | None = None,
    prefix: Mapping[ReplicaKey, float] | None = None,
    session: ReplicaKey | None = None,
    speed: Mapping[ReplicaKey, float] | None = None,
) -> Replica | None:
    """The replica for the next request, or None (no candidate, or every candidate full)."""
    n = len(cands.replicas)
    if n == 0:
        return None
    args = (inflight, turn, weights, max_concurrency, queued, prefix, session, speed)
    if n <= SCAN_LIMIT:
        return _best(cands, range(n), *args)
    chosen = _best(cands, _window(cands, turn, prefix, session), *args)
    if chosen is None and max_concurrency:
        chosen = _best(cands, range(n), *args)
    return chosen


def _window(
    cands: Candidates,
    turn: int,
    prefix: Mapping[ReplicaKey, float] | None,
    session: ReplicaKey | None,
) -> list[int]:
    """Positions of a moving window of WINDOW candidates plus the affine ones outside it."""
    n = len(cands.replicas)
    start = (turn * WINDOW) % n
    out = [(start + i) % n for i in range(WINDOW)]
    extra = list(prefix) if prefix else []
    if session is not None:
        extra.append(session)
    positions = cands.positions
    for k in extra:
        p = positions.get(k)
        if p is not None and (p - start) % n >= WINDOW and p not in out:
            out.append(p)
    return out


def _best(
    cands: Candidates,
    positions: Sequence[int],
    inflight: Mapping[ReplicaKey, int],
    turn: int,
    weights: RoutingWeights,
    max_concurrency: int | None,
    queued: Mapping[ReplicaKey, int] | None,
    prefix: Mapping[ReplicaKey, float] | None,
    session: ReplicaKey | None,
    speed: Mapping[ReplicaKey, float] | None,
) -> Replica | None:
    all_keys = cands.keys
    whole = len(positions) == len(all_keys)  # then positions is range(n)
    keys = all_keys if whole else [all_keys[p] for p in positions]
    get = inflight.get
    loads = [get(k, 0) for k in keys]
    if queued:
        qget = queued.get
        loads = [x + qget(k, 0) for x, k in zip(loads, keys, strict=True)]
    scale = float(max_concurrency or weights.concurrency)
    total = load_scores(loads, scale, weights.load)
    if max_concurrency:
        full = [i for i, x in enumerate(loads) if x >= max_concurrency]
        if full:
            if len(full) == len(loads):
                return None
            for f in full:
                total[f] = _FULL
    use_prefix = bool(prefix) and weights.prefix > 0
    use_session = session is not None and weights.session > 0
    if speed or use_prefix or use_session:
        local = cands.positions if whole else {k: i for i, k in enumerate(keys)}
        lookup = local.get
        if speed:  # sparse: only the measurably slower replicas are in it (speed default 1)
            wl, ws = weights.load, weights.speed
            if len(speed) <= len(keys):
                slow = [(j, s) for k, s in speed.items() if (j := lookup(k)) is not None]
            else:  # a window of a huge model where many replicas are slow
                slow = [(j, s) for j, k in enumerate(keys) if (s := speed.get(k)) is not None]
            for j, s in slow:
                if total[j] != _FULL:
                    total[j] = wl * load_score(loads[j], s, scale) + ws * (1.0 / s - 1.0)
        if use_prefix or use_session:
            slack = weights.affinity_slack * scale
            least = min(loads)
            if use_prefix:
                assert prefix is not None
                _add_affinity(total, loads, lookup, prefix.items(), weights.prefix, least, slack)
            if use_session:
                assert session is not None
                sticky = ((session, 1.0),)
                _add_affinity(total, loads, lookup, sticky, weights.session, least, slack)
    best = max(total)
    ties = [i for i, t in enumerate(total) if t == best]
    i = ties[turn % len(ties)] if len(ties) > 1 else ties[0]
    return cands.replicas[positions[i]]


def _add_affinity(
    total: list[float],
    loads: Sequence[int],
    lookup: Callable[[ReplicaKey], int | None],
    scores: Iterable[tuple[ReplicaKey, float]],
    weight: float,
    least: int,
    slack: float,
) -> None:
    """Add `weight * score` to the candidates named in `scores` that pass the load guard."""
    for k, score in scores:
        i = lookup(k)
        if i is not None and within_guard(loads[i], least, slack):
            total[i] += weight * score

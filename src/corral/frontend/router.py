"""The frontend's routing state: the pipeline of `domain.routing` fed per request, no I/O.

Per request (`choose`): the model's cached `Candidates` (rebuilt when the view's candidate list
changes), the request's prefix block hashes and session (`features`), the shared `PrefixIndex`,
the `SessionTable`, a `SpeedTracker` per model and answer kind, and the cluster-wide in-flight
counts; then `route`, and the choice is recorded in the index and the table. A model with one
candidate skips all of it.

Prefix bytes: the request body from the top-level `messages` (chat), `prompt` (completions) or
`input` (responses) key on, as the client sent it: no re-encoding. Clients serialize a request
the same way every time, so requests sharing a system prompt share their first blocks.

Replicas that leave the candidates (stopped, reloaded at a new address, filtered out) are
forgotten by the index, the session table and the speed trackers, so a new process under an old
index inherits no warm cache. Counters per model feed `/metrics`
(`routing_metrics.routing_families`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Final

import orjson

from corral.domain.entities import ModelSpec, Replica, ReplicaKey
from corral.domain.prefix import PrefixIndex, block_hashes
from corral.domain.routing import Candidates, SessionTable, SpeedTracker, route, session_key
from corral.domain.routing.explain import explain
from corral.frontend.request import ParsedRequest

#: The body key whose value (to the end of the body) is hashed for prefix affinity, per path.
PREFIX_KEYS: Final[dict[bytes, bytes]] = {
    b"/v1/chat/completions": b'"messages"',
    b"/v1/completions": b'"prompt"',
    b"/v1/responses": b'"input"',
}
SESSION_HEADER: Final = b"x-session-id"
DEBUG_HEADER: Final = b"x-corral-debug"
SCORES_HEADER: Final = b"x-corral-scores"
REPLICA_HEADER: Final = b"x-corral-replica"
NODE_HEADER: Final = b"x-corral-node"

#: Bytes per prefix block (about 128 tokens): half the hashing, matching and recording per
#: request of the domain's 256 for the same prompt; a shared prefix under 512 bytes (whose
#: prefill is cheap anyway) gets no affinity.
ROUTING_BLOCK_BYTES: Final = 512
#: Seconds of time to first byte within which replicas count as equally fast (`SpeedTracker`).
SPEED_FLOOR: Final = 0.02
Identity = tuple[str, int, str | None]  # (model, index, address)


def prompt_bytes(body: bytes, key: bytes) -> bytes:
    """The bytes of `body` from just after the top-level JSON key `key` (b"" when absent).

    The first occurrence of the quoted key followed by a colon: a string value equal to the
    key is followed by `,`, `}` or `]`, never `:`. A nested object with the same key before
    the top-level one would shift the bytes hashed; the worst that does is a missed affinity.
    """
    start = 0
    while True:
        i = body.find(key, start)
        if i < 0:
            return b""
        j = i + len(key)
        while j < len(body) and body[j] in b" \t\r\n":
            j += 1
        if j < len(body) and body[j] == 58:  # ":"
            return body[j + 1 :]
        start = j


@dataclass(slots=True)
class Features:
    """What routing reads from one request (computed again on a retry: retries are rare)."""

    hashes: list[int]
    session: int | None
    debug: bool


@dataclass(slots=True)
class ModelCounters:
    """Routing decisions for one model, by what the scorers contributed (for /metrics)."""

    decisions: int = 0  # requests routed among two or more candidates
    prefix_matched: int = 0  # some candidate had served the request's prefix
    prefix_followed: int = 0  # ... and the chosen replica was the best-matching one
    session_matched: int = 0  # the request's session had a replica
    session_followed: int = 0  # ... and it was chosen
    speed_slow: int = 0  # decisions with at least one measurably slower candidate


class Router:
    """Chooses replicas (contract in the module doc); owns the index, sessions and speeds."""

    def __init__(
        self,
        inflight: Mapping[ReplicaKey, int],
        *,
        index: PrefixIndex | None = None,
        sessions: SessionTable | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.inflight = inflight
        self.index = index or PrefixIndex()
        self.sessions = sessions or SessionTable()
        self.clock = clock
        self.counters: dict[str, ModelCounters] = {}
        self._cands: dict[str, tuple[list[Replica], Candidates, set[Identity]]] = {}
        self._speed: dict[tuple[str, bool], SpeedTracker] = {}
        self._turns: dict[str, int] = {}
        self._warm: set[ReplicaKey] = set()  # replicas whose first (cold) sample was dropped

    # --- per request ----------------------------------------------------------------------
    def choose(
        self,
        spec: ModelSpec,
        replicas: list[Replica],
        request: ParsedRequest,
        headers: Collection[tuple[bytes, bytes]],
        tried: Collection[Identity] = (),
    ) -> tuple[Replica | None, bytes | None]:
        """The replica for `request` among `replicas` (the view's candidates, whose list object
        changes whenever they do), and the debug scores header value when asked for."""
        model = spec.name
        cached = self._cands.get(model)
        if cached is None or cached[0] is not replicas:
            cached = self._refresh(model, replicas)
        cands = cached[1]
        if tried:
            cands = Candidates.of(r for r in cands.replicas if _identity(r) not in tried)
        n = len(cands)
        if n == 0:
            return None, None
        if n == 1 and not _wants_scores(headers):
            return cands.replicas[0], None  # nothing to weigh: no hashing, no records
        weights = spec.routing
        feats = self.features(request, headers, weights.prefix > 0)
        now = self.clock()
        hashes = feats.hashes
        matched = self.index.match(hashes, now) if hashes else None
        sticky = self.sessions.get(feats.session, now) if feats.session is not None else None
        speed = self._tracker(model, request.stream).ratios(now)
        turn = self._turns[model] = self._turns.get(model, 0) + 1
        chosen = route(
            cands,
            self.inflight,
            turn,
            weights=weights,
            prefix=matched,
            session=sticky,
            speed=speed,
        )
        if chosen is None:
            return None, None
        key = chosen.key
        if hashes:
            self.index.record(key, hashes, now)
        if feats.session is not None:
            self.sessions.record(feats.session, key, now)
        self._count(model, key, matched, sticky, speed)
        scores = None
        if feats.debug:
            table = explain(
                cands, self.inflight, weights=weights, prefix=matched, session=sticky, speed=speed
            )
            scores = orjson.dumps(
                [
                    {
                        "replica": f"{m}#{i}",
                        "node": s.node_id,
                        "inflight": s.load,
                        "load": round(s.load_score, 4),
                        "prefix": round(s.prefix, 4),
                        "session": s.session,
                        "speed": round(s.speed, 4),
                        "total": None if s.total is None else round(s.total, 4),
                        "chosen": (m, i) == key,
                    }
                    for s in table
                    for m, i in (s.replica,)
                ]
            )
        return chosen, scores

    def features(
        self, request: ParsedRequest, headers: Collection[tuple[bytes, bytes]], prefix: bool
    ) -> Features:
        """The request's prefix hashes (when the model weighs them), session and debug flag."""
        header: str | None = None
        debug = False
        for k, v in headers:
            if k == SESSION_HEADER:
                header = v.decode("latin-1")
            elif k == DEBUG_HEADER:
                debug = b"scores" in v
        hashes: list[int] = []
        body = request.body
        if prefix and isinstance(body, bytes):
            key = PREFIX_KEYS.get(request.path)
            if key is not None:
                hashes = block_hashes(prompt_bytes(body, key), ROUTING_BLOCK_BYTES)
        return Features(hashes, session_key(request.model, header, request.user), debug)

    def observe(self, key: ReplicaKey, stream: bool, seconds: float) -> None:
        """A time to first byte `key` answered in while it served nothing else; a replica's
        first is dropped (it pays for opening the connection, not for the replica's speed)."""
        if key not in self._warm:
            self._warm.add(key)
            return
        self._tracker(key[0], stream).observe(key, seconds, self.clock())

    # --- internals ------------------------------------------------------------------------
    def _tracker(self, model: str, stream: bool) -> SpeedTracker:
        tracker = self._speed.get((model, stream))
        if tracker is None:
            tracker = self._speed[(model, stream)] = SpeedTracker(
                floor=SPEED_FLOOR, alpha=0.5, alpha_up=0.1, min_samples=3
            )
        return tracker

    def _refresh(
        self, model: str, replicas: list[Replica]
    ) -> tuple[list[Replica], Candidates, set[Identity]]:
        """A new candidate list for `model`: rebuild, and forget replicas no longer in it."""
        ids = {_identity(r) for r in replicas}
        old = self._cands.get(model)
        if old is not None:
            now = self.clock()
            for gone in old[2] - ids:
                key = (gone[0], gone[1])
                self.index.forget(key, now)
                self.sessions.forget(key)
                self._warm.discard(key)
                for stream in (False, True):
                    tracker = self._speed.get((model, stream))
                    if tracker is not None:
                        tracker.forget(key)
        entry = (replicas, Candidates.of(replicas), ids)
        self._cands[model] = entry
        return entry

    def _count(
        self,
        model: str,
        key: ReplicaKey,
        matched: Mapping[ReplicaKey, float] | None,
        sticky: ReplicaKey | None,
        speed: Mapping[ReplicaKey, float],
    ) -> None:
        c = self.counters.get(model)
        if c is None:
            c = self.counters[model] = ModelCounters()
        c.decisions += 1
        if matched:
            c.prefix_matched += 1
            if matched.get(key, 0.0) >= max(matched.values()):
                c.prefix_followed += 1
        if sticky is not None:
            c.session_matched += 1
            c.session_followed += sticky == key
        if speed:
            c.speed_slow += 1


def replica_headers(replica: Replica, node_name: str) -> list[tuple[bytes, bytes]]:
    """`x-corral-replica: model#index` and `x-corral-node: node name` for a response."""
    return [
        (REPLICA_HEADER, f"{replica.model}#{replica.index}".encode("latin-1", "replace")),
        (NODE_HEADER, node_name.encode("latin-1", "replace")),
    ]


def _wants_scores(headers: Collection[tuple[bytes, bytes]]) -> bool:
    return any(k == DEBUG_HEADER and b"scores" in v for k, v in headers)


def _identity(r: Replica) -> Identity:
    return (r.model, r.index, r.address)

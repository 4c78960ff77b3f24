"""The frontend's Router without I/O: prefix bytes from the raw body, sessions from the header or
`user`, rotation of equal replicas, prefix and session affinity, forgetting replicas that went,
the debug scores and the per-scorer counters."""

from __future__ import annotations

import dataclasses

import orjson
import pytest

from corral.domain.entities import ReplicaKey
from corral.domain.routing import SpeedTracker
from corral.domain.routing_weights import RoutingWeights
from corral.frontend.request import ParsedRequest, parse_request
from corral.frontend.router import Router, prompt_bytes, replica_headers
from factories import model, replica

CHAT = b"/v1/chat/completions"
SYSTEM = [f"You are assistant number {i}. " * 80 for i in range(8)]  # ~2.4 KB each


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def chat(system: str, text: str, **extra: object) -> bytes:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": text}]
    return orjson.dumps({"model": "m", "messages": messages, **extra})


def request(body: bytes, path: bytes = CHAT) -> ParsedRequest:
    return parse_request(path, body)


REPLICAS = [replica("m", i, f"n{i}") for i in range(3)]


@pytest.mark.parametrize(
    ("body", "key", "expected"),
    [
        (b'{"model":"m","messages":[1]}', b'"messages"', b"[1]}"),
        (b'{"messages" : [2]}', b'"messages"', b" [2]}"),
        (b'{"user":"messages","messages":[3]}', b'"messages"', b"[3]}"),  # a value, then the key
        (b'{"model":"m"}', b'"messages"', b""),
        (b'{"prompt":"abc"}', b'"prompt"', b'"abc"}'),
    ],
)
def test_prompt_bytes_start_after_the_top_level_key(
    body: bytes, key: bytes, expected: bytes
) -> None:
    assert prompt_bytes(body, key) == expected


def test_features_share_hashes_for_a_shared_system_prompt_and_read_the_session() -> None:
    router = Router({}, clock=Clock())
    a = router.features(request(chat(SYSTEM[0], "alice asks")), [], True)
    b = router.features(request(chat(SYSTEM[0], "bob asks something else")), [], True)
    c = router.features(request(chat(SYSTEM[1], "alice asks")), [], True)
    assert len(a.hashes) >= 4
    assert a.hashes[:4] == b.hashes[:4]
    assert a.hashes[0] != c.hashes[0]
    assert router.features(request(chat(SYSTEM[0], "x")), [], False).hashes == []
    by_user = router.features(request(chat("s", "x", user="u1")), [], True)
    by_header = router.features(
        request(chat("s", "x", user="u2")),
        [(b"x-session-id", b"u1"), (b"x-corral-debug", b"x")],
        True,
    )
    assert by_user.session is not None and by_user.session == by_header.session
    assert not by_header.debug
    assert router.features(request(chat("s", "x")), [(b"x-corral-debug", b"scores")], True).debug
    assert router.features(request(chat("s", "x")), [], True).session is None


def test_equal_idle_replicas_rotate_evenly() -> None:
    router = Router({}, clock=Clock())
    counts = {0: 0, 1: 0, 2: 0}
    for i in range(30):
        chosen, scores = router.choose(model(), REPLICAS, request(chat("hi", f"q{i}")), [])
        assert chosen is not None and scores is None
        counts[chosen.index] += 1
    assert counts == {0: 10, 1: 10, 2: 10}


def test_prefix_families_stick_to_a_replica_and_spread_over_replicas() -> None:
    inflight: dict[ReplicaKey, int] = {}
    router = Router(inflight, clock=Clock())
    homes: dict[int, set[int]] = {f: set() for f in range(6)}
    for user in range(10):
        for family in range(6):
            body = chat(SYSTEM[family], f"user {user} asks about {family}")
            chosen, _ = router.choose(model(), REPLICAS, request(body), [])
            assert chosen is not None
            homes[family].add(chosen.index)
    assert all(len(h) == 1 for h in homes.values()), homes
    assert len(set().union(*homes.values())) == 3  # the families spread over every replica
    c = router.counters["m"]
    assert c.decisions == 60 and c.prefix_matched == 54 and c.prefix_followed == 54


def test_load_guard_spills_a_hot_prefix() -> None:
    inflight: dict[ReplicaKey, int] = {}
    router = Router(inflight, clock=Clock())
    body = chat(SYSTEM[0], "q")
    first, _ = router.choose(model(), REPLICAS, request(body), [])
    assert first is not None
    inflight[first.key] = 5  # beyond least (0) + slack (0.5 x 8 = 4)
    second, _ = router.choose(model(), REPLICAS, request(body), [])
    assert second is not None and second.key != first.key
    inflight[first.key] = 4  # within the slack: the affinity counts again
    inflight[second.key] = 4
    third, _ = router.choose(model(), REPLICAS, request(body), [])
    assert third is not None and third.key in (first.key, second.key)


def test_session_affinity_and_weights_zero() -> None:
    router = Router({}, clock=Clock())
    headers = [(b"x-session-id", b"conversation-7")]
    picks = {
        router.choose(model(), REPLICAS, request(chat("s", f"t{i}")), headers)[0].index  # type: ignore[union-attr]
        for i in range(6)
    }
    assert len(picks) == 1
    off = dataclasses.replace(model(), routing=RoutingWeights(session=0, prefix=0))
    picks = {
        router.choose(off, REPLICAS, request(chat(SYSTEM[0], f"t{i}")), headers)[0].index  # type: ignore[union-attr]
        for i in range(6)
    }
    assert picks == {0, 1, 2}


def test_a_replica_that_went_is_forgotten_and_tried_ones_are_skipped() -> None:
    clock = Clock()
    router = Router({}, clock=clock)
    body = chat(SYSTEM[0], "q")
    first, _ = router.choose(model(), REPLICAS, request(body), [])
    assert first is not None
    assert router.index.match(router.features(request(body), [], True).hashes, clock.now)
    reloaded = [
        dataclasses.replace(r, address="elsewhere:1") if r.key == first.key else r for r in REPLICAS
    ]
    clock.now += 1
    router.choose(model(), reloaded, request(chat("other", "x")), [])  # sees the new list
    hashes = router.features(request(body), [], True).hashes
    assert first.key not in router.index.match(hashes, clock.now)
    tried = {(r.model, r.index, r.address) for r in reloaded[:2]}
    chosen, _ = router.choose(model(), reloaded, request(body), [], tried)
    assert chosen is not None and chosen.index == 2
    none, _ = router.choose(model(), reloaded, request(body), [], tried | {("m", 2, "n2:9002")})
    assert none is None


def test_one_candidate_skips_routing_unless_scores_are_asked_for() -> None:
    router = Router({}, clock=Clock())
    only = REPLICAS[:1]
    chosen, scores = router.choose(model(), only, request(chat(SYSTEM[0], "q")), [])
    assert chosen == only[0] and scores is None and len(router.index) == 0
    debug = [(b"x-corral-debug", b"scores")]
    router.choose(model(), REPLICAS, request(chat(SYSTEM[0], "q")), [])
    chosen, scores = router.choose(model(), REPLICAS, request(chat(SYSTEM[0], "r")), debug)
    assert chosen is not None and scores is not None
    table = orjson.loads(scores)
    assert [row["replica"] for row in table] == ["m#0", "m#1", "m#2"]
    best = max(table, key=lambda row: row["total"])
    assert best["chosen"] and best["replica"] == f"m#{chosen.index}" and best["prefix"] == 1.0
    assert {row["node"] for row in table} == {"n0", "n1", "n2"}


def test_replica_headers() -> None:
    assert replica_headers(REPLICAS[1], "gpu-box") == [
        (b"x-corral-replica", b"m#1"),
        (b"x-corral-node", b"gpu-box"),
    ]


def test_speed_noise_does_not_flag_an_equal_replica_but_real_slowness_does() -> None:
    def tracker() -> SpeedTracker:
        return SpeedTracker(floor=0.02, alpha=0.5, alpha_up=0.1, min_samples=3)

    a, b, c = ("m", 0), ("m", 1), ("m", 2)
    t = tracker()
    for key in (a, b, c):
        t.observe(key, 0.001, 1.0)
    t.observe(b, 0.001, 1.0)
    assert t.ratios(1.0) == {}  # b has two samples; a and c one: nothing to compare yet
    t = tracker()
    for s in (0.080, 0.001, 0.001):  # an unlucky first sample
        t.observe(a, s, 1.0)
        t.observe(b, 0.001, 1.0)
    assert t.ratios(1.0) == {}
    t.observe(a, 0.050, 1.0)  # a spike after warm-up moves the estimate a tenth of the way
    assert t.ratios(1.0) == {}
    t = tracker()
    for _ in range(3):
        t.observe(a, 0.020, 1.0)
        t.observe(b, 0.060, 1.0)
    assert t.ratios(1.0) == {b: pytest.approx(1.75)}

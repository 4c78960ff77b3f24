"""Learned routing inputs: the speed tracker (decay, exploration, dead zone) and session table."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from corral.domain.entities import Replica, ReplicaKey, ReplicaState
from corral.domain.routing import Candidates, SessionTable, SpeedTracker, route, session_key

C3 = Candidates.of(
    Replica("m", i, f"n{i}", ReplicaState.LOADED, address=f"n{i}:1") for i in range(3)
)
A, B, C = C3.keys


def k(i: int) -> ReplicaKey:
    return ("m", i)


# --- speed tracker: unit rules ---------------------------------------------------------------

RATIOS: list[tuple[str, dict[ReplicaKey, float], dict[ReplicaKey, float]]] = [
    ("equal", {A: 1.0, B: 1.0}, {}),
    ("within-dead-zone", {A: 1.0, B: 1.2}, {}),
    ("past-dead-zone-is-continuous", {A: 1.0, B: 1.3}, {B: pytest.approx(1.05)}),
    ("three-times", {A: 1.0, B: 3.0}, {B: pytest.approx(2.75)}),
    ("relative-to-fastest", {A: 2.0, B: 6.0, C: 2.2}, {B: pytest.approx(2.75)}),
    ("no-samples", {}, {}),
]


@pytest.mark.parametrize(
    ("samples", "expected"), [c[1:] for c in RATIOS], ids=[c[0] for c in RATIOS]
)
def test_ratios(samples: dict[ReplicaKey, float], expected: dict[ReplicaKey, float]) -> None:
    t = SpeedTracker()
    for key, seconds in samples.items():
        t.observe(key, seconds, now=0.0)
    assert t.ratios(now=0.0) == expected


def test_estimate_is_a_moving_average() -> None:
    t = SpeedTracker(alpha=0.5)
    t.observe(A, 1.0, now=0.0)
    t.observe(A, 3.0, now=0.0)
    assert t.estimate(A, now=0.0) == 2.0
    assert t.estimate(B, now=0.0) is None


def test_estimates_decay_toward_the_mean() -> None:
    t = SpeedTracker(half_life=30.0)
    t.observe(A, 1.0, now=0.0)
    t.observe(B, 3.0, now=0.0)  # mean 2
    assert t.estimate(B, now=30.0) == pytest.approx(2.5)
    assert t.estimate(A, now=60.0) == pytest.approx(1.75)


def test_a_replica_not_measured_recently_is_explored() -> None:
    t = SpeedTracker(explore_after=10.0)
    t.observe(A, 1.0, now=0.0)
    t.observe(B, 3.0, now=0.0)
    assert B in t.ratios(now=5.0)
    t.observe(A, 1.0, now=10.0)  # A keeps being measured, B is not
    assert t.ratios(now=10.5) == {}  # B counts as fast until it is measured again
    assert route(C3, {A: 0, C: 1}, 1, speed=t.ratios(now=10.5)) == C3.replicas[1]
    t.observe(B, 3.0, now=11.0)
    assert B in t.ratios(now=11.0)  # measured again: slow again


def test_ratios_are_recomputed_at_refresh_and_samples_update_their_own() -> None:
    t = SpeedTracker(refresh=1.0, explore_after=0.5)
    t.observe(A, 1.0, now=0.0)
    t.observe(B, 3.0, now=0.0)
    first = t.ratios(now=0.0)
    assert first == {B: pytest.approx(2.75)}
    assert t.ratios(now=0.9) is first  # B's exploration is noticed at the next refresh
    assert t.ratios(now=1.0) == {}
    t.observe(B, 3.0, now=1.1)  # B measured again: slow at once, no full recomputation
    assert B in t.ratios(now=1.1)
    t.observe(C, 0.5, now=1.2)  # a new fastest: every ratio moves
    got = t.ratios(now=1.2)
    assert C not in got and got[B] > 4


def test_forget_and_bad_samples() -> None:
    t = SpeedTracker()
    t.observe(A, 1.0, now=0.0)
    t.observe(B, 3.0, now=0.0)
    t.observe(A, -1.0, now=0.0)  # ignored
    assert t.estimate(A, now=0.0) == 1.0
    t.forget(A)
    assert t.estimate(A, now=0.0) is None and t.ratios(now=0.0) == {}


# --- speed tracker with route: the starvation cases ---------------------------------------------


def run_sequential(
    true: dict[ReplicaKey, float], n: int, *, first_slow: ReplicaKey | None = None, seed: int = 1
) -> Counter[int]:
    """n requests one after another (each completes before the next: served alone)."""
    rng = random.Random(seed)
    t = SpeedTracker()
    now = 1000.0
    chosen: Counter[int] = Counter()
    seen: set[ReplicaKey] = set()
    for turn in range(n):
        r = route(C3, {}, turn, speed=t.ratios(now))
        assert r is not None
        noise = 1.125 if r.key == first_slow and r.key not in seen else rng.uniform(0.95, 1.05)
        seconds = true[r.key] * noise
        seen.add(r.key)
        t.observe(r.key, seconds, now)
        now += seconds
        chosen[r.index] += 1
    return chosen


@pytest.mark.parametrize("latency", [0.001, 0.1, 2.0], ids=["1ms", "100ms", "2s"])
def test_equal_replicas_rotate_at_concurrency_1(latency: float) -> None:
    # the old pick split this 9/20/1: one early sample 12.5 % slower lost every tie forever
    for seed in range(5):
        chosen = run_sequential(dict.fromkeys(C3.keys, latency), 30, first_slow=C, seed=seed)
        assert all(8 <= chosen[i] <= 12 for i in range(3)), chosen


def test_a_3x_slower_replica_gets_little_at_concurrency_1() -> None:
    chosen = run_sequential({A: 0.001, B: 0.001, C: 0.003}, 30)
    assert chosen[2] <= 3 and chosen[0] + chosen[1] >= 27


def burst(true: dict[ReplicaKey, float], n: int, seed: int = 1) -> Counter[int]:
    """A learned tracker (noisy samples), then n requests that all arrive before any finishes."""
    rng = random.Random(seed)
    t = SpeedTracker()
    for round_ in range(5):
        for key, seconds in true.items():
            t.observe(key, seconds * rng.uniform(0.9, 1.1), now=float(round_))
    inflight: dict[ReplicaKey, int] = {}
    chosen: Counter[int] = Counter()
    for turn in range(n):
        r = route(C3, inflight, turn, speed=t.ratios(5.0))
        assert r is not None
        inflight[r.key] = inflight.get(r.key, 0) + 1
        chosen[r.index] += 1
    return chosen


def test_burst_over_equal_replicas_is_even() -> None:
    for seed in range(5):
        chosen = burst(dict.fromkeys(C3.keys, 0.001), 300, seed)
        assert all(85 <= chosen[i] <= 115 for i in range(3)), chosen


def test_burst_gives_a_3x_slower_replica_clearly_less() -> None:
    chosen = burst({A: 0.001, B: 0.001, C: 0.003}, 300)
    assert chosen[2] < 70, chosen  # an equal share would be 100; its speed share is ~43
    assert chosen[2] > 20, chosen  # but it is not starved either


# --- sessions ----------------------------------------------------------------------------------

KEYS: list[tuple[str, str, str | None, str | None, bool]] = [
    ("none", "m", None, None, False),
    ("empty-header-falls-back-to-user", "m", "", "u1", True),
    ("header", "m", "s1", None, True),
]


@pytest.mark.parametrize(
    ("model", "header", "user", "present"), [c[1:] for c in KEYS], ids=[c[0] for c in KEYS]
)
def test_session_key_presence(
    model: str, header: str | None, user: str | None, present: bool
) -> None:
    assert (session_key(model, header, user) is not None) is present


def test_session_key_prefers_the_header_and_is_per_model() -> None:
    assert session_key("m", "s1", "u1") == session_key("m", "s1", None)
    assert session_key("m", None, "u1") != session_key("m", "s1", None)
    assert session_key("m", "s1", None) != session_key("other", "s1", None)


def test_session_table_remembers_the_last_replica_within_the_ttl() -> None:
    table = SessionTable(ttl=60.0)
    s = session_key("m", "abc", None)
    assert table.get(s, now=0.0) is None
    table.record(s, A, now=0.0)
    table.record(s, B, now=10.0)
    assert table.get(s, now=70.0) == B
    assert table.get(s, now=70.5) is None
    assert table.get(None, now=0.0) is None


def test_session_table_is_bounded_and_forgets_replicas() -> None:
    table = SessionTable(max_entries=2)
    for i in range(3):
        table.record(i, k(i), now=float(i))
    assert len(table) == 2 and table.get(0, now=3.0) is None
    table.forget(k(2))
    assert table.get(2, now=3.0) is None and table.get(1, now=3.0) == k(1)


def test_route_with_a_session_sticks_until_the_guard() -> None:
    table = SessionTable()
    s = session_key("m", "chat-1", None)
    inflight: dict[ReplicaKey, int] = {}
    chosen = []
    for turn in range(8):  # one session sends 8 requests at once
        r = route(C3, inflight, turn, session=table.get(s, now=0.0))
        assert r is not None
        table.record(s, r.key, now=0.0)
        inflight[r.key] = inflight.get(r.key, 0) + 1
        chosen.append(r.index)
    assert chosen[:5] == [chosen[0]] * 5  # sticks while within least loaded + 4
    assert len(set(chosen)) > 1  # then moves instead of piling up

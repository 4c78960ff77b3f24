"""Admission order: priority classes, fairness between keys, deadlines, cancels, bounds, slots."""

from __future__ import annotations

import itertools
import random
from collections import Counter

import pytest

from corral.domain.admission import (
    AdmissionQueue,
    Entry,
    Priority,
    Queued,
    Rejected,
    has_free_slot,
    overshoot_bound,
)
from corral.errors import ConfigError

HIGH, NORMAL, LOW = Priority.HIGH, Priority.NORMAL, Priority.LOW
FAR = 1e9  # a deadline that never comes


class Q:
    """An AdmissionQueue with a request counter, for short tests."""

    def __init__(self, **kwargs: object) -> None:
        self.q = AdmissionQueue(**kwargs)  # type: ignore[arg-type]
        self.ids = itertools.count()

    def add(
        self,
        key: str = "k",
        priority: Priority = NORMAL,
        tokens: int = 100,
        size: int = 10,
        deadline: float = FAR,
        now: float = 0.0,
    ) -> Queued | Rejected:
        return self.q.admit(next(self.ids), key, priority, tokens, size, deadline, now)

    def drain(self, n: int, now: float = 0.0) -> list[Entry]:
        out = []
        for _ in range(n):
            e = self.q.pop(now)
            if e is None:
                break
            out.append(e)
        return out


def test_fifo_within_one_key() -> None:
    q = Q()
    for _ in range(5):
        q.add()
    assert [e.id for e in q.drain(10)] == [0, 1, 2, 3, 4]
    assert q.q.pop(0.0) is None and len(q.q) == 0


def test_strict_priority_between_classes() -> None:
    q = Q()
    q.add(priority=LOW)
    q.add(priority=NORMAL)
    q.add(priority=HIGH)
    q.add(priority=NORMAL)
    assert [e.priority for e in q.drain(4)] == [HIGH, NORMAL, NORMAL, LOW]


def test_low_is_not_starved_forever() -> None:
    q = Q(starvation_limit=3)
    for _ in range(20):
        q.add(priority=HIGH)
    for _ in range(3):
        q.add(priority=LOW)
    order = [e.priority for e in q.drain(12)]
    # low gets the 4th slot of every 4 while both are backlogged
    assert order == [HIGH, HIGH, HIGH, LOW] * 3


def test_normal_and_low_both_progress_under_high_pressure() -> None:
    q = Q(starvation_limit=4)
    for p, n in ((HIGH, 50), (NORMAL, 10), (LOW, 10)):
        for _ in range(n):
            q.add(priority=p)
    counts = Counter(e.priority for e in q.drain(30))
    assert counts[HIGH] >= 20 and counts[NORMAL] >= 3 and counts[LOW] >= 3


# --- fairness between keys ---------------------------------------------------------------------


def test_a_key_with_10x_the_requests_gets_about_half_the_slots() -> None:
    q = Q()
    for i in range(110):  # interleaved arrivals: 10 from "big" per one from "small"
        q.add("small" if i % 11 == 10 else "big")
    served = Counter(e.key for e in q.drain(20))
    assert served["big"] <= 12  # <= 60 % while both are backlogged
    assert served["small"] == 10


def test_fairness_is_weighted_by_requested_tokens() -> None:
    q = Q()
    for _ in range(50):
        q.add("long", tokens=1000)
        q.add("short", tokens=100)
    served = Counter(e.key for e in q.drain(22))
    assert served == {"short": 20, "long": 2}


def test_key_weights() -> None:
    q = Q(key_weights={"gold": 2.0})
    for _ in range(30):
        q.add("gold")
        q.add("plain")
    served = Counter(e.key for e in q.drain(30))
    assert served == {"gold": 20, "plain": 10}


def test_an_idle_key_saves_no_credit() -> None:
    q = Q()
    for _ in range(60):
        q.add("busy")
    q.drain(50)  # "busy" alone for a long time
    for _ in range(10):
        q.add("late")
    served = Counter(e.key for e in q.drain(10))
    assert served["late"] <= 6  # it shares from now on; it does not take every slot


def test_a_cancelled_request_costs_its_key_nothing() -> None:
    q = Q()
    a_ids = [q.add("a").entry.id for _ in range(10)]  # type: ignore[union-attr]
    for _ in range(10):
        q.add("b")
    for i in a_ids[:5]:
        assert q.q.cancel(i)
    served = [e.key for e in q.drain(10)]
    assert Counter(served) == {"a": 5, "b": 5}
    assert not ({e.id for e in q.drain(10)} & set(a_ids[:5]))


def test_invalid_key_weight() -> None:
    with pytest.raises(ConfigError, match="key_weights"):
        AdmissionQueue(key_weights={"x": 0.0})


# --- deadlines, cancels, bounds -----------------------------------------------------------------


def test_expired_entries_are_reported_never_dispatched() -> None:
    q = Q()
    q.add(deadline=5.0)
    q.add(deadline=20.0)
    q.add(deadline=7.0)
    assert q.q.next_deadline() == 5.0
    assert [e.id for e in q.q.expire(now=5.0)] == []  # due at 5: still waiting at 5
    assert [e.id for e in q.q.expire(now=6.0)] == [0]
    assert len(q.q) == 2
    gone = q.q.expire(now=8.0)
    assert [e.id for e in gone] == [2] and len(q.q) == 1
    assert q.q.next_deadline() == 20.0


def test_pop_skips_expired_heads_and_expire_reports_them() -> None:
    q = Q()
    q.add(deadline=5.0)
    q.add(deadline=50.0)
    e = q.q.pop(now=10.0)
    assert e is not None and e.id == 1
    assert [x.id for x in q.q.expire(now=10.0)] == [0]
    assert len(q.q) == 0 and q.q.bytes == 0
    assert not q.q.cancel(0)  # already reported: nothing left to cancel


def test_cancel() -> None:
    q = Q()
    q.add()
    q.add()
    assert q.q.cancel(0) and not q.q.cancel(0) and not q.q.cancel(99)
    assert len(q.q) == 1 and q.q.bytes == 10
    assert [e.id for e in q.drain(5)] == [1]


ADMIT: list[tuple[str, dict[str, int], int, float, str | None]] = [
    ("fits", {"max_entries": 2}, 10, FAR, None),
    ("too-many", {"max_entries": 1}, 10, FAR, "queue_full"),
    ("too-many-bytes", {"max_bytes": 15}, 10, FAR, "queue_full"),
    ("bytes-exactly-fit", {"max_bytes": 20}, 10, FAR, None),
    ("deadline-past", {}, 10, 0.0, "deadline"),
]


@pytest.mark.parametrize(
    ("limits", "size", "deadline", "code"), [c[1:] for c in ADMIT], ids=[c[0] for c in ADMIT]
)
def test_admit_bounds(limits: dict[str, int], size: int, deadline: float, code: str | None) -> None:
    q = Q(**limits)
    assert isinstance(q.add(size=10), Queued)
    got = q.add(size=size, deadline=deadline)
    assert (got.code if isinstance(got, Rejected) else None) == code


def test_retry_after_follows_the_drain_rate() -> None:
    q = Q(max_entries=20)
    assert q.q.retry_after(now=0.0) == 5.0  # nothing dispatched yet: the default
    for _ in range(30):
        q.add()  # 20 fit
    for i in range(10):  # 10 dispatches over 5 s: 2/s
        q.q.pop(now=float(i) * 0.5)
    for _ in range(10):
        q.add()
    rejected = q.add(now=5.0)
    assert isinstance(rejected, Rejected) and rejected.code == "queue_full"
    assert rejected.retry_after == 10.0  # 20 waiting at 2/s (rate over the last 5 s)
    assert q.q.retry_after(now=1000.0) == 5.0  # old measurements no longer count


def test_duplicate_id_is_a_caller_bug() -> None:
    q = AdmissionQueue()
    q.admit(1, "k", NORMAL, 1, 1, FAR, 0.0)
    with pytest.raises(ValueError, match="already queued"):
        q.admit(1, "k", NORMAL, 1, 1, FAR, 0.0)


def test_accounting_survives_random_operations() -> None:
    rng = random.Random(5)
    q = AdmissionQueue(max_entries=50, max_bytes=4000)
    live: dict[int, Entry] = {}
    now = 0.0
    for i in range(5000):
        now += rng.random()
        op = rng.random()
        if op < 0.5:
            got = q.admit(
                i,
                rng.choice("abcd"),
                rng.choice(list(Priority)),
                rng.randint(1, 500),
                rng.randint(1, 200),
                now + rng.uniform(1, 60),
                now,
            )
            if isinstance(got, Queued):
                live[i] = got.entry
        elif op < 0.75:
            e = q.pop(now)
            if e is not None:
                assert e.deadline >= now and live.pop(e.id) is e
        elif op < 0.9 and live:
            assert q.cancel(rng.choice(list(live)))
        for e in q.expire(now):
            assert e.deadline < now and live.pop(e.id) is e
        live = {k: e for k, e in live.items() if e.waiting}
        assert len(q) == len(live)
        assert q.bytes == sum(e.size for e in live.values())


# --- slots ---------------------------------------------------------------------------------------

SLOTS = [("no-limit", None, 10**6, True), ("below", 4, 3, True), ("at", 4, 4, False)]


@pytest.mark.parametrize(
    ("limit", "inflight", "free"), [c[1:] for c in SLOTS], ids=[c[0] for c in SLOTS]
)
def test_has_free_slot(limit: int | None, inflight: int, free: bool) -> None:
    assert has_free_slot(limit, inflight) is free


OVERSHOOT = [
    ("one-frontend", (8, 1, 0.25, 100.0), 0),
    ("rate-bound", (8, 3, 0.25, 4.0), 2),  # 2 others x ceil(4/s x 0.25 s)
    ("capped-by-limit", (8, 3, 0.25, 1000.0), 16),
    ("bus-delay", (8, 2, 0.2, 10.0, 0.1), 3),
    ("idle", (8, 4, 1.0, 0.0), 0),
]


@pytest.mark.parametrize(
    ("args", "bound"), [c[1:] for c in OVERSHOOT], ids=[c[0] for c in OVERSHOOT]
)
def test_overshoot_bound(args: tuple[float, ...], bound: int) -> None:
    assert overshoot_bound(*args) == bound  # type: ignore[arg-type]

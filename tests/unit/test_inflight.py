"""The in-flight counts: local slots, other frontends' reports, expiry, the pick's view."""

from __future__ import annotations

from corral.bus.messages import LoadReport
from corral.frontend.inflight import InflightTracker
from factories import FakeClock

A = ("m", 0)
B = ("m", 1)
C = ("other", 0)


def _tracker(clock: FakeClock | None = None) -> InflightTracker:
    return InflightTracker("fe-me", stale_after=2.0, clock=clock or FakeClock())


def test_inflight_acquire_counts_and_release_returns_to_zero() -> None:
    t = _tracker()
    s1 = t.acquire(A)
    s2 = t.acquire(A)
    s3 = t.acquire(B)
    assert (t.total(A), t.total(B), t.local_total()) == (2, 1, 3)
    s1.release()
    assert t.total(A) == 1
    s2.release()
    s3.release()
    assert t.local == {}
    assert (t.total(A), t.total(B), t.local_total()) == (0, 0, 0)


def test_inflight_double_release_never_goes_negative() -> None:
    t = _tracker()
    first = t.acquire(A)
    second = t.acquire(A)
    first.release()
    first.release()
    first.release()
    assert t.total(A) == 1, "a repeated release must not free another request's slot"
    assert first.released and not second.released
    second.release()
    second.release()
    assert t.total(A) == 0
    assert A not in t.local


def test_inflight_version_bumps_on_local_changes_only() -> None:
    t = _tracker()
    v0 = t.version
    slot = t.acquire(A)
    v1 = t.version
    assert v1 > v0
    slot.release()
    v2 = t.version
    assert v2 > v1
    slot.release()  # no-op: nothing changed, nothing to report
    assert t.version == v2
    t.merge(LoadReport(frontend_id="fe-other", inflight=[("m", 0, 3)]))
    assert t.version == v2, "remote reports are not this frontend's state"


def test_inflight_merge_adds_remote_counts_and_ignores_own_echo() -> None:
    t = _tracker()
    t.acquire(A)
    t.merge(LoadReport(frontend_id="fe-me", inflight=[("m", 0, 50)]))
    assert t.total(A) == 1, "our own broadcast echoed back must not double count"
    t.merge(LoadReport(frontend_id="fe-2", inflight=[("m", 0, 2), ("m", 1, 4)]))
    t.merge(LoadReport(frontend_id="fe-3", inflight=[("m", 0, 3), ("other", 0, 0)]))
    assert (t.total(A), t.total(B), t.total(C)) == (1 + 2 + 3, 4, 0)
    assert t.local_total() == 1, "remote counts are not local"


def test_inflight_newer_report_replaces_older_one_of_same_frontend() -> None:
    t = _tracker()
    t.merge(LoadReport(frontend_id="fe-2", inflight=[("m", 0, 5)]))
    t.merge(LoadReport(frontend_id="fe-2", inflight=[("m", 1, 1)]))
    assert (t.total(A), t.total(B)) == (0, 1)


def test_inflight_expire_forgets_stale_reports_only() -> None:
    clock = FakeClock(100.0)
    t = _tracker(clock)
    t.merge(LoadReport(frontend_id="fe-old", inflight=[("m", 0, 4)]))
    clock.now = 101.0
    t.merge(LoadReport(frontend_id="fe-new", inflight=[("m", 0, 1)]))
    clock.now = 101.9  # fe-old is 1.9 s old: still fresh
    t.expire()
    assert t.total(A) == 5
    clock.now = 102.5  # fe-old 2.5 s old (stale), fe-new 1.5 s old
    t.expire()
    assert t.total(A) == 1
    clock.now = 110.0
    t.expire()
    assert t.total(A) == 0


def test_inflight_view_is_a_mapping_of_local_plus_remote() -> None:
    t = _tracker()
    t.acquire(A)
    t.acquire(A)
    t.merge(LoadReport(frontend_id="fe-2", inflight=[("m", 0, 1), ("m", 1, 3)]))
    view = t.view()
    assert view[A] == 3
    assert view.get(B, 0) == 3
    assert view.get(C, 0) == 0
    assert view[C] == 0
    assert set(view) == {A, B}
    assert len(view) == 2
    assert dict(view) == {A: 3, B: 3}
    t.acquire(C)  # a live view: later changes show through
    assert view[C] == 1 and len(view) == 3


def test_inflight_report_carries_local_counts_and_clock() -> None:
    clock = FakeClock(42.0)
    t = _tracker(clock)
    t.acquire(A)
    t.acquire(B)
    t.acquire(B)
    t.merge(LoadReport(frontend_id="fe-2", inflight=[("m", 0, 9)]))
    report = t.report()
    assert report.frontend_id == "fe-me"
    assert report.at == 42.0
    assert sorted(report.inflight) == [("m", 0, 1), ("m", 1, 2)]
    # what one frontend reports, another one merges
    other = InflightTracker("fe-2", clock=clock)
    other.merge(LoadReport.model_validate_json(report.model_dump_json()))
    assert (other.total(A), other.total(B)) == (1, 2)


def test_model_signals_sum_queues_and_take_the_worst_wait_and_ttft() -> None:
    clock = FakeClock()
    t = _tracker(clock)
    t.set_queue("m", 3, 0.5)
    for ms in range(1, 11):
        t.observe_ttft("m", ms / 1000)
    assert (t.queued("m"), t.queue_wait("m"), t.ttft_p90("m")) == (3, 0.5, 0.009)
    other = InflightTracker("fe-other", clock=clock)
    other.set_queue("m", 2, 4.0)
    other.observe_ttft("m", 0.2)
    t.merge(other.report())
    assert (t.queued("m"), t.queue_wait("m"), t.ttft_p90("m")) == (5, 4.0, 0.2)
    assert (t.queued("x"), t.queue_wait("x"), t.ttft_p90("x")) == (0, 0.0, None)
    t.set_queue("m", 0, 0.0)
    clock.now += 10
    t.expire()
    assert (t.queued("m"), t.queue_wait("m"), t.ttft_p90("m")) == (0, 0.0, 0.009)


def test_reports_without_model_signals_still_merge() -> None:
    t = _tracker()
    t.merge(LoadReport.model_validate({"frontend_id": "old-fe", "inflight": [["m", 0, 2]]}))
    assert (t.total(A), t.queued("m")) == (2, 0)

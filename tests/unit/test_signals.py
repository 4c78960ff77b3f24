"""The autoscaler's signals: values per metric from the view and the in-flight counts, and the
mean between two takes."""

from __future__ import annotations

from corral.domain.autoscale import Sample, ScalingTarget, Signal
from corral.domain.entities import ReplicaState
from corral.frontend.inflight import InflightTracker
from corral.frontend.signals import LoadSignals
from corral.frontend.view import ClusterView
from factories import FakeClock, model, node, replica


def setup(metric: Signal) -> tuple[LoadSignals, InflightTracker]:
    view = ClusterView()
    view.put_node(node("n1"))
    view.put_model(model("m", scaling=ScalingTarget(metric, 1.0)))
    view.put_model(model("plain"))
    view.put_replica(replica("m", 0))
    view.put_replica(replica("m", 1))
    view.put_replica(replica("m", 2, state=ReplicaState.LOADING))
    inflight = InflightTracker("fe", clock=FakeClock())
    return LoadSignals(view, inflight), inflight


def test_inflight_per_replica_counts_queued_requests_over_loaded_replicas() -> None:
    signals, inflight = setup(Signal.INFLIGHT)
    for _ in range(3):
        inflight.acquire(("m", 0))
    inflight.set_queue("m", 3, 2.0)
    spec = signals.view.models["m"]
    assert signals.value(spec) == 3.0  # (3 in flight + 3 queued) / 2 loaded
    assert signals.value(signals.view.models["plain"]) is None, "no scaling, no signal"


def test_queue_wait_and_ttft_come_from_the_reports() -> None:
    signals, inflight = setup(Signal.QUEUE_WAIT)
    assert signals.value(signals.view.models["m"]) == 0.0, "nothing waits"
    inflight.set_queue("m", 1, 2.5)
    assert signals.value(signals.view.models["m"]) == 2.5
    ttft, inflight = setup(Signal.TTFT_P90)
    assert ttft.value(ttft.view.models["m"]) is None, "no answer measured yet"
    inflight.observe_ttft("m", 0.3)
    assert ttft.value(ttft.view.models["m"]) == 0.3


def test_take_returns_the_mean_since_the_last_take() -> None:
    signals, inflight = setup(Signal.INFLIGHT)
    slot = inflight.acquire(("m", 0))
    signals.sample()  # 0.5 per replica
    inflight.acquire(("m", 1))
    inflight.acquire(("m", 1))
    signals.sample()  # 1.5
    assert signals.take(100.0) == {"m": Sample(100.0, 1.0)}
    slot.release()
    assert signals.take(101.0) == {"m": Sample(101.0, 1.0)}, "sampled once when not yet"

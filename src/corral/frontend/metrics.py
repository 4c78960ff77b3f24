"""Prometheus metrics of one frontend process, through prometheus-client: a registry per process.

The request path only adds to plain numbers (one dict lookup and two bisects: no lock, since
a frontend serves on one event loop thread); `FrontendCollector` turns them, and the gauges
read from the view, into metric families at scrape time. Label values stay bounded: a model
is a label only while it is declared (else "other"), endpoints are the proxy's fixed paths.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from corral.frontend.routing_metrics import routing_families

if TYPE_CHECKING:
    from corral.frontend.service import Frontend

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: Seconds: request durations and times to first byte (a token stream may last minutes).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
#: Seconds: waits in the admission queue.
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: Seconds: model loads (a start, until its backend answers).
LOAD_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
#: Label combinations past this many fold into model "other" (models come and go).
MAX_SERIES = 2000
OTHER = "other"
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")


class Histogram:
    """Bucket counts (not cumulative), their sum and count: what `observe` costs is a bisect."""

    __slots__ = ("bounds", "buckets", "count", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = bounds
        self.buckets = [0] * (len(bounds) + 1)  # the last one: +Inf
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.buckets[bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, float]]:
        """(le, count) pairs as the exposition format wants them."""
        out: list[tuple[str, float]] = []
        total = 0
        for bound, n in zip((*self.bounds, float("inf")), self.buckets, strict=True):
            total += n
            out.append(("+Inf" if bound == float("inf") else repr(float(bound)), total))
        return out


class RequestSeries:
    """One (model, endpoint, status class): requests, their durations, their first bytes."""

    __slots__ = ("duration", "first_byte")

    def __init__(self) -> None:
        self.duration = Histogram(LATENCY_BUCKETS)
        self.first_byte = Histogram(LATENCY_BUCKETS)


class FrontendMetrics:
    """What the request path, the queue and the actuator observe; read by `FrontendCollector`."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, str], RequestSeries] = {}
        self.queue_wait: dict[str, Histogram] = {}
        self.loads: dict[tuple[str, str], Histogram] = {}  # (model, outcome)

    def observe_request(
        self,
        model: str,
        endpoint: str,
        status: int,
        seconds: float,
        first_byte: float | None,
    ) -> None:
        """One answered request: `model` a declared model (else "other"), `first_byte` the
        seconds until its first body byte went out (None: it sent none or failed)."""
        cls = STATUS_CLASSES[min(4, max(0, status // 100 - 1))]
        key = (model, endpoint, cls)
        series = self.requests.get(key)
        if series is None:
            if len(self.requests) >= MAX_SERIES:
                key = (OTHER, endpoint, cls)
                series = self.requests.get(key)
            if series is None:
                series = self.requests[key] = RequestSeries()
        series.duration.observe(seconds)
        if first_byte is not None:
            series.first_byte.observe(first_byte)

    def observe_queue_wait(self, model: str, seconds: float) -> None:
        """A request left the admission queue after `seconds` (`model`: a declared model)."""
        hist = self.queue_wait.get(model)
        if hist is None:
            if len(self.queue_wait) >= MAX_SERIES:
                model = OTHER
            hist = self.queue_wait.setdefault(model, Histogram(QUEUE_BUCKETS))
        hist.observe(seconds)

    def observe_load(self, model: str, outcome: str, seconds: float) -> None:
        """A replica start ended (`outcome`: loaded or failed) after `seconds`."""
        key = (model, outcome)
        hist = self.loads.get(key)
        if hist is None:
            hist = self.loads[key] = Histogram(LOAD_BUCKETS)
        hist.observe(seconds)


class FrontendCollector(Collector):
    """The frontend's metric families, built at scrape time."""

    def __init__(self, frontend: Frontend) -> None:
        self.frontend = frontend

    def collect(self) -> Iterator[Metric]:
        fe = self.frontend
        yield from _request_families(fe.metrics)
        yield from _state_families(fe, time.time())
        yield from _counter_families(fe)
        yield from _admission_families(fe)
        yield from routing_families(fe.router, fe.prefixes)


def _histogram(name: str, doc: str, labels: list[str]) -> HistogramMetricFamily:
    return HistogramMetricFamily(name, doc, labels=labels)


def _request_families(m: FrontendMetrics) -> Iterator[Metric]:
    labels = ["model", "endpoint", "status_class"]
    count = CounterMetricFamily(
        "corral_requests",
        "Inference requests answered, by model, endpoint and status class.",
        labels=labels,
    )
    duration = _histogram(
        "corral_request_duration_seconds",
        "Seconds from a request's arrival to the end of its answer.",
        labels,
    )
    first = _histogram(
        "corral_time_to_first_byte_seconds",
        "Seconds from a request's arrival to the first byte of its answer's body.",
        labels,
    )
    for key, series in sorted(m.requests.items()):
        values = list(key)
        count.add_metric(values, series.duration.count)
        duration.add_metric(values, series.duration.cumulative(), series.duration.sum)
        if series.first_byte.count:
            first.add_metric(values, series.first_byte.cumulative(), series.first_byte.sum)
    queue = _histogram(
        "corral_queue_wait_seconds", "Seconds requests waited in the admission queue.", ["model"]
    )
    for model, hist in sorted(m.queue_wait.items()):
        queue.add_metric([model], hist.cumulative(), hist.sum)
    loads = _histogram(
        "corral_load_duration_seconds",
        "Seconds replica starts took on this frontend, until loaded or failed.",
        ["model", "outcome"],
    )
    for (model, outcome), hist in sorted(m.loads.items()):
        loads.add_metric([model, outcome], hist.cumulative(), hist.sum)
    yield from (count, duration, first, queue, loads)


def _state_families(fe: Frontend, now: float) -> Iterator[Metric]:
    view = fe.view
    inflight = GaugeMetricFamily(
        "corral_inflight",
        "Requests in flight on this frontend, per replica.",
        labels=["model", "replica"],
    )
    for (model, index), n in sorted(fe.inflight.local.items()):
        inflight.add_metric([model, str(index)], n)
    replicas = GaugeMetricFamily(
        "corral_replicas",
        "Replicas known to this frontend, by model and state.",
        labels=["model", "state"],
    )
    counts: dict[tuple[str, str], int] = {}
    for r in view.replicas.values():
        counts[(r.model, r.state.value)] = counts.get((r.model, r.state.value), 0) + 1
    for key, n in sorted(counts.items()):
        replicas.add_metric(list(key), n)
    nodes = GaugeMetricFamily(
        "corral_nodes", "Nodes known to this frontend, by status.", labels=["status"]
    )
    status: dict[str, int] = {}
    for node in view.nodes.values():
        status[node.status.value] = status.get(node.status.value, 0) + 1
    for name, n in sorted(status.items()):
        nodes.add_metric([name], n)
    leader = GaugeMetricFamily(
        "corral_reconciler_leader",
        "1 while this frontend runs the reconciler.",
        value=int(fe.reconciler.leader),
    )
    age = GaugeMetricFamily(
        "corral_view_age_seconds",
        "Seconds since the last full resync.",
        value=max(0.0, now - view.synced_at),
    )
    yield from (inflight, replicas, nodes, leader, age)


def _counter_families(fe: Frontend) -> Iterator[Metric]:
    yield CounterMetricFamily(
        "corral_cold_loads", "Model loads this frontend performed.", value=fe.cold.starts
    )
    yield CounterMetricFamily(
        "corral_probes", "Backend health probes sent.", value=fe.probes.probes
    )
    yield CounterMetricFamily(
        "corral_reconcile_ticks", "Reconcile ticks this frontend ran.", value=fe.reconciler.ticks
    )
    actions = CounterMetricFamily(
        "corral_reconcile_actions",
        "Actions the reconciler's plans handed to the actuator, by kind.",
        labels=["action"],
    )
    for kind, n in sorted(fe.reconciler.actions.items()):
        actions.add_metric([kind], n)
    yield actions
    yield CounterMetricFamily(
        "corral_nats_errors",
        "NATS errors: connection, publish and request failures.",
        value=fe.bus.errors,
    )
    yield CounterMetricFamily(
        "corral_db_errors", "PostgreSQL errors raised to this frontend.", value=fe.registry.errors
    )


def _admission_families(fe: Frontend) -> Iterator[Metric]:
    gate = fe.admission
    for name, doc, value in (
        ("corral_admission_rejected", "Requests answered 429 queue_full.", gate.rejected),
        ("corral_admission_expired", "Requests answered 504 deadline_exceeded.", gate.expired),
        (
            "corral_admission_abandoned",
            "Clients that left while waiting in a queue.",
            gate.abandoned,
        ),
    ):
        yield CounterMetricFamily(name, doc, value=value)
    depth = GaugeMetricFamily(
        "corral_queue_depth",
        "Requests waiting for a slot on this frontend, per model.",
        labels=["model"],
    )
    longest = GaugeMetricFamily(
        "corral_queue_longest_wait_seconds",
        "The longest wait of a request queued now on this frontend, per model.",
        labels=["model"],
    )
    for model, queue in sorted(gate.queues().items()):
        depth.add_metric([model], queue["depth"])
        longest.add_metric([model], queue["longest_wait"])
    yield from (depth, longest)


def metrics_registry(frontend: Frontend) -> CollectorRegistry:
    """A registry of this frontend's own (not prometheus-client's process-global one)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FrontendCollector(frontend))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The text exposition of `registry`."""
    return generate_latest(registry)

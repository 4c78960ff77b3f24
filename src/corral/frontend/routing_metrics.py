"""Metric families of routing's per-scorer counters and the shared prefix index (kept apart so
the router knows nothing of prometheus-client)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from corral.frontend.prefix_share import PrefixShare
from corral.frontend.router import ModelCounters, Router

#: (metric suffix, ModelCounters field, help)
COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("decisions", "decisions", "Requests routed among two or more replicas."),
    ("prefix_matched", "prefix_matched", "Decisions where a replica had served the prefix."),
    ("prefix_followed", "prefix_followed", "Decisions sent to the best prefix match."),
    ("session_matched", "session_matched", "Decisions whose session had a replica."),
    ("session_followed", "session_followed", "Decisions sent to the session's replica."),
    ("speed_slow", "speed_slow", "Decisions with a measurably slower candidate."),
)


def routing_families(router: Router, share: PrefixShare | None = None) -> Iterator[Metric]:
    """`corral_route_<counter>_total{model}` per scorer, and the index's and table's sizes."""
    counters: list[tuple[str, ModelCounters]] = sorted(router.counters.items())
    for suffix, field, text in COUNTERS:
        family = CounterMetricFamily(f"corral_route_{suffix}", text, labels=["model"])
        for model, c in counters:
            family.add_metric([model], getattr(c, field))
        yield family
    yield GaugeMetricFamily(
        "corral_route_prefix_entries",
        "Prompt-prefix hashes in the routing index.",
        value=len(router.index),
    )
    yield GaugeMetricFamily(
        "corral_route_sessions",
        "Sessions remembered for session affinity.",
        value=len(router.sessions),
    )
    if share is not None:
        yield CounterMetricFamily(
            "corral_route_prefix_batches_sent",
            "Prefix batches sent to frontends.",
            value=share.sent,
        )
        yield CounterMetricFamily(
            "corral_route_prefix_batches_merged",
            "Prefix batches merged from others.",
            value=share.merged,
        )

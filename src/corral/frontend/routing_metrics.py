"""Prometheus text of routing's per-scorer counters and the shared prefix index (one function,
kept apart so the metrics move to prometheus-client without touching the router)."""

from __future__ import annotations

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


def routing_metrics(router: Router, share: PrefixShare | None = None) -> str:
    """`corral_route_<counter>_total{model}` per scorer, and the index's and table's sizes."""
    lines: list[str] = []
    counters: list[tuple[str, ModelCounters]] = sorted(router.counters.items())
    for suffix, field, text in COUNTERS:
        name = f"corral_route_{suffix}_total"
        lines += [f"# HELP {name} {text}", f"# TYPE {name} counter"]
        for model, c in counters:
            lines.append(f'{name}{{model="{model}"}} {getattr(c, field)}')
    lines += [
        "# HELP corral_route_prefix_entries Prompt-prefix hashes in the routing index.",
        "# TYPE corral_route_prefix_entries gauge",
        f"corral_route_prefix_entries {len(router.index)}",
        "# HELP corral_route_sessions Sessions remembered for session affinity.",
        "# TYPE corral_route_sessions gauge",
        f"corral_route_sessions {len(router.sessions)}",
    ]
    if share is not None:
        lines += [
            "# HELP corral_route_prefix_batches_sent_total Prefix batches sent to frontends.",
            "# TYPE corral_route_prefix_batches_sent_total counter",
            f"corral_route_prefix_batches_sent_total {share.sent}",
            "# HELP corral_route_prefix_batches_merged_total Prefix batches merged from others.",
            "# TYPE corral_route_prefix_batches_merged_total counter",
            f"corral_route_prefix_batches_merged_total {share.merged}",
        ]
    return "\n".join(lines) + "\n"

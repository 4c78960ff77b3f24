"""Prometheus text exposition of the frontend's own counters and view."""

from __future__ import annotations

from typing import TYPE_CHECKING

from corral.frontend.routing_metrics import routing_metrics

if TYPE_CHECKING:
    from corral.frontend.service import Frontend


def render_metrics(fe: Frontend, now: float) -> str:
    view = fe.view
    lines = [
        "# HELP corral_inflight Requests in flight on this frontend, per replica.",
        "# TYPE corral_inflight gauge",
    ]
    for (model, index), count in sorted(fe.inflight.local.items()):
        lines.append(f'corral_inflight{{model="{model}",replica="{index}"}} {count}')
    lines += [
        "# HELP corral_replicas Replicas known to this frontend, by model and state.",
        "# TYPE corral_replicas gauge",
    ]
    counts: dict[tuple[str, str], int] = {}
    for r in view.replicas.values():
        counts[(r.model, r.state.value)] = counts.get((r.model, r.state.value), 0) + 1
    for (model, state), count in sorted(counts.items()):
        lines.append(f'corral_replicas{{model="{model}",state="{state}"}} {count}')
    lines += [
        "# HELP corral_nodes Nodes known to this frontend, by status.",
        "# TYPE corral_nodes gauge",
    ]
    status: dict[str, int] = {}
    for n in view.nodes.values():
        status[n.status.value] = status.get(n.status.value, 0) + 1
    for name, count in sorted(status.items()):
        lines.append(f'corral_nodes{{status="{name}"}} {count}')
    lines += [
        "# HELP corral_cold_loads_total Model loads this frontend performed.",
        "# TYPE corral_cold_loads_total counter",
        f"corral_cold_loads_total {fe.cold.starts}",
        "# HELP corral_probes_total Backend health probes sent.",
        "# TYPE corral_probes_total counter",
        f"corral_probes_total {fe.probes.probes}",
        "# HELP corral_reconciler_leader 1 while this frontend runs the reconciler.",
        "# TYPE corral_reconciler_leader gauge",
        f"corral_reconciler_leader {int(fe.reconciler.leader)}",
        "# HELP corral_reconcile_ticks_total Reconcile ticks this frontend ran.",
        "# TYPE corral_reconcile_ticks_total counter",
        f"corral_reconcile_ticks_total {fe.reconciler.ticks}",
        "# HELP corral_admission_rejected_total Requests answered 429 queue_full.",
        "# TYPE corral_admission_rejected_total counter",
        f"corral_admission_rejected_total {fe.admission.rejected}",
        "# HELP corral_admission_expired_total Requests answered 504 deadline_exceeded.",
        "# TYPE corral_admission_expired_total counter",
        f"corral_admission_expired_total {fe.admission.expired}",
        "# HELP corral_admission_abandoned_total Clients that left while waiting in a queue.",
        "# TYPE corral_admission_abandoned_total counter",
        f"corral_admission_abandoned_total {fe.admission.abandoned}",
        "# HELP corral_view_age_seconds Seconds since the last full resync.",
        "# TYPE corral_view_age_seconds gauge",
        f"corral_view_age_seconds {max(0.0, now - view.synced_at):.3f}",
    ]
    lines += [
        "# HELP corral_queue_depth Requests waiting for a slot on this frontend, per model.",
        "# TYPE corral_queue_depth gauge",
        "# HELP corral_queue_wait_seconds The longest wait of a queued request, per model.",
        "# TYPE corral_queue_wait_seconds gauge",
    ]
    for model, queue in fe.admission.queues().items():
        lines.append(f'corral_queue_depth{{model="{model}"}} {queue["depth"]:g}')
        lines.append(f'corral_queue_wait_seconds{{model="{model}"}} {queue["longest_wait"]:.3f}')
    return "\n".join(lines) + "\n" + routing_metrics(fe.router, fe.prefixes)

"""Autoscaling on a real cluster with the sim's engine model: a step in load from one replica's
capacity to four times it scales the model up until the signal is under its target; without
load it scales back (highest index first), then to zero after the idle timeout; the next
request wakes it.

The sim runs 2 requests at a time (`slots`), about 0.8 s each (long next to a client's own
gap between two requests, even on a loaded machine). The model scales on in-flight requests
per replica with a target of 2.2: 2 closed-loop clients (1x) never exceed it, 8 (4x) ask for
ceil(8 / 2.2) = 4 replicas, which bring it back to 2.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from cluster import FAST_FRONTEND_ENV, Cluster, wait_for
from traffic import Traffic, events, loaded, start_workers

pytestmark = pytest.mark.slow

TICK = float(FAST_FRONTEND_ENV["CORRAL_RECONCILE_INTERVAL"])
TARGET = 2.2
WINDOW = 2.0
IDLE = 8.0


def scaling(cluster: Cluster) -> dict[str, Any]:
    found: dict[str, Any] = cluster.api("GET", "/api/models/chat")["scaling"]
    return found


def load_seconds(message: str) -> float:
    """How long a load took, from its audit entry ("... in 1.23s (revision ...)")."""
    return float(message.split(" in ")[1].split("s")[0])


def count(cluster: Cluster) -> int:
    return len(loaded(cluster, "chat"))


def test_a_load_step_scales_up_then_back_down_and_to_zero(cluster: Cluster) -> None:
    cluster.write_model(
        "chat",
        options={"slots": 2, "tokens": 16, "tpot": 0.05, "load_time": 1},
        scheduling={
            "min_replicas": 0,
            "max_replicas": 6,
            "scale_down_delay": 3,
            "scaling": {
                "metric": "inflight",
                "target": TARGET,
                "window": WINDOW,
                "idle_timeout": IDLE,
            },
        },
    )
    cluster.start_frontend()
    start_workers(cluster, "w1")
    assert cluster.replicas("chat") == [], "min_replicas 0: nothing preloaded"

    with Traffic(cluster.url(), "chat", clients=2) as base:  # 1x: one replica's capacity
        base.wait_for_successes(10, timeout=60)  # the first one woke the model
        time.sleep(WINDOW + 2 * TICK)
        assert count(cluster) == 1
        step = time.monotonic()
        with Traffic(cluster.url(), "chat", clients=6) as surge:  # now 8 clients: 4x
            wait_for(
                lambda: count(cluster) == 4 and (scaling(cluster)["value"] or 0) < TARGET,
                timeout=60,
                interval=0.2,
                what="4 replicas and the signal under target",
            )
            took = time.monotonic() - step
            surge.wait_for_successes(10)
        decisions = [e["message"] for e in events(cluster, "model.scaled")]
        assert len(decisions) == 1 and decisions[0].startswith(
            "scaled up 1 -> 4: inflight_per_replica"
        ), decisions
        loads = [load_seconds(e["message"]) for e in events(cluster, "replica.loaded")]
        bound = WINDOW + max(loads[:3]) + 2 * TICK + 2  # + one sample period and event delays
        print(f"\nscaled 1 -> 4 {took:.1f}s after the step (window {WINDOW}, loads {loads[:3]})")
        assert took <= bound, f"{took:.1f}s > window + load + 2 ticks ({bound:.1f}s)"
    assert base.failures() == [] and surge.failures() == []

    wait_for(lambda: count(cluster) == 1, timeout=30, what="scaled back to one replica")
    (only,) = loaded(cluster, "chat")
    assert only["index"] == 0, "the highest indexes went first"
    wait_for(lambda: cluster.replicas("chat") == [], timeout=IDLE + 15, what="scaled to zero")
    down = [e["message"] for e in events(cluster, "model.scaled")]
    assert down[0].startswith("scaled down 1 -> 0: idle for")
    assert any(m.startswith("scaled down 4 -> ") for m in down), down

    body = {"model": "chat", "messages": [{"role": "user", "content": "wake up"}]}
    woke = httpx.post(cluster.url() + "/v1/chat/completions", json=body, timeout=60)
    assert woke.status_code == 200

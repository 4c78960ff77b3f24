"""`min_replicas` above capacity: capped, reported once, resumed when a worker joins."""

from __future__ import annotations

import httpx
import pytest

from cluster import Cluster, wait_for
from traffic import chat, events, loaded, start_workers

pytestmark = pytest.mark.slow


def test_minimum_above_capacity_is_capped_then_resumed(cluster: Cluster) -> None:
    cluster.write_model("chat", options={"tokens": 2}, scheduling={"min_replicas": 3})
    cluster.start_frontend(CORRAL_CAPACITY_COOLDOWN="0.5")  # retry (and stay quiet) every tick
    one_each = ["--max-replicas-per-model", "1"]
    start_workers(cluster, "w1", "w2", args=one_each)

    # a declared model preloads its minimum from its spec, no request needed, capped by capacity
    wait_for(lambda: len(loaded(cluster, "chat")) == 2, what="capped at 2 replicas")
    assert chat(cluster, "chat").status_code == 200
    wait_for(lambda: events(cluster, "model.capacity"), what="the shortage reported")
    first = tick_count(cluster)
    wait_for(lambda: tick_count(cluster) >= first + 4, what="four more ticks")
    assert len(cluster.replicas("chat")) == 2
    assert len(events(cluster, "model.capacity")) == 1  # once, not once per tick or cooldown
    assert events(cluster, "model.waiting") == []

    cluster.start_worker("w3", args=one_each)
    wait_for(lambda: len(loaded(cluster, "chat")) == 3, what="the third replica on the new node")


def tick_count(cluster: Cluster) -> int:
    text = httpx.get(cluster.url() + "/metrics", timeout=5).text
    line = next(x for x in text.splitlines() if x.startswith("corral_reconcile_ticks_total "))
    return int(float(line.split()[1]))

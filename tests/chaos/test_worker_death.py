"""A worker dies (kill -9) under load: its replica is replaced elsewhere, no request fails."""

from __future__ import annotations

import time

import pytest

from cluster import FAST_FRONTEND_ENV, Cluster, wait_for
from traffic import Traffic, chat, loaded, node_id, start_workers

pytestmark = pytest.mark.slow

LOAD_TIME = 1.0  # seconds the simulated model takes to load


def test_killed_worker_is_replaced_within_two_ticks_plus_load_time(cluster: Cluster) -> None:
    cluster.write_model(
        "chat",
        options={"tokens": 4, "ttft": 0.02, "load_time": LOAD_TIME},
        scheduling={"min_replicas": 2},
    )
    cluster.start_frontend()
    workers = start_workers(cluster, "w1", "w2", "w3", args=["--max-replicas-per-model", "1"])
    assert chat(cluster, "chat").status_code == 200  # the first load records the load info
    hosts = wait_for(lambda: len(loaded(cluster, "chat")) == 2 and loaded(cluster, "chat"))
    victim_id = hosts[0]["node_id"]
    victim = next(w for w in workers if node_id(cluster, w.name) == victim_id)

    with Traffic(cluster.url(), "chat") as traffic:
        traffic.wait_for_successes(5)
        killed = time.monotonic()
        victim.kill()
        detected = wait_for(
            lambda: (
                next(n["status"] for n in cluster.nodes() if n["id"] == victim_id) != "healthy"
                and time.monotonic()
            ),
            interval=0.02,
            what="the dead worker's node leaves healthy",
        )
        replaced = wait_for(
            lambda: (
                len(r := loaded(cluster, "chat")) == 2
                and victim_id not in {x["node_id"] for x in r}
                and time.monotonic()
            ),
            interval=0.02,
            what="a replacement replica on another node",
        )
        traffic.wait_for_successes(len(traffic.outcomes) + 5)

    tick = float(FAST_FRONTEND_ENV["CORRAL_RECONCILE_INTERVAL"])
    heartbeat = float(FAST_FRONTEND_ENV["CORRAL_HEARTBEAT_INTERVAL"])
    unhealthy = int(FAST_FRONTEND_ENV["CORRAL_UNHEALTHY_AFTER"]) * heartbeat
    print(
        f"\nworker killed -> full replica count in {replaced - killed:.2f}s "
        f"(detected after {detected - killed:.2f}s; tick {tick}s, heartbeat {heartbeat}s, "
        f"unhealthy after {unhealthy}s, load time {LOAD_TIME}s); "
        f"{len(traffic.failures())} of {len(traffic.outcomes)} requests failed"
    )
    assert replaced - detected <= 2 * tick + LOAD_TIME + 1.0  # 1 s for the start round trips
    assert traffic.failures(after=detected) == []
    assert len(traffic.outcomes) > 20

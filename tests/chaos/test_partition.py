"""A worker is cut off (SIGSTOP) until it goes offline, then heals: no duplicate replicas remain."""

from __future__ import annotations

import signal

import psutil
import pytest

from cluster import Cluster, wait_for
from traffic import chat, loaded, node_id, start_workers

pytestmark = pytest.mark.slow


def test_orphans_of_a_healed_partition_are_stopped(cluster: Cluster) -> None:
    cluster.write_model("chat", options={"tokens": 2}, scheduling={"min_replicas": 2})
    cluster.start_frontend()
    workers = start_workers(cluster, "w1", "w2", "w3", args=["--max-replicas-per-model", "1"])
    assert chat(cluster, "chat").status_code == 200
    hosts = wait_for(lambda: len(r := loaded(cluster, "chat")) == 2 and r, what="2 replicas")
    frozen_id = hosts[0]["node_id"]
    frozen = next(w for w in workers if node_id(cluster, w.name) == frozen_id)
    orphans = frozen.tree()[1:]
    assert len(orphans) == 1  # the backend of the replica it hosts

    frozen.signal(signal.SIGSTOP)
    try:
        wait_for(lambda: cluster.node(frozen.name, status="offline"), what="frozen node offline")
        wait_for(
            lambda: (
                len(r := loaded(cluster, "chat")) == 2
                and frozen_id not in {x["node_id"] for x in r}
            ),
            what="a replacement on another node",
        )
        assert orphans[0].is_running()  # the backend kept running: the partition's orphan
    finally:
        frozen.signal(signal.SIGCONT)

    wait_for(lambda: cluster.node(frozen.name, status="healthy"), what="healed node healthy")
    psutil.wait_procs(orphans, timeout=30)
    assert not orphans[0].is_running()
    replicas = cluster.replicas("chat")
    assert len(replicas) == 2 and frozen_id not in {r["node_id"] for r in replicas}
    wait_for(
        lambda: cluster.api("GET", f"/api/nodes/{frozen_id}")["processes"] == [],
        what="the healed worker reports no process",
    )
    orphan_events = [
        e for e in cluster.api("GET", "/api/events")["events"] if e["kind"] == "replica.orphan"
    ]
    assert len(orphan_events) == 1

"""Draining a node under load (`corral drain`) and a worker draining itself on SIGTERM."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import psutil
import pytest

from cluster import Cluster, wait_for
from traffic import Traffic, chat, events, loaded, node_id, start_workers

pytestmark = pytest.mark.slow


def test_drain_under_load_moves_replicas_without_a_failed_request(cluster: Cluster) -> None:
    cluster.write_model("chat", options={"tokens": 4, "ttft": 0.1}, scheduling={"min_replicas": 2})
    cluster.start_frontend(CORRAL_DRAIN_TIMEOUT="60")
    start_workers(cluster, "w1", "w2", "w3", args=["--max-replicas-per-model", "1"])
    assert chat(cluster, "chat").status_code == 200
    hosts = wait_for(lambda: len(r := loaded(cluster, "chat")) == 2 and r, what="2 replicas")
    drained = hosts[0]["node_id"]

    with Traffic(cluster.url(), "chat", clients=6) as traffic:  # never idle: 3 per replica
        traffic.wait_for_successes(5)
        began = time.monotonic()
        out = subprocess.run(
            [
                *(sys.executable, "-m", "corral", "drain", drained, "--json"),
                *("--url", cluster.url(), "--api-key", cluster.admin_key),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        took = time.monotonic() - began
        sent = len(traffic.outcomes)
        traffic.wait_for_successes(sent + 10)

    assert json.loads(out.stdout) == {
        "node_id": drained,
        "name": next(n["name"] for n in cluster.nodes() if n["id"] == drained),
        "status": "drained",
        "stopped_replicas": 1,
    }
    assert traffic.failures() == []
    assert took < 30  # not the drain timeout (60 s): the drained replica got no new request
    now = loaded(cluster, "chat")
    assert len(now) == 2 and drained not in {r["node_id"] for r in now}
    # the node's process list is its last heartbeat's: the next one shows the stop
    wait_for(
        lambda: cluster.api("GET", f"/api/nodes/{drained}")["processes"] == [],
        timeout=10,
        what="the drained node reports no process",
    )
    assert next(n for n in cluster.nodes() if n["id"] == drained)["status"] == "draining"


def test_sigterm_worker_drains_itself_and_deregisters(cluster: Cluster) -> None:
    # loading takes longer than a heartbeat may be late: the worker heartbeats while it drains
    cluster.write_model(
        "chat", options={"tokens": 2, "load_time": 2}, scheduling={"min_replicas": 1}
    )
    cluster.start_frontend()
    start_workers(cluster, "w1", "w2", args=["--max-replicas-per-model", "1"])
    assert chat(cluster, "chat").status_code == 200
    first = wait_for(lambda: loaded(cluster, "chat"), what="a replica")[0]
    gone = first["node_id"]
    leaving = next(w for w in cluster.workers if node_id(cluster, w.name) == gone)
    backends = leaving.tree()[1:]
    assert len(backends) == 1
    identity = cluster.root / "workers" / leaving.name / "node.json"
    saved = identity.read_text()

    assert leaving.stop() == 0  # SIGTERM: drains, stops its backends, deregisters, exits 0
    psutil.wait_procs(backends, timeout=5)
    assert not any(p.is_running() for p in backends)
    assert next(n for n in cluster.nodes() if n["id"] == gone)["status"] == "offline"
    assert events(cluster, "node.deregistered")
    assert [e["message"] for e in events(cluster, "node.status")] == []  # never judged late
    assert identity.read_text() == saved  # the same node when it starts again
    replicas = cluster.replicas("chat")
    assert len(replicas) == 1 and replicas[0]["state"] == "loaded"
    assert replicas[0]["node_id"] != gone
    # its replacement was loaded before the leaving replica stopped: never below the minimum
    replacement = next(e for e in events(cluster, "replica.loaded") if gone not in e["message"])
    stopped = next(e for e in events(cluster, "replica.removed") if gone in e["message"])
    assert replacement["id"] < stopped["id"]

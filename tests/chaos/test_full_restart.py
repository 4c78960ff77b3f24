"""The whole cluster restarts: the model is back at its minimum before any inference request."""

from __future__ import annotations

import httpx
import psutil
import pytest

from cluster import Cluster, wait_for
from traffic import chat, loaded, start_workers

pytestmark = pytest.mark.slow


def test_model_restored_to_its_minimum_after_a_full_restart(cluster: Cluster) -> None:
    cluster.write_model("chat", options={"tokens": 2}, scheduling={"min_replicas": 2})
    cluster.start_frontend()
    one_each = ["--max-replicas-per-model", "1"]
    start_workers(cluster, "w1", "w2", args=one_each)
    assert chat(cluster, "chat").status_code == 200
    before = wait_for(lambda: len(r := loaded(cluster, "chat")) == 2 and r, what="2 replicas")
    backends = [p for w in cluster.workers for p in w.tree()[1:]]
    assert len(backends) == 2

    old_frontend = cluster.frontends[0]
    old_frontend.stop()
    cluster.frontends.remove(old_frontend)  # the cluster's helpers talk to frontends[0]
    for worker in list(cluster.workers):
        worker.kill()  # kill -9: its backends die with it
    psutil.wait_procs(backends, timeout=10)
    assert not any(p.is_running() for p in backends)

    frontend = cluster.start_frontend(wait=False)
    start_workers(cluster, "w1", "w2", args=one_each)  # they register once it is up
    cluster.wait_healthy(frontend)
    old = {r["address"] for r in before}

    def restored() -> list[dict[str, object]]:
        r = cluster.replicas("chat")
        fresh = [x for x in r if x["state"] == "loaded" and x["address"] not in old]
        return fresh if len(fresh) == 2 and len(r) == 2 else []

    replicas = wait_for(restored, timeout=30, what="the minimum restored")
    assert {r["node_id"] for r in replicas} == {r["node_id"] for r in before}  # same identities
    for r in replicas:  # no inference request reached them: the reconciler did it alone
        stats = httpx.get(f"http://{r['address']}/admin/stats", timeout=5).json()
        assert stats["requests"] == 0 and stats["loaded"]

"""Two frontends: the one holding the reconciler lock dies, the other leads within one tick."""

from __future__ import annotations

import time

import httpx
import pytest

from cluster import FAST_FRONTEND_ENV, Cluster, Proc, wait_for
from traffic import events

pytestmark = pytest.mark.slow


def leads(cluster: Cluster, frontend: Proc) -> bool:
    health = httpx.get(cluster.url(frontend) + "/healthz", timeout=2).json()
    return bool(health["reconciler_leader"])


def test_the_surviving_frontend_takes_over_the_reconciler(cluster: Cluster) -> None:
    cluster.write_model(
        "chat", options={"tokens": 2, "load_time": 2}, scheduling={"min_replicas": 1}
    )
    frontends = [cluster.start_frontend(wait=False) for _ in range(2)]
    for frontend in frontends:
        cluster.wait_healthy(frontend)
    wait_for(lambda: sum(leads(cluster, f) for f in frontends) == 1, what="one leader")
    leader = next(f for f in frontends if leads(cluster, f))
    survivor = next(f for f in frontends if f is not leader)
    cluster.frontends.remove(leader)  # the cluster's helpers talk to the survivor from now on
    cluster.frontends.append(leader)
    worker = cluster.start_worker("w1")
    chat = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
    r = httpx.post(cluster.url(survivor) + "/v1/chat/completions", json=chat, timeout=60)
    assert r.status_code == 200

    # a scheduling change through the admin API of one frontend; the leader applies it
    path = "/api/models/chat/scheduling"
    assert cluster.api("GET", path)["min_replicas"] == 1  # from the model file
    changed = cluster.api("PUT", path, json={"min_replicas": 2, "scale_down_delay": 5})
    assert changed["min_replicas"] == 2 and changed["scale_down_delay"] == 5
    node = cluster.node("w1")
    assert node is not None
    wait_for(  # the leader's start of the second replica reached the worker ...
        lambda: any(
            p["index"] == 1 for p in cluster.api("GET", f"/api/nodes/{node['id']}")["processes"]
        ),
        interval=0.02,
        what="the leader starting a second replica",
    )
    killed = time.monotonic()
    leader.kill()  # ... and the leader dies before it could see the replica loaded
    took_over = wait_for(
        lambda: leads(cluster, survivor) and time.monotonic(), interval=0.02, what="takeover"
    )
    tick = float(FAST_FRONTEND_ENV["CORRAL_RECONCILE_INTERVAL"])
    print(f"\nreconciler taken over {took_over - killed:.2f}s after the leader died (tick {tick}s)")
    assert took_over - killed <= tick

    # the new leader adopts the start the dead one left behind: two loaded, no third process
    wait_for(
        lambda: [r["state"] for r in cluster.replicas("chat")] == ["loaded", "loaded"],
        timeout=15,
        what="the orphaned start adopted",
    )
    assert len(worker.tree()) == 3  # the worker and its two backends
    assert len(events(cluster, "replica.adopted")) == 1

    # lowering the minimum stops the idle surplus, highest index first, once the delay is over
    cluster.api("PUT", path, json={"min_replicas": 1, "scale_down_delay": 0})
    left = wait_for(lambda: len(r := cluster.replicas("chat")) == 1 and r, what="one replica")
    assert left[0]["index"] == 0

"""`corral serve --processes N`: N full frontends on one port; SIGTERM leaves no process."""

from __future__ import annotations

import signal
import threading
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import httpx
import psutil
import pytest

from cluster import Cluster, wait_for

pytestmark = pytest.mark.slow

CHAT = {"messages": [{"role": "user", "content": "which process?"}]}


def frontend_of(client: httpx.Client) -> str:
    """The id of the frontend process this client's (single, kept-alive) connection reached."""
    frontend_id: str = client.get("/healthz").json()["frontend_id"]
    return frontend_id


def one_connection(cluster: Cluster) -> httpx.Client:
    return httpx.Client(
        base_url=cluster.url(),
        timeout=30,
        limits=httpx.Limits(max_connections=1),
        headers=cluster.admin_headers,
    )


def clients_by_process(cluster: Cluster, n: int) -> dict[str, list[httpx.Client]]:
    found: dict[str, list[httpx.Client]] = defaultdict(list)
    for _ in range(n):
        client = one_connection(cluster)
        found[frontend_of(client)].append(client)
    return found


def sample_ids(cluster: Cluster, n: int = 12) -> set[str]:
    """Frontend ids answering `n` fresh connections."""
    ids = set()
    for _ in range(n):
        with one_connection(cluster) as c:
            ids.add(frontend_of(c))
    return ids


def wait_processes(cluster: Cluster, n: int) -> set[str]:
    """Wait until `n` frontend processes answer (children listen a moment after the parent)."""
    found: set[str] = set()

    def all_answer() -> bool:
        found.update(sample_ids(cluster))
        return len(found) >= n

    wait_for(all_answer, timeout=60, what=f"{n} frontend processes answering")
    return found


@pytest.fixture
def three(cluster: Cluster) -> Iterator[Cluster]:
    cluster.write_model("chat", options={"tokens": 4})
    cluster.write_model(
        "drip",
        options={"tokens": 400, "tpot": 0.05},
        scheduling={"min_replicas": 2, "max_replicas": 2, "scale_down_delay": 3600},
    )
    cluster.start_frontend(CORRAL_PROCESSES="3")
    wait_processes(cluster, 3)
    cluster.start_worker("w")
    yield cluster


def test_connections_and_requests_spread_over_the_processes(three: Cluster) -> None:
    found = clients_by_process(three, 30)
    try:
        # 30 connections over 3 processes: all three take some (chance of missing one: 1e-5)
        assert len(found) == 3, {k: len(v) for k, v in found.items()}
        base = min(found, key=len)
        assert all(k.startswith(base) for k in found)  # fe-x, fe-x-1, fe-x-2
        for clients in found.values():
            r = clients[0].post("/v1/chat/completions", json={"model": "chat", **CHAT})
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
            assert frontend_of(clients[0]) == frontend_of(clients[-1])  # same connection
        # FastAPI's own pages behind the server, on any process
        any_client = next(iter(found.values()))[0]
        docs = any_client.get("/docs")
        assert docs.status_code == 200 and "swagger" in docs.text.lower()
        assert "/api/nodes" in any_client.get("/openapi.json").json()["paths"]
        assert "corral_inflight" in any_client.get("/metrics").text
    finally:
        for clients in found.values():
            for c in clients:
                c.close()


def test_in_flight_counts_are_shared_across_processes(three: Cluster) -> None:
    # the first load records how to start it; then the reconciler brings it to min_replicas
    first_load = httpx.post(
        three.url() + "/v1/chat/completions",
        json={"model": "drip", "max_tokens": 1, **CHAT},
        timeout=60,
    )
    assert first_load.status_code == 200
    wait_for(
        lambda: len([r for r in three.replicas("drip") if r["state"] == "loaded"]) == 2,
        timeout=90,
        what="two drip replicas loaded",
    )
    found = clients_by_process(three, 30)
    a, b = (found[k][0] for k in sorted(found)[:2])
    streams: list[threading.Thread] = []
    stop = threading.Event()

    def hold_stream(client: httpx.Client, started: threading.Event) -> None:
        body = {"model": "drip", "stream": True, **CHAT}
        with client.stream("POST", "/v1/chat/completions", json=body) as r:
            for _ in r.iter_raw():
                started.set()
                if stop.is_set():
                    return

    def inflight_seen_by(client: httpx.Client) -> dict[int, int]:
        replicas: list[dict[str, Any]] = client.get("/api/replicas").json()["replicas"]
        return {r["index"]: r["inflight"] for r in replicas if r["model"] == "drip"}

    try:
        first = threading.Event()
        streams.append(threading.Thread(target=hold_stream, args=(a, first)))
        streams[-1].start()
        assert first.wait(30)
        # process B has nothing in flight itself, yet counts A's stream
        peek_b = one_connection(three)
        while frontend_of(peek_b) != frontend_of(b):
            peek_b.close()
            peek_b = one_connection(three)
        busy = wait_for(
            lambda: [i for i, n in inflight_seen_by(peek_b).items() if n == 1],
            what="A's stream visible to B",
        )
        assert len(busy) == 1
        second = threading.Event()
        streams.append(threading.Thread(target=hold_stream, args=(b, second)))
        streams[-1].start()
        assert second.wait(30)
        # so B sent its stream to the other replica: one each, as every process sees it
        wait_for(
            lambda: sorted(inflight_seen_by(peek_b).values()) == [1, 1],
            what="one stream per replica",
        )
        peek_b.close()
    finally:
        stop.set()
        for t in streams:
            t.join(30)
        for clients in found.values():
            for c in clients:
                c.close()


def test_sigterm_stops_every_process(cluster: Cluster) -> None:
    proc = cluster.start_frontend(CORRAL_PROCESSES="3")
    wait_processes(cluster, 3)
    tree = proc.tree()
    children = [p for p in tree if p.pid != proc.pid]
    assert len(children) == 2, [p.cmdline() for p in tree]
    assert all("corral.frontends" in " ".join(p.cmdline()) for p in children)
    proc.signal(signal.SIGTERM)
    assert proc.popen is not None and proc.popen.wait(60) == 0, proc.output()[-3000:]
    wait_for(
        lambda: not [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE],
        timeout=30,
        what="every frontend process gone",
    )


def test_a_child_that_dies_is_replaced(cluster: Cluster) -> None:
    proc = cluster.start_frontend(CORRAL_PROCESSES="2")
    ids = wait_processes(cluster, 2)
    (child,) = [p for p in proc.tree() if p.pid != proc.pid]
    child.kill()
    wait_for(
        lambda: [p for p in proc.tree() if p.pid not in (proc.pid, child.pid)],
        timeout=30,
        what="a new frontend process",
    )
    # the new one serves under the same id, so nothing else in the cluster has to change
    wait_for(lambda: sample_ids(cluster) == ids, timeout=60, what="both processes answering")

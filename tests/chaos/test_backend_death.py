"""A backend process dies (SIGKILL): the replica is replaced and never gets a request again."""

from __future__ import annotations

import os
import signal
import socket
import threading

import pytest

from cluster import Cluster, wait_for
from traffic import Traffic, chat, events, loaded

pytestmark = pytest.mark.slow


class Listener:
    """Takes over a dead backend's address and counts every connection made to it."""

    def __init__(self, address: str) -> None:
        host, port = address.rsplit(":", 1)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, int(port)))
        self.sock.listen(64)
        self.sock.settimeout(0.1)
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def test_killed_backend_is_replaced_and_never_routed_to(cluster: Cluster) -> None:
    cluster.write_model("chat", options={"tokens": 4, "ttft": 0.02}, scheduling={"min_replicas": 2})
    cluster.start_frontend()
    for name in ("w1", "w2"):
        cluster.start_worker(name, args=["--max-replicas-per-model", "1"])
    assert chat(cluster, "chat").status_code == 200
    victim = wait_for(lambda: len(r := loaded(cluster, "chat")) == 2 and r[0], what="2 replicas")
    node = cluster.api("GET", f"/api/nodes/{victim['node_id']}")
    pid = next(p["pid"] for p in node["processes"] if p["address"] == victim["address"])

    with Traffic(cluster.url(), "chat") as traffic:
        traffic.wait_for_successes(5)
        os.kill(pid, signal.SIGKILL)
        wait_for(
            lambda: victim["address"] not in {r["address"] for r in cluster.replicas("chat")},
            interval=0.02,
            what="the dead replica's row removed",
        )
        listener = Listener(victim["address"])  # stands in for the dead backend from now on
        try:
            sent_after_removal = len(traffic.outcomes)
            wait_for(
                lambda: (
                    len(r := loaded(cluster, "chat")) == 2
                    and victim["address"] not in {x["address"] for x in r}
                ),
                what="a replacement replica",
            )
            traffic.wait_for_successes(sent_after_removal + 20)
        finally:
            listener.close()

    assert listener.connections == 0
    assert traffic.failures() == []
    removals = events(cluster, "replica.exited") + events(cluster, "replica.removed")
    assert len(removals) == 1  # removed once (by its exit report or by the router), then never

"""Helpers of the cluster tests: steady background traffic and views of the cluster's replicas."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import httpx

from cluster import Cluster, Proc, wait_for
from infra import poll_until


@dataclass(frozen=True, slots=True)
class Outcome:
    """One request of the background traffic."""

    sent: float  # time.monotonic() when it was sent
    status: int  # HTTP status, 0 when the request itself failed
    error: str = ""
    wall: float = 0.0  # time.time() when it was sent (to compare with the audit log)
    fingerprint: str = ""  # the answer's system_fingerprint (which configuration served it)


@dataclass
class Traffic:
    """Non-streaming chat requests from `clients` background threads, each one after the other."""

    url: str
    model: str
    clients: int = 1
    outcomes: list[Outcome] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Traffic:
        for i in range(self.clients):
            thread = threading.Thread(target=self._run, name=f"traffic{i}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)

    def _run(self) -> None:
        body = {"model": self.model, "messages": [{"role": "user", "content": "hi"}]}
        with httpx.Client(timeout=60) as client:
            while not self._stop.is_set():
                sent, wall = time.monotonic(), time.time()
                try:
                    r = client.post(self.url + "/v1/chat/completions", json=body)
                except httpx.HTTPError as exc:
                    self.outcomes.append(Outcome(sent, 0, repr(exc), wall))
                    continue
                if r.status_code == 200:
                    fingerprint = str(r.json().get("system_fingerprint", ""))
                    self.outcomes.append(Outcome(sent, 200, "", wall, fingerprint))
                else:
                    self.outcomes.append(Outcome(sent, r.status_code, r.text[:300], wall))

    def failures(self, after: float = 0.0) -> list[Outcome]:
        """Requests sent at or after `after` (monotonic) that did not answer 200."""
        return [o for o in list(self.outcomes) if o.sent >= after and o.status != 200]

    def wait_for_successes(self, count: int, timeout: float = 30.0) -> None:
        poll_until(
            lambda: sum(1 for o in list(self.outcomes) if o.status == 200) >= count,
            timeout=timeout,
            what=f"{count} successful requests (so far: {self.outcomes})",
        )


def start_workers(cluster: Cluster, *names: str, args: list[str] | None = None) -> list[Proc]:
    """Start workers at once (their start-up overlaps) and wait until all are healthy."""
    procs = [cluster.start_worker(name, args=args, wait=False) for name in names]
    wait_for(
        lambda: all(cluster.node(name, status="healthy") for name in names),
        timeout=60,
        what=f"workers {names} healthy",
    )
    return procs


def loaded(cluster: Cluster, model: str) -> list[dict[str, object]]:
    """The loaded replicas of `model` on healthy nodes."""
    healthy = {n["id"] for n in cluster.nodes() if n["status"] == "healthy"}
    return [
        r for r in cluster.replicas(model) if r["state"] == "loaded" and r["node_id"] in healthy
    ]


def node_id(cluster: Cluster, name: str) -> str:
    node = cluster.node(name)
    assert node is not None, f"no node named {name}"
    return str(node["id"])


def events(cluster: Cluster, kind: str) -> list[dict[str, Any]]:
    """Audit log entries of one kind, newest first."""
    found: list[dict[str, Any]] = cluster.api("GET", "/api/events", params={"limit": 1000})[
        "events"
    ]
    return [e for e in found if e["kind"] == kind]


def chat(cluster: Cluster, model: str) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    return httpx.post(cluster.url() + "/v1/chat/completions", json=body, timeout=60)

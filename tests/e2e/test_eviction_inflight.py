"""LRU eviction by memory on a real worker, and in-flight counts released on every path."""

from __future__ import annotations

import threading
from typing import Any

import httpx
import pytest

from cluster import Cluster, wait_for

pytestmark = pytest.mark.slow

CHAT = {"messages": [{"role": "user", "content": "hello"}]}


def ask(c: Cluster, model: str, **extra: Any) -> httpx.Response:
    return httpx.post(
        c.url() + "/v1/chat/completions", json={"model": model, **CHAT, **extra}, timeout=60
    )


def loaded_models(c: Cluster) -> set[str]:
    return {r["model"] for r in c.replicas() if r["state"] == "loaded"}


def test_lru_idle_replica_is_evicted_and_a_busy_one_never(cluster: Cluster) -> None:
    cluster.write_model("long", memory="64MB", options={"tokens": 40, "tpot": 0.2})
    for name in ("m1", "m2", "m3"):
        cluster.write_model(name, memory="64MB", options={"tokens": 2})
    cluster.start_frontend()
    cluster.start_worker("small", args=["--memory-budget", "200MB"])

    assert ask(cluster, "long", max_tokens=1).status_code == 200
    for name in ("m1", "m2"):  # 3 x 64 MB fill the 200 MB budget
        assert ask(cluster, name).status_code == 200
    assert loaded_models(cluster) == {"long", "m1", "m2"}

    # `long` becomes busy (an 8 s stream) and then the least recently used of the three
    result: dict[str, Any] = {}
    started = threading.Event()

    def stream_long() -> None:
        with (
            httpx.Client(timeout=60) as client,
            client.stream(
                "POST",
                cluster.url() + "/v1/chat/completions",
                json={"model": "long", "stream": True, **CHAT},
            ) as r,
        ):
            result["status"] = r.status_code
            chunks = []
            for chunk in r.iter_raw():
                started.set()
                chunks.append(chunk)
            result["body"] = b"".join(chunks)

    streamer = threading.Thread(target=stream_long)
    streamer.start()
    assert started.wait(30)
    assert ask(cluster, "m1").status_code == 200
    assert ask(cluster, "m2").status_code == 200

    # m3 needs room: `long` is least recently used but busy, so m1 (LRU idle) goes
    assert ask(cluster, "m3").status_code == 200
    assert loaded_models(cluster) == {"long", "m2", "m3"}
    streamer.join(60)
    assert result["status"] == 200 and result["body"].rstrip().endswith(b"data: [DONE]")
    events = cluster.api("GET", "/api/events?limit=200")["events"]
    evicted = [e["message"] for e in events if "evicted" in e["message"]]
    assert len(evicted) == 1 and evicted[0].startswith("m1#"), evicted


def test_inflight_returns_to_zero_on_every_path(cluster: Cluster) -> None:
    cluster.write_model("quick", options={"tokens": 4})
    cluster.write_model("slow", options={"ttft": 3.0, "tokens": 2})
    cluster.write_model("drip", options={"tokens": 200, "tpot": 0.05})
    cluster.start_frontend(CORRAL_REQUEST_TIMEOUT="1")
    cluster.start_worker("w")

    def inflight() -> int:
        text = httpx.get(cluster.url() + "/metrics").text
        return sum(
            int(float(line.rsplit(" ", 1)[1]))
            for line in text.splitlines()
            if line.startswith("corral_inflight{")
        )

    # success
    for _ in range(5):
        assert ask(cluster, "quick").status_code == 200
    assert inflight() == 0
    # backend error: the sim rejects a malformed request body after routing
    bad = httpx.post(
        cluster.url() + "/v1/chat/completions",
        json={"model": "quick", "messages": [], "max_tokens": "many"},
        timeout=30,
    )
    assert bad.status_code == 400
    assert inflight() == 0
    # timeout: the backend answers after 3 s, the frontend waits 1 s (the load is not timed)
    timed_out = ask(cluster, "slow")
    assert timed_out.status_code == 504
    assert timed_out.json()["error"]["code"] == "upstream_timeout"
    assert inflight() == 0
    # client disconnect mid-stream
    assert ask(cluster, "drip", max_tokens=2).status_code == 200  # load it first
    with (
        httpx.Client(timeout=30) as client,
        client.stream(
            "POST",
            cluster.url() + "/v1/chat/completions",
            json={"model": "drip", "stream": True, **CHAT},
        ) as r,
    ):
        chunks = r.iter_raw()  # keep the iterator: dropping it closes the stream
        assert next(chunks).startswith(b"data: ")
        assert inflight() == 1
    wait_for(lambda: inflight() == 0, timeout=10, what="in-flight released after disconnect")

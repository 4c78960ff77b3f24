"""Routing on a real cluster: balance, one load per model, self-heal, selectors.

One cluster serves the whole module (two frontends, four workers); each test declares its own
models through the admin API, so tests do not see each other's replicas.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import infra
from cluster import Cluster, running_cluster, wait_for
from natsauth_infra import AuthNats

pytestmark = pytest.mark.slow

CHAT = {"messages": [{"role": "user", "content": "route me"}]}


@pytest.fixture(scope="module")
def big(
    module_database: str, cluster_nats: AuthNats, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    root: Path = tmp_path_factory.mktemp("routing")
    with running_cluster(module_database, cluster_nats, infra.unique_prefix(), root) as c:
        c.start_frontend()
        c.start_frontend()
        c.start_worker("w1", labels="zone=a,pool=mixed")
        c.start_worker("w2", labels="zone=a,pool=mixed")
        c.start_worker("w3", labels="zone=a")
        c.start_worker("w4", labels="pool=mixed", CORRAL_SIM_SLOWDOWN="3")
        yield c


def declare(c: Cluster, name: str, **fields: Any) -> None:
    c.api("PUT", f"/api/models/{name}", json={"backend": "sim", **fields})
    for fe in c.frontends:  # every frontend knows it before the test sends requests
        wait_for(
            lambda fe=fe: any(m["id"] == name for m in c.api("GET", "/v1/models", fe)["data"]),
            what=f"{name} visible",
        )


def loaded(c: Cluster, model: str) -> list[dict[str, Any]]:
    return [r for r in c.replicas(model) if r["state"] == "loaded"]


def served(replica: dict[str, Any]) -> int:
    stats = httpx.get(f"http://{replica['address']}/admin/stats", timeout=5).json()
    return int(stats["requests"])


def served_total(c: Cluster, replica: dict[str, Any], worker: str) -> int:
    """Requests a replica answered, from its stats or, once stopped, from its exit line."""
    try:
        return served(replica)
    except httpx.HTTPError:
        log = c.root / "workers" / worker / "logs" / f"{replica['model']}.{replica['index']}.log"
        lines = [ln for ln in log.read_text().splitlines() if "sim stopped:" in ln]
        assert lines, f"{log} has no exit line"
        return int(lines[-1].split("requests=")[1].split()[0])


async def fire(c: Cluster, model: str, n: int, **extra: Any) -> list[int]:
    """Send n requests at once, alternating between the frontends; return the statuses."""
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        urls = [c.url(fe) + "/v1/chat/completions" for fe in c.frontends]
        responses = await asyncio.gather(
            *(
                client.post(urls[i % len(urls)], json={"model": model, **CHAT, **extra})
                for i in range(n)
            )
        )
    return [r.status_code for r in responses]


async def closed_loop(c: Cluster, model: str, *, clients: int, each: int) -> list[int]:
    statuses: list[int] = []
    urls = [c.url(fe) + "/v1/chat/completions" for fe in c.frontends]

    async def one(i: int, client: httpx.AsyncClient) -> None:
        for _ in range(each):
            r = await client.post(urls[i % len(urls)], json={"model": model, **CHAT})
            statuses.append(r.status_code)

    async with httpx.AsyncClient(timeout=120) as client:
        await asyncio.gather(*(one(i, client) for i in range(clients)))
    return statuses


def spread(c: Cluster, model: str, replicas: int) -> list[dict[str, Any]]:
    """Load `model` once by request, then wait for the reconciler to spread it."""
    r = httpx.post(c.url() + "/v1/chat/completions", json={"model": model, **CHAT}, timeout=60)
    assert r.status_code == 200, r.text
    return wait_for(
        lambda: len(found := loaded(c, model)) == replicas and found,
        timeout=60,
        what=f"{replicas} loaded replicas of {model}",
    )


async def test_balance_across_equal_replicas_and_two_frontends(big: Cluster) -> None:
    declare(
        big,
        "even",
        options={"ttft": 0.05, "tokens": 4},
        scheduling={"spread_all": True, "node_selector": {"zone": "a"}},
    )
    replicas = spread(big, "even", 3)
    before = {r["address"]: served(r) for r in replicas}
    statuses = await fire(big, "even", 300)
    assert Counter(statuses) == {200: 300}
    counts = {r["address"]: served(r) - before[r["address"]] for r in replicas}
    assert sum(counts.values()) == 300
    for address, count in counts.items():
        assert 85 <= count <= 115, f"{address} served {count} of 300: {counts}"


async def test_a_slow_replica_gets_fewer_requests(big: Cluster) -> None:
    declare(
        big,
        "mixed",
        options={"ttft": 0.03, "tpot": 0.01, "tokens": 8},
        scheduling={"spread_all": True, "node_selector": {"pool": "mixed"}},
    )
    replicas = spread(big, "mixed", 3)
    w4 = big.node("w4")
    assert w4 is not None
    before = {r["address"]: served(r) for r in replicas}
    # closed loop: each client sends its next request when the last one returned, so a
    # replica that answers faster frees its slots sooner and is picked more often
    assert Counter(await closed_loop(big, "mixed", clients=9, each=20)) == {200: 180}
    counts = {r["address"]: served(r) - before[r["address"]] for r in replicas}
    slow = next(counts[r["address"]] for r in replicas if r["node_id"] == w4["id"])
    fast = [counts[r["address"]] for r in replicas if r["node_id"] != w4["id"]]
    assert slow < 0.75 * min(fast), counts


async def test_concurrent_cold_requests_start_exactly_one_replica(big: Cluster) -> None:
    # max 1: the scale-up rule (all replicas busy) must not blur the count of cold starts
    declare(big, "cold", options={"load_time": 1.0, "tokens": 2}, scheduling={"max_replicas": 1})
    statuses = await fire(big, "cold", 50)
    assert Counter(statuses) == {200: 50}
    assert len(big.replicas("cold")) == 1
    events = big.api("GET", "/api/events?limit=1000")["events"]
    loads = [e for e in events if e["kind"] == "replica.loaded" and e["subject"] == "cold"]
    assert len(loads) == 1, loads


async def test_out_of_band_unload_heals_without_failed_requests(big: Cluster) -> None:
    declare(
        big,
        "heal",
        options={"tokens": 2},
        scheduling={"spread_all": True, "node_selector": {"zone": "a"}},
    )
    replicas = spread(big, "heal", 3)
    victim = replicas[0]
    assert httpx.post(f"http://{victim['address']}/admin/unload").status_code == 200
    statuses = []
    for _ in range(4):
        statuses += await fire(big, "heal", 50)
    assert Counter(statuses) == {200: 200}
    gone = (victim["index"], victim["address"])
    assert gone not in {(r["index"], r["address"]) for r in big.replicas("heal")}
    events = big.api("GET", "/api/events?limit=1000")["events"]
    assert any(
        e["kind"] == "replica.removed" and e["subject"] == "heal" and "not loaded" in e["message"]
        for e in events
    ), "the drop is in the audit log with the backend's reason"
    # the reconciler puts a replica back where the model wants one (spread over zone=a)
    wait_for(lambda: len(loaded(big, "heal")) == 3, timeout=60, what="heal back to 3 replicas")


async def test_relabelled_node_gets_no_more_requests(big: Cluster) -> None:
    declare(
        big,
        "picky",
        options={"tokens": 2},
        scheduling={"spread_all": True, "node_selector": {"zone": "a"}},
    )
    replicas = spread(big, "picky", 3)
    w3 = big.node("w3")
    assert w3 is not None
    on_w3 = next(r for r in replicas if r["node_id"] == w3["id"])
    before = served(on_w3)
    big.api("PUT", f"/api/nodes/{w3['id']}/labels", json={"labels": {"zone": "elsewhere"}})
    try:
        for fe in big.frontends:  # both frontends saw the relabel event
            wait_for(
                lambda fe=fe: (
                    big.api("GET", f"/api/nodes/{w3['id']}", fe)["labels"] == {"zone": "elsewhere"}
                ),
                what="relabel visible",
            )
        statuses = await fire(big, "picky", 100)
        assert Counter(statuses) == {200: 100}
        # the reconciler may have stopped it since: then its count comes from its exit line
        assert served_total(big, on_w3, "w3") == before
    finally:
        big.api("PUT", f"/api/nodes/{w3['id']}/labels", json={"labels": {"zone": "a"}})


def test_selector_matching_no_node_is_a_clear_503(big: Cluster) -> None:
    declare(big, "nowhere", scheduling={"node_selector": {"gpu": "h100"}})
    r = httpx.post(big.url() + "/v1/chat/completions", json={"model": "nowhere", **CHAT})
    assert r.status_code == 503
    assert "gpu=h100" in r.json()["error"]["message"]
    assert r.json()["error"]["code"] == "no_eligible_node"
    assert "retry-after" not in r.headers, "retrying cannot help until an operator acts"

"""The routing pipeline on a real cluster (two frontends sharing the prefix index over NATS, sims
with the engine model): prompt families stay on a replica and hit its prefix cache while load
stays even; least-loaded routing gets far fewer hits; equal replicas rotate evenly; every
response names its replica and node, and `x-corral-debug: scores` shows the decision."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
from harness import FakeWorker, InProcessCluster, client, declare

from corral.domain.actions import StartReplica
from corral.domain.routing_weights import RoutingWeights
from corral.frontend.metrics import render
from corral.frontend.model_view import model_json
from corral.frontend.service import Frontend
from factories import MB, model
from infra import apoll_until

#: The engine model: 4 slots, prefill 20 us a token not cached, a cache of 128 blocks of 16
#: tokens (8 KB of prompt: three of the system prompts below, not eight).
ENGINE: dict[str, Any] = {
    "slots": 4,
    "prefill_per_token": 2e-5,
    "decode_base": 0.0005,
    "cache_blocks": 128,
    "block_tokens": 16,
    "tokens": 2,
}
FAMILIES = 8
LEAST_LOADED = RoutingWeights(prefix=0.0, session=0.0)


def system_prompt(family: int) -> str:
    """A distinct system prompt of about 2.3 KB."""
    words = hashlib.sha256(f"family {family}".encode()).hexdigest()
    return (
        f"You are assistant {family}. " + " ".join(words[i : i + 6] for i in range(0, 64, 2)) * 10
    )


def chat(model_name: str, family: int, user: int) -> dict[str, Any]:
    return {
        "model": model_name,
        "messages": [
            {"role": "system", "content": system_prompt(family)},
            {"role": "user", "content": f"user {user} asks question {user * 7 + family}"},
        ],
        "max_tokens": 2,
    }


async def start(
    cluster: InProcessCluster,
    fe: Frontend,
    workers: list[FakeWorker],
    name: str,
    routing: RoutingWeights = RoutingWeights(),  # noqa: B008 - frozen
) -> None:
    await declare(fe, dataclasses.replace(model(name), routing=routing))
    for w in workers:
        await fe.actuator.apply(StartReplica(name, w.node_id, None, "sim", 64 * MB, "test"))


@contextlib.asynccontextmanager
async def sharing(*frontends: Frontend) -> AsyncIterator[None]:
    """The frontends' load-report and prefix-share loops, as `run_loops` runs them (faster)."""
    tasks = []
    for fe in frontends:
        tasks.append(asyncio.create_task(fe._every("report", fe._report_load, 0.05)))
        tasks.append(asyncio.create_task(fe._every("share", fe.prefixes.publish, 0.05)))
    try:
        yield
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def shared_prefix_load(
    clients: list[httpx.AsyncClient], name: str, users: int, concurrency: int = 12
) -> None:
    """`FAMILIES` system prompts x `users` users, alternating frontends, `concurrency` at once."""
    gate = asyncio.Semaphore(concurrency)

    async def one(n: int, family: int, user: int) -> None:
        async with gate:
            r = await clients[n % len(clients)].post(
                "/v1/chat/completions", json=chat(name, family, user)
            )
            assert r.status_code == 200, r.text

    await asyncio.gather(
        *(
            one(user * FAMILIES + family, family, user)
            for user in range(users)
            for family in range(FAMILIES)
        )
    )


def engine_stats(workers: list[FakeWorker], name: str) -> list[dict[str, Any]]:
    return [w.sims[key].stats() for w in workers for key in w.sims if key[0] == name]


def hit_rate(stats: list[dict[str, Any]]) -> float:
    hits = sum(s["engine"]["prefix_cache_hits"] for s in stats)
    queries = sum(s["engine"]["prefix_cache_queries"] for s in stats)
    return float(hits / queries)


async def test_prompt_families_hit_the_cache_through_two_frontends_with_even_load(
    cluster: InProcessCluster,
) -> None:
    fe1 = await cluster.frontend()
    workers = [await cluster.worker(fe1, f"n{i}", **ENGINE) for i in range(4)]
    await start(cluster, fe1, workers, "aff")
    await start(cluster, fe1, workers, "ll", LEAST_LOADED)
    fe2 = await cluster.frontend()
    for name in ("aff", "ll"):
        await apoll_until(lambda n=name: len(fe2.view.candidates(n)) == 4, what="fe2 sees 4")
    async with client(fe1) as c1, client(fe2) as c2, sharing(fe1, fe2):
        await shared_prefix_load([c1, c2], "aff", users=40)
        await shared_prefix_load([c1, c2], "ll", users=40)
    affinity, least = engine_stats(workers, "aff"), engine_stats(workers, "ll")
    served = [s["requests"] for s in affinity]
    assert sum(served) == FAMILIES * 40
    assert max(served) <= 1.5 * sum(served) / len(served), served
    assert hit_rate(affinity) >= 0.8, (hit_rate(affinity), served)
    assert hit_rate(least) < hit_rate(affinity) - 0.3, (hit_rate(least), hit_rate(affinity))
    # both frontends learned from each other's batches, and counted what the scorers did
    assert fe1.prefixes.merged > 0 and fe2.prefixes.merged > 0
    for fe in (fe1, fe2):
        counters = fe.router.counters["aff"]
        assert counters.prefix_followed > 0.8 * counters.decisions
        assert fe.router.counters["ll"].prefix_matched == 0
        assert (
            'corral_route_prefix_followed_total{model="aff"}'
            in render(fe.metrics_registry).decode()
        )


async def test_equal_replicas_rotate_and_a_burst_spreads(cluster: InProcessCluster) -> None:
    fe = await cluster.frontend()
    workers = [await cluster.worker(fe, f"n{i}", ttft=0.001) for i in range(3)]
    await start(cluster, fe, workers, "eq")
    seen: dict[str, int] = {}
    async with client(fe) as c:
        for i in range(30):
            body = {"model": "eq", "messages": [{"role": "user", "content": f"q{i}"}]}
            r = await c.post("/v1/chat/completions", json=body)
            assert r.status_code == 200
            seen[r.headers["x-corral-replica"]] = seen.get(r.headers["x-corral-replica"], 0) + 1
        assert sorted(seen) == ["eq#0", "eq#1", "eq#2"]
        assert all(8 <= n <= 12 for n in seen.values()), seen
        before = {key: s.stats()["requests"] for w in workers for key, s in w.sims.items()}
        body = {"model": "eq", "messages": [{"role": "user", "content": "burst"}]}
        answers = await asyncio.gather(
            *(c.post("/v1/chat/completions", json=body) for _ in range(300))
        )
        assert all(a.status_code == 200 for a in answers)
    after = {key: s.stats()["requests"] for w in workers for key, s in w.sims.items()}
    burst = [after[k] - before[k] for k in after]
    assert sum(burst) == 300
    assert all(abs(n - 100) <= 15 for n in burst), burst


async def test_responses_name_their_replica_and_node_and_scores_on_request(
    cluster: InProcessCluster,
) -> None:
    fe = await cluster.frontend()
    workers = [await cluster.worker(fe, f"node-{i}") for i in range(2)]
    await start(cluster, fe, workers, "m")
    async with client(fe) as c:
        plain = await c.post("/v1/chat/completions", json=chat("m", 0, 0))
        assert plain.status_code == 200
        assert plain.headers["x-corral-replica"] in ("m#0", "m#1")
        index = int(plain.headers["x-corral-replica"].split("#")[1])
        assert plain.headers["x-corral-node"] == f"node-{index}"
        assert "x-corral-scores" not in plain.headers
        debug = await c.post(
            "/v1/chat/completions",
            json={**chat("m", 0, 1), "stream": True},
            headers={"x-corral-debug": "scores"},
        )
        assert debug.status_code == 200
        assert debug.headers["x-corral-replica"] == plain.headers["x-corral-replica"]
        table = orjson.loads(debug.headers["x-corral-scores"])
        chosen = [row for row in table if row["chosen"]]
        assert len(table) == 2 and chosen[0]["replica"] == plain.headers["x-corral-replica"]
        # the first request's system prompt, on the same replica (the user's line differs,
        # in the last block or in the partial one after it, which is not hashed)
        assert 0.5 < chosen[0]["prefix"] <= 1.0
        assert [row["prefix"] for row in table if not row["chosen"]] == [0.0]
        assert {row["node"] for row in table} == {"node-0", "node-1"}
    assert model_json(fe.view.models["m"])["routing"] == {
        "load": 1.0,
        "prefix": 1.0,
        "session": 1.0,
        "speed": 0.0,
        "affinity_slack": 0.5,
        "concurrency": 8,
    }

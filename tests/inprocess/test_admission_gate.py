"""Admission in one process: a replica never holds more than its model's max_concurrency, and
the requests beyond it wait in a fair, bounded queue with priorities and deadlines."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

import httpx
from harness import InProcessCluster, client, declare

from corral.domain.admission import overshoot_bound
from corral.domain.entities import ModelSpec, Scheduling
from corral.frontend.service import Frontend
from factories import model
from infra import apoll_until


def limited(name: str, limit: int, **options: Any) -> ModelSpec:
    spec = model(name, options=options)
    return dataclasses.replace(spec, scheduling=Scheduling(max_concurrency=limit))


async def ask(
    c: httpx.AsyncClient, name: str, *, key: str | None = None, **headers: str
) -> httpx.Response:
    body = {"model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    sent = {k.replace("_", "-"): v for k, v in headers.items()}
    if key is not None:
        sent["authorization"] = f"Bearer {key}"
    return await c.post("/v1/chat/completions", json=body, headers=sent)


async def warm(fe: Frontend, c: httpx.AsyncClient, name: str) -> None:
    """Load the model with one request, so the tests start from a loaded replica."""
    r = await ask(c, name)
    assert r.status_code == 200, r.text
    assert fe.view.candidates(name)


def waiting(fe: Frontend, name: str) -> int:
    queue = fe.admission.queues().get(name)
    return int(queue["depth"]) if queue else 0


async def queued(fe: Frontend, name: str, count: int) -> None:
    await apoll_until(lambda: waiting(fe, name) >= count, timeout=10, what=f"{count} queued")


async def test_a_replica_never_holds_more_than_max_concurrency(
    cluster: InProcessCluster,
) -> None:
    fe = await cluster.frontend()
    worker = await cluster.worker(fe, "n1")
    await declare(fe, limited("m", 2, ttft=0.05))
    async with client(fe) as c:
        await warm(fe, c, "m")
        sim = worker.sims[("m", 0)]
        answers = await asyncio.gather(*(ask(c, "m") for _ in range(30)))
    assert [r.status_code for r in answers] == [200] * 30
    assert sim.stats()["peak_inflight"] == 2, "the backend saw at most max_concurrency at once"
    assert fe.inflight.local_total() == 0
    assert waiting(fe, "m") == 0


async def test_max_concurrency_holds_across_two_frontends_under_a_burst(
    cluster: InProcessCluster,
) -> None:
    one = await cluster.frontend(load_report_interval=0.05)
    two = await cluster.frontend(load_report_interval=0.05)
    worker = await cluster.worker(one, "n1")
    limit, ttft = 4, 0.05
    await declare(one, limited("m", limit, ttft=ttft))
    async with client(one) as c1, client(two) as c2:
        await warm(one, c1, "m")
        await apoll_until(lambda: two.view.candidates("m"), timeout=5, what="frontend 2 sees it")
        sim = worker.sims[("m", 0)]
        sim._answers.reset_peak()
        reports = [asyncio.create_task(_report(fe, 0.05)) for fe in (one, two)]
        try:
            burst = [ask(c1 if i % 2 else c2, "m") for i in range(200)]
            answers = await asyncio.gather(*burst)
        finally:
            for task in reports:
                task.cancel()
    assert [r.status_code for r in answers] == [200] * 200
    # each frontend dispatches at most limit / ttft requests a second to the replica
    bound = overshoot_bound(limit, 2, 0.05, limit / ttft, bus_delay=0.01)
    print(
        f"peak {sim.stats()['peak_inflight']} with max_concurrency {limit}, bound {limit + bound}"
    )
    assert limit <= sim.stats()["peak_inflight"] <= limit + bound


async def _report(fe: Frontend, interval: float) -> None:
    """The in-flight report loop a running frontend has (in-process ones run no loops)."""
    while True:
        await fe.bus.publish(fe.bus.subjects.load_reports, fe.inflight.report())
        await asyncio.sleep(interval)


async def test_high_priority_requests_queued_after_low_ones_go_first(
    cluster: InProcessCluster,
) -> None:
    fe = await cluster.frontend()
    await cluster.worker(fe, "n1")
    await declare(fe, limited("m", 1, ttft=0.2))
    done: list[str] = []

    async def tagged(c: httpx.AsyncClient, tag: str, priority: str) -> None:
        r = await ask(c, "m", x_corral_priority=priority)
        assert r.status_code == 200, r.text
        done.append(tag)

    async with client(fe) as c:
        await warm(fe, c, "m")
        blocker = asyncio.create_task(tagged(c, "first", "low"))
        await apoll_until(lambda: fe.inflight.local_total() == 1, timeout=5, what="busy")
        tasks = []
        for i in range(3):
            tasks.append(asyncio.create_task(tagged(c, f"low{i}", "low")))
            await queued(fe, "m", i + 1)
        for i in range(3):
            tasks.append(asyncio.create_task(tagged(c, f"high{i}", "high")))
            await queued(fe, "m", 4 + i)
        await asyncio.gather(blocker, *tasks)
    assert done == ["first", "high0", "high1", "high2", "low0", "low1", "low2"]
    # corral_queue_wait_seconds: the six that queued, and the first (it waited for the load)
    waited = fe.metrics.queue_wait["m"]
    assert waited.count == 7 and waited.sum > 0


async def test_a_heavy_key_does_not_starve_a_light_one(cluster: InProcessCluster) -> None:
    fe = await cluster.frontend(api_keys=["heavy", "light"])
    await cluster.worker(fe, "n1")
    await declare(fe, limited("m", 1, ttft=0.15))
    order: list[str] = []

    async def one(c: httpx.AsyncClient, key: str) -> None:
        r = await ask(c, "m", key=key)
        assert r.status_code == 200, r.text
        order.append(key)

    async with client(fe) as c:
        r = await ask(c, "m", key="heavy")
        assert r.status_code == 200
        blocker = asyncio.create_task(one(c, "heavy"))
        await apoll_until(lambda: fe.inflight.local_total() == 1, timeout=5, what="busy")
        tasks = [asyncio.create_task(one(c, "heavy")) for _ in range(10)]
        await queued(fe, "m", 10)
        tasks += [asyncio.create_task(one(c, "light")) for _ in range(2)]
        await queued(fe, "m", 12)
        await asyncio.gather(blocker, *tasks)
    served = order[1:]  # after the request that held the slot
    # both keys backlogged: start-time fair queueing alternates between them
    assert served[:4].count("light") == 2, served


async def test_a_request_past_its_deadline_gets_504_and_never_reaches_the_backend(
    cluster: InProcessCluster,
) -> None:
    fe = await cluster.frontend()
    worker = await cluster.worker(fe, "n1")
    await declare(fe, limited("m", 1, ttft=1.0))
    async with client(fe) as c:
        await warm(fe, c, "m")
        sim = worker.sims[("m", 0)]
        seen = sim.stats()["requests"]
        blocker = asyncio.create_task(ask(c, "m"))
        await apoll_until(lambda: fe.inflight.local_total() == 1, timeout=5, what="busy")
        started = time.monotonic()
        late = await ask(c, "m", x_corral_deadline="0.2")
        waited = time.monotonic() - started
        assert (await blocker).status_code == 200
    assert late.status_code == 504
    assert late.json()["error"]["code"] == "deadline_exceeded"
    assert 0.2 <= waited < 0.9, waited
    assert sim.stats()["requests"] == seen + 1, "only the blocker reached the backend"
    assert fe.admission.expired == 1


async def test_bad_priority_or_deadline_headers_are_400(cluster: InProcessCluster) -> None:
    fe = await cluster.frontend()
    await cluster.worker(fe, "n1")
    await declare(fe, limited("m", 1, ttft=0.5))
    async with client(fe) as c:
        await warm(fe, c, "m")
        blocker = asyncio.create_task(ask(c, "m"))
        await apoll_until(lambda: fe.inflight.local_total() == 1, timeout=5, what="busy")
        bad_priority = await ask(c, "m", x_corral_priority="urgent")
        bad_deadline = await ask(c, "m", x_corral_deadline="soon")
        await blocker
    assert bad_priority.status_code == 400
    assert bad_priority.json()["error"]["param"] == "x-corral-priority"
    assert bad_deadline.status_code == 400
    assert bad_deadline.json()["error"]["param"] == "x-corral-deadline"


async def test_a_full_queue_answers_429_with_retry_after(cluster: InProcessCluster) -> None:
    fe = await cluster.frontend(queue_max_entries=2)
    await cluster.worker(fe, "n1")
    await declare(fe, limited("m", 1, ttft=0.3))
    async with client(fe) as c:
        await warm(fe, c, "m")
        blocker = asyncio.create_task(ask(c, "m"))
        await apoll_until(lambda: fe.inflight.local_total() == 1, timeout=5, what="busy")
        waiters = [asyncio.create_task(ask(c, "m")) for _ in range(2)]
        await queued(fe, "m", 2)
        refused = await ask(c, "m")
        rest = await asyncio.gather(blocker, *waiters)
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "queue_full"
    assert int(refused.headers["retry-after"]) >= 1
    assert [r.status_code for r in rest] == [200] * 3
    assert fe.admission.rejected == 1


async def test_a_client_leaving_the_queue_uses_no_slot(cluster: InProcessCluster) -> None:
    fe = await cluster.frontend()
    worker = await cluster.worker(fe, "n1")
    await declare(fe, limited("m", 1, ttft=0.5))
    async with client(fe) as c:
        await warm(fe, c, "m")
        sim = worker.sims[("m", 0)]
        seen = sim.stats()["requests"]
        blocker = asyncio.create_task(ask(c, "m"))
        await apoll_until(lambda: fe.inflight.local_total() == 1, timeout=5, what="busy")
        leaving = asyncio.create_task(ask(c, "m"))
        await queued(fe, "m", 1)
        leaving.cancel()  # the client gives up while its request waits
        await apoll_until(lambda: waiting(fe, "m") == 0, timeout=5, what="the queue shrinks")
        assert (await blocker).status_code == 200
    assert fe.admission.abandoned == 1
    assert sim.stats()["requests"] == seen + 1, "the abandoned request never reached the backend"
    assert fe.inflight.local_total() == 0

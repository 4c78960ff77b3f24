"""The cold path in one process: one load per model across frontends, failures reaching every
waiter, the wait budget, and eviction of idle replicas (never busy ones)."""

from __future__ import annotations

import asyncio

import httpx
from harness import FakeWorker, InProcessCluster, chat, client, declare, heartbeat

from corral.domain.actions import RegisterNode
from factories import GB, model
from infra import apoll_until


async def test_concurrent_requests_on_two_frontends_share_one_load(
    cluster: InProcessCluster,
) -> None:
    one = await cluster.frontend()
    two = await cluster.frontend()
    worker = await cluster.worker(one, "n1")
    worker.gate = asyncio.Event()  # the start waits until every request is queued
    await declare(one, model("m"))
    await apoll_until(lambda: "m" in two.view.models, timeout=5, what="the model on frontend 2")
    async with client(one) as c1, client(two) as c2:
        requests = [asyncio.create_task(chat(c, "m")) for c in (c1, c2, c1, c2, c1, c2)]
        await apoll_until(lambda: worker.starts, timeout=5, what="the start")
        await asyncio.sleep(0)
        worker.gate.set()
        answers = await asyncio.gather(*requests)
    assert [r.status_code for r in answers] == [200] * 6
    assert len(worker.starts) == 1, "one load for six requests on two frontends"
    assert one.cold.starts + two.cold.starts == 1
    assert [r.key for r in await one.registry.replicas.all()] == [("m", 0)]
    assert await one.registry.jobs.all() == [], "the claim is released after the load"


async def test_requests_during_a_preload_wait_for_it_instead_of_loading_again(
    cluster: InProcessCluster,
) -> None:
    one = await cluster.frontend()
    two = await cluster.frontend()
    worker = await cluster.worker(one, "n1")
    worker.gate = asyncio.Event()
    await declare(one, model("m", min_replicas=1))
    await one.reconciler.tick()  # the preload's start waits at the gate
    await apoll_until(lambda: two.view.replicas_of("m"), timeout=5, what="the start seen")
    async with client(one) as c1, client(two) as c2:
        requests = [asyncio.create_task(chat(c, "m")) for c in (c1, c2)]
        await apoll_until(
            lambda: "m" in one.cold._loads and "m" in two.cold._loads,
            timeout=5,
            what="both requests waiting in the cold path",
        )
        worker.gate.set()
        answers = await asyncio.gather(*requests)
    assert [r.status_code for r in answers] == [200, 200]
    assert len(worker.starts) == 1 and one.cold.starts + two.cold.starts == 0
    assert await one.registry.jobs.all() == [], "no load claimed"


async def test_a_failed_load_reaches_every_waiter_with_the_nodes_error(
    cluster: InProcessCluster,
) -> None:
    one = await cluster.frontend()
    two = await cluster.frontend()
    worker = await cluster.worker(one, "n1")
    worker.fail = "backend exited: CUDA out of memory"
    worker.gate = asyncio.Event()
    await declare(one, model("m"))
    await apoll_until(lambda: "m" in two.view.models, timeout=5, what="the model on frontend 2")
    async with client(one) as c1, client(two) as c2:
        requests = [asyncio.create_task(chat(c, "m")) for c in (c1, c2, c2)]
        await apoll_until(lambda: worker.starts, timeout=5, what="the start")
        worker.gate.set()
        answers = await asyncio.gather(*requests)
    for r in answers:
        assert r.status_code == 503
        error = r.json()["error"]
        assert error["code"] == "model_load_failed"
        assert "CUDA out of memory" in error["message"]
    assert len(worker.starts) == 1
    (job,) = await one.registry.jobs.all()
    assert job.state == "failed" and "CUDA out of memory" in (job.error or "")
    assert await one.registry.replicas.all() == []


async def test_past_the_wait_budget_the_client_gets_the_progress_and_the_load_goes_on(
    cluster: InProcessCluster,
) -> None:
    fe = await cluster.frontend(wait_budget=0.5)
    worker = await cluster.worker(fe, "n1")
    worker.gate = asyncio.Event()
    await declare(fe, model("m"))
    async with client(fe) as c:
        r = await chat(c, "m")
        assert r.status_code == 503
        assert r.headers["retry-after"] == "5"
        error = r.json()["error"]
        assert error["code"] == "model_loading"
        assert error["load"]["state"] == "loading" and error["load"]["node_id"] == "n1"
        worker.gate.set()  # the load was not cancelled with the request
        await apoll_until(lambda: fe.view.candidates("m"), timeout=5, what="the load to end")
        assert (await chat(c, "m")).status_code == 200
    assert len(worker.starts) == 1


async def test_an_idle_replica_is_evicted_to_make_room_and_a_busy_one_never(
    cluster: InProcessCluster,
) -> None:
    fe = await cluster.frontend(wait_budget=1.0)
    worker = await cluster.worker(fe, "n1", ram=10 * GB)  # budget 80%: 8 GB
    for name in ("a", "b", "c"):
        await declare(fe, model(name, memory=6 * GB))
    async with client(fe) as c:
        assert (await chat(c, "a")).status_code == 200
        assert (await chat(c, "b")).status_code == 200  # "a" is idle: it makes room
        assert [r.key for r in await fe.registry.replicas.all()] == [("b", 0)]
        assert ("a", 0) not in worker.sims
        events = await fe.registry.audit.recent(20, kind="replica.removed")
        assert "evicted to make room for b" in events[0]["message"]

        slot = fe.inflight.acquire(("b", 0))  # "b" is busy now
        try:
            r = await chat(c, "c")
            assert r.status_code == 503  # the waiter's budget ran out
            error = r.json()["error"]
            assert error["code"] == "no_capacity", "nothing is loading: not model_loading"
            assert "1 busy" in error["message"]

            async def gave_up() -> bool:
                job = await fe.registry.jobs.get("c")
                return job is not None and job.state == "failed"

            await apoll_until(gave_up, timeout=5, what="the load of c to give up")
        finally:
            slot.release()
        job = await fe.registry.jobs.get("c")
        assert job is not None and job.error_code == "no_capacity"
        assert "no replica can be evicted to make room: 1 busy" in (job.error or "")
        assert [r.key for r in await fe.registry.replicas.all()] == [("b", 0)]
        assert ("b", 0) in worker.sims


async def test_requests_for_unknown_models_never_reach_the_cold_path(
    cluster: InProcessCluster,
) -> None:
    fe = await cluster.frontend()
    worker = await cluster.worker(fe, "n1")
    async with client(fe) as c:
        r = await chat(c, "nope")
        bad = await c.post("/v1/chat/completions", content=b"{", headers={"content-type": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_request"
    assert worker.starts == [] and fe.cold.starts == 0
    assert isinstance(r, httpx.Response)


async def test_a_node_not_back_yet_is_waited_for_and_its_no_responder_is_not_cached(
    cluster: InProcessCluster,
) -> None:
    fe = await cluster.frontend()
    worker = FakeWorker(cluster.nats_url, cluster.prefix, "n1")
    cluster.workers.append(worker)
    register = RegisterNode("n1", "n1", "127.0.0.1", "digest", {}, "80%", 0, ["sim"])
    await fe.actuator.apply(register)
    await heartbeat(fe, worker)  # healthy in the registry, but not listening yet (re-joining)
    await declare(fe, model("m"))
    async with client(fe) as c:
        first = asyncio.create_task(chat(c, "m"))
        await apoll_until(
            lambda: any("no responder" in (e.error or "") for e in cluster.events.replicas),
            timeout=5,
            what="a start that found no responder",
        )
        await worker.open()  # the worker is back
        second = await chat(c, "m")
        assert (await first).status_code == 200, (await first).text
    assert second.status_code == 200, second.text
    assert len(worker.starts) == 1, "the start that reached the worker"
    assert await fe.registry.jobs.all() == [], "no failure was recorded"

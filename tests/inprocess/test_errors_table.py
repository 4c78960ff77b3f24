"""The errors a client sees when a model cannot be served, each caused for real: status, code,
Retry-After and a message that says why (and the growing backoff of a model whose loads fail)."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import httpx
from harness import InProcessCluster, chat, client, declare

from corral.domain.entities import Scheduling
from factories import GB, model
from infra import apoll_until


def expect(
    r: httpx.Response, status: int, code: str, retry_after: bool, *words: str
) -> dict[str, object]:
    """One row of the table: status, code, whether Retry-After is sent, words of the message."""
    error = r.json()["error"]
    assert (r.status_code, error["code"]) == (status, code), r.text
    assert ("retry-after" in r.headers) is retry_after, dict(r.headers)
    for word in words:
        assert word in error["message"], (word, error["message"])
    return dict(error)


async def test_no_eligible_node_names_the_selector_and_sends_no_retry_after(
    cluster: InProcessCluster,
) -> None:
    fe = await cluster.frontend()
    await cluster.worker(fe, "n1")
    await declare(fe, model("m", selector={"gpu": "h100"}))
    async with client(fe) as c:
        r = await chat(c, "m")
    expect(r, 503, "no_eligible_node", False, "selector gpu=h100")


async def test_no_eligible_node_names_the_backend(cluster: InProcessCluster) -> None:
    fe = await cluster.frontend()
    await cluster.worker(fe, "n1")  # runs sim only
    await declare(fe, model("m", backend="vllm"))
    async with client(fe) as c:
        r = await chat(c, "m")
    expect(r, 503, "no_eligible_node", False, "backend vllm")


async def test_model_loading_only_while_a_load_runs_with_its_progress(
    cluster: InProcessCluster,
) -> None:
    fe = await cluster.frontend(wait_budget=0.5)
    worker = await cluster.worker(fe, "n1")
    worker.gate = asyncio.Event()  # the start hangs
    await declare(fe, model("m"))
    async with client(fe) as c:
        r = await chat(c, "m")
        error = expect(r, 503, "model_loading", True, "still loading")
        worker.gate.set()
    assert isinstance(error["load"], dict) and error["load"]["state"] != "failed"


async def test_no_capacity_names_the_busy_replicas(cluster: InProcessCluster) -> None:
    fe = await cluster.frontend(wait_budget=1.0)
    await cluster.worker(fe, "n1", ram=10 * GB)  # an 8 GB budget
    await declare(fe, model("busy", memory=6 * GB, options={"ttft": 3.0}))
    await declare(fe, model("new", memory=6 * GB))
    async with client(fe) as c:
        r = await chat(c, "busy", "warm")
        assert r.status_code == 200
        holder = asyncio.create_task(chat(c, "busy"))
        await apoll_until(lambda: fe.inflight.local_total() == 1, timeout=5, what="busy")
        r = await chat(c, "new")
        holder.cancel()
    expect(r, 503, "no_capacity", True, "1 busy")


async def test_queue_full_and_deadline_exceeded(cluster: InProcessCluster) -> None:
    fe = await cluster.frontend(queue_max_entries=1)
    await cluster.worker(fe, "n1")
    spec = model("m", options={"ttft": 0.5})
    await declare(fe, dataclasses.replace(spec, scheduling=Scheduling(max_concurrency=1)))
    async with client(fe) as c:
        assert (await chat(c, "m")).status_code == 200
        holder = asyncio.create_task(chat(c, "m"))
        await apoll_until(lambda: fe.inflight.local_total() == 1, timeout=5, what="busy")
        body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
        late = await c.post("/v1/chat/completions", json=body, headers={"x-corral-deadline": "0.1"})
        waiter = asyncio.create_task(chat(c, "m"))
        await apoll_until(
            lambda: fe.admission.queues()["m"]["depth"] == 1, timeout=5, what="one waiting"
        )
        full = await chat(c, "m")
        await asyncio.gather(holder, waiter)
    expect(late, 504, "deadline_exceeded", False, "deadline")
    expect(full, 429, "queue_full", True, "full")


async def test_a_failing_model_backs_off_and_every_request_gets_its_error_at_once(
    cluster: InProcessCluster,
) -> None:
    # the backoff of production (5, 10, 20 s ...) scaled down 10x: 0.5, 1, 2, 4 s
    fe = await cluster.frontend(load_backoff=0.5, load_backoff_max=30)
    worker = await cluster.worker(fe, "n1")
    worker.fail = "CUDA out of memory"
    await declare(fe, model("m"))
    answers: list[tuple[float, httpx.Response]] = []
    async with client(fe) as c:
        began = time.monotonic()
        while time.monotonic() - began < 6.0:  # steady requests for 60 s (scaled)
            sent = time.monotonic()
            r = await chat(c, "m")
            answers.append((time.monotonic() - sent, r))
            await asyncio.sleep(0.05)
    for _, r in answers:
        expect(r, 503, "model_load_failed", True, "CUDA out of memory")
    # attempts at about 0, 0.5, 1.5, 3.5 s (the next at 7.5): at most 4 in the 6 s
    assert 3 <= len(worker.starts) <= 4, len(worker.starts)
    in_backoff = [took for took, r in answers if "retry-after" in r.headers]
    assert len(in_backoff) > 20 and sorted(in_backoff)[len(in_backoff) // 2] < 0.2
    retry = [int(r.headers["retry-after"]) for _, r in answers]
    assert max(retry) >= 2, "the Retry-After grows with the backoff"
    # a change of the spec resets it: the next request tries again at once
    await declare(fe, model("m", options={"changed": 1}))
    starts = len(worker.starts)
    async with client(fe) as c:
        r = await chat(c, "m")
    expect(r, 503, "model_load_failed", True, "CUDA out of memory")
    assert len(worker.starts) == starts + 1

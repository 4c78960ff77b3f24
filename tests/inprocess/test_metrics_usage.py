"""/metrics scraped and parsed with prometheus_client's parser (histograms, database and NATS
errors), usage per API key summed across two frontends, and per-key limits answering 429 (real
frontends on real PostgreSQL and NATS, in-loop sims)."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
from harness import InProcessCluster, declare
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from corral.bus.messages import ListReplicasCommand, ListReplicasReply
from corral.domain.access import Role
from corral.domain.actions import StartReplica
from corral.errors import NodeUnreachable
from corral.frontend.app import CorralApp, build_api
from corral.frontend.service import Frontend
from factories import MB, model
from infra import apoll_until

CHAT = "/v1/chat/completions"
MINUTE = 1_800_000_000.0 + 5  # a fixed clock for the usage meters: 5 s into a minute


@contextlib.asynccontextmanager
async def app_client(fe: Frontend, key: str | None = None) -> AsyncIterator[httpx.AsyncClient]:
    """A client of `fe`'s whole app (proxy and FastAPI), without sockets."""
    app = CorralApp(fe, build_api(fe, manage_lifecycle=False))
    headers = {"authorization": f"Bearer {key}"} if key else {}
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://corral",
        headers=headers,
        timeout=30,
    ) as c:
        yield c


async def scrape(c: httpx.AsyncClient) -> dict[str, list[Sample]]:
    response = await c.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {f.name: f.samples for f in text_string_to_metric_families(response.text)}


def value(samples: dict[str, list[Sample]], family: str, name: str, **labels: str) -> float:
    """The one sample `name` of `family` whose labels include `labels` (0 when none)."""
    found = [
        s.value
        for s in samples.get(family, [])
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert len(found) <= 1, found
    return found[0] if found else 0.0


async def loaded(cluster: InProcessCluster, fe: Frontend, name: str = "m") -> None:
    worker = await cluster.worker(fe, "n1")
    await declare(fe, dataclasses.replace(model(name)))
    await fe.actuator.apply(StartReplica(name, worker.node_id, None, "sim", 64 * MB, "test"))


def chat_body(stream: bool = False, text: str = "hello there") -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "m",
        "messages": [{"role": "user", "content": text}],
        "max_tokens": 5,
    }
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


async def streamed_usage(c: httpx.AsyncClient, text: str = "hello") -> dict[str, int]:
    """Stream one chat answer; the usage of its final usage chunk."""
    async with c.stream("POST", CHAT, json=chat_body(stream=True, text=text)) as r:
        assert r.status_code == 200
        lines = [line async for line in r.aiter_lines() if line.startswith("data: {")]
    usage: dict[str, int] = orjson.loads(lines[-1][6:])["usage"]
    return usage


async def test_request_histograms_move_after_requests(cluster: InProcessCluster) -> None:
    fe = await cluster.frontend()
    await loaded(cluster, fe)
    chat = {"model": "m", "endpoint": CHAT, "status_class": "2xx"}
    async with app_client(fe) as c:
        before = await scrape(c)
        assert value(before, "corral_requests", "corral_requests_total", **chat) == 0
        assert (
            value(
                before,
                "corral_load_duration_seconds",
                "corral_load_duration_seconds_count",
                model="m",
                outcome="loaded",
            )
            == 1
        )
        assert (await c.post(CHAT, json=chat_body())).status_code == 200
        await streamed_usage(c)
        missing = await c.post(CHAT, json={**chat_body(), "model": "no-such-model"})
        assert missing.status_code == 404
        after = await scrape(c)
    assert value(after, "corral_requests", "corral_requests_total", **chat) == 2
    duration = "corral_request_duration_seconds"
    assert value(after, duration, duration + "_count", **chat) == 2
    assert value(after, duration, duration + "_bucket", le="+Inf", **chat) == 2
    assert value(after, duration, duration + "_sum", **chat) > 0
    first = "corral_time_to_first_byte_seconds"
    assert value(after, first, first + "_count", **chat) == 2
    assert value(after, first, first + "_bucket", le="300.0", **chat) == 2
    # an unknown model is no label: it counts as "other"
    other = {"model": "other", "endpoint": CHAT, "status_class": "4xx"}
    assert value(after, "corral_requests", "corral_requests_total", **other) == 1
    assert not any(s.labels.get("model") == "no-such-model" for f in after.values() for s in f)
    # the autoscaler's time-to-first-byte signal got them too; gauges from the view
    assert fe.inflight.ttft_p90("m") is not None
    assert value(after, "corral_replicas", "corral_replicas", model="m", state="loaded") == 1
    assert value(after, "corral_nodes", "corral_nodes", status="healthy") == 1
    assert "corral_inflight" in after and "corral_reconcile_ticks" in after
    assert "corral_nats_errors" in after and "corral_db_errors" in after
    assert "corral_admission_rejected" in after and "corral_queue_depth" in after


async def test_usage_totals_equal_what_clients_saw_across_two_frontends(
    cluster: InProcessCluster,
) -> None:
    fe1 = await cluster.frontend()
    await loaded(cluster, fe1)
    key_id, secret = await fe1.registry.audit.create_api_key("team-a")
    _, admin_key = await fe1.registry.audit.create_api_key("ops", Role.ADMIN)
    fe2 = await cluster.frontend()
    for fe in (fe1, fe2):
        await fe.refresh()  # the new key
    await apoll_until(lambda: len(fe2.view.candidates("m")) == 1, what="fe2 sees the replica")
    seen = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0}
    async with (
        app_client(fe1, secret) as c1,
        app_client(fe2, secret) as c2,
        app_client(fe1, admin_key) as a1,
        app_client(fe2, admin_key) as a2,
    ):
        for i, c in enumerate((c1, c2, c1, c2)):
            whole = await c.post(CHAT, json=chat_body(text=f"question {i} " * (i + 1)))
            assert whole.status_code == 200
            streamed = await streamed_usage(c, text=f"stream {i} " * (i + 2))
            for usage in (whole.json()["usage"], streamed):
                seen["requests"] += 1
                seen["prompt_tokens"] += usage["prompt_tokens"]
                seen["completion_tokens"] += usage["completion_tokens"]
        assert seen["completion_tokens"] > 0 and seen["prompt_tokens"] > 0
        await fe2.usage.flush()  # fe1's own counts are flushed by the API call
        answer = await a1.get("/api/usage", params={"group_by": "key,model"})
        assert answer.status_code == 200, answer.text
        rows = answer.json()["usage"]
        assert len(rows) == 1, rows
        row = rows[0]
        assert (row["key_id"], row["key_name"], row["model"]) == (key_id, "team-a", "m")
        assert {k: row[k] for k in seen} == seen
        assert row["total_tokens"] == seen["prompt_tokens"] + seen["completion_tokens"]
        assert row["errors"] == 0
        # filters and time groups
        by_name = (await a2.get("/api/usage", params={"key": "team-a", "group_by": "day"})).json()
        assert [r["requests"] for r in by_name["usage"]] == [8]
        none = await a2.get("/api/usage", params={"model": "other-model"})
        assert none.json()["usage"] == []
        bad = await a2.get("/api/usage", params={"group_by": "key,colour"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "group_by"


async def test_limits_answer_429_at_the_limit_on_every_frontend(
    cluster: InProcessCluster,
) -> None:
    fe1 = await cluster.frontend()
    await loaded(cluster, fe1)
    key_id, secret = await fe1.registry.audit.create_api_key("limited")
    _, admin_key = await fe1.registry.audit.create_api_key("ops", Role.ADMIN)
    fe2 = await cluster.frontend()
    for fe in (fe1, fe2):
        fe.usage.clock = lambda: MINUTE
        await fe.refresh()
    await apoll_until(lambda: len(fe2.view.candidates("m")) == 1, what="fe2 sees the replica")
    async with (
        app_client(fe1, secret) as c1,
        app_client(fe2, secret) as c2,
        app_client(fe1, admin_key) as a1,
        app_client(fe2, admin_key) as a2,
    ):
        put = await a1.put(f"/api/keys/{key_id}/limits", json={"requests_per_minute": 3})
        assert put.status_code == 200, put.text
        limits = (await a2.get(f"/api/keys/{key_id}/limits")).json()
        assert (limits["requests_per_minute"], limits["tokens_per_day"]) == (3, None)
        assert (await a2.get("/api/keys/key-none/limits")).status_code == 404
        bad = await a2.put(f"/api/keys/{key_id}/limits", json={"requests_per_minute": 0})
        assert bad.status_code == 400
        await fe2.refresh()  # the other frontend learns the limit at its resync
        assert (await c1.post(CHAT, json=chat_body())).status_code == 200
        assert (await c2.post(CHAT, json=chat_body())).status_code == 200
        for fe in (fe1, fe2, fe1):  # each flushes; the last read sees both
            await fe.usage.flush()
        assert (await c1.post(CHAT, json=chat_body())).status_code == 200  # the 3rd
        refused = await c1.post(CHAT, json=chat_body())
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "rate_limited"
        assert refused.headers["retry-after"] == "55"  # the minute ends in 55 s
        await fe1.usage.flush()
        await fe2.usage.flush()
        also = await c2.post(CHAT, json=chat_body())
        assert also.status_code == 429 and also.json()["error"]["code"] == "rate_limited"
        # tokens per day: one answer past the limit, then refused until the day ends
        put = await a1.put(f"/api/keys/{key_id}/limits", json={"tokens_per_day": 5})
        assert put.status_code == 200
        fe1.usage.clock = lambda: MINUTE + 86400  # the next day: no tokens counted yet
        first = await c1.post(CHAT, json=chat_body())
        assert first.status_code == 200 and first.json()["usage"]["total_tokens"] > 5
        over = await c1.post(CHAT, json=chat_body())
        assert over.status_code == 429
        assert int(over.headers["retry-after"]) == 86400 - int(MINUTE % 86400)
        await fe2.usage.flush()
        usage = (await a1.get("/api/usage", params={"group_by": "key"})).json()["usage"]
        assert [(u["requests"], u["limited"], u["errors"]) for u in usage] == [(7, 3, 3)]


async def test_database_and_nats_errors_are_counted(cluster: InProcessCluster) -> None:
    fe = await cluster.frontend()
    async with app_client(fe) as c:
        before = await scrape(c)
        with pytest.raises(DBAPIError):
            async with fe.registry.engine.connect() as conn:
                await conn.execute(text("SELECT * FROM no_such_table"))
        with pytest.raises(NodeUnreachable):
            await fe.bus.request(
                "corral-test.nobody.listens", ListReplicasCommand(), ListReplicasReply, timeout=1
            )
        after = await scrape(c)
    for family in ("corral_db_errors", "corral_nats_errors"):
        name = family + "_total"
        assert value(after, family, name) == value(before, family, name) + 1, family

"""Every endpoint through the proxy in one process (real frontends on real PostgreSQL and NATS,
in-loop sims): capabilities gate requests before any load, stored responses go home through
either frontend (the map shared over NATS) and a home that is gone answers 404, uploads are
spooled and resent on a retry, and in-flight counts return to zero after each endpoint."""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import httpx
from harness import FakeWorker, InProcessCluster, client, declare

from corral.domain.actions import StartReplica
from corral.domain.entities import Replica
from corral.frontend.app import CorralApp, build_api
from corral.frontend.service import Frontend
from factories import MB, model
from infra import apoll_until


async def replicas(
    cluster: InProcessCluster, fe: Frontend, n: int, name: str = "m", **spec: Any
) -> tuple[list[Replica], list[FakeWorker]]:
    """`n` loaded replicas of sim model `name`, one per fake worker."""
    workers = [await cluster.worker(fe, f"n{i + 1}") for i in range(n)]
    await declare(fe, dataclasses.replace(model(name), **spec))
    started = [
        await fe.actuator.apply(StartReplica(name, w.node_id, None, "sim", 64 * MB, "test"))
        for w in workers
    ]
    return started, workers


async def sim_requests(address: str | None) -> int:
    async with httpx.AsyncClient() as c:
        stats = (await c.get(f"http://{address}/admin/stats")).json()
    count: int = stats["requests"]
    return count


def text_of(response: dict[str, Any]) -> str:
    text: str = response["output"][0]["content"][0]["text"]
    return text


async def test_follow_ups_go_to_the_replica_holding_the_response_through_either_frontend(
    cluster: InProcessCluster,
) -> None:
    fe1 = await cluster.frontend()
    started, _ = await replicas(cluster, fe1, 3)
    fe2 = await cluster.frontend()
    await apoll_until(lambda: len(fe2.view.candidates("m")) == 3, what="fe2 sees 3 replicas")
    async with client(fe1) as c1, client(fe2) as c2:
        first = await c1.post("/v1/responses", json={"model": "m", "input": "hello"})
        assert first.status_code == 200, first.text
        chain = [first.json()["id"]]
        for turn in range(6):  # alternate frontends; each follow-up continues the last one
            c = (c2, c1)[turn % 2]
            body = {"model": "m", "input": f"turn {turn}", "previous_response_id": chain[-1]}
            answer = await c.post("/v1/responses", json=body)
            assert answer.status_code == 200, answer.text
            assert text_of(answer.json()).startswith(f"[after {chain[-1]}]")
            chain.append(answer.json()["id"])
        # streamed, then at once a follow-up through the other frontend
        async with c1.stream(
            "POST", "/v1/responses", json={"model": "m", "input": "s", "stream": True}
        ) as streamed:
            events = [line async for line in streamed.aiter_lines() if line.startswith("data:")]
        assert '"type":"response.created"' in events[0]
        streamed_id = httpx.Response(200, content=events[0][5:]).json()["response"]["id"]
        follow = await c2.post(
            "/v1/responses",
            json={"model": "m", "input": "x", "previous_response_id": streamed_id},
        )
        assert follow.status_code == 200, follow.text
        assert text_of(follow.json()).startswith(f"[after {streamed_id}]")

        # GET and DELETE by id, through the frontend that did not create it
        got = await c2.get(f"/v1/responses/{chain[0]}")
        assert got.status_code == 200 and got.json()["id"] == chain[0]
        deleted = await c2.delete(f"/v1/responses/{chain[0]}")
        assert deleted.status_code == 200 and deleted.json()["deleted"] is True
        assert chain[0] not in fe2.response_homes.homes._items
        gone = await c1.get(f"/v1/responses/{chain[0]}")  # fe1 still knows the home
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "response_not_found"
        unknown = await c1.get("/v1/responses/resp_never_made")
        assert unknown.status_code == 404
        assert unknown.json()["error"]["code"] == "response_not_found"

    # a frontend that started later missed the broadcasts: it asks the others
    fe3 = await cluster.frontend()
    await apoll_until(lambda: len(fe3.view.candidates("m")) == 3, what="fe3 sees 3 replicas")
    assert fe3.response_homes.homes.get(chain[-1]) is None
    async with client(fe3) as c3:
        late = await c3.get(f"/v1/responses/{chain[-1]}")
    assert late.status_code == 200 and late.json()["id"] == chain[-1]

    # every turn ran where the one before it was stored: the whole chain lives on one replica
    homes = {rid: [r.key for r in started if await stores(r, rid)] for rid in chain[1:]}
    assert len({tuple(keys) for keys in homes.values()}) == 1, homes
    assert all(len(keys) == 1 for keys in homes.values()), homes
    assert not fe1.inflight.local and not fe2.inflight.local
    # the 404s about stored responses dropped no replica
    assert len(await fe1.registry.replicas.all("m")) == 3


async def stores(replica: Replica, response_id: str) -> bool:
    """Whether the sim behind `replica` holds the stored response (asked directly)."""
    async with httpx.AsyncClient() as c:
        answer = await c.get(f"http://{replica.address}/v1/responses/{response_id}")
    return answer.status_code == 200


async def test_a_response_whose_replica_is_gone_is_a_404_never_another_replicas_answer(
    cluster: InProcessCluster,
) -> None:
    fe = await cluster.frontend()
    started, workers = await replicas(cluster, fe, 2)
    async with client(fe) as c:
        made = (await c.post("/v1/responses", json={"model": "m", "input": "hi"})).json()
        (home,) = [r for r in started if await stores(r, made["id"])]
        other = next(r for r in started if r is not home)
        owner = next(w for w in workers if w.node_id == home.node_id)
        await owner.sims.pop(home.key).stop()  # the process died; nobody said so yet
        before = await sim_requests(other.address)
        follow = await c.post(
            "/v1/responses",
            json={"model": "m", "input": "again", "previous_response_id": made["id"]},
        )
        assert follow.status_code == 404, follow.text
        error = follow.json()["error"]
        assert error["code"] == "response_not_found" and error["param"] == "previous_response_id"
        assert made["id"] in error["message"]
        got = await c.get(f"/v1/responses/{made['id']}")
        assert got.status_code == 404 and got.json()["error"]["code"] == "response_not_found"
        # a new conversation still works, on the replica that is left
        fresh = await c.post("/v1/responses", json={"model": "m", "input": "new"})
        assert fresh.status_code == 200
    assert await sim_requests(other.address) == before + 1
    assert [r.key for r in await fe.registry.replicas.all("m")] == [other.key]
    assert not fe.inflight.local


async def test_an_endpoint_the_model_does_not_serve_is_a_400_and_never_a_load(
    cluster: InProcessCluster,
) -> None:
    fe = await cluster.frontend()
    worker = await cluster.worker(fe, "n1")
    await declare(fe, dataclasses.replace(model("chat-only"), capabilities=("chat",)))
    await declare(fe, model("rank", backend="embeddings"))
    async with client(fe) as c:
        speech = await c.post(
            "/v1/audio/speech", json={"model": "chat-only", "input": "hi", "voice": "alloy"}
        )
        chat = await c.post("/v1/chat/completions", json={"model": "rank", "messages": []})
        upload = await c.post(
            "/v1/audio/transcriptions",
            data={"model": "chat-only"},
            files={"file": ("a.wav", b"RIFF....", "audio/wav")},
        )
    for answer, name, path in (
        (speech, "chat-only", "/v1/audio/speech"),
        (chat, "rank", "/v1/chat/completions"),
        (upload, "chat-only", "/v1/audio/transcriptions"),
    ):
        assert answer.status_code == 400, answer.text
        error = answer.json()["error"]
        assert error["code"] == "unsupported_endpoint" and error["param"] == "model"
        assert name in error["message"] and path in error["message"]
    assert worker.starts == [] and await fe.registry.replicas.all() == []
    assert await fe.registry.jobs.all() == []  # no load was even claimed


WAV = b"RIFF" + bytes(range(256)) * 64
MESSAGES = [{"role": "user", "content": "hi"}]


def upload_text(data: bytes, verb: str = "transcribed") -> str:
    return f"{verb} {len(data)} bytes sha256 {hashlib.sha256(data).hexdigest()[:16]}"


async def test_every_endpoint_answers_through_the_proxy_and_frees_its_slot(
    cluster: InProcessCluster,
) -> None:
    fe = await cluster.frontend()
    await replicas(cluster, fe, 1)
    form = {"data": {"model": "m"}, "files": {"file": ("a.wav", WAV, "audio/wav")}}
    calls: list[tuple[str, str, dict[str, Any]]] = [
        ("POST", "/v1/chat/completions", {"json": {"model": "m", "messages": MESSAGES}}),
        ("POST", "/v1/completions", {"json": {"model": "m", "prompt": "x"}}),
        ("POST", "/v1/embeddings", {"json": {"model": "m", "input": "x"}}),
        ("POST", "/v1/responses", {"json": {"model": "m", "input": "x"}}),
        ("POST", "/v1/rerank", {"json": {"model": "m", "query": "a", "documents": ["a b"]}}),
        ("POST", "/rerank", {"json": {"model": "m", "query": "a", "documents": ["a"]}}),
        ("POST", "/v2/rerank", {"json": {"model": "m", "query": "a", "documents": ["a"]}}),
        ("POST", "/v1/score", {"json": {"model": "m", "text_1": "a", "text_2": ["a"]}}),
        ("POST", "/score", {"json": {"model": "m", "text_1": "a", "text_2": "b"}}),
        ("POST", "/v1/audio/transcriptions", form),
        ("POST", "/v1/audio/translations", form),
        ("POST", "/v1/audio/speech", {"json": {"model": "m", "input": "hello", "voice": "a"}}),
        ("POST", "/v1/images/generations", {"json": {"model": "m", "prompt": "a horse"}}),
        (
            "POST",
            "/v1/images/edits",
            {"data": {"model": "m", "prompt": "p"}, "files": {"image": ("i.png", b"x", "")}},
        ),
        ("POST", "/v1/moderations", {"json": {"model": "m", "input": "x"}}),
        ("POST", "/tokenize", {"json": {"model": "m", "prompt": "hello world"}}),
        ("POST", "/detokenize", {"json": {"model": "m", "tokens": [1, 2]}}),
    ]
    async with client(fe) as c:
        for method, path, kw in calls:
            answer = await c.request(method, path, **kw)
            assert answer.status_code == 200, (path, answer.text)
            assert fe.inflight.local_total() == 0, path
        transcribed = await c.post("/v1/audio/transcriptions", **form)  # type: ignore[arg-type]
        assert transcribed.json()["text"] == upload_text(WAV)
        speech = await c.post(
            "/v1/audio/speech", json={"model": "m", "input": "hello", "voice": "a"}
        )
        assert speech.headers["content-type"] == "audio/wav"
        assert speech.content.startswith(b"RIFF") and len(speech.content) > 44
        # a wrong method on an inference path, a missing model form field
        wrong = await c.get("/v1/audio/speech")
        assert wrong.status_code == 405
        no_model = await c.post("/v1/audio/transcriptions", files={"file": ("a", b"x", "")})
        assert no_model.status_code == 400 and no_model.json()["error"]["param"] == "model"
        not_form = await c.post("/v1/audio/transcriptions", json={"model": "m"})
        assert not_form.status_code == 400
    assert fe.inflight.local_total() == 0


async def test_a_spooled_upload_is_sent_again_when_its_first_replica_is_gone(
    cluster: InProcessCluster,
) -> None:
    fe = await cluster.frontend(spool_memory_bytes=4096)  # past 4 KiB an upload goes to disk
    started, workers = await replicas(cluster, fe, 2)
    audio = bytes(range(256)) * 1024  # 256 KiB: on disk
    await workers[1].sims.pop(started[1].key).stop()  # the process died; nobody said so yet
    async with client(fe) as c:
        answers = [
            await c.post(
                "/v1/audio/transcriptions",
                data={"model": "m", "response_format": "json"},
                files={"file": ("a.raw", audio, "application/octet-stream")},
            )
            for _ in range(3)
        ]
    assert [a.status_code for a in answers] == [200] * 3, answers[-1].text
    assert {a.json()["text"] for a in answers} == {upload_text(audio)}
    assert [r.key for r in await fe.registry.replicas.all("m")] == [started[0].key]
    assert fe.inflight.local_total() == 0


async def test_capabilities_through_the_admin_api_and_models_list(
    cluster: InProcessCluster,
) -> None:
    fe = await cluster.frontend()
    app = CorralApp(fe, build_api(fe, manage_lifecycle=False))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://corral"
    ) as c:
        ok = await c.put("/api/models/narrow", json={"backend": "sim", "capabilities": ["chat"]})
        assert ok.status_code == 200 and ok.json()["capabilities"] == ["chat"]
        wide = await c.put(
            "/api/models/wide", json={"backend": "embeddings", "capabilities": ["chat"]}
        )
        assert wide.status_code == 400 and wide.json()["error"]["param"] == "capabilities"
        unknown = await c.put(
            "/api/models/odd", json={"backend": "sim", "capabilities": ["telepathy"]}
        )
        assert unknown.status_code == 400
        await c.put("/api/models/ranker", json={"backend": "embeddings"})
        cards = {m["id"]: m for m in (await c.get("/v1/models")).json()["data"]}
        assert cards["narrow"]["capabilities"] == ["chat"]
        assert cards["ranker"]["capabilities"] == ["embeddings", "rerank", "score"]
        assert set(cards) == {"narrow", "ranker"}
        one = (await c.get("/v1/models/narrow")).json()
        assert one["capabilities"] == ["chat"]
        # by-id paths reach the proxy under any ASGI server too
        missing = await c.get("/v1/responses/resp_nowhere")
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "response_not_found"

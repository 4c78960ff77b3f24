"""The proxy on Corral's own server, in one process, against a raw upstream socket server:
request bytes reach the backend unchanged, response bytes come back unchanged (whole and
SSE), a client that leaves mid-stream aborts the upstream, and the slot is released on
every path."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import httpx
import pytest

from corral.domain.entities import ModelSpec, Node, NodeStatus, Replica, ReplicaState
from corral.frontend.auth import Authorizer
from corral.frontend.http import HttpServer, bind_socket
from corral.frontend.inflight import InflightTracker
from corral.frontend.probe import ProbeCache
from corral.frontend.proxy import OpenAIProxy
from corral.frontend.upstream import UpstreamPool
from corral.frontend.view import ClusterView

WHOLE = b'{ "id" : "x",\n  "text": "caf\\u00e9 \xc3\xa9" ,"n":1.50 }'
EVENTS = [b'data: {"a": 1}\n\n', b'data: {"b":  2}\r\n\r\n', b"data: [DONE]\n\n"]


@dataclass
class Upstream:
    """A backend that records the raw requests it got and answers with fixed bytes."""

    requests: list[bytes] = field(default_factory=list)
    aborted: asyncio.Event = field(default_factory=asyncio.Event)
    port: int = 0
    server: asyncio.Server | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = await reader.readexactly(length)
                self.requests.append(head + body)
                if b"hang" in body:  # never answers; notices when the frontend hangs up
                    if not await reader.read(1):
                        self.aborted.set()
                    return
                if b'"stream":true' not in body.replace(b" ", b""):
                    writer.write(
                        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                        b"x-upstream: kept\r\nconnection: keep-alive\r\n"
                        b"content-length: %d\r\n\r\n%s" % (len(WHOLE), WHOLE)
                    )
                    continue
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                    b"transfer-encoding: chunked\r\n\r\n"
                )
                slow = b"slow" in body
                for event in EVENTS * (200 if slow else 1):
                    writer.write(b"%x\r\n%s\r\n" % (len(event), event))
                    await writer.drain()
                    if slow:
                        await asyncio.sleep(0.02)
                writer.write(b"0\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            self.aborted.set()
        finally:
            writer.close()


@dataclass
class Setup:
    url: str
    upstream: Upstream
    inflight: InflightTracker
    dropped: list[str]


@pytest.fixture
async def setup() -> AsyncIterator[Setup]:
    upstream = Upstream()
    upstream.server = await asyncio.start_server(upstream.handle, "127.0.0.1", 0)
    upstream.port = upstream.server.sockets[0].getsockname()[1]
    address = f"127.0.0.1:{upstream.port}"

    view = ClusterView()
    view.put_node(Node(id="n1", name="n1", status=NodeStatus.HEALTHY))
    view.put_model(ModelSpec(name="m", backend="sim"))
    view.put_replica(Replica("m", 0, "n1", ReplicaState.LOADED, address=address))
    pool = UpstreamPool()
    probes = ProbeCache(pool, ttl=3600)
    probes.mark_ok("n1", address)
    inflight = InflightTracker("fe")
    dropped: list[str] = []

    async def ensure(_: ModelSpec) -> None:
        raise AssertionError("no cold load expected")

    async def drop(_: Replica, reason: str) -> None:
        dropped.append(reason)

    proxy = OpenAIProxy(
        view=view,
        inflight=inflight,
        pool=pool,
        probes=probes,
        ensure_replica=ensure,
        drop_replica=drop,
        authorizer=Authorizer(),
        max_body_bytes=1 << 20,
        request_timeout=30,
    )

    async def no_app(scope: object, receive: object, send: object) -> None:
        return

    server = HttpServer(no_app, native={b"/v1/chat/completions": proxy.handle})  # type: ignore[arg-type]
    await server.startup()
    await server.start(bind_socket("127.0.0.1", 0))
    try:
        yield Setup(f"http://127.0.0.1:{server.port}", upstream, inflight, dropped)
    finally:
        await server.stop()
        await server.shutdown()
        await pool.close()
        upstream.server.close()


async def wait_until(check: Callable[[], bool], what: str, timeout: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def test_request_and_response_bytes_pass_unchanged(setup: Setup) -> None:
    body = b'{"model": "m",   "messages": [{"role":"user","content":"\\u00e9 \xc3\xa9"}] }'
    async with httpx.AsyncClient(base_url=setup.url) as client:
        r = await client.post(
            "/v1/chat/completions",
            content=body,
            headers={
                "x-request-id": "abc",
                "x-custom": "kept",
                "authorization": "Bearer secret-key",  # Corral's credential, not the backend's
                "x-corral-priority": "secret-control",  # Corral's own control header
            },
        )
    assert r.status_code == 200
    assert r.content == WHOLE
    assert r.headers["x-upstream"] == "kept" and "connection" not in r.headers
    assert r.headers["content-length"] == str(len(WHOLE))
    (sent,) = setup.upstream.requests
    assert sent.endswith(b"\r\n\r\n" + body)  # the body exactly as the client sent it
    assert b"x-request-id: abc" in sent and b"x-custom: kept" in sent
    assert b"secret" not in sent
    assert setup.inflight.local_total() == 0


async def test_sse_bytes_pass_unchanged(setup: Setup) -> None:
    body = b'{"model":"m","messages":[],"stream":true}'
    async with (
        httpx.AsyncClient(base_url=setup.url) as client,
        client.stream("POST", "/v1/chat/completions", content=body) as r,
    ):
        got = b"".join([chunk async for chunk in r.aiter_raw()])
    assert r.status_code == 200 and r.headers["content-type"] == "text/event-stream"
    assert got == b"".join(EVENTS)
    assert setup.inflight.local_total() == 0 and setup.dropped == []


async def test_client_leaving_mid_stream_aborts_the_upstream(setup: Setup) -> None:
    body = b'{"model":"m","messages":["slow"],"stream":true}'
    async with (
        httpx.AsyncClient(base_url=setup.url) as client,
        client.stream("POST", "/v1/chat/completions", content=body) as r,
    ):
        chunks = r.aiter_raw()
        assert (await anext(chunks)).startswith(b"data: ")
        assert setup.inflight.local_total() == 1
    await asyncio.wait_for(setup.upstream.aborted.wait(), 10)
    await wait_until(lambda: setup.inflight.local_total() == 0, "the slot released")
    assert setup.dropped == []  # a client leaving is not the replica's fault


async def test_errors_are_openai_json_and_release_slots(setup: Setup) -> None:
    async with httpx.AsyncClient(base_url=setup.url) as client:
        cases = [
            (b"not json", 400, "invalid_request"),
            (b'{"model":"nope","messages":[]}', 404, "model_not_found"),
            (b'{"model":"m"}', 400, "invalid_request"),
            (b"x" * ((1 << 20) + 1), 413, "payload_too_large"),
        ]
        for body, status, code in cases:
            r = await client.post("/v1/chat/completions", content=body)
            assert r.status_code == status and r.json()["error"]["code"] == code, r.text
        r = await client.get("/v1/chat/completions")
        assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
    assert setup.inflight.local_total() == 0


async def test_a_client_leaving_a_non_streamed_request_aborts_the_backend_within_a_second(
    setup: Setup,
) -> None:
    host, _, port = setup.url.removeprefix("http://").partition(":")
    _, writer = await asyncio.open_connection(host, int(port))
    body = b'{"model": "m", "messages": [], "hang": true}'
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%s" % (len(body), body)
    )
    await writer.drain()
    await wait_until(lambda: bool(setup.upstream.requests), "the request at the backend")
    assert setup.inflight.local_total() == 1
    writer.close()  # the client gives up before any answer
    left = time.monotonic()
    await asyncio.wait_for(setup.upstream.aborted.wait(), timeout=1.0)
    await wait_until(lambda: setup.inflight.local_total() == 0, "the slot freed", timeout=1.0)
    assert time.monotonic() - left < 1.0
    assert setup.dropped == [], "a client leaving says nothing about the replica"

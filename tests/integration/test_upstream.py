"""UpstreamPool and ProbeCache against small real HTTP servers written here (asyncio streams)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import cast

import orjson
import pytest

from corral.errors import ReplicaGone, UpstreamError, UpstreamTimeout
from corral.frontend.probe import ProbeCache
from corral.frontend.upstream import UpstreamPool
from infra import apoll_until

# --- a tiny scripted HTTP/1.1 server ------------------------------------------------------------


@dataclass
class Request:
    """One request as the test server received it."""

    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes
    connection: int  # 1-based number of the TCP connection it came on
    seq: int  # 1-based number of the request on that connection

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None


#: Writes the response for one request; returns False to close the connection afterwards.
Respond = Callable[[Request, asyncio.StreamWriter], Awaitable[bool]]


class Backend:
    """A real TCP server that speaks just enough HTTP/1.1 for the pool, scripted per test."""

    def __init__(self, respond: Respond) -> None:
        self.respond = respond
        self.connections = 0
        self.closed = 0
        self.requests: list[Request] = []
        self.request_seen = asyncio.Event()
        self.closed_event = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.readers: list[asyncio.StreamReader] = []  # per connection, in order

    @property
    def address(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"127.0.0.1:{port}"

    async def start(self) -> Backend:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()
        for writer in list(self._writers):
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        self.readers.append(reader)
        self.connections += 1
        number = self.connections
        seq = 0
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    break
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = []
                for line in lines[1:]:
                    if line:
                        name, _, value = line.partition(":")
                        headers.append((name.strip().lower(), value.strip()))
                length = int(dict(headers).get("content-length", "0"))
                body = await reader.readexactly(length) if length else b""
                seq += 1
                request = Request(method, path, headers, body, number, seq)
                self.requests.append(request)
                self.request_seen.set()
                keep = await self.respond(request, writer)
                await writer.drain()
                if not keep:
                    break
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # cancelled only by stop(): end quietly, the server is going away
        finally:
            writer.close()
            self._writers.discard(writer)
            self._tasks.discard(task)
            self.closed += 1
            self.closed_event.set()


def response(
    body: bytes = b"ok", *, status: int = 200, headers: list[tuple[str, str]] | None = None
) -> bytes:
    head = [f"HTTP/1.1 {status} X", f"content-length: {len(body)}"]
    head += [f"{k}: {v}" for k, v in headers or []]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


CHUNKED_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
)


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


LAST_CHUNK = b"0\r\n\r\n"


async def answer_ok(request: Request, writer: asyncio.StreamWriter) -> bool:
    writer.write(response(f"{request.method} {request.path} #{request.seq}".encode()))
    return True


StartBackend = Callable[[Respond], Awaitable[Backend]]


@pytest.fixture
async def start_backend() -> AsyncIterator[StartBackend]:
    backends: list[Backend] = []

    async def start(respond: Respond) -> Backend:
        backend = await Backend(respond).start()
        backends.append(backend)
        return backend

    yield start
    for backend in backends:
        await backend.stop()


@pytest.fixture
async def pool() -> AsyncIterator[UpstreamPool]:
    p = UpstreamPool(connect_timeout=2.0)
    yield p
    await p.close()


@pytest.fixture
def refused_address() -> Iterator[str]:
    """An address whose port is bound but not listening: connecting is refused at once."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    try:
        yield f"127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


# --- keep-alive and framing ----------------------------------------------------------------------


async def test_keep_alive_reuses_one_connection(
    start_backend: StartBackend, pool: UpstreamPool
) -> None:
    backend = await start_backend(answer_ok)
    for i in range(20):
        resp = await pool.request(backend.address, b"GET", f"/r{i}".encode(), timeout=5)
        assert resp.status == 200
        assert await resp.read() == f"GET /r{i} #{i + 1}".encode()
    assert backend.connections == 1, "sequential requests must share one keep-alive connection"
    assert [r.seq for r in backend.requests] == list(range(1, 21))


async def test_unread_body_is_not_reused(start_backend: StartBackend, pool: UpstreamPool) -> None:
    backend = await start_backend(answer_ok)
    first = await pool.request(backend.address, b"GET", b"/a", timeout=5)
    first.release()  # body never read: the connection cannot carry another response
    second = await pool.request(backend.address, b"GET", b"/b", timeout=5)
    assert await second.read() == b"GET /b #1"
    assert backend.connections == 2


async def test_concurrent_requests_use_separate_connections(
    start_backend: StartBackend, pool: UpstreamPool
) -> None:
    both_arrived = asyncio.Event()

    async def respond(request: Request, writer: asyncio.StreamWriter) -> bool:
        if len(backend.requests) == 2:
            both_arrived.set()
        await both_arrived.wait()  # neither is answered until both reached the server
        writer.write(response(request.path.encode()))
        return True

    backend = await start_backend(respond)

    async def one(path: bytes) -> bytes:
        resp = await pool.request(backend.address, b"POST", path, b"{}", timeout=5)
        return await resp.read()

    assert list(await asyncio.gather(one(b"/x"), one(b"/y"))) == [b"/x", b"/y"]
    assert backend.connections == 2


async def _respond_content_length(request: Request, writer: asyncio.StreamWriter) -> bool:
    writer.write(response(b"hello world", headers=[("content-type", "text/plain")]))
    return True


async def _respond_chunked(request: Request, writer: asyncio.StreamWriter) -> bool:
    writer.write(CHUNKED_HEAD + chunk(b"hello") + chunk(b" ") + chunk(b"world") + LAST_CHUNK)
    return True


async def _respond_close_delimited(request: Request, writer: asyncio.StreamWriter) -> bool:
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nhello world")
    return False  # the end of the body is the end of the connection


async def _respond_empty(request: Request, writer: asyncio.StreamWriter) -> bool:
    writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
    return True


FRAMINGS = [
    ("content-length", _respond_content_length, b"hello world"),
    ("chunked", _respond_chunked, b"hello world"),
    ("close-delimited", _respond_close_delimited, b"hello world"),
    ("no-content", _respond_empty, b""),
]


@pytest.mark.parametrize(
    ("respond", "body"), [f[1:] for f in FRAMINGS], ids=[f[0] for f in FRAMINGS]
)
async def test_body_framings(
    start_backend: StartBackend, pool: UpstreamPool, respond: Respond, body: bytes
) -> None:
    backend = await start_backend(respond)
    for _ in range(3):
        resp = await pool.request(backend.address, b"GET", b"/", timeout=5)
        assert resp.status in (200, 204)
        assert await resp.read() == body
    assert len(backend.requests) == 3


@pytest.mark.parametrize(
    "respond",
    [_respond_content_length, _respond_chunked],
    ids=["content-length", "chunked"],
)
async def test_framed_responses_keep_the_connection(
    start_backend: StartBackend, pool: UpstreamPool, respond: Respond
) -> None:
    backend = await start_backend(respond)
    for _ in range(3):
        resp = await pool.request(backend.address, b"GET", b"/", timeout=5)
        await resp.read()
    assert backend.connections == 1


async def test_no_content_response_keeps_the_connection(
    start_backend: StartBackend, pool: UpstreamPool
) -> None:
    backend = await start_backend(_respond_empty)
    for _ in range(3):
        resp = await pool.request(backend.address, b"GET", b"/", timeout=5)
        assert resp.status == 204
        assert await resp.read() == b""
    assert backend.connections == 1


async def test_close_delimited_body_is_not_reused(
    start_backend: StartBackend, pool: UpstreamPool
) -> None:
    backend = await start_backend(_respond_close_delimited)
    for _ in range(3):
        resp = await pool.request(backend.address, b"GET", b"/", timeout=5)
        assert await resp.read() == b"hello world"
    assert backend.connections == 3


async def test_large_response_body_arrives_intact(
    start_backend: StartBackend, pool: UpstreamPool
) -> None:
    payload = os.urandom(12 * 1024 * 1024)  # past the pool's 4 MiB read high-water mark

    async def respond(request: Request, writer: asyncio.StreamWriter) -> bool:
        writer.write(response(payload))
        return True

    backend = await start_backend(respond)
    resp = await pool.request(backend.address, b"GET", b"/big", timeout=10)
    digest = hashlib.sha256()
    size = 0
    async for part in resp.iter_body():
        digest.update(part)
        size += len(part)
    assert size == len(payload)
    assert digest.digest() == hashlib.sha256(payload).digest()
    again = await pool.request(backend.address, b"GET", b"/big", timeout=10)
    assert await again.read() == payload


@pytest.mark.parametrize(
    "size", [0, 1000, 65535, 65536, 3 * 1024 * 1024], ids=["empty", "1k", "64k-1", "64k", "3m"]
)
async def test_request_body_sent_intact(
    start_backend: StartBackend, pool: UpstreamPool, size: int
) -> None:
    backend = await start_backend(answer_ok)
    body = os.urandom(size)
    headers = [(b"content-type", b"application/json"), (b"x-request-id", b"abc")]
    resp = await pool.request(backend.address, b"POST", b"/v1/x", body, headers=headers, timeout=10)
    assert resp.status == 200
    await resp.read()
    (received,) = backend.requests
    assert received.body == body
    assert received.method == "POST" and received.path == "/v1/x"
    assert received.header("content-length") == str(size)
    assert received.header("host") == backend.address
    assert received.header("x-request-id") == "abc"
    assert received.header("content-type") == "application/json"


# --- streaming -----------------------------------------------------------------------------------


async def test_streaming_body_arrives_incrementally(
    start_backend: StartBackend, pool: UpstreamPool
) -> None:
    go_on = asyncio.Event()
    sent_last = False

    async def respond(request: Request, writer: asyncio.StreamWriter) -> bool:
        nonlocal sent_last
        writer.write(CHUNKED_HEAD + chunk(b"data: 1\n\n"))
        await writer.drain()
        await go_on.wait()  # the rest only after the client has seen the first event
        writer.write(chunk(b"data: 2\n\n"))
        await writer.drain()
        sent_last = True
        writer.write(chunk(b"data: [DONE]\n\n") + LAST_CHUNK)
        return True

    backend = await start_backend(respond)
    resp = await pool.request(backend.address, b"POST", b"/v1/chat/completions", b"{}", timeout=5)
    assert resp.status == 200
    assert (b"content-type", b"text/event-stream") in resp.forward_headers()
    body = cast(AsyncGenerator[bytes, None], resp.iter_body())
    first = await asyncio.wait_for(anext(body), timeout=5)
    assert first == b"data: 1\n\n"
    assert not sent_last, "the first chunk must reach the client before the last is sent"
    go_on.set()
    rest = b"".join([part async for part in body])
    assert rest == b"data: 2\n\ndata: [DONE]\n\n"
    assert sent_last


async def test_timeout_mid_stream(start_backend: StartBackend, pool: UpstreamPool) -> None:
    never = asyncio.Event()

    async def respond(request: Request, writer: asyncio.StreamWriter) -> bool:
        writer.write(CHUNKED_HEAD + chunk(b"partial"))
        await writer.drain()
        await never.wait()
        return False

    backend = await start_backend(respond)
    resp = await pool.request(backend.address, b"GET", b"/", timeout=0.5)
    body = cast(AsyncGenerator[bytes, None], resp.iter_body())
    assert await anext(body) == b"partial"
    with pytest.raises(UpstreamTimeout):
        await anext(body)
    await body.aclose()
    await apoll_until(backend.readers[0].at_eof, timeout=5, interval=0.005)  # the pool hung up


# --- failures ------------------------------------------------------------------------------------


async def test_stale_pooled_connection_is_retried_once(
    start_backend: StartBackend, pool: UpstreamPool
) -> None:
    async def respond(request: Request, writer: asyncio.StreamWriter) -> bool:
        if request.connection == 1 and request.seq == 2:
            return False  # the server gave up on the idle connection as the request came in
        writer.write(response(f"conn {request.connection}".encode()))
        return True

    backend = await start_backend(respond)
    first = await pool.request(backend.address, b"GET", b"/", timeout=5)
    assert await first.read() == b"conn 1"
    second = await pool.request(backend.address, b"POST", b"/", b'{"a":1}', timeout=5)
    assert await second.read() == b"conn 2", "the client never sees the stale connection"
    assert backend.connections == 2
    assert [r.body for r in backend.requests] == [b"", b'{"a":1}', b'{"a":1}']


async def test_stale_connection_retry_happens_only_once(
    start_backend: StartBackend, pool: UpstreamPool
) -> None:
    async def respond(request: Request, writer: asyncio.StreamWriter) -> bool:
        if request.connection == 1 and request.seq == 1:
            writer.write(response(b"first"))
            return True
        return False  # every later request: connection closed without an answer

    backend = await start_backend(respond)
    first = await pool.request(backend.address, b"GET", b"/", timeout=5)
    assert await first.read() == b"first"
    with pytest.raises(ReplicaGone):
        await pool.request(backend.address, b"GET", b"/", timeout=5)
    assert [(r.connection, r.seq) for r in backend.requests] == [(1, 1), (1, 2), (2, 1)]
    assert backend.connections == 2, "one retry on a fresh connection, no more"


async def test_idle_connection_closed_by_server_is_replaced(
    start_backend: StartBackend, pool: UpstreamPool
) -> None:
    async def respond(request: Request, writer: asyncio.StreamWriter) -> bool:
        writer.write(response(b"bye"))  # keep-alive response, then the server closes anyway
        return False

    backend = await start_backend(respond)
    for _ in range(3):
        resp = await pool.request(backend.address, b"GET", b"/", timeout=5)
        assert await resp.read() == b"bye"
        await apoll_until(lambda: backend.closed == backend.connections, timeout=5, interval=0.005)
    assert backend.connections == 3


async def test_connection_refused_is_replica_gone(pool: UpstreamPool, refused_address: str) -> None:
    with pytest.raises(ReplicaGone) as info:
        await pool.request(refused_address, b"GET", b"/", timeout=5)
    assert refused_address in info.value.message


async def test_closed_before_answering_is_replica_gone(
    start_backend: StartBackend, pool: UpstreamPool
) -> None:
    async def respond(request: Request, writer: asyncio.StreamWriter) -> bool:
        return False

    backend = await start_backend(respond)
    with pytest.raises(ReplicaGone):
        await pool.request(backend.address, b"GET", b"/", timeout=5)
    assert backend.connections == 1, "a fresh connection is not retried"


async def test_no_answer_within_timeout(start_backend: StartBackend, pool: UpstreamPool) -> None:
    never = asyncio.Event()

    async def respond(request: Request, writer: asyncio.StreamWriter) -> bool:
        await never.wait()
        return False

    backend = await start_backend(respond)
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout) as info:
        await pool.request(backend.address, b"GET", b"/", timeout=0.3)
    assert 0.25 < time.monotonic() - started < 3
    assert info.value.status == 504
    await apoll_until(backend.readers[0].at_eof, timeout=5, interval=0.005)  # the pool hung up


async def _close_mid_content_length(request: Request, writer: asyncio.StreamWriter) -> bool:
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789")
    return False


async def _close_mid_chunked(request: Request, writer: asyncio.StreamWriter) -> bool:
    writer.write(CHUNKED_HEAD + chunk(b"0123456789"))
    return False


@pytest.mark.parametrize(
    "respond",
    [_close_mid_content_length, _close_mid_chunked],
    ids=["content-length", "chunked"],
)
async def test_server_closing_mid_body_is_upstream_error(
    start_backend: StartBackend, pool: UpstreamPool, respond: Respond
) -> None:
    backend = await start_backend(respond)
    resp = await pool.request(backend.address, b"GET", b"/", timeout=5)
    assert resp.status == 200
    received = b""
    with pytest.raises(UpstreamError) as info:
        async for part in resp.iter_body():
            received += part
    assert not isinstance(info.value, UpstreamTimeout)
    assert received == b"0123456789", "the bytes that did arrive are delivered first"


async def test_malformed_response_is_a_typed_error(
    start_backend: StartBackend, pool: UpstreamPool
) -> None:
    async def garbage(request: Request, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        return True

    backend = await start_backend(garbage)
    with pytest.raises((UpstreamError, ReplicaGone)) as info:
        resp = await pool.request(backend.address, b"GET", b"/", timeout=5)
        await resp.read()
    assert "malformed" in info.value.message


async def test_abort_closes_the_connection(start_backend: StartBackend, pool: UpstreamPool) -> None:
    never = asyncio.Event()

    async def respond(request: Request, writer: asyncio.StreamWriter) -> bool:
        if request.connection == 1:
            writer.write(CHUNKED_HEAD + chunk(b"tok"))
            await writer.drain()
            await never.wait()
            return False
        writer.write(response(b"fresh"))
        return True

    backend = await start_backend(respond)
    resp = await pool.request(backend.address, b"POST", b"/v1/completions", b"{}", timeout=5)
    body = cast(AsyncGenerator[bytes, None], resp.iter_body())
    assert await anext(body) == b"tok"
    resp.abort()
    resp.abort()  # idempotent
    with pytest.raises(UpstreamError, match="aborted"):
        await anext(body)
    await body.aclose()
    # the server sees the client hang up (its handler is still blocked, not reading)
    await apoll_until(backend.readers[0].at_eof, timeout=5, interval=0.005)
    again = await pool.request(backend.address, b"GET", b"/", timeout=5)
    assert await again.read() == b"fresh"
    assert backend.connections == 2, "an aborted connection never goes back to the pool"


async def test_hop_by_hop_headers_are_not_forwarded(
    start_backend: StartBackend, pool: UpstreamPool
) -> None:
    async def respond(request: Request, writer: asyncio.StreamWriter) -> bool:
        writer.write(
            b"HTTP/1.1 200 OK\r\n"
            b"Content-Type: application/json\r\n"
            b"Connection: keep-alive\r\n"
            b"Keep-Alive: timeout=5\r\n"
            b"Transfer-Encoding: chunked\r\n"
            b"Trailer: x-checksum\r\n"
            b"Upgrade: h2c\r\n"
            b"Proxy-Connection: keep-alive\r\n"
            b"Date: Mon, 01 Jan 2024 00:00:00 GMT\r\n"
            b"Server: backend/1.0\r\n"
            b"X-Request-Id: r-1\r\n"
            b"OpenAI-Processing-Ms: 12\r\n"
            b"\r\n" + chunk(b"{}") + LAST_CHUNK
        )
        return True

    backend = await start_backend(respond)
    resp = await pool.request(backend.address, b"GET", b"/", timeout=5)
    assert await resp.read() == b"{}"
    forwarded = resp.forward_headers()
    assert sorted(forwarded) == [
        (b"content-type", b"application/json"),
        (b"openai-processing-ms", b"12"),
    ], "x-request-id too: the frontend answers with the request's own id"
    assert len(resp.headers) == 11, "all headers are still visible to the caller, lowercased"


async def test_headers_named_in_connection_are_not_forwarded(
    start_backend: StartBackend, pool: UpstreamPool
) -> None:
    async def respond(request: Request, writer: asyncio.StreamWriter) -> bool:
        writer.write(response(b"{}", headers=[("connection", "x-internal"), ("x-internal", "1")]))
        return True

    backend = await start_backend(respond)
    resp = await pool.request(backend.address, b"GET", b"/", timeout=5)
    await resp.read()
    assert b"x-internal" not in dict(resp.forward_headers())


async def test_pool_close_and_close_host_close_idle_connections(
    start_backend: StartBackend,
) -> None:
    one = await start_backend(answer_ok)
    two = await start_backend(answer_ok)
    pool = UpstreamPool()
    try:
        for backend in (one, two, one, two):
            resp = await pool.request(backend.address, b"GET", b"/", timeout=5)
            await resp.read()
        assert (one.connections, two.connections) == (1, 1), "idle connections were kept"
        pool.close_host(one.address)
        await asyncio.wait_for(one.closed_event.wait(), timeout=5)
        assert two.closed == 0, "other backends keep their idle connections"
        resp = await pool.request(one.address, b"GET", b"/", timeout=5)
        await resp.read()
        assert one.connections == 2
    finally:
        await pool.close()
    await apoll_until(lambda: one.closed == 2 and two.closed == 1, timeout=5, interval=0.005)


# --- ProbeCache ----------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def models_body(*ids: str) -> bytes:
    return orjson.dumps({"object": "list", "data": [{"id": i, "object": "model"} for i in ids]})


class ModelsServer:
    """Serves /v1/models with a body and status the test changes as it goes."""

    def __init__(self) -> None:
        self.status = 200
        self.body = models_body("m")
        self.hold: asyncio.Event | None = None

    async def respond(self, request: Request, writer: asyncio.StreamWriter) -> bool:
        assert (request.method, request.path) == ("GET", "/v1/models")
        if self.hold is not None:
            await self.hold.wait()
        writer.write(response(self.body, status=self.status))
        return True


@pytest.fixture
async def models_backend(start_backend: StartBackend) -> tuple[ModelsServer, Backend]:
    server = ModelsServer()
    return server, await start_backend(server.respond)


async def test_probe_success_is_cached_for_the_ttl(
    models_backend: tuple[ModelsServer, Backend], pool: UpstreamPool
) -> None:
    _, backend = models_backend
    clock = FakeClock()
    probes = ProbeCache(pool, ttl=30, timeout=5, clock=clock)
    assert not probes.fresh("n1", backend.address)
    assert await probes.check("n1", backend.address, "m") is None
    assert probes.fresh("n1", backend.address)
    clock.now += 29
    assert await probes.check("n1", backend.address, "m") is None
    assert (probes.probes, len(backend.requests)) == (1, 1)
    clock.now += 2  # past the TTL
    assert not probes.fresh("n1", backend.address)
    assert await probes.check("n1", backend.address, "m") is None
    assert (probes.probes, len(backend.requests)) == (2, 2)
    assert await probes.check("n2", backend.address, "m") is None, "keyed by node too"
    assert probes.probes == 3


async def test_concurrent_checks_collapse_into_one_probe(
    models_backend: tuple[ModelsServer, Backend], pool: UpstreamPool
) -> None:
    server, backend = models_backend
    server.hold = asyncio.Event()
    probes = ProbeCache(pool, ttl=30, timeout=5, clock=FakeClock())
    checks = [asyncio.create_task(probes.check("n1", backend.address, "m")) for _ in range(20)]
    await asyncio.wait_for(backend.request_seen.wait(), timeout=5)
    assert not any(c.done() for c in checks)
    server.hold.set()
    assert await asyncio.gather(*checks) == [None] * 20
    assert probes.probes == 1
    assert len(backend.requests) == 1


async def test_cancelled_check_does_not_cancel_the_shared_probe(
    models_backend: tuple[ModelsServer, Backend], pool: UpstreamPool
) -> None:
    server, backend = models_backend
    server.hold = asyncio.Event()
    probes = ProbeCache(pool, ttl=30, timeout=5, clock=FakeClock())
    first = asyncio.create_task(probes.check("n1", backend.address, "m"))
    second = asyncio.create_task(probes.check("n1", backend.address, "m"))
    await asyncio.wait_for(backend.request_seen.wait(), timeout=5)
    first.cancel()
    server.hold.set()
    assert await second is None
    with pytest.raises(asyncio.CancelledError):
        await first
    assert probes.probes == 1


async def test_probe_failures_are_not_cached(
    models_backend: tuple[ModelsServer, Backend], pool: UpstreamPool
) -> None:
    server, backend = models_backend
    probes = ProbeCache(pool, ttl=30, timeout=5, clock=FakeClock())
    server.status = 503
    assert await probes.check("n1", backend.address, "m") == "probe answered HTTP 503"
    assert not probes.fresh("n1", backend.address)
    reason = await probes.check("n1", backend.address, "m")
    assert reason == "probe answered HTTP 503"
    assert probes.probes == 2, "a failure is probed again, not remembered"
    server.status = 200
    assert await probes.check("n1", backend.address, "m") is None
    assert await probes.check("n1", backend.address, "m") is None
    assert probes.probes == 3


MODEL_REASONS = [
    ("serves-it", models_body("a", "m"), None),
    ("serves-no-model", models_body(), "the backend serves no model"),
    ("serves-another-model", models_body("other"), "the backend serves ['other']"),
    ("not-json-but-alive", b"<html>ok</html>", None),
    ("no-data-list", b'{"models": []}', None),
]


@pytest.mark.parametrize(
    ("body", "expected"), [m[1:] for m in MODEL_REASONS], ids=[m[0] for m in MODEL_REASONS]
)
async def test_probe_checks_the_model_is_served(
    models_backend: tuple[ModelsServer, Backend],
    pool: UpstreamPool,
    body: bytes,
    expected: str | None,
) -> None:
    server, backend = models_backend
    server.body = body
    probes = ProbeCache(pool, ttl=30, timeout=5, clock=FakeClock())
    reason = await probes.check("n1", backend.address, "m")
    if expected is None:
        assert reason is None
    else:
        assert reason is not None
        assert "'m' is not loaded" in reason and expected in reason
        assert not probes.fresh("n1", backend.address)


async def test_probe_of_refused_backend(pool: UpstreamPool, refused_address: str) -> None:
    clock = FakeClock()
    probes = ProbeCache(pool, ttl=30, timeout=5, clock=clock)
    reason = await probes.check("n1", refused_address, "m")
    assert reason is not None and "refused" in reason
    assert await probes.check("n1", refused_address, "m") is not None
    assert probes.probes == 2


async def test_mark_ok_counts_as_a_probe_until_ttl(
    pool: UpstreamPool, refused_address: str
) -> None:
    clock = FakeClock()
    probes = ProbeCache(pool, ttl=10, timeout=5, clock=clock)
    probes.mark_ok("n1", refused_address)
    assert probes.fresh("n1", refused_address)
    assert await probes.check("n1", refused_address, "m") is None
    assert probes.probes == 0, "a proxied success makes a probe unnecessary"
    clock.now += 11
    assert await probes.check("n1", refused_address, "m") is not None
    assert probes.probes == 1
    probes.mark_ok("n1", refused_address)
    probes.forget("n1", refused_address)
    assert not probes.fresh("n1", refused_address)
    assert await probes.check("n1", refused_address, "m") is not None
    assert probes.probes == 2

"""Corral's own HTTP server over real sockets: native handlers, the FastAPI app behind the ASGI
bridge, HTTP/1.1 framing, deadlines against slow clients, TLS, and an orderly stop."""

from __future__ import annotations

import asyncio
import os
import ssl
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
import orjson
import pytest
import trustme
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, StreamingResponse

from corral.errors import CorralError
from corral.frontend.http import HttpLimits, HttpServer, bind_socket
from corral.frontend.http.exchange import Exchange, respond_error

LIMIT = 64 * 1024

Start = Callable[..., Awaitable[HttpServer]]


class Events:
    """What the app and the native handlers saw."""

    def __init__(self) -> None:
        self.lifespan: list[str] = []
        self.disconnects = 0
        self.stream_done = asyncio.Event()


def make_app(events: Events, files: Path) -> FastAPI:
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        events.lifespan.append("startup")
        yield
        events.lifespan.append("shutdown")

    app = FastAPI(lifespan=lifespan)

    @app.api_route("/hello", methods=["GET", "HEAD"])
    async def hello() -> dict[str, str]:
        return {"hello": "world"}

    @app.post("/count")
    async def count(request: Request) -> dict[str, int]:
        return {"bytes": len(await request.body())}

    @app.get("/events")
    async def sse() -> StreamingResponse:
        async def gen() -> AsyncIterator[bytes]:
            for i in range(5):
                yield b"data: %d\n\n" % i
                await asyncio.sleep(0.01)

        return StreamingResponse(gen(), media_type="text/event-stream")

    @app.get("/file")
    async def file() -> FileResponse:
        return FileResponse(files / "big.bin")

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("handler bug")

    return app


async def echo(ex: Exchange) -> None:
    """Native: the request body back, whole."""
    try:
        body = await ex.body(LIMIT)
    except CorralError as exc:
        await respond_error(ex, exc)
        return
    await ex.respond(200, [(b"content-type", b"application/octet-stream")], body)


def streamer(events: Events) -> Callable[[Exchange], Awaitable[None]]:
    async def stream(ex: Exchange) -> None:
        """Native: 200 small chunks 10 ms apart; counts disconnects."""
        await ex.body(LIMIT)
        stop = asyncio.Event()

        def left() -> None:
            events.disconnects += 1
            stop.set()

        await ex.start(200, [(b"content-type", b"text/event-stream")], b"data: first\n\n")
        ex.on_disconnect = left
        try:
            for i in range(200):
                if stop.is_set():
                    return
                await ex.write(b"data: %d\n\n" % i)
                await asyncio.sleep(0.01)
            await ex.end(b"data: [DONE]\n\n")
        finally:
            ex.on_disconnect = None
            events.stream_done.set()

    return stream


@pytest.fixture
def events() -> Events:
    return Events()


@pytest.fixture
async def start(events: Events, tmp_path: Path) -> AsyncIterator[Start]:
    (tmp_path / "big.bin").write_bytes(os.urandom(8 * 1024 * 1024))
    servers: list[HttpServer] = []

    async def go(ssl_context: ssl.SSLContext | None = None, **limits: float) -> HttpServer:
        server = HttpServer(
            make_app(events, tmp_path),
            native={b"/native/echo": echo, b"/native/stream": streamer(events)},
            limits=HttpLimits(**limits),
            ssl_context=ssl_context,
            max_body_bytes=LIMIT,
        )
        await server.startup()
        await server.start(bind_socket("127.0.0.1", 0))
        servers.append(server)
        return server

    yield go
    for server in servers:
        await server.stop()
        await server.shutdown()


@pytest.fixture
async def server(start: Start) -> HttpServer:
    return await start()


# --- raw HTTP helpers ------------------------------------------------------------------------


class Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, server: HttpServer) -> Conn:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        return cls(reader, writer)

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def response(self, head_only: bool = False) -> tuple[int, dict[str, str], bytes]:
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 10)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                assert name.strip().lower() not in headers, f"duplicate header {name}"
                headers[name.strip().lower()] = value.strip()
        if head_only or status in (100, 204, 304):
            return status, headers, b""
        if headers.get("transfer-encoding") == "chunked":
            body = b""
            while True:
                size = int((await self.reader.readuntil(b"\r\n"))[:-2], 16)
                data = await self.reader.readexactly(size + 2)
                if size == 0:
                    return status, headers, body
                body += data[:-2]
        if "content-length" in headers:
            return status, headers, await self.reader.readexactly(int(headers["content-length"]))
        return status, headers, await self.reader.read()

    async def closed(self, timeout: float = 10) -> bool:
        """True when the server closed the connection (EOF or reset) within `timeout`."""
        try:
            rest = await asyncio.wait_for(self.reader.read(), timeout)
        except ConnectionResetError:
            return True
        return rest == b""

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except OSError:
            pass


def post(path: str, body: bytes, extra: str = "") -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    return head.encode() + body


def get(path: str, method: str = "GET", extra: str = "") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: t\r\n{extra}\r\n".encode()


def error_code(body: bytes) -> str:
    code: str = orjson.loads(body)["error"]["code"]
    return code


# --- framing, keep-alive, pipelining ---------------------------------------------------------


async def test_keep_alive_native_and_asgi_on_one_connection(server: HttpServer) -> None:
    conn = await Conn.open(server)
    try:
        for _ in range(3):
            conn.send(post("/native/echo", b"ping"))
            status, headers, body = await conn.response()
            assert (status, body, headers["content-length"]) == (200, b"ping", "4")
            assert "connection" not in headers  # HTTP/1.1 keeps it open by default
            conn.send(get("/hello"))
            status, headers, body = await conn.response()
            assert status == 200 and orjson.loads(body) == {"hello": "world"}
            assert headers["content-length"] == str(len(body))
        assert len(server.connections) == 1
    finally:
        await conn.close()


async def test_pipelined_requests_are_answered_in_order(server: HttpServer) -> None:
    conn = await Conn.open(server)
    try:
        conn.send(
            post("/native/echo", b"one")
            + get("/hello")
            + post("/native/echo", b"three")
            + post("/count", b"x" * 1000)
        )
        assert (await conn.response())[2] == b"one"
        assert orjson.loads((await conn.response())[2]) == {"hello": "world"}
        assert (await conn.response())[2] == b"three"
        assert orjson.loads((await conn.response())[2]) == {"bytes": 1000}
    finally:
        await conn.close()


async def test_chunked_request_body_and_expect_continue(server: HttpServer) -> None:
    conn = await Conn.open(server)
    try:
        conn.send(
            b"POST /native/echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        )
        assert (await conn.response())[2] == b"hello world"
        conn.send(
            b"POST /count HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n"
        )
        status, _, _ = await conn.response()
        assert status == 100
        conn.send(b"abc")
        assert orjson.loads((await conn.response())[2]) == {"bytes": 3}
    finally:
        await conn.close()


async def test_head_gets_headers_without_a_body(server: HttpServer) -> None:
    conn = await Conn.open(server)
    try:
        conn.send(get("/hello", "HEAD"))
        status, headers, _ = await conn.response(head_only=True)
        assert status == 200 and headers["content-length"] == str(len(b'{"hello":"world"}'))
        conn.send(get("/hello"))  # nothing of a body was sent: the next response parses
        assert orjson.loads((await conn.response())[2]) == {"hello": "world"}
    finally:
        await conn.close()


async def test_http10_gets_keep_alive_only_when_asked(server: HttpServer) -> None:
    conn = await Conn.open(server)
    try:
        conn.send(b"GET /hello HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        status, headers, _ = await conn.response()
        assert status == 200 and headers["connection"] == "keep-alive"
        conn.send(b"GET /hello HTTP/1.0\r\n\r\n")
        status, headers, _ = await conn.response()
        assert status == 200 and headers["connection"] == "close"
        assert await conn.closed()
    finally:
        await conn.close()


# --- limits and errors -------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/native/echo", "/count"])
async def test_body_over_the_limit_is_413_and_closes(server: HttpServer, path: str) -> None:
    conn = await Conn.open(server)
    try:
        conn.send(post(path, b"x" * (LIMIT + 1)))
        status, headers, body = await conn.response()
        assert status == 413 and error_code(body) == "payload_too_large"
        assert headers["connection"] == "close" and await conn.closed()
    finally:
        await conn.close()
    conn = await Conn.open(server)  # chunked: no length up front
    try:
        conn.send(f"POST {path} HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
        for _ in range(LIMIT // 4096 + 1):
            conn.send(b"1000\r\n" + b"y" * 4096 + b"\r\n")
        status, _, body = await conn.response()
        assert status == 413 and error_code(body) == "payload_too_large"
        assert await conn.closed()
    finally:
        await conn.close()


async def test_malformed_and_oversized_requests(server: HttpServer) -> None:
    conn = await Conn.open(server)
    try:
        conn.send(b"NOT HTTP AT ALL\r\n\r\n")
        status, _, body = await conn.response()
        assert status == 400 and error_code(body) == "invalid_request"
        assert await conn.closed()
    finally:
        await conn.close()
    conn = await Conn.open(server)
    try:
        conn.send(get("/hello", extra="x-big: " + "a" * 70000 + "\r\n"))
        status, _, body = await conn.response()
        assert status == 431 and error_code(body) == "headers_too_large"
    finally:
        await conn.close()


async def test_a_failing_asgi_handler_is_a_500(
    server: HttpServer, caplog: pytest.LogCaptureFixture
) -> None:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
        assert (await client.get("/boom")).status_code == 500
        assert (await client.get("/hello")).status_code == 200
    assert "handler bug" in caplog.text


# --- streaming, large bodies, disconnects ----------------------------------------------------


async def test_native_stream_and_disconnect(server: HttpServer, events: Events) -> None:
    async with (
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client,
        client.stream("POST", "/native/stream", content=b"{}") as r,
    ):
        assert r.headers["transfer-encoding"] == "chunked"
        chunks = r.aiter_raw()
        first = await anext(chunks)
        assert first.startswith(b"data: first")
    # leaving the block closed the connection mid-stream
    await asyncio.wait_for(events.stream_done.wait(), 5)
    assert events.disconnects == 1


async def test_whole_native_stream(server: HttpServer) -> None:
    conn = await Conn.open(server)
    try:
        conn.send(post("/native/stream", b"{}"))
        status, _, body = await conn.response()
        assert status == 200 and body.startswith(b"data: first\n\ndata: 0\n\n")
        assert body.endswith(b"data: 199\n\ndata: [DONE]\n\n")
        conn.send(get("/hello"))  # still usable
        assert (await conn.response())[0] == 200
    finally:
        await conn.close()


async def test_fastapi_streaming_and_file_responses(server: HttpServer, tmp_path: Path) -> None:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
        async with client.stream("GET", "/events") as r:
            got = [line async for line in r.aiter_lines() if line]
        assert got == [f"data: {i}" for i in range(5)]
        big = (tmp_path / "big.bin").read_bytes()
        r2 = await client.get("/file")
        assert r2.status_code == 200 and r2.content == big
        r3 = await client.get("/file", headers={"range": "bytes=100-199"})
        assert r3.status_code == 206 and r3.content == big[100:200]


# --- deadlines -------------------------------------------------------------------------------


async def test_headers_must_arrive_in_time(start: Start) -> None:
    server = await start(header_timeout=0.5)
    conn = await Conn.open(server)
    try:
        t0 = time.monotonic()
        conn.send(b"GET /hello HTTP/1.1\r\nHost: t\r\n")  # and never the blank line
        status, headers, body = await conn.response()
        assert status == 408 and error_code(body) == "request_timeout"
        assert headers["connection"] == "close" and await conn.closed()
        assert 0.4 < time.monotonic() - t0 < 3
    finally:
        await conn.close()


async def test_idle_keep_alive_connections_close(start: Start) -> None:
    server = await start(keep_alive_timeout=0.4)
    conn = await Conn.open(server)
    try:
        conn.send(get("/hello"))
        assert (await conn.response())[0] == 200
        t0 = time.monotonic()
        assert await conn.closed(5)  # quietly: no 408 for a connection between requests
        assert 0.3 < time.monotonic() - t0 < 3
    finally:
        await conn.close()


async def test_a_slow_but_moving_body_is_not_cut(start: Start) -> None:
    server = await start(body_timeout=0.3, body_min_rate=100)
    conn = await Conn.open(server)
    try:
        body = b"z" * 400
        conn.send(
            f"POST /native/echo HTTP/1.1\r\nHost: t\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        )
        for i in range(0, len(body), 50):  # 50 bytes every 0.1 s: 500 B/s, 1.3 windows of 0.3 s
            conn.send(body[i : i + 50])
            await asyncio.sleep(0.1)
        status, _, got = await conn.response()
        assert status == 200 and got == body
    finally:
        await conn.close()


async def test_slowloris_bodies_are_cut_while_others_are_served(start: Start) -> None:
    server = await start(body_timeout=1.0, body_min_rate=64)
    url = f"http://127.0.0.1:{server.port}/native/echo"

    async def latencies(n: int) -> list[float]:
        out = []
        async with httpx.AsyncClient() as client:
            for _ in range(n):
                t0 = time.perf_counter()
                r = await client.post(url, content=b"hello")
                out.append(time.perf_counter() - t0)
                assert r.status_code == 200
        return out

    baseline = statistics.median(await latencies(50))
    slow = [await Conn.open(server) for _ in range(30)]

    async def trickle(conn: Conn) -> tuple[int, float]:
        t0 = time.monotonic()
        conn.send(b"POST /native/echo HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\n")
        answer = asyncio.ensure_future(conn.response())
        try:
            for _ in range(20):  # 1 byte/s, far below the minimum rate
                conn.send(b"a")
                done, _ = await asyncio.wait({answer}, timeout=1.0)
                if done:
                    break
            status, _, body = await answer
            assert error_code(body) == "request_timeout"
            assert await conn.closed()
            return status, time.monotonic() - t0
        finally:
            answer.cancel()
            await conn.close()

    tasks = [asyncio.create_task(trickle(c)) for c in slow]
    await asyncio.sleep(0.2)
    during = statistics.median(await latencies(50))
    results = await asyncio.gather(*tasks)
    assert all(status == 408 for status, _ in results)
    assert max(t for _, t in results) < 4.0  # the 1 s deadline, checked at the sweep, plus slack
    # normal requests kept their latency (a loaded CI machine gets a generous bound)
    assert during < baseline * 3 + 0.005, (baseline, during)


# --- TLS, lifespan, stop -------------------------------------------------------------------


async def test_tls(start: Start, tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert.configure_cert(context)
    server = await start(ssl_context=context)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    async with httpx.AsyncClient(
        base_url=f"https://127.0.0.1:{server.port}", verify=client_ctx
    ) as client:
        r = await client.post("/native/echo", content=b"secret")
        assert r.status_code == 200 and r.content == b"secret"
        assert (await client.get("/hello")).json() == {"hello": "world"}
    async with httpx.AsyncClient(base_url=f"https://127.0.0.1:{server.port}") as untrusting:
        with pytest.raises(httpx.ConnectError):
            await untrusting.get("/hello")


async def test_lifespan_and_stop_with_a_stream_in_flight(start: Start, events: Events) -> None:
    server = await start(shutdown_timeout=5)
    assert events.lifespan == ["startup"]
    streaming = await Conn.open(server)
    idle = await Conn.open(server)
    try:
        idle.send(get("/hello"))
        assert (await idle.response())[0] == 200
        streaming.send(post("/native/stream", b"{}"))
        await streaming.reader.readuntil(b"data: first")
        t0 = time.monotonic()
        await server.stop()
        # the idle connection closed at once, the stream was allowed to finish
        assert await idle.closed(1)
        rest = await asyncio.wait_for(streaming.reader.read(), 5)
        assert rest.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")
        assert time.monotonic() - t0 < 5
        await server.shutdown()
        assert events.lifespan == ["startup", "shutdown"]
    finally:
        await idle.close()
        await streaming.close()


async def test_an_app_without_lifespan_support_is_served() -> None:
    async def plain(scope: dict[str, object], receive: object, send: object) -> None:
        if scope["type"] != "http":
            return  # no lifespan: returns at once, as many small ASGI apps do
        await send({"type": "http.response.start", "status": 204, "headers": []})  # type: ignore[operator]
        await send({"type": "http.response.body", "body": b""})  # type: ignore[operator]

    server = HttpServer(plain)  # type: ignore[arg-type]
    await asyncio.wait_for(server.startup(), 5)
    await server.start(bind_socket("127.0.0.1", 0))
    try:
        conn = await Conn.open(server)
        conn.send(get("/anything"))
        status, headers, _ = await conn.response()
        assert status == 204 and "content-length" not in headers
        await conn.close()
    finally:
        await server.stop()
        await server.shutdown()

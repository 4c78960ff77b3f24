"""The one door to backend HTTP: a pooled keep-alive HTTP/1.1 client on asyncio + httptools.

Built for the proxy's hot path: one write per request, body bytes handed over as they
arrive (no re-encoding), connections reused per (host, port). Errors are typed: a refused
connection is `ReplicaGone` (the router drops the replica), a silent backend `UpstreamTimeout`.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Iterable
from typing import Protocol

import httptools

from corral.errors import ReplicaGone, UpstreamError, UpstreamTimeout

log = logging.getLogger(__name__)

#: Headers of the backend's response that must not be copied to the client.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"transfer-encoding",
        b"te",
        b"trailer",
        b"upgrade",
        b"proxy-connection",
        b"date",
        b"server",
        b"x-request-id",  # the frontend answers with the request's own id
    }
)

_HIGH_WATER = 4 * 1024 * 1024


class BodySource(Protocol):
    """A request body sent in pieces (a spooled upload): its size first, then its bytes;
    `chunks()` starts over on each call, so a retry can send it again."""

    size: int

    def chunks(self) -> AsyncIterator[bytes]: ...


class _Connection(asyncio.Protocol):
    """One TCP connection to a backend, parsing one response at a time."""

    def __init__(self, pool: UpstreamPool, key: tuple[str, int]) -> None:
        self.pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.busy = False
        self.headers: list[tuple[bytes, bytes]] = []
        self.status = 0
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.headers_done = False
        self.complete = False
        self.error: BaseException | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.reading_paused = False
        self.received_any = False
        self.keep_alive = False
        self.write_paused = False
        self.partial = False  # the request body was not sent whole

    # --- asyncio.Protocol ------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._wake()

    def data_received(self, data: bytes) -> None:
        self.received_any = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError(f"malformed response from backend: {exc}"))
            self.close()
            return
        if self.buffered > _HIGH_WATER and not self.reading_paused and self.transport:
            self.reading_paused = True
            self.transport.pause_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool._forget(self)
        if self.busy and not self.complete:
            if self.headers_done and not self._framed():
                self.complete = True  # body delimited by connection close
                self._wake()
            else:
                self._fail(UpstreamError("backend closed the connection mid-response"))

    # --- httptools callbacks --------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.headers_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        self._wake()

    def on_message_complete(self) -> None:
        # read now: once the message is done, httptools resets and says False
        self.keep_alive = self.parser.should_keep_alive()
        self.complete = True
        self._wake()

    # --- used by UpstreamResponse ---------------------------------------------------
    def _framed(self) -> bool:
        return any(k in (b"content-length", b"transfer-encoding") for k, _ in self.headers)

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        self.error = exc
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self, timeout: float | None) -> None:
        """Wait for the next parser event; TimeoutError after `timeout` seconds."""
        loop = asyncio.get_running_loop()
        waiter = self.waiter = loop.create_future()
        timer = None if timeout is None else loop.call_later(timeout, _expire, waiter)
        try:
            await waiter
        finally:
            self.waiter = None
            if timer is not None:
                timer.cancel()

    def take(self) -> bytes:
        if len(self.chunks) == 1:
            data = self.chunks.popleft()
        else:
            data = b"".join(self.chunks)
            self.chunks.clear()
        self.buffered = 0
        if self.reading_paused and self.transport:
            self.reading_paused = False
            self.transport.resume_reading()
        return data

    def reset(self) -> None:
        self.headers = []
        self.status = 0
        self.chunks.clear()
        self.buffered = 0
        self.headers_done = False
        self.complete = False
        self.error = None
        self.received_any = False
        self.keep_alive = False
        self.partial = False

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class UpstreamResponse:
    """A backend's response: status and headers now, the body as it arrives."""

    __slots__ = ("_conn", "_done", "headers", "status", "timeout")

    def __init__(self, conn: _Connection, timeout: float | None) -> None:
        self._conn = conn
        self.status = conn.status
        self.headers = conn.headers
        self.timeout = timeout
        self._done = False

    def small(self, limit: int) -> bool:
        """Whether the whole body is known to be at most `limit` bytes: it all came with the
        head, or its declared length says so (an unsized body is not known to be small)."""
        conn = self._conn
        if conn.complete and conn.error is None:
            return conn.buffered <= limit
        length = self.length
        return length is not None and length <= limit

    @property
    def length(self) -> int | None:
        """The body's declared length; None when unsized (chunked or until the close)."""
        for name, value in self.headers:
            if name == b"content-length":
                try:
                    return int(value)
                except ValueError:
                    return None
        return None

    def forward_headers(self) -> list[tuple[bytes, bytes]]:
        """Response headers a proxy may copy to its client (RFC 9110 7.6.1)."""
        named = {
            token.strip().lower()
            for k, v in self.headers
            if k == b"connection"
            for token in v.split(b",")
        }
        return [(k, v) for k, v in self.headers if k not in HOP_BY_HOP and k not in named]

    async def read(self) -> bytes:
        """The whole body."""
        conn = self._conn
        if conn.complete and conn.error is None:  # it all came with the head: no waiting
            data = conn.take() if conn.chunks else b""
            self._done = True
            self.release()
            return data
        parts = []
        async for chunk in self.iter_body():
            parts.append(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def ready(self) -> bytes:
        """Body bytes that already arrived (b"" if none), without waiting."""
        conn = self._conn
        return conn.take() if conn.chunks else b""

    async def iter_body(self) -> AsyncIterator[bytes]:
        """Body bytes as they arrive (chunked framing removed); `timeout` applies per wait."""
        conn = self._conn
        try:
            while True:
                if conn.chunks:
                    yield conn.take()
                    continue
                if conn.error is not None:
                    raise conn.error
                if conn.complete:
                    break
                try:
                    await conn.wait(self.timeout)
                except TimeoutError:
                    raise UpstreamTimeout(
                        f"backend sent nothing for {self.timeout:g}s mid-response"
                    ) from None
            self._done = True
        finally:
            self.release()

    def release(self) -> None:
        """Return the connection to the pool if the body was read to the end, else close it."""
        conn = self._conn
        if not conn.busy:
            return
        conn.busy = False
        if self._done and conn.complete and conn.keep_alive and not (conn.closed or conn.partial):
            conn.pool._give_back(conn)
        else:
            conn.close()

    def abort(self) -> None:
        """Drop the connection now (client went away); any reader sees an error."""
        conn = self._conn
        if conn.busy:
            conn._fail(UpstreamError("request aborted"))
            conn.busy = False
            conn.close()


async def _send_body(conn: _Connection, body: BodySource, timeout: float | None) -> None:
    """Write `body` piece by piece, waiting while the transport's buffer is full; stops early
    when the backend answered or closed (its answer, or the error, is what counts)."""
    async for piece in body.chunks():
        if conn.closed or conn.error is not None or conn.complete:
            conn.partial = True  # the request was cut short: never reuse the connection
            return
        assert conn.transport is not None
        conn.transport.write(piece)
        while conn.write_paused and not (conn.closed or conn.error is not None or conn.complete):
            await conn.wait(timeout)


def _target(address: str) -> tuple[tuple[str, int], bytes]:
    """(host, port) and the fixed part of the request head for "host:port"."""
    host, _, port_text = address.rpartition(":")
    line = b" HTTP/1.1\r\nhost: " + address.encode() + b"\r\ncontent-length: "
    return (host.strip("[]"), int(port_text)), line


class UpstreamPool:
    """Keep-alive connections to backends, keyed by (host, port)."""

    def __init__(self, *, max_idle_per_host: int = 256, connect_timeout: float = 5.0) -> None:
        self.max_idle_per_host = max_idle_per_host
        self.connect_timeout = connect_timeout
        self._idle: dict[tuple[str, int], deque[_Connection]] = {}
        self._all: set[_Connection] = set()
        self._targets: dict[str, tuple[tuple[str, int], bytes]] = {}

    async def request(
        self,
        address: str,
        method: bytes,
        path: bytes,
        body: bytes | BodySource = b"",
        *,
        headers: Iterable[tuple[bytes, bytes]] = (),
        timeout: float | None = None,
    ) -> UpstreamResponse:
        """Send one request to `address` ("host:port"); return once the status line arrived.

        `body` is bytes, or a `BodySource` streamed in pieces with the transport's flow
        control (`timeout` applies to each wait for the backend to read on).
        Raises ReplicaGone when the backend refuses the connection or drops it before
        answering, UpstreamTimeout when it does not answer within `timeout`.
        """
        target = self._targets.get(address)
        if target is None:
            target = self._targets[address] = _target(address)
        key, host_line = target
        source: BodySource | None = None  # a body streamed in pieces
        if isinstance(body, bytes):
            data, size = body, len(body)
        else:
            data, size, source = b"", body.size, body
        head = [method, b" ", path, host_line, str(size).encode(), b"\r\n"]
        for name, value in headers:
            head += [name, b": ", value, b"\r\n"]
        head.append(b"\r\n")
        payload = None
        if source is None and size < 65536:
            payload = b"".join(head) + data

        for attempt in (0, 1):
            conn = self._idle_connection(key)  # no await when one is idle: the usual case
            reused = conn is not None
            if conn is None:
                conn = await self._connect(key)
            conn.reset()
            conn.busy = True
            assert conn.transport is not None
            if payload is not None:
                conn.transport.write(payload)
            elif source is None:
                conn.transport.writelines([b"".join(head), data])
            else:
                conn.transport.write(b"".join(head))
            try:
                if source is not None:
                    await _send_body(conn, source, timeout)
                while not conn.headers_done and conn.error is None:
                    await conn.wait(timeout)
            except TimeoutError:
                conn.busy = False
                conn.close()
                raise UpstreamTimeout(
                    f"backend {address} did not answer within {timeout:g}s"
                ) from None
            except BaseException:
                conn.busy = False
                conn.close()
                raise
            if conn.error is not None:
                conn.busy = False
                conn.close()
                if reused and not conn.received_any and attempt == 0:
                    continue  # a stale keep-alive connection: retry once on a fresh one
                raise ReplicaGone(f"backend {address} closed the connection: {conn.error}")
            return UpstreamResponse(conn, timeout)
        raise AssertionError("unreachable")

    def _idle_connection(self, key: tuple[str, int]) -> _Connection | None:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if not conn.closed and conn.transport is not None and not conn.transport.is_closing():
                return conn
        return None

    async def _connect(self, key: tuple[str, int]) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, proto = await loop.create_connection(
                    lambda: _Connection(self, key), key[0], key[1]
                )
        except (ConnectionRefusedError, ConnectionResetError) as exc:
            raise ReplicaGone(f"backend {key[0]}:{key[1]} refused the connection") from exc
        except TimeoutError:
            raise ReplicaGone(f"connecting to backend {key[0]}:{key[1]} timed out") from None
        except OSError as exc:
            raise ReplicaGone(f"cannot connect to backend {key[0]}:{key[1]}: {exc}") from exc
        self._all.add(proto)
        return proto

    def _give_back(self, conn: _Connection) -> None:
        idle = self._idle.setdefault(conn.key, deque())
        if len(idle) >= self.max_idle_per_host:
            conn.close()
            return
        idle.append(conn)

    def _forget(self, conn: _Connection) -> None:
        self._all.discard(conn)
        idle = self._idle.get(conn.key)
        if idle is not None and conn in idle:
            idle.remove(conn)

    def close_host(self, address: str) -> None:
        """Close idle connections to one backend (it was removed)."""
        host, _, port_text = address.rpartition(":")
        for conn in self._idle.pop((host.strip("[]"), int(port_text)), deque()):
            conn.close()

    async def close(self) -> None:
        for conn in list(self._all):
            conn.close()
        self._idle.clear()
        await asyncio.sleep(0)  # let transports run connection_lost

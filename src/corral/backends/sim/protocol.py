"""The simulator's HTTP/1.1 layer: one asyncio.Protocol per connection (httptools), framing.

One connection is one `HttpConnection`. Requests on a connection are answered strictly in
order: a request whose answer is ready at once is written from inside the parser callback;
one that has to wait (timings, the engine model, load time) runs as the connection's only
task while later pipelined requests queue behind it. Closing the connection cancels that task.
`Heads` holds one server's pre-encoded response heads, so a whole answer costs one join.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, Protocol, cast

import httptools

log = logging.getLogger(__name__)

Reply = bytes | Coroutine[Any, Any, None]

_MAX_PIPELINE = 64  # queued requests per connection before reading pauses

REASONS = {
    200: b"OK",
    400: b"Bad Request",
    404: b"Not Found",
    405: b"Method Not Allowed",
    413: b"Payload Too Large",
    500: b"Internal Server Error",
    503: b"Service Unavailable",
}
CLOSE = b"connection: close\r\n"
KEEP_ALIVE = b"connection: keep-alive\r\n"  # only HTTP/1.0 clients need to be told
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
CRLF = b"\r\n"
LAST_CHUNK = b"0\r\n\r\n"
SSE = b"text/event-stream"


class Request:
    """One parsed HTTP request; `conn` is the connection header its response must carry."""

    __slots__ = ("body", "conn", "ctype", "method", "parse_error", "path", "too_large")

    def __init__(
        self,
        method: bytes,
        path: bytes,
        body: bytes,
        conn: bytes,
        too_large: bool = False,
        parse_error: bool = False,
        ctype: bytes = b"",
    ) -> None:
        self.method = method
        self.path = path
        self.body = body
        self.conn = conn
        self.too_large = too_large
        self.parse_error = parse_error
        self.ctype = ctype  # the content-type header, b"" when absent

    @property
    def close(self) -> bool:
        return self.conn is CLOSE


class Responder(Protocol):
    """What a connection needs from its server."""

    @property
    def max_body(self) -> int: ...

    def respond(self, req: Request, conn: HttpConnection) -> Reply: ...

    def connection_opened(self, conn: HttpConnection) -> None: ...

    def connection_closed(self, conn: HttpConnection) -> None: ...


def frame(events: list[bytes], out: list[bytes]) -> None:
    """Append each event (an SSE event, an audio chunk) to `out` as one HTTP chunk."""
    for event in events:
        out.append(b"%x\r\n" % len(event))
        out.append(event)
        out.append(CRLF)


@dataclass(frozen=True, slots=True)
class Heads:
    """One server's pre-encoded response heads; each carries its `x-sim-fingerprint`."""

    json: dict[int, bytes]  # status -> status line, content type, fingerprint
    json_200: bytes  # the 200 head up to the content-length value
    sse: bytes  # the head of a 200 event stream, up to the connection header
    extra: bytes  # the fingerprint header line

    @classmethod
    def for_fingerprint(cls, fingerprint: str) -> Heads:
        extra = b"x-sim-fingerprint: " + fingerprint.encode("ascii") + CRLF
        json = {
            status: b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\n%s"
            % (status, reason, extra)
            for status, reason in REASONS.items()
        }
        return cls(json, json[200] + b"content-length: ", _chunked(SSE, extra), extra)

    def ok_json(self, body: bytes, conn: bytes) -> bytes:
        """A whole 200 JSON answer."""
        return b"".join((self.json_200, b"%d\r\n" % len(body), conn, CRLF, body))

    def json_status(self, status: int, body: bytes, conn: bytes, extra: bytes = b"") -> bytes:
        """A whole JSON answer with any status (`extra`: more header lines)."""
        return b"".join(
            (self.json[status], b"content-length: %d\r\n" % len(body), conn, extra, CRLF, body)
        )

    def ok(self, content_type: bytes, body: bytes, conn: bytes) -> bytes:
        """A whole 200 answer of another content type (text, metrics)."""
        return b"".join(
            (
                b"HTTP/1.1 200 OK\r\ncontent-type: ",
                content_type,
                CRLF,
                self.extra,
                b"content-length: %d\r\n" % len(body),
                conn,
                CRLF,
                body,
            )
        )

    def chunked(self, content_type: bytes) -> bytes:
        """The head of a 200 answer sent in chunks (SSE, audio), up to the connection header."""
        return self.sse if content_type is SSE else _chunked(content_type, self.extra)


def _chunked(content_type: bytes, extra: bytes) -> bytes:
    return b"".join(
        (
            b"HTTP/1.1 200 OK\r\ncontent-type: ",
            content_type,
            b"\r\ncache-control: no-cache\r\ntransfer-encoding: chunked\r\n",
            extra,
        )
    )


class HttpConnection(asyncio.Protocol):
    """One client connection: parses requests with httptools and answers them in order."""

    def __init__(self, server: Responder) -> None:
        self._server = server
        self._max_body = server.max_body
        self._transport: asyncio.Transport | None = None
        self._parser: Any = None
        self._url = b""
        self._body: list[bytes] = []
        self._body_size = 0
        self._expect_continue = False
        self._content_type = b""
        self._pending: deque[Request] = deque()
        self._task: asyncio.Task[None] | None = None
        self._close_after_task = False
        self._closing = False  # no more requests are answered on this connection
        self._lost = False
        self._write_paused = False
        self._read_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._out: list[bytes] | None = None  # set while data_received parses

    # --- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        self._parser = httptools.HttpRequestParser(self)
        self._server.connection_opened(self)

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        # Answers produced while parsing this read go out in one write (pipelined clients).
        self._out = []
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            self._enqueue(Request(b"", b"", b"", CLOSE, parse_error=True))
            self._closing = True
        except httptools.HttpParserUpgrade:
            # No protocol upgrades here: answer what was parsed, then hang up.
            self._enqueue(Request(b"", b"", b"", CLOSE, parse_error=True))
            self._closing = True
        finally:
            self._flush()
            self._out = None

    def eof_received(self) -> bool | None:
        # Half-close from the client: finish answering what is queued, then close.
        if self._task is None and not self._pending:
            return None  # closes the transport
        self._close_after_task = True
        self._closing = True
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._closing = True
        self._pending.clear()
        if self._task is not None:
            self._task.cancel()
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.cancel()
        self._server.connection_closed(self)

    def pause_writing(self) -> None:
        self._write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        self._update_reading()

    # --- httptools callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url = b""
        self._body = []
        self._body_size = 0
        self._expect_continue = False
        self._content_type = b""

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        n = len(name)
        if n == 12 and name.lower() == b"content-type":
            self._content_type = value
        elif n == 6 and name.lower() == b"expect" and value.lower() == b"100-continue":
            self._expect_continue = True

    def on_headers_complete(self) -> None:
        if self._expect_continue and self._task is None and not self._pending:
            self.write(_CONTINUE)

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        if self._body_size <= self._max_body:
            self._body.append(body)
        else:
            self._body = []

    def on_message_complete(self) -> None:
        if self._closing:
            return
        parser = self._parser
        if not parser.should_keep_alive():
            conn = CLOSE
        elif parser.get_http_version() == "1.0":
            conn = KEEP_ALIVE
        else:
            conn = b""
        url = self._url
        q = url.find(b"?")
        path = url if q < 0 else url[:q]
        parts = self._body
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        too_large = self._body_size > self._max_body
        self._enqueue(
            Request(parser.get_method(), path, body, conn, too_large, ctype=self._content_type)
        )
        if conn is CLOSE:
            self._closing = True

    # --- answering -------------------------------------------------------------------------

    def _enqueue(self, req: Request) -> None:
        if self._task is None and not self._pending:
            self._dispatch(req)
        else:
            self._pending.append(req)
            self._update_reading()

    def _dispatch(self, req: Request) -> None:
        reply = self._server.respond(req, self)
        if isinstance(reply, bytes):
            self.write(reply)
            if req.close:
                self._close()
            return
        task = asyncio.get_running_loop().create_task(reply)
        self._task = task
        self._close_after_task = self._close_after_task or req.close
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._task = None
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("sim: response task failed", exc_info=exc)
            self._close()
            return
        while self._pending and self._task is None and not self._lost:
            self._dispatch(self._pending.popleft())
        if self._task is None and not self._pending and self._close_after_task:
            self._close()
            return
        self._update_reading()

    def _update_reading(self) -> None:
        transport = self._transport
        if transport is None or self._lost:
            return
        want_pause = self._write_paused or len(self._pending) >= _MAX_PIPELINE
        if want_pause and not self._read_paused:
            self._read_paused = True
            transport.pause_reading()
        elif not want_pause and self._read_paused:
            self._read_paused = False
            transport.resume_reading()

    def write(self, data: bytes) -> None:
        """Send bytes unless the client is gone (batched while a read is being parsed)."""
        out = self._out
        if out is not None:
            out.append(data)
        elif not self._lost and self._transport is not None:
            self._transport.write(data)

    def _flush(self) -> None:
        out = self._out
        if out:
            self._out = []
            if not self._lost and self._transport is not None:
                self._transport.write(out[0] if len(out) == 1 else b"".join(out))

    async def drain(self) -> None:
        """Wait while the transport's write buffer is over its high-water mark."""
        if self._write_paused and not self._lost:
            waiter = asyncio.get_running_loop().create_future()
            self._drain_waiter = waiter
            await waiter

    def _close(self) -> None:
        self._closing = True
        self._flush()
        if self._transport is not None and not self._lost:
            self._transport.close()

    def shutdown(self) -> asyncio.Task[None] | None:
        """Close the connection now (server stop); return the task still to await, if any."""
        task = self._task
        if task is not None:
            task.cancel()
        self._pending.clear()
        self._close()
        return task

    def abort(self) -> None:
        """Drop the connection without flushing (a client that stopped reading)."""
        if self._transport is not None and not self._lost:
            self._transport.abort()

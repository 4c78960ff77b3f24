"""One HTTP request on a connection (`Request`): what the client sent, and the `Exchange`
handle the proxy and the ASGI bridge answer it through (see exchange.py)."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from corral.errors import CorralError, PayloadTooLarge
from corral.frontend.asgi import ClientGone
from corral.frontend.http.request_id import Origin
from corral.frontend.http.wire import (
    CHUNKED,
    CLOSE,
    CONTINUE,
    CRLF,
    KEEP_ALIVE,
    LAST_CHUNK,
    Headers,
    chunk,
    error_response,
    status_line,
)

if TYPE_CHECKING:
    from corral.frontend.http.protocol import HttpConnection

log = logging.getLogger(__name__)

_JOIN_LIMIT = 65536  # whole responses up to this size are joined into one buffer


class Request:
    """One request: what the client sent, and the handle to answer it."""

    __slots__ = (
        "_chunked",
        "_raw",
        "_waiter",
        "buffered",
        "chunks_in",
        "complete",
        "conn",
        "content_length",
        "continue_sent",
        "finished",
        "gone",
        "head_only",
        "headers",
        "http11",
        "keep_alive",
        "method",
        "on_disconnect",
        "path",
        "query",
        "raw_path",
        "request_id",
        "request_id_origin",
        "sent_request_id",
        "started",
        "task",
        "version",
    )

    def __init__(
        self,
        conn: HttpConnection,
        method: bytes,
        raw_path: bytes,
        headers: Headers,
        version: str,
        keep_alive: bool,
        content_length: int | None,
        expect_continue: bool,
    ) -> None:
        self.conn = conn
        self.method = method
        self.raw_path = raw_path
        path, _, self.query = raw_path.partition(b"?")
        self.path = path
        self.headers = headers
        self.version = version
        self.http11 = version == "1.1"
        self.keep_alive = keep_alive
        self.content_length = content_length
        self.continue_sent = not expect_continue
        self.head_only = method == b"HEAD"
        self.chunks_in: deque[bytes] = deque()
        self.buffered = 0
        self.complete = False  # the whole body arrived
        self.gone = False  # the client disconnected (or the connection was closed)
        self.started = False  # the response head was written
        self.finished = False  # the response is complete
        self.on_disconnect: Callable[[], None] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._chunked = False
        self._raw = False
        self.task: asyncio.Task[None] | None = None
        self.request_id = b""  # set when its handler starts; sent back as x-request-id
        self.request_id_origin = Origin.CLIENT
        self.sent_request_id: bytes | None = None  # the client's x-request-id header

    # --- reading the body -----------------------------------------------------------------
    async def body(self, limit: int) -> bytes:
        if self.complete and not self.gone and self.buffered <= limit:
            return self._take()
        parts = []
        async for part in self.chunks(limit):
            parts.append(part)
        return b"".join(parts)

    async def chunks(self, limit: int) -> AsyncIterator[bytes]:
        if self.content_length is not None and self.content_length > limit:
            raise self._too_large(limit)
        size = 0
        while True:
            if self.chunks_in:
                data = self._take()
                size += len(data)
                if size > limit:
                    raise self._too_large(limit)
                yield data
                continue
            if self.complete:
                return
            if self.gone:
                raise ClientGone
            if not self.continue_sent:
                self.continue_sent = True
                self.conn.write(CONTINUE)
            waiter = self._waiter = self.conn.loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None

    def _too_large(self, limit: int) -> PayloadTooLarge:
        """The error for a body past `limit`; the connection closes after the answer."""
        self.keep_alive = False
        self.chunks_in.clear()
        self.buffered = 0
        self.conn.body_taken()
        return PayloadTooLarge(f"request body exceeds {limit} bytes")

    def _take(self) -> bytes:
        parts = self.chunks_in
        data = parts.popleft() if len(parts) == 1 else b"".join(parts)
        parts.clear()
        self.buffered = 0
        self.conn.body_taken()
        return data

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # --- answering --------------------------------------------------------------------------
    async def respond(self, status: int, headers: Headers, body: bytes) -> None:
        self.begin(status, headers, body)
        if self.conn.write_paused:
            await self.conn.drain()

    async def start(self, status: int, headers: Headers, first: bytes = b"") -> None:
        self.begin(status, headers, first, more=True)
        if self.conn.write_paused:
            await self.conn.drain()

    async def write(self, data: bytes) -> None:
        self.send(data)
        if self.conn.write_paused:
            await self.conn.drain()

    async def end(self, last: bytes = b"") -> None:
        self.send(last, more=False)

    def begin(
        self,
        status: int,
        headers: Headers,
        body: bytes = b"",
        *,
        more: bool = False,
        length: int = -1,
    ) -> None:
        """Write the response head and the first body bytes in one write.

        Without `more`, this is the whole response (a content-length is added unless
        `length` says `headers` carry one). With `more`, the body continues in `send()`:
        raw when `length` is given, chunked otherwise (close-delimited for HTTP/1.0).
        """
        if self.started:
            if self.finished:  # e.g. the server already answered 408: nothing more to say
                return
            raise RuntimeError("the response has already started")
        self.started = True
        conn = self.conn
        if self.gone:
            if not more:
                self.finished = True
            return
        # the connection can carry another request only once this one's body was read
        keep = self.keep_alive and self.complete and not conn.server.stopping
        parts = [status_line(status)]
        for name, value in headers:
            parts += (name, b": ", value, CRLF)
        if self.request_id:
            parts += (b"x-request-id: ", self.request_id, CRLF)
        if more and length < 0:
            if self.http11:
                self._chunked = True
                parts.append(CHUNKED)
            else:
                keep = False
        elif length < 0 and status >= 200 and status not in (204, 304):
            parts.append(b"content-length: %d\r\n" % len(body))
        self.keep_alive = keep
        if not keep:
            parts.append(CLOSE)
        elif not self.http11:
            parts.append(KEEP_ALIVE)
        parts.append(CRLF)
        if body and not self.head_only:
            if self._chunked:
                body = chunk(body)
            if len(body) <= _JOIN_LIMIT:
                parts.append(body)
                conn.write(b"".join(parts))
            else:
                conn.writelines([b"".join(parts), body])
        else:
            conn.write(b"".join(parts))
        if not more:
            self._done()

    def send(self, data: bytes, *, more: bool = True) -> None:
        """More body bytes after `begin(more=True)`; `more=False` ends the response."""
        if self.finished:
            return
        if not self.started:
            raise RuntimeError("send() before begin()")
        if not self.gone and not self.head_only:
            if self._chunked:
                if data:
                    data = chunk(data)
                if not more:
                    data += LAST_CHUNK
            if data:
                self.conn.write(data)
        if not more:
            self._done()

    def _done(self) -> None:
        self.finished = True
        self.conn.response_done(self)

    def handler_done(self, task: asyncio.Task[None]) -> None:
        """The handler returned (or failed): make sure the client gets a complete answer."""
        self.task = None
        exc = None if task.cancelled() else task.exception()
        if exc is not None and not isinstance(exc, ClientGone):
            log.error(
                "request handler failed: %s %s",
                self.method.decode(),
                self.path.decode(),
                exc_info=exc,
            )
        if self.finished:
            return
        if not self.started and not self.gone:
            if exc is None:
                log.error("handler returned without a response: %s", self.path.decode())
            status, headers, body = error_response(CorralError("internal server error"))
            self.keep_alive = False
            self.begin(status, headers, body)
            return
        self.finished = True
        self.conn.close()  # a response cut short: only closing tells the client

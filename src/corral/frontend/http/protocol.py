"""One HTTP/1.1 connection (`HttpConnection`): parsing, handlers in order, deadlines, writes.

Requests on a connection are answered strictly in order: the first runs as a task as soon as
its headers are parsed (its body is read through `Request.body()`/`chunks()`); pipelined
requests queue behind it. Reading pauses while a request's unread body passes `_HIGH_WATER`
or too many requests queue, so memory stays bounded. Deadlines are plain numbers checked by
the server's sweep (`HttpConnection.expire`), so a request arms no timer: the headers must
arrive within `header_timeout`, the body within `body_timeout` (extended while it keeps
arriving at `body_min_rate` bytes/s), and an idle keep-alive connection closes after
`keep_alive_timeout`.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import deque
from collections.abc import Callable, Coroutine
from contextvars import copy_context
from typing import TYPE_CHECKING, Any

import httptools

from corral.errors import BadRequest, CorralError, HeadersTooLarge, RequestTimeout
from corral.frontend.http.request import Request
from corral.frontend.http.wire import CLOSE, CRLF, Headers, error_response, status_line
from corral.logs import REQUEST_ID

if TYPE_CHECKING:
    from corral.frontend.http.server import HttpServer

log = logging.getLogger(__name__)

Handler = Callable[[Request], Coroutine[Any, Any, None]]

_HIGH_WATER = 1024 * 1024  # unread request body bytes before reading pauses
_MAX_PIPELINE = 16  # queued requests before reading pauses
_MAX_HEAD = 64 * 1024  # request line + headers

# what the connection is waiting for from the client (the deadline applies to it)
_IDLE = 0  # nothing: a keep-alive connection between requests
_HEAD = 1  # a request line and headers
_BODY = 2  # the rest of a request body
_BUSY = 3  # nothing; a request is being answered


class HttpConnection(asyncio.Protocol):
    """One client connection: parses requests and runs their handlers one at a time."""

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.loop = server.loop
        self.limits = server.limits
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.current: Request | None = None  # the request being received
        self.active: Request | None = None  # the request being answered
        self.queue: deque[Request] = deque()
        self.write_paused = False
        self.reading_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._url = b""
        self._headers: Headers = []
        self._head_size = 0
        self._length: bytes | None = None
        self._chunked_in = False
        self._expect = False
        self._request_id: bytes | None = None  # the client's x-request-id
        self._error: CorralError | None = None
        self.phase = _HEAD
        self.deadline = math.inf
        self.window_start = 0.0  # when the current body window began
        self.window_bytes = 0  # body bytes received in it

    # --- asyncio.Protocol -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        self.server.connections.add(self)
        self.deadline = self.loop.time() + self.limits.header_timeout

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._reject(BadRequest("protocol upgrades are not supported"))
        except httptools.HttpParserError as exc:
            self._reject(self._error or BadRequest(f"malformed HTTP request: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        self.server.connection_quiet()
        for req in (self.active, self.current, *self.queue):
            if req is not None and not req.gone:
                req.gone = True
                req._wake()
        active = self.active
        if active is not None and active.on_disconnect is not None and not active.finished:
            callback, active.on_disconnect = active.on_disconnect, None
            try:
                callback()
            except Exception:
                log.exception("disconnect callback failed")
        self.queue.clear()
        self.current = None
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    # --- httptools callbacks ------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._head_size = 0
        self._length = None
        self._chunked_in = False
        self._expect = False
        self._request_id = None
        if self.phase != _HEAD:
            self.phase = _HEAD
            self.deadline = self.loop.time() + self.limits.header_timeout

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_size += len(url)
        if self._head_size > _MAX_HEAD:
            self._error = HeadersTooLarge("request line and headers exceed 64 KiB")
            raise self._error

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        self._headers.append((name, value))
        self._head_size += len(name) + len(value) + 4
        if self._head_size > _MAX_HEAD:
            self._error = HeadersTooLarge("request line and headers exceed 64 KiB")
            raise self._error
        if name == b"content-length":
            self._length = value
        elif name == b"transfer-encoding":
            self._chunked_in = True
        elif name == b"expect" and value.lower() == b"100-continue":
            self._expect = True
        elif name == b"x-request-id" and self._request_id is None:
            self._request_id = value

    def on_headers_complete(self) -> None:
        parser = self.parser
        length: int | None = None
        if self._length is not None:
            try:
                length = int(self._length)
            except ValueError:
                self._error = BadRequest("invalid content-length")
                raise self._error from None
        req = Request(
            self,
            parser.get_method(),
            self._url,
            self._headers,
            parser.get_http_version(),
            parser.should_keep_alive(),
            length,
            self._expect,
        )
        req.sent_request_id = self._request_id
        self.current = req
        if length != 0 and (length is not None or self._chunked_in):
            now = self.loop.time()
            self.phase = _BODY
            self.deadline = now + self.limits.body_timeout
            self.window_start = now
            self.window_bytes = 0
        if self.active is None and not self.queue:
            self._begin(req)
        else:
            self.queue.append(req)
            if len(self.queue) >= _MAX_PIPELINE:
                self._pause_reading()

    def on_body(self, body: bytes) -> None:
        req = self.current
        if req is None:
            return
        req.chunks_in.append(body)
        req.buffered += len(body)
        self.window_bytes += len(body)
        req._wake()
        if req.buffered > _HIGH_WATER:
            self._pause_reading()

    def on_message_complete(self) -> None:
        req = self.current
        if req is None:
            return
        req.complete = True
        req._wake()
        self.current = None
        self.phase = _BUSY
        self.deadline = math.inf

    # --- running handlers -----------------------------------------------------------------
    def _begin(self, req: Request) -> None:
        self.active = req
        handler = self.server.route(req)
        rid, req.request_id_origin = self.server.request_ids.pick(req.sent_request_id)
        req.request_id = rid
        context = copy_context()  # the handler's task (and what it spawns) logs with the id
        context.run(REQUEST_ID.set, rid)
        task = self.loop.create_task(handler(req), context=context)
        req.task = task
        task.add_done_callback(req.handler_done)

    def response_done(self, req: Request) -> None:
        """`req`'s response is complete: close, or go on with the next request."""
        if not req.keep_alive or self.closed:
            self.close()
            return
        if req is self.active:
            self._next()

    def _next(self) -> None:
        self.active = None
        if self.server.stopping:
            self.close()
            self.server.connection_quiet()
            return
        if self.queue:
            nxt = self.queue.popleft()
            if self.reading_paused and len(self.queue) < _MAX_PIPELINE // 2:
                self._resume_reading()
            self._begin(nxt)
            return
        if self.current is None:
            self.phase = _IDLE
            self.deadline = self.loop.time() + self.limits.keep_alive_timeout

    @property
    def idle(self) -> bool:
        return self.active is None and self.current is None and not self.queue

    # --- deadlines (called by the server's sweep) -------------------------------------------
    def expire(self, now: float) -> None:
        if self.phase == _BODY:
            if self.window_bytes >= self.limits.body_min_rate * (now - self.window_start):
                self.window_start = now  # still moving at the minimum rate: another window
                self.window_bytes = 0
                self.deadline = now + self.limits.body_timeout
                return
            self._timeout(RequestTimeout("the request body did not arrive in time"))
        elif self.phase == _HEAD:
            self._timeout(RequestTimeout("the request headers did not arrive in time"))
        elif self.phase == _IDLE:
            self.close()
        else:
            self.deadline = math.inf

    def _timeout(self, exc: RequestTimeout) -> None:
        log.info("closing a slow client connection: %s", exc.message)
        self._reject(exc)

    def _reject(self, exc: CorralError) -> None:
        """Answer `exc` if no response is under way, then close the connection."""
        req = self.active
        if not self.closed and (req is None or not req.started):
            status, headers, body = error_response(exc)
            if req is None:
                head = status_line(status) + b"".join(n + b": " + v + CRLF for n, v in headers)
                self.write(head + b"content-length: %d\r\n" % len(body) + CLOSE + CRLF + body)
            else:
                req.keep_alive = False
                req.begin(status, headers, body)
        self.close()

    # --- writing ----------------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    def writelines(self, data: list[bytes]) -> None:
        if not self.closed and self.transport is not None:
            self.transport.writelines(data)

    async def drain(self) -> None:
        if self.write_paused and not self.closed:
            waiter = self._drain = self.loop.create_future()
            await waiter

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.deadline = math.inf
            if self.transport is not None:
                self.transport.close()  # flushes what was written; connection_lost follows

    # --- flow control ---------------------------------------------------------------------
    def body_taken(self) -> None:
        if self.reading_paused and len(self.queue) < _MAX_PIPELINE // 2:
            current = self.current
            if current is None or current.buffered <= _HIGH_WATER:
                self._resume_reading()

    def _pause_reading(self) -> None:
        if not self.reading_paused and self.transport is not None and not self.closed:
            self.reading_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self.reading_paused and self.transport is not None and not self.closed:
            self.reading_paused = False
            self.transport.resume_reading()

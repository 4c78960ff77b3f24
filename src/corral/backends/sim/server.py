"""SimServer: the simulator's HTTP/1.1 server (asyncio.Protocol + httptools), its routes and state.

One connection is one `_HttpConnection`. Requests on a connection are answered strictly in
order: a request whose answer is ready at once (zero timings) is written from inside the
parser callback; one that has to wait (ttft/tpot, load time) runs as the connection's only
task while later pipelined requests queue behind it. Closing the connection cancels that task.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import signal
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any, cast

import httptools
import orjson

from corral.backends.sim.config import SimConfig
from corral.backends.sim.engine import (
    SimEngine,
    StreamEvents,
    chat_prompt,
    completion_prompt,
    include_usage,
    max_tokens,
)
from corral.errors import (
    BadRequest,
    CorralError,
    ModelNotFound,
    NotFound,
    PayloadTooLarge,
    Unavailable,
)

log = logging.getLogger(__name__)

Reply = bytes | Coroutine[Any, Any, None]
Handler = Callable[["_Request", "_HttpConnection"], Reply]

_MAX_PIPELINE = 64  # queued requests per connection before reading pauses
_CLOSE_GRACE = 2.0  # seconds stop() lets connections flush before aborting them

_REASONS = {
    200: b"OK",
    400: b"Bad Request",
    404: b"Not Found",
    405: b"Method Not Allowed",
    413: b"Payload Too Large",
    500: b"Internal Server Error",
    503: b"Service Unavailable",
}
_STATUS_JSON = {
    status: b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\n" % (status, reason)
    for status, reason in _REASONS.items()
}
_JSON_200 = _STATUS_JSON[200] + b"content-length: "
_SSE_200 = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
    b"transfer-encoding: chunked\r\n"
)
_CLOSE = b"connection: close\r\n"
_KEEP_ALIVE = b"connection: keep-alive\r\n"  # only HTTP/1.0 clients need to be told
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_CRLF = b"\r\n"
_LAST_CHUNK = b"0\r\n\r\n"
_GET = b"GET"
_POST = b"POST"


class MethodNotAllowed(CorralError):
    """The path exists but not for this HTTP method (HTTP 405)."""

    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class ModelLoading(Unavailable):
    """The model is still loading (`--load-time`); retry shortly (HTTP 503)."""

    code = "model_loading"


class _Request:
    """One parsed HTTP request; `conn` is the connection header its response must carry."""

    __slots__ = ("body", "conn", "method", "parse_error", "path", "too_large")

    def __init__(
        self,
        method: bytes,
        path: bytes,
        body: bytes,
        conn: bytes,
        too_large: bool = False,
        parse_error: bool = False,
    ) -> None:
        self.method = method
        self.path = path
        self.body = body
        self.conn = conn
        self.too_large = too_large
        self.parse_error = parse_error

    @property
    def close(self) -> bool:
        return self.conn is _CLOSE


def _json_response(status: int, body: bytes, conn: bytes, extra: bytes = b"") -> bytes:
    return b"".join(
        (_STATUS_JSON[status], b"content-length: ", b"%d\r\n" % len(body), conn, extra, _CRLF, body)
    )


def _ok_json(body: bytes, conn: bytes) -> bytes:
    return b"".join((_JSON_200, b"%d\r\n" % len(body), conn, _CRLF, body))


def _frame(events: list[bytes], out: list[bytes]) -> None:
    """Append each SSE event to `out` as one HTTP chunk."""
    for event in events:
        out.append(b"%x\r\n" % len(event))
        out.append(event)
        out.append(_CRLF)


class SimServer:
    """The simulator backend: binds at `start()`, serves until `stop()`."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self._engine = SimEngine(config)
        self._loaded = not config.unloaded  # the admin switch
        self._loading = False  # True during --load-time
        self._requests = 0  # inference requests answered with 200
        self._inflight = 0  # inference requests waiting or streaming now
        self._server: asyncio.Server | None = None
        self._load_timer: asyncio.TimerHandle | None = None
        self._connections: set[_HttpConnection] = set()
        self._all_closed: asyncio.Event | None = None  # set by stop(), fired when none is left
        self._ids: itertools.count[int] = itertools.count(1)
        self._id_prefix = ""
        self._routes: dict[bytes, tuple[bytes, Handler]] = {
            b"/health": (_GET, self._health),
            b"/v1/models": (_GET, self._models),
            b"/v1/chat/completions": (_POST, self._chat),
            b"/v1/completions": (_POST, self._completions),
            b"/v1/embeddings": (_POST, self._embeddings),
            b"/admin/load": (_POST, self._admin_load),
            b"/admin/unload": (_POST, self._admin_unload),
            b"/admin/stats": (_GET, self._admin_stats),
        }

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> int:
        """Bind and start serving; return the bound port (useful with port 0)."""
        if self._server is not None:
            raise RuntimeError("SimServer already started")
        self.config.validate()
        loop = asyncio.get_running_loop()
        self._id_prefix = os.urandom(6).hex()
        if self.config.load_time > 0:
            self._loading = True
            self._load_timer = loop.call_later(self.config.load_time, self._finish_loading)
        try:
            self._server = await loop.create_server(
                lambda: _HttpConnection(self),
                self.config.host,
                self.config.port,
                backlog=2048,
                reuse_address=True,
            )
        except BaseException:
            if self._load_timer is not None:
                self._load_timer.cancel()
                self._load_timer = None
            raise
        return self.port

    @property
    def port(self) -> int:
        """The bound port (of the first socket, when the host resolved to several)."""
        if self._server is None:
            raise RuntimeError("SimServer not started")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def url(self) -> str:
        """Base URL of the server, e.g. http://127.0.0.1:8001."""
        host = self.config.host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    async def stop(self) -> None:
        """Stop listening, close every connection, and wait for their tasks and sockets."""
        if self._load_timer is not None:
            self._load_timer.cancel()
            self._load_timer = None
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        self._all_closed = asyncio.Event()
        conns = list(self._connections)
        tasks = [t for c in conns if (t := c.shutdown()) is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._connections:
            try:
                await asyncio.wait_for(self._all_closed.wait(), _CLOSE_GRACE)
            except TimeoutError:  # a client that does not read: drop it
                for conn in list(self._connections):
                    conn.abort()
        await server.wait_closed()

    def stats(self) -> dict[str, Any]:
        """What `GET /admin/stats` answers: model, loaded, loading, requests, inflight."""
        return {
            "model": self.config.model,
            "loaded": self._loaded and not self._loading,
            "loading": self._loading,
            "requests": self._requests,
            "inflight": self._inflight,
        }

    @property
    def open_connections(self) -> int:
        """Client connections currently open."""
        return len(self._connections)

    def _finish_loading(self) -> None:
        self._loading = False
        self._load_timer = None

    def connection_opened(self, conn: _HttpConnection) -> None:
        self._connections.add(conn)

    def connection_closed(self, conn: _HttpConnection) -> None:
        self._connections.discard(conn)
        if not self._connections and self._all_closed is not None:
            self._all_closed.set()

    # --- dispatch --------------------------------------------------------------------------

    def respond(self, req: _Request, conn: _HttpConnection) -> Reply:
        """The answer to one request: response bytes, or a coroutine that writes it later."""
        try:
            if req.parse_error:
                raise BadRequest("malformed HTTP request")
            route = self._routes.get(req.path)
            if route is None:
                raise NotFound(f"no route for {req.path.decode('latin-1')}")
            method, handler = route
            if req.method != method:
                raise MethodNotAllowed(
                    f"{req.method.decode('latin-1')} is not allowed on "
                    f"{req.path.decode('latin-1')}; use {method.decode()}",
                    allow=method,
                )
            if req.too_large:
                raise PayloadTooLarge(f"request body exceeds {self.config.max_body} bytes")
            return handler(req, conn)
        except CorralError as exc:
            return self._error(exc, req.conn)
        except Exception:
            log.exception("sim: unexpected error answering %r", req.path)
            return self._error(CorralError("internal error in the simulator"), req.conn)

    def _error(self, exc: CorralError, conn: bytes) -> bytes:
        body = orjson.dumps(
            {
                "error": {
                    "message": exc.message,
                    "type": exc.type,
                    "param": exc.extra.get("param"),
                    "code": exc.code,
                }
            }
        )
        extra = b""
        allow = exc.extra.get("allow")
        if isinstance(allow, bytes):
            extra = b"allow: " + allow + _CRLF
        if exc.retry_after is not None:
            extra += b"retry-after: %d\r\n" % max(1, round(exc.retry_after))
        return _json_response(exc.status, body, conn, extra)

    # --- plain endpoints -------------------------------------------------------------------

    def _health(self, req: _Request, conn: _HttpConnection) -> Reply:
        if self._loading:
            return _json_response(503, b'{"status":"loading"}', req.conn, b"retry-after: 1\r\n")
        return _ok_json(b'{"status":"ok"}', req.conn)

    def _models(self, req: _Request, conn: _HttpConnection) -> Reply:
        data: list[dict[str, Any]] = []
        if self._loaded and not self._loading:
            data.append(
                {
                    "id": self.config.model,
                    "object": "model",
                    "created": int(time.time()),
                    "owned_by": "corral-sim",
                }
            )
        return _ok_json(orjson.dumps({"object": "list", "data": data}), req.conn)

    def _stats(self) -> bytes:
        return orjson.dumps(self.stats())

    def _admin_load(self, req: _Request, conn: _HttpConnection) -> Reply:
        self._loaded = True
        return _ok_json(self._stats(), req.conn)

    def _admin_unload(self, req: _Request, conn: _HttpConnection) -> Reply:
        self._loaded = False
        return _ok_json(self._stats(), req.conn)

    def _admin_stats(self, req: _Request, conn: _HttpConnection) -> Reply:
        return _ok_json(self._stats(), req.conn)

    # --- inference -------------------------------------------------------------------------

    def _inference_body(self, req: _Request) -> dict[str, Any]:
        """The JSON body of an inference request, after the checks every endpoint shares."""
        model = self.config.model
        if self._loading:
            raise ModelLoading(f"model '{model}' is loading", retry_after=1)
        try:
            body = orjson.loads(req.body)
        except orjson.JSONDecodeError as exc:
            raise BadRequest(f"request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise BadRequest("request body must be a JSON object")
        requested = body.get("model")
        if requested is not None and not isinstance(requested, str):
            raise BadRequest("'model' must be a string", param="model")
        if not self._loaded:
            raise ModelNotFound(f"model '{model}' is not loaded", param="model")
        if requested is not None and requested != model:
            raise ModelNotFound(
                f"model '{requested}' is not served here; this server serves '{model}'",
                param="model",
            )
        stream = body.get("stream")
        if stream is not None and not isinstance(stream, bool):
            raise BadRequest("'stream' must be a boolean", param="stream")
        return body

    def _next_id(self, prefix: str) -> str:
        return f"{prefix}{self._id_prefix}{next(self._ids):x}"

    def _chat(self, req: _Request, conn: _HttpConnection) -> Reply:
        body = self._inference_body(req)
        gen = self._engine.generate(chat_prompt(body), max_tokens(body))
        rid = self._next_id("chatcmpl-")
        created = int(time.time())
        if body.get("stream"):
            events = self._engine.chat_events(rid, created, gen, with_usage=include_usage(body))
            return self._stream(events, req.conn, conn)
        return self._complete(
            self._engine.chat_completion(rid, created, gen), gen.completion_tokens, req, conn
        )

    def _completions(self, req: _Request, conn: _HttpConnection) -> Reply:
        body = self._inference_body(req)
        gen = self._engine.generate(completion_prompt(body), max_tokens(body))
        rid = self._next_id("cmpl-")
        created = int(time.time())
        if body.get("stream"):
            events = self._engine.completion_events(
                rid, created, gen, with_usage=include_usage(body)
            )
            return self._stream(events, req.conn, conn)
        return self._complete(
            self._engine.text_completion(rid, created, gen), gen.completion_tokens, req, conn
        )

    def _embeddings(self, req: _Request, conn: _HttpConnection) -> Reply:
        payload = self._engine.embeddings(self._inference_body(req))
        return self._complete(payload, 0, req, conn)

    def _complete(self, payload: bytes, tokens: int, req: _Request, conn: _HttpConnection) -> Reply:
        """A non-streamed answer: now, or after ttft + tpot per further token in one sleep."""
        delay = self.config.ttft + self.config.tpot * max(tokens - 1, 0)
        if delay > 0:
            return self._complete_later(delay, payload, req.conn, conn)
        self._requests += 1
        return _ok_json(payload, req.conn)

    async def _complete_later(
        self, delay: float, payload: bytes, conn_header: bytes, conn: _HttpConnection
    ) -> None:
        self._inflight += 1
        try:
            await asyncio.sleep(delay)
            self._requests += 1
            conn.write(_ok_json(payload, conn_header))
        finally:
            self._inflight -= 1

    def _stream(self, events: StreamEvents, conn_header: bytes, conn: _HttpConnection) -> Reply:
        """A streamed answer: all at once when timings are zero, else paced by a task."""
        if self.config.ttft > 0 or self.config.tpot > 0:
            return self._stream_later(events, conn_header, conn)
        self._requests += 1
        out = [_SSE_200, conn_header, _CRLF]
        _frame(events.head, out)
        _frame(events.tokens, out)
        _frame(events.tail, out)
        out.append(_LAST_CHUNK)
        return b"".join(out)

    async def _stream_later(
        self, events: StreamEvents, conn_header: bytes, conn: _HttpConnection
    ) -> None:
        ttft, tpot = self.config.ttft, self.config.tpot
        self._inflight += 1
        try:
            self._requests += 1
            out = [_SSE_200, conn_header, _CRLF]
            _frame(events.head, out)
            conn.write(b"".join(out))
            # Pace against absolute deadlines, so timer overshoot does not add up per token.
            loop = asyncio.get_running_loop()
            due = loop.time() + ttft
            if ttft > 0:
                await asyncio.sleep(ttft)
            for i, event in enumerate(events.tokens):
                if i and tpot > 0:
                    due += tpot
                    wait = due - loop.time()
                    if wait > 0:
                        await asyncio.sleep(wait)
                conn.write(b"%x\r\n%b\r\n" % (len(event), event))
                await conn.drain()
            out = []
            _frame(events.tail, out)
            out.append(_LAST_CHUNK)
            conn.write(b"".join(out))
        finally:
            self._inflight -= 1


class _HttpConnection(asyncio.Protocol):
    """One client connection: parses requests with httptools and answers them in order."""

    def __init__(self, server: SimServer) -> None:
        self._server = server
        self._max_body = server.config.max_body
        self._transport: asyncio.Transport | None = None
        self._parser: Any = None
        self._url = b""
        self._body: list[bytes] = []
        self._body_size = 0
        self._expect_continue = False
        self._pending: deque[_Request] = deque()
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
            self._enqueue(_Request(b"", b"", b"", _CLOSE, parse_error=True))
            self._closing = True
        except httptools.HttpParserUpgrade:
            # No protocol upgrades here: answer what was parsed, then hang up.
            self._enqueue(_Request(b"", b"", b"", _CLOSE, parse_error=True))
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

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) == 6 and name.lower() == b"expect" and value.lower() == b"100-continue":
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
            conn = _CLOSE
        elif parser.get_http_version() == "1.0":
            conn = _KEEP_ALIVE
        else:
            conn = b""
        url = self._url
        q = url.find(b"?")
        path = url if q < 0 else url[:q]
        parts = self._body
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        too_large = self._body_size > self._max_body
        self._enqueue(_Request(parser.get_method(), path, body, conn, too_large))
        if conn is _CLOSE:
            self._closing = True

    # --- answering -------------------------------------------------------------------------

    def _enqueue(self, req: _Request) -> None:
        if self._task is None and not self._pending:
            self._dispatch(req)
        else:
            self._pending.append(req)
            self._update_reading()

    def _dispatch(self, req: _Request) -> None:
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


async def serve(config: SimConfig) -> None:
    """Run a SimServer until SIGTERM or SIGINT; print the listening line once bound."""
    loop = asyncio.get_running_loop()
    stopped = asyncio.Event()
    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:  # before the line is printed: a supervisor may signal right after it
        loop.add_signal_handler(sig, stopped.set)
    server = SimServer(config)
    try:
        await server.start()
        print(f"sim listening on {server.url}", flush=True)
        await stopped.wait()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        await server.stop()
        print(f"sim stopped: requests={server.stats()['requests']}", flush=True)


def run(config: SimConfig) -> None:
    """The CLI entry: serve `config` on uvloop when it is installed, else on asyncio's loop."""
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(serve(config))

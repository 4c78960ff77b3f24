"""Running an ASGI app (FastAPI: admin API, docs, metrics, node API, artifacts) on the native
server: one `AsgiBridge` call per request, and the app's lifespan (`Lifespan`).

What uvicorn guarantees, kept: the request body as `http.request` messages (413 past the
limit), `http.disconnect` once the client left or the response is complete, sends after a
disconnect are dropped, HEAD responses lose their body, a response without content-length is
chunked. A whole response (one body message) goes out as one write, with its content-length.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote

from corral.errors import PayloadTooLarge
from corral.frontend.asgi import ClientGone, Message, Receive, Scope, Send
from corral.frontend.http.request import Request
from corral.frontend.http.wire import Headers, error_response

log = logging.getLogger(__name__)

AsgiApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_DISCONNECT: Message = {"type": "http.disconnect"}


class AsgiBridge:
    """Calls the ASGI app for one native request (used as a native handler)."""

    def __init__(self, app: AsgiApp, base: Scope, max_body_bytes: int) -> None:
        self.app = app
        self.scheme: str = base["scheme"]
        self.state: dict[str, Any] = base["state"]
        self.max_body_bytes = max_body_bytes

    async def __call__(self, req: Request) -> None:
        transport = req.conn.transport
        assert transport is not None
        scope: Scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": req.version,
            "method": req.method.decode("ascii"),
            "scheme": self.scheme,
            "path": unquote(req.path.decode("latin-1")),
            "raw_path": req.path,
            "query_string": req.query,
            "root_path": "",
            "headers": req.headers,
            "client": _address(transport.get_extra_info("peername")),
            "server": _address(transport.get_extra_info("sockname")),
            "state": self.state.copy(),
        }
        cycle = _Cycle(req, self.max_body_bytes)
        await self.app(scope, cycle.receive, cycle.send)


class _Cycle:
    """The receive/send pair of one request."""

    __slots__ = ("body", "ended", "headers", "length", "req", "status", "waiter")

    def __init__(self, req: Request, limit: int) -> None:
        self.req = req
        self.body = req.chunks(limit)
        self.ended = False  # the last http.request message was given
        self.status = 0
        self.headers: Headers | None = None
        self.length = -1
        self.waiter: asyncio.Future[None] | None = None

    async def receive(self) -> Message:
        req = self.req
        if req.gone or req.finished:
            return _DISCONNECT
        if not self.ended:
            try:
                chunk = await anext(self.body)
            except StopAsyncIteration:
                self.ended = True
                return {"type": "http.request", "body": b"", "more_body": False}
            except ClientGone:
                return _DISCONNECT
            except PayloadTooLarge as exc:
                self.ended = True
                if not req.started:
                    req.keep_alive = False
                    req.begin(*error_response(exc))
                return _DISCONNECT
            self.ended = req.complete and not req.chunks_in
            return {"type": "http.request", "body": chunk, "more_body": not self.ended}
        # the body was read: wait until the client leaves or the response is complete
        waiter = self.waiter = req.conn.loop.create_future()
        req.on_disconnect = self._wake
        try:
            await waiter
        finally:
            self.waiter = None
        return _DISCONNECT

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def send(self, message: Message) -> None:
        req = self.req
        kind = message["type"]
        if kind == "http.response.start":
            if self.headers is not None:
                raise RuntimeError("http.response.start sent twice")
            self.status = message["status"]
            headers: Headers = []
            for name, value in message.get("headers", ()):
                name = name.lower()
                if name == b"content-length":
                    self.length = int(value)
                    continue
                if name == b"connection":
                    if b"close" in value.lower():
                        req.keep_alive = False
                    continue
                elif name == b"transfer-encoding":
                    continue
                headers.append((name, value))
            if self.length >= 0:
                headers.append((b"content-length", b"%d" % self.length))
            self.headers = headers
            return
        if kind != "http.response.body":
            raise RuntimeError(f"unexpected ASGI message {kind!r}")
        if self.headers is None:
            raise RuntimeError("http.response.body before http.response.start")
        body: bytes = message.get("body", b"")
        more: bool = message.get("more_body", False)
        if not req.started:
            req.begin(self.status, self.headers, body, more=more, length=self.length)
        elif not req.finished:
            req.send(body, more=more)
        if req.finished:
            self._wake()
        elif req.conn.write_paused:
            await req.conn.drain()


def _address(info: Any) -> tuple[str, int] | None:
    if isinstance(info, tuple) and len(info) >= 2:
        return str(info[0]), int(info[1])
    return None


class Lifespan:
    """The ASGI lifespan protocol: start-up before serving, shutdown after."""

    def __init__(self, app: AsgiApp) -> None:
        self.app = app
        self.state: dict[str, Any] = {}
        self._inbox: asyncio.Queue[Message] = asyncio.Queue()
        self._outbox: asyncio.Queue[Message] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    async def startup(self) -> None:
        scope: Scope = {
            "type": "lifespan",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "state": self.state,
        }
        self._task = asyncio.create_task(self._run(scope), name="lifespan")
        await self._inbox.put({"type": "lifespan.startup"})
        reply = await self._reply()
        if reply["type"] == "lifespan.startup.failed":
            raise RuntimeError(f"application start-up failed: {reply.get('message', '')}")

    async def shutdown(self) -> None:
        if self._task is None or self._task.done():
            return
        await self._inbox.put({"type": "lifespan.shutdown"})
        reply = await self._reply()
        if reply["type"] == "lifespan.shutdown.failed":
            log.error("application shutdown failed: %s", reply.get("message", ""))
        await self._task

    async def _run(self, scope: Scope) -> None:
        try:
            await self.app(scope, self._inbox.get, self._outbox.put)
        except BaseException as exc:
            await self._outbox.put({"type": "lifespan.startup.failed", "message": repr(exc)})
            if not isinstance(exc, Exception):
                raise
            log.exception("application lifespan failed")
        else:
            # an app without lifespan support returns at once: serve it without one
            await self._outbox.put({"type": "lifespan.unsupported"})

    async def _reply(self) -> Message:
        return await self._outbox.get()

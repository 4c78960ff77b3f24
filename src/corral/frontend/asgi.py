"""Small raw-ASGI helpers: read a body, OpenAI-style error payloads, and `AsgiExchange`
(the proxy's request interface on top of any ASGI server)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

import orjson

from corral.errors import CorralError, PayloadTooLarge
from corral.frontend.errors_http import describe

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

JSON_HEADERS = [(b"content-type", b"application/json")]


class ClientGone(Exception):
    """The client disconnected before its request body arrived."""


async def read_body(receive: Receive, limit: int) -> bytes:
    """Read the whole request body; PayloadTooLarge past `limit` bytes."""
    message = await receive()
    if message["type"] == "http.disconnect":
        raise ClientGone
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        if len(body) > limit:
            raise PayloadTooLarge(f"request body exceeds {limit} bytes")
        return body
    parts = [body]
    size = len(body)
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body exceeds {limit} bytes")
        parts.append(chunk)
        if not message.get("more_body", False):
            return b"".join(parts)


def error_payload(exc: CorralError) -> dict[str, Any]:
    """The OpenAI-style error object for `exc` (extra fields such as load progress included)."""
    wire = describe(exc)
    error: dict[str, Any] = {
        "message": exc.message,
        "type": wire.type,
        "param": exc.extra.get("param"),
        "code": wire.code,
    }
    for key, value in exc.extra.items():
        if key not in error and key not in ("no_responders", "timed_out"):
            error[key] = value
    return {"error": error}


def error_headers(exc: CorralError) -> list[tuple[bytes, bytes]]:
    headers = list(JSON_HEADERS)
    if exc.retry_after is not None:
        headers.append((b"retry-after", str(max(1, math.ceil(exc.retry_after))).encode()))
    return headers


def sse_error(exc: CorralError) -> bytes:
    """An OpenAI-style error as one SSE event, to end a stream that already started."""
    return b"data: " + orjson.dumps(error_payload(exc)) + b"\n\n"


class AsgiExchange:
    """An ASGI request as an `Exchange` (corral.frontend.http.exchange): lets the proxy run
    under any ASGI server (uvicorn, granian) as well as on Corral's own."""

    __slots__ = (
        "_gone",
        "_receive",
        "_send",
        "_watcher",
        "headers",
        "method",
        "on_disconnect_cb",
        "path",
        "query",
    )

    def __init__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw: bytes = scope.get("raw_path") or scope["path"].encode()
        path, _, query = raw.partition(b"?")
        self.method: bytes = scope["method"].encode()
        self.path = path
        self.query: bytes = scope.get("query_string") or query
        self.headers: list[tuple[bytes, bytes]] = scope["headers"]
        self._receive = receive
        self._send = send
        self._gone = False
        self._watcher: asyncio.Future[None] | None = None
        self.on_disconnect_cb: Callable[[], None] | None = None

    @property
    def gone(self) -> bool:
        return self._gone

    @property
    def on_disconnect(self) -> Callable[[], None] | None:
        return self.on_disconnect_cb

    @on_disconnect.setter
    def on_disconnect(self, callback: Callable[[], None] | None) -> None:
        """Setting a callback starts watching `receive()` for the client's disconnect."""
        self.on_disconnect_cb = callback
        if callback is None:
            if self._watcher is not None:
                self._watcher.cancel()
                self._watcher = None
        elif self._watcher is None:
            self._watcher = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass  # stray empty http.request messages
        self._gone = True
        callback, self.on_disconnect_cb = self.on_disconnect_cb, None
        if callback is not None:
            callback()

    async def body(self, limit: int) -> bytes:
        try:
            return await read_body(self._receive, limit)
        except ClientGone:
            self._gone = True
            raise

    async def chunks(self, limit: int) -> AsyncIterator[bytes]:
        size = 0
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                self._gone = True
                raise ClientGone
            data: bytes = message.get("body", b"")
            size += len(data)
            if size > limit:
                raise PayloadTooLarge(f"request body exceeds {limit} bytes")
            if data:
                yield data
            if not message.get("more_body", False):
                return

    async def respond(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        headers = [*headers, (b"content-length", str(len(body)).encode())]
        await self._send({"type": "http.response.start", "status": status, "headers": headers})
        await self._send({"type": "http.response.body", "body": body})

    async def start(
        self, status: int, headers: list[tuple[bytes, bytes]], first: bytes = b""
    ) -> None:
        await self._send({"type": "http.response.start", "status": status, "headers": headers})
        if first:
            await self.write(first)

    async def write(self, data: bytes) -> None:
        await self._send({"type": "http.response.body", "body": data, "more_body": True})

    async def end(self, last: bytes = b"") -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None
        await self._send({"type": "http.response.body", "body": last, "more_body": False})

"""`Tally`: one inference request's `Exchange`, noting on the way what metrics and usage need.

It passes every call through unchanged and notes the status, when the first body byte went
out, and (set by the proxy) the model, the API key's grant and the backend's usage. After the
first body byte, `write` is the wrapped exchange's own method: no cost per streamed chunk.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from corral.domain.access import Grant
from corral.domain.usage import Usage
from corral.frontend.http.exchange import Exchange, Headers


class Tally:
    """An `Exchange` that remembers how it was answered."""

    __slots__ = (
        "admitted",
        "endpoint",
        "first_byte",
        "grant",
        "headers",
        "inner",
        "method",
        "model",
        "path",
        "query",
        "started",
        "status",
        "usage",
        "write",
    )

    def __init__(self, inner: Exchange, started: float) -> None:
        self.inner = inner
        self.method = inner.method
        self.path = inner.path
        self.query = inner.query
        self.headers = inner.headers
        self.started = started  # time.perf_counter() at arrival
        self.status = 0  # 0: not answered (the client left first)
        self.first_byte: float | None = None  # perf_counter() when the first body byte went
        self.endpoint: str | None = None  # the endpoint's path (bounded), once known
        self.model: str | None = None  # the declared model it was routed for
        self.grant: Grant | None = None  # what the API key allows (None: /v1 is open)
        self.usage: Usage | None = None  # the backend's usage of a 200 answer
        self.admitted = False  # counted for its key (usage, limits)
        self.write: Callable[[bytes], Coroutine[Any, Any, None]] = self._first_write

    @property
    def gone(self) -> bool:
        return self.inner.gone

    @property
    def on_disconnect(self) -> Callable[[], None] | None:
        return self.inner.on_disconnect

    @on_disconnect.setter
    def on_disconnect(self, callback: Callable[[], None] | None) -> None:
        self.inner.on_disconnect = callback

    async def body(self, limit: int) -> bytes:
        return await self.inner.body(limit)

    def chunks(self, limit: int) -> AsyncIterator[bytes]:
        return self.inner.chunks(limit)

    async def respond(self, status: int, headers: Headers, body: bytes) -> None:
        self.status = status
        self.first_byte = time.perf_counter()
        self.write = self.inner.write
        await self.inner.respond(status, headers, body)

    async def start(self, status: int, headers: Headers, first: bytes = b"") -> None:
        self.status = status
        if first:
            self.first_byte = time.perf_counter()
            self.write = self.inner.write
        await self.inner.start(status, headers, first)

    async def _first_write(self, data: bytes) -> None:
        if data:
            self.first_byte = time.perf_counter()
            self.write = self.inner.write
        await self.inner.write(data)

    async def end(self, last: bytes = b"") -> None:
        if last and self.first_byte is None:
            self.first_byte = time.perf_counter()
        await self.inner.end(last)

    def close(self) -> None:
        """The request is over: drop the reference cycle `write` = `self._first_write` makes,
        so the tally (and the exchange it holds) is freed at once, not by the cyclic GC."""
        self.write = self.inner.write

"""The `Exchange`: one request and the way to answer it, as the proxy sees it on any server.

The native server's `protocol.Request` is one; `corral.frontend.asgi.AsgiExchange` adapts an
ASGI (scope, receive, send) to the same interface, so the proxy runs unchanged under uvicorn
or granian (the bench compares them) and in tests.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Protocol

from corral.errors import CorralError
from corral.frontend.errors_http import describe
from corral.frontend.http.wire import error_response

log = logging.getLogger(__name__)

Headers = list[tuple[bytes, bytes]]


class Exchange(Protocol):
    """One HTTP request and its response.

    Reading: `body(limit)` returns the whole body; `chunks(limit)` yields it as it arrives
    (bounded memory: the connection stops reading while chunks wait). Both raise
    `PayloadTooLarge` past `limit` bytes and `ClientGone` when the client left.

    Answering: either `respond()` once (a whole response: head and body in one write), or
    `start()`, any number of `write()`, then `end()` (chunked framing added by the server).
    The caller never sends content-length, transfer-encoding or connection headers.
    After the client left, writes are dropped.
    """

    method: bytes
    path: bytes  # without the query string
    query: bytes
    headers: Headers  # names lower-cased
    #: called once if the client disconnects while the response is being streamed
    on_disconnect: Callable[[], None] | None

    @property
    def gone(self) -> bool:
        """True once the client disconnected."""
        ...

    async def body(self, limit: int) -> bytes: ...

    def chunks(self, limit: int) -> AsyncIterator[bytes]: ...

    async def respond(self, status: int, headers: Headers, body: bytes) -> None: ...

    async def start(self, status: int, headers: Headers, first: bytes = b"") -> None: ...

    async def write(self, data: bytes) -> None: ...

    async def end(self, last: bytes = b"") -> None: ...


async def respond_error(exchange: Exchange, exc: CorralError) -> None:
    """Answer with the OpenAI-style error JSON for `exc`, and log it (a server-side failure as
    a warning), with the request's id."""
    status, headers, body = error_response(exc)
    log.log(
        logging.WARNING if status >= 500 else logging.INFO,
        "%s %s: %d %s: %s",
        exchange.method.decode("latin-1"),
        exchange.path.decode("latin-1"),
        status,
        describe(exc).code or "error",
        exc.message,
    )
    await exchange.respond(status, headers, body)

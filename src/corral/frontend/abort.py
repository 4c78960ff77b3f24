"""Disconnect = abort: while a request waits (for a slot, or for its backend), a client that
goes away cancels the wait, which closes the backend connection and frees the slot.

`AbortOnDisconnect` is a context manager around the waiting part of a request's task: the
exchange's disconnect callback cancels that task, and the cancellation is swallowed when the
block ends (the client is gone; nothing is left to answer). The upstream pool closes a
connection whose wait is cancelled, so the backend sees its client leave; the caller's
`finally` releases the in-flight slot on the way out. Streams set their own callback while
they relay (`response.abort`), which replaces this one for that time.
"""

from __future__ import annotations

import asyncio
from types import TracebackType

from corral.frontend.http.exchange import Exchange


class AbortOnDisconnect:
    """Cancel the current task when the exchange's client disconnects inside the block."""

    __slots__ = ("exchange", "fired", "task")

    def __init__(self, exchange: Exchange) -> None:
        self.exchange = exchange
        self.fired = False
        self.task: asyncio.Task[object] | None = None

    def __enter__(self) -> AbortOnDisconnect:
        self.task = asyncio.current_task()
        self.exchange.on_disconnect = self._fire
        return self

    def _fire(self) -> None:
        if not self.fired and self.task is not None:
            self.fired = True
            self.task.cancel()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if self.exchange.on_disconnect == self._fire:
            self.exchange.on_disconnect = None
        if self.fired and kind is asyncio.CancelledError and self.task is not None:
            self.task.uncancel()
            return True  # our own cancellation: the client is gone, the request is over
        return False

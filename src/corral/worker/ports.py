"""Hands out TCP ports to backend processes: free now, one replica each, not reused soon."""

from __future__ import annotations

import random
import socket
import time
from collections.abc import Callable

from corral.errors import NoCapacity


class PortAllocator:
    """Allocates ports from `low`..`high` (inclusive) on `host`.

    A port is handed out only when a bind test succeeds, it is not held by a live replica, and it
    was not released less than `quarantine` seconds ago (so a dying backend's socket and stray
    clients of the old replica never meet a new one on the same port). The search starts after the
    last port handed out, so ports rotate through the range instead of being reused first; the
    first search starts at a random port, so several allocators sharing a range (several workers
    on one host) rarely race for the same port between the bind test and the backend's bind.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        low: int = 20000,
        high: int = 29999,
        quarantine: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 < low <= high <= 65535:
            raise ValueError(f"invalid port range {low}-{high}")
        self.host = host
        self.low = low
        self.high = high
        self.quarantine = quarantine
        self._clock = clock
        self._in_use: set[int] = set()
        self._released: dict[int, float] = {}  # port -> clock() when released
        self._cursor: int | None = None  # next port to try; random at first

    @property
    def in_use(self) -> frozenset[int]:
        """Ports handed out and not released yet."""
        return frozenset(self._in_use)

    def allocate(self) -> int:
        """Return a port that is free now; raise `NoCapacity` when the whole range is taken."""
        now = self._clock()
        self._released = {p: t for p, t in self._released.items() if now - t < self.quarantine}
        size = self.high - self.low + 1
        if self._cursor is None:
            self._cursor = random.randint(self.low, self.high)
        for step in range(size):
            port = self.low + (self._cursor - self.low + step) % size
            if port in self._in_use or port in self._released:
                continue
            if not self._bindable(port):
                continue
            self._in_use.add(port)
            self._cursor = port + 1 if port < self.high else self.low
            return port
        raise NoCapacity(
            f"no free port in {self.low}-{self.high} on {self.host} "
            f"({len(self._in_use)} in use, {len(self._released)} in quarantine)"
        )

    def release(self, port: int) -> None:
        """Give `port` back; it is handed out again only after the quarantine. Unknown ports are
        ignored, so releasing twice is harmless."""
        if port in self._in_use:
            self._in_use.discard(port)
            self._released[port] = self._clock()

    def _bindable(self, port: int) -> bool:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                sock.bind((self.host, port))
        except OSError:
            return False
        return True

"""Health probe cache per (node, address): a TTL on success, concurrent probes collapsed into one.

A probe asks the backend for `/v1/models` and checks that it still serves the model, so a
process that is alive but lost its model counts as gone. Failures are never cached.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import orjson

from corral.errors import CorralError
from corral.frontend.upstream import UpstreamPool


class ProbeCache:
    """Remembers which backends answered recently; probes the others, once at a time each."""

    def __init__(
        self,
        pool: UpstreamPool,
        *,
        ttl: float = 30.0,
        timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pool = pool
        self.ttl = ttl
        self.timeout = timeout
        self.clock = clock
        self._ok_until: dict[tuple[str, str], float] = {}
        self._running: dict[tuple[str, str], asyncio.Future[str | None]] = {}
        self.probes = 0  # probes actually sent (for tests and metrics)

    def fresh(self, node_id: str, address: str) -> bool:
        return self._ok_until.get((node_id, address), 0.0) > self.clock()

    def mark_ok(self, node_id: str, address: str) -> None:
        """A request just succeeded there: as good as a probe."""
        self._ok_until[(node_id, address)] = self.clock() + self.ttl

    def forget(self, node_id: str, address: str) -> None:
        self._ok_until.pop((node_id, address), None)

    async def check(self, node_id: str, address: str, model: str) -> str | None:
        """None when the backend is fine, else the reason it is not (cached successes only)."""
        key = (node_id, address)
        if self._ok_until.get(key, 0.0) > self.clock():
            return None
        running = self._running.get(key)
        if running is None:
            running = asyncio.ensure_future(self._probe(address, model))
            self._running[key] = running
            running.add_done_callback(lambda _: self._running.pop(key, None))
        reason = await asyncio.shield(running)
        if reason is None:
            self._ok_until[key] = self.clock() + self.ttl
        return reason

    async def _probe(self, address: str, model: str) -> str | None:
        self.probes += 1
        try:
            response = await self.pool.request(address, b"GET", b"/v1/models", timeout=self.timeout)
            body = await response.read()
        except CorralError as exc:
            return exc.message
        if response.status != 200:
            return f"probe answered HTTP {response.status}"
        try:
            data = orjson.loads(body).get("data")
        except (orjson.JSONDecodeError, AttributeError):
            return None  # not a standard /v1/models, but alive
        if isinstance(data, list):
            ids = {m.get("id") for m in data if isinstance(m, dict)}
            if not ids:
                return f"model {model!r} is not loaded: the backend serves no model"
            if model not in ids:
                served = sorted(str(i) for i in ids)
                return f"model {model!r} is not loaded: the backend serves {served}"
        return None

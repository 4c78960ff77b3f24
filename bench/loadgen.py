"""The bench's load generator: closed-loop virtual users on keep-alive HTTP/1.1 connections.

Why not wrk or httpx: the client shares two cores with the proxy and the backend, so it must
cost as little CPU per request as possible, and the workloads need per-request latency, time
to first body byte, SSE event counts, per-backend dispatch (round robin, an oracle) and
reconnects after failures. A callback-driven `asyncio.Protocol` with httptools' C parser on
uvloop does all of that: a finished response writes the next request from inside the parser
callback, with no task switch and no per-request future.

Each virtual user has one connection per backend URL and exactly one request in flight.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httptools
import orjson

PROMPT = [{"role": "user", "content": "Say something about corrals."}]


def chat_body(model: str, *, stream: bool = False, max_tokens: int | None = None) -> bytes:
    body: dict[str, object] = {"model": model, "messages": PROMPT}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    if stream:
        body["stream"] = True
    return orjson.dumps(body)


def raw_post(url: str, path: str, body: bytes) -> tuple[str, int, bytes]:
    """(host, port, request bytes) for a POST of `body` to `url` + `path`."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    base = parts.path.rstrip("/")
    head = (
        f"POST {base}{path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return host, port, head.encode() + body


@dataclass
class Stats:
    """What one run measured; times in seconds."""

    elapsed: float = 0.0
    ok: int = 0
    errors: int = 0
    error_kinds: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)  # ok responses only
    ttfb: list[float] = field(default_factory=list)  # send -> first body byte, ok only
    done_at: list[float] = field(default_factory=list)  # completion time since start, ok only
    failed_at: list[float] = field(default_factory=list)
    events: int = 0  # SSE events in ok responses
    per_backend: Counter[int] = field(default_factory=Counter)

    @property
    def rps(self) -> float:
        return self.ok / self.elapsed if self.elapsed else 0.0

    @property
    def events_per_s(self) -> float:
        return self.events / self.elapsed if self.elapsed else 0.0

    def pct(self, q: float, of: str = "latencies") -> float:
        values = sorted(getattr(self, of))
        if not values:
            return math.nan
        return values[min(len(values) - 1, int(len(values) * q))]


class _Conn(asyncio.Protocol):
    def __init__(self, user: _User, backend: int) -> None:
        self.user = user
        self.backend = backend
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.busy = False
        self.t0 = 0.0
        self.first = 0.0
        self.events = 0
        self.nl = False
        self.status = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, raw: bytes) -> None:
        self.busy = True
        self.first = 0.0
        self.events = 0
        self.nl = False
        self.status = 0
        self.t0 = time.perf_counter()
        assert self.transport is not None
        self.transport.write(raw)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.abort()

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        if not self.first:
            self.first = time.perf_counter()
        n = body.count(b"\n\n")
        if self.nl and body[:1] == b"\n":
            n += 1
        self.nl = body[-1:] == b"\n"
        self.events += n

    def on_message_complete(self) -> None:
        if self.busy:
            self.busy = False
            self.user.complete(self, time.perf_counter())

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.busy:
            self.busy = False
            self.user.failed(self, "connection lost")


class _User:
    def __init__(self, run: Run, backends: int) -> None:
        self.run = run
        self.conns: list[_Conn | None] = [None] * backends
        self.done = False

    async def connect(self, b: int) -> _Conn:
        host, port, _ = self.run.targets[b]
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(lambda: _Conn(self, b), host, port)
        self.conns[b] = conn
        return conn

    def fire(self) -> None:
        run = self.run
        if run.stopping or not run.take():
            self._finish()
            return
        b = run.choose()
        conn = self.conns[b]
        if conn is None or conn.transport is None or conn.transport.is_closing():
            self.conns[b] = None
            run.spawn(self._reconnect_and_send(b))
            return
        run.inflight[b] += 1
        conn.send(run.targets[b][2])

    async def _reconnect_and_send(self, b: int) -> None:
        run = self.run
        try:
            conn = await asyncio.wait_for(self.connect(b), 5)
        except (OSError, TimeoutError) as exc:
            run.error(f"connect: {type(exc).__name__}")
            await asyncio.sleep(0.05)
            self.fire()
            return
        run.inflight[b] += 1
        conn.send(run.targets[b][2])

    def complete(self, conn: _Conn, now: float) -> None:
        run = self.run
        run.inflight[conn.backend] -= 1
        if conn.status == 200:
            s = run.stats
            s.ok += 1
            s.latencies.append(now - conn.t0)
            s.ttfb.append((conn.first or now) - conn.t0)
            s.done_at.append(now - run.started)
            s.events += conn.events
            s.per_backend[conn.backend] += 1
        else:
            run.error(f"HTTP {conn.status}")
        self.fire()

    def failed(self, conn: _Conn, why: str) -> None:
        run = self.run
        run.inflight[conn.backend] -= 1
        self.conns[conn.backend] = None
        run.error(why)
        self.fire()

    def _finish(self) -> None:
        if not self.done:
            self.done = True
            self.run.user_done()


class Run:
    """One closed-loop run: `users` virtual users until `duration` passes or `count` are sent.

    `targets` are base URLs; with several, `policy` picks one per request: "rr" (round
    robin) or "oracle" (shortest expected delay from known service times `service` and
    `slots` parallel slots per backend, using this client's exact in-flight counts).
    """

    def __init__(
        self,
        urls: Sequence[str],
        body: bytes,
        *,
        users: int,
        duration: float | None = None,
        count: int | None = None,
        path: str = "/v1/chat/completions",
        policy: str = "first",
        service: Sequence[float] = (),
        slots: Sequence[int] = (),
    ) -> None:
        self.targets = [raw_post(u, path, body) for u in urls]
        self.users = users
        self.duration = duration
        self.count = count
        self.policy = policy
        self.service = list(service)
        self.slots = list(slots)
        self.inflight = [0] * len(urls)
        self.stats = Stats()
        self.started = 0.0
        self.deadline = math.inf
        self.issued = 0
        self.stopping = False
        self._rr = 0
        self._alive = 0
        self._done: asyncio.Future[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._users: list[_User] = []

    def take(self) -> bool:
        if self.count is not None:
            if self.issued >= self.count:
                return False
            self.issued += 1
            return True
        return time.perf_counter() < self.deadline

    def choose(self) -> int:
        n = len(self.targets)
        if n == 1:
            return 0
        if self.policy == "rr":
            self._rr = (self._rr + 1) % n
            return self._rr
        if self.policy == "oracle":
            best, best_key = 0, (math.inf, math.inf)
            for b in range(n):
                s = self.service[b]
                key = (s * (self.inflight[b] // self.slots[b] + 1), s)
                if key < best_key:
                    best, best_key = b, key
            return best
        raise ValueError(f"unknown policy {self.policy}")

    def error(self, kind: str) -> None:
        self.stats.errors += 1
        self.stats.error_kinds[kind] += 1
        self.stats.failed_at.append(time.perf_counter() - self.started)

    def spawn(self, coro: object) -> None:
        task = asyncio.ensure_future(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def user_done(self) -> None:
        self._alive -= 1
        if self._alive == 0 and self._done is not None and not self._done.done():
            self._done.set_result(None)

    async def run(self, *, grace: float = 30.0) -> Stats:
        loop = asyncio.get_running_loop()
        self._done = loop.create_future()
        self._users = [_User(self, len(self.targets)) for _ in range(self.users)]
        for b in range(len(self.targets)):
            await asyncio.gather(*(u.connect(b) for u in self._users))
        self.started = time.perf_counter()
        if self.duration is not None:
            self.deadline = self.started + self.duration
        self._alive = len(self._users)
        for u in self._users:
            u.fire()
        limit = (self.duration or 0) + grace
        if self.count is not None:
            limit += self.count * 0.05
        try:
            await asyncio.wait_for(asyncio.shield(self._done), limit)
        except TimeoutError:
            self.stopping = True
            stuck = sum(self.inflight)
            for _ in range(stuck):
                self.error("timeout")
        self.stats.elapsed = time.perf_counter() - self.started
        self.stopping = True
        for u in self._users:
            for c in u.conns:
                if c is not None and c.transport is not None:
                    c.busy = False
                    c.transport.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.sleep(0)
        return self.stats


async def run_load(urls: Sequence[str] | str, body: bytes, **kw: object) -> Stats:
    if isinstance(urls, str):
        urls = [urls]
    return await Run(urls, body, **kw).run()  # type: ignore[arg-type]


async def first_byte(url: str, body: bytes, timeout: float = 120.0) -> tuple[int, float, float]:
    """Send one request on a fresh connection: (status, seconds to first body byte, total)."""
    host, port, raw = raw_post(url, "/v1/chat/completions", body)
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    class _One(_Conn):
        def on_message_complete(self) -> None:
            self.busy = False
            if not done.done():
                done.set_result(None)

        def connection_lost(self, exc: Exception | None) -> None:
            if not done.done():
                done.set_exception(ConnectionError("connection lost"))

    t0 = time.perf_counter()
    transport, conn = await loop.create_connection(lambda: _One(None, 0), host, port)  # type: ignore[arg-type]
    try:
        conn.send(raw)
        conn.t0 = t0
        await asyncio.wait_for(done, timeout)
        end = time.perf_counter()
        return conn.status, (conn.first or end) - t0, end - t0
    finally:
        transport.close()


def _main() -> None:
    """One load process of a multi-process run (bench/scaling.py): prints its stats as JSON."""
    import argparse
    import sys

    import uvloop

    p = argparse.ArgumentParser()
    p.add_argument("--url", action="append", required=True)
    p.add_argument("--model", default="bench")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--users", type=int, required=True)
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--policy", default="first")
    p.add_argument("--start-at", type=float, default=0.0, help="time.time() to start firing")
    args = p.parse_args()
    body = chat_body(args.model, max_tokens=args.max_tokens)

    async def go() -> Stats:
        run = Run(args.url, body, users=args.users, duration=args.seconds, policy=args.policy)
        delay = args.start_at - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        return await run.run()

    s = uvloop.run(go())
    lat = sorted(s.latencies)
    step = max(1, len(lat) // 2000)
    out = {
        "ok": s.ok,
        "errors": s.errors,
        "error_kinds": dict(s.error_kinds),
        "elapsed": s.elapsed,
        "latencies": lat[::step],
    }
    sys.stdout.write(orjson.dumps(out).decode() + "\n")


if __name__ == "__main__":
    _main()

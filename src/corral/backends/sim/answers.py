"""Answers: writes whole and streamed answers, paced by the fixed timings or the engine model,
and counts requests and concurrency (now and peak).

Fixed timings (`--ttft`, `--tpot`): an answer with zero timings is returned as bytes and
written from the parser callback (the fast path: nothing here costs more than a counter);
otherwise a coroutine sleeps against absolute deadlines.

The engine model (`--slots` > 0): every generation is an `EngineRequest` in the pure
`EngineModel`; one loop timer fires when the model's next event is due, advances it and wakes
the coroutines whose requests emitted or finished. As in vLLM, nothing of a streamed answer
is sent before its first token; its events are built then, when its cached tokens are known.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from corral.backends.sim.config import SimConfig
from corral.backends.sim.engine import StreamEvents
from corral.backends.sim.protocol import CRLF, LAST_CHUNK, SSE, Heads, HttpConnection, Reply, frame
from corral.backends.sim.scheduler import EngineModel, EngineParams, EngineRequest, EngineStats


class _Run:
    """A coroutine waiting on an engine request: woken when it has something to write."""

    __slots__ = ("stream", "waiter")

    def __init__(self, stream: bool) -> None:
        self.stream = stream
        self.waiter: asyncio.Future[None] | None = None


def engine_params(config: SimConfig) -> EngineParams:
    """The engine model's parameters from the config (ttft and tpot add as fixed costs)."""
    return EngineParams(
        slots=config.slots,
        prefill_base=config.ttft,
        prefill_per_token=config.prefill_per_token,
        decode_base=config.tpot + config.decode_base,
        decode_slope=config.decode_slope,
        cache_blocks=config.cache_blocks,
        block_tokens=config.block_tokens,
    )


class Answers:
    """Writes answers for one server and keeps its request and concurrency counters."""

    def __init__(self, config: SimConfig, heads: Heads, model: EngineModel | None) -> None:
        self._config = config
        self._heads = heads
        self.model = model
        self.requests = 0  # answers begun with 200
        self.inflight = 0  # answers waiting, queued, running or streaming now
        self.peak = 0  # most answers in flight at once since start or reset_peak()
        self._runs: dict[EngineRequest, _Run] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_due = 0.0

    def reset_peak(self) -> None:
        """Count the peaks again from what is in flight now."""
        self.peak = self.inflight
        if self.model is not None:
            self.model.reset_peak()

    def engine_stats(self) -> EngineStats | None:
        return None if self.model is None else self.model.stats()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _enter(self) -> None:
        self.inflight += 1
        if self.inflight > self.peak:
            self.peak = self.inflight

    # --- fixed timings ---------------------------------------------------------------------

    def whole(
        self,
        payload: bytes,
        tokens: int,
        conn_header: bytes,
        conn: HttpConnection,
        content_type: bytes | None = None,
    ) -> Reply:
        """A whole answer (JSON unless `content_type` says otherwise): now, or after ttft +
        tpot per further token in one sleep."""
        delay = self._config.ttft + self._config.tpot * max(tokens - 1, 0)
        if delay > 0:
            return self._whole_later(delay, payload, conn_header, conn, content_type)
        self.requests += 1
        if not self.peak:
            self.peak = 1
        if content_type is None:
            return self._heads.ok_json(payload, conn_header)
        return self._whole(payload, conn_header, content_type)

    def _whole(self, payload: bytes, conn_header: bytes, content_type: bytes | None) -> bytes:
        if content_type is None or content_type == b"application/json":
            return self._heads.ok_json(payload, conn_header)
        return self._heads.ok(content_type, payload, conn_header)

    async def _whole_later(
        self,
        delay: float,
        payload: bytes,
        conn_header: bytes,
        conn: HttpConnection,
        content_type: bytes | None,
    ) -> None:
        self._enter()
        try:
            await asyncio.sleep(delay)
            self.requests += 1
            conn.write(self._whole(payload, conn_header, content_type))
        finally:
            self.inflight -= 1

    def stream(
        self,
        events: StreamEvents,
        conn_header: bytes,
        conn: HttpConnection,
        content_type: bytes = SSE,
    ) -> Reply:
        """A chunked answer (SSE events, audio chunks): at once with zero timings, else paced:
        ttft before the first of `events.tokens`, tpot between them."""
        if self._config.ttft > 0 or self._config.tpot > 0:
            return self._stream_later(events, conn_header, conn, content_type)
        self.requests += 1
        if not self.peak:
            self.peak = 1
        out = [self._heads.chunked(content_type), conn_header, CRLF]
        frame(events.head, out)
        frame(events.tokens, out)
        frame(events.tail, out)
        out.append(LAST_CHUNK)
        return b"".join(out)

    async def _stream_later(
        self, events: StreamEvents, conn_header: bytes, conn: HttpConnection, content_type: bytes
    ) -> None:
        ttft, tpot = self._config.ttft, self._config.tpot
        self._enter()
        try:
            self.requests += 1
            out = [self._heads.chunked(content_type), conn_header, CRLF]
            frame(events.head, out)
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
            frame(events.tail, out)
            out.append(LAST_CHUNK)
            conn.write(b"".join(out))
        finally:
            self.inflight -= 1

    # --- the engine model ------------------------------------------------------------------

    async def engine_whole(
        self,
        prompt: bytes,
        output_tokens: int,
        build: Callable[[EngineRequest], bytes],
        conn_header: bytes,
        conn: HttpConnection,
    ) -> None:
        """A whole answer once the engine model finished the request; `build` makes the body."""
        model = self.model
        assert model is not None
        req = model.request(prompt, output_tokens)
        run = _Run(stream=False)
        loop = asyncio.get_running_loop()
        self._enter()
        self._runs[req] = run
        try:
            self._submit(req, loop)
            while not req.done:
                run.waiter = loop.create_future()
                await run.waiter
            self.requests += 1
            conn.write(self._heads.ok_json(build(req), conn_header))
        finally:
            self._finish(req, loop)

    async def engine_stream(
        self,
        prompt: bytes,
        output_tokens: int,
        build: Callable[[EngineRequest], StreamEvents],
        conn_header: bytes,
        conn: HttpConnection,
    ) -> None:
        """A streamed answer, one event per token as the engine model emits it."""
        model = self.model
        assert model is not None
        req = model.request(prompt, output_tokens)
        run = _Run(stream=True)
        loop = asyncio.get_running_loop()
        self._enter()
        self._runs[req] = run
        try:
            self._submit(req, loop)
            events: StreamEvents | None = None
            sent = 0
            while True:
                if req.emitted > sent or req.done:
                    out: list[bytes] = []
                    if events is None:  # the first token (or the end): the answer begins
                        events = build(req)
                        self.requests += 1
                        out += (self._heads.chunked(SSE), conn_header, CRLF)
                        frame(events.head, out)
                    frame(events.tokens[sent : req.emitted], out)
                    sent = req.emitted
                    if req.done:
                        frame(events.tail, out)
                        out.append(LAST_CHUNK)
                    conn.write(b"".join(out))
                    if req.done:
                        return
                    await conn.drain()
                    continue
                run.waiter = loop.create_future()
                await run.waiter
        finally:
            self._finish(req, loop)

    def _submit(self, req: EngineRequest, loop: asyncio.AbstractEventLoop) -> None:
        assert self.model is not None
        self._wake(self.model.submit(req, loop.time()))
        self._schedule(loop)

    def _finish(self, req: EngineRequest, loop: asyncio.AbstractEventLoop) -> None:
        self._runs.pop(req, None)
        self.inflight -= 1
        if not req.done and self.model is not None:  # cancelled: its client left or we stop
            self._wake(self.model.cancel(req, loop.time()))
            self._schedule(loop)

    def _wake(self, changed: list[EngineRequest]) -> None:
        for req in changed:
            run = self._runs.get(req)
            if run is None or not (run.stream or req.done):
                continue
            waiter = run.waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        assert self.model is not None
        due = self.model.next_due()
        timer = self._timer
        if due is None:
            if timer is not None:
                timer.cancel()
                self._timer = None
            return
        if timer is not None:
            if self._timer_due <= due:
                return  # it fires first; the tick schedules the next
            timer.cancel()
        self._timer_due = due
        self._timer = loop.call_at(due, self._tick, loop)

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        assert self.model is not None
        self._timer = None
        # Timers may fire up to the clock resolution early: the due time counts as reached.
        now = max(loop.time(), self._timer_due)
        self._wake(self.model.advance(now))
        self._schedule(loop)

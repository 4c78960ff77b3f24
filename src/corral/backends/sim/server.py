"""SimServer: the simulator's process-level state, lifecycle and dispatch, over the HTTP
layer in protocol.py; the inference routes are in endpoints.py.

Besides those it answers /health, /v1/models, /metrics (vLLM's gauge names) and the /admin
switches and stats.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable
from typing import Any

import orjson

from corral.backends.sim.answers import Answers, engine_params
from corral.backends.sim.config import SimConfig
from corral.backends.sim.endpoints import (
    RESPONSE_PATH,
    Endpoints,
    Handler,
    MethodNotAllowed,
    ModelState,
)
from corral.backends.sim.engine import SimEngine
from corral.backends.sim.metrics import CONTENT_TYPE as METRICS_TYPE
from corral.backends.sim.metrics import prometheus
from corral.backends.sim.protocol import CRLF, Heads, HttpConnection, Reply, Request
from corral.backends.sim.scheduler import EngineModel
from corral.errors import BadRequest, CorralError, NotFound, PayloadTooLarge

log = logging.getLogger(__name__)

_CLOSE_GRACE = 2.0  # seconds stop() lets connections flush before aborting them
_GET = b"GET"
_POST = b"POST"


class SimServer:
    """The simulator backend: binds at `start()`, serves until `stop()`."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self._engine = SimEngine(config)
        self._heads = Heads.for_fingerprint(config.system_fingerprint)
        model = EngineModel(engine_params(config)) if config.engine_model else None
        self._answers = Answers(config, self._heads, model)
        self._state = ModelState(loaded=not config.unloaded)
        self._endpoints = Endpoints(config, self._state, self._engine, self._answers, self._heads)
        self._server: asyncio.Server | None = None
        self._load_timer: asyncio.TimerHandle | None = None
        self._connections: set[HttpConnection] = set()
        self._all_closed: asyncio.Event | None = None  # set by stop(), fired when none is left
        admin: dict[bytes, Handler] = {
            b"/admin/load": self._admin_load,
            b"/admin/unload": self._admin_unload,
            b"/admin/reset-peak": self._admin_reset_peak,
        }
        get: dict[bytes, Handler] = {
            b"/health": self._health,
            b"/v1/models": self._models,
            b"/metrics": self._metrics,
            b"/admin/stats": self._admin_stats,
        }
        self._routes: dict[bytes, tuple[bytes, Handler]] = {
            **{path: (_POST, h) for path, h in self._endpoints.routes().items()},
            **{path: (_POST, h) for path, h in admin.items()},
            **{path: (_GET, h) for path, h in get.items()},
        }

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> int:
        """Bind and start serving; return the bound port (useful with port 0)."""
        if self._server is not None:
            raise RuntimeError("SimServer already started")
        self.config.validate()
        loop = asyncio.get_running_loop()
        self._endpoints.start()
        if self.config.load_time > 0:
            self._state.loading = True
            self._load_timer = loop.call_later(self.config.load_time, self._finish_loading)
        try:
            self._server = await loop.create_server(
                lambda: HttpConnection(self),
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

    @property
    def max_body(self) -> int:
        return self.config.max_body

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
        self._answers.stop()
        if self._connections:
            try:
                await asyncio.wait_for(self._all_closed.wait(), _CLOSE_GRACE)
            except TimeoutError:  # a client that does not read: drop it
                for conn in list(self._connections):
                    conn.abort()
        await server.wait_closed()

    def stats(self) -> dict[str, Any]:
        """What `GET /admin/stats` answers: model state, request and concurrency counters
        (`peak_inflight` since start or the last reset-peak), and the engine model's figures
        (`engine`, null when it is off)."""
        a = self._answers
        engine = a.engine_stats()
        return {
            "model": self.config.model,
            "loaded": self._state.loaded and not self._state.loading,
            "loading": self._state.loading,
            "requests": a.requests,
            "inflight": a.inflight,
            "peak_inflight": a.peak,
            "fingerprint": self._engine.fingerprint,
            "engine": None if engine is None else engine.as_dict(),
        }

    @property
    def open_connections(self) -> int:
        """Client connections currently open."""
        return len(self._connections)

    def _finish_loading(self) -> None:
        self._state.loading = False
        self._load_timer = None

    def connection_opened(self, conn: HttpConnection) -> None:
        self._connections.add(conn)

    def connection_closed(self, conn: HttpConnection) -> None:
        self._connections.discard(conn)
        if not self._connections and self._all_closed is not None:
            self._all_closed.set()

    # --- dispatch --------------------------------------------------------------------------

    def respond(self, req: Request, conn: HttpConnection) -> Reply:
        """The answer to one request: response bytes, or a coroutine that writes it later."""
        try:
            if req.parse_error:
                raise BadRequest("malformed HTTP request")
            route = self._routes.get(req.path)
            if route is None:
                if req.path.startswith(RESPONSE_PATH):
                    return self._endpoints.response_by_id(req)
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
            extra = b"allow: " + allow + CRLF
        if exc.retry_after is not None:
            extra += b"retry-after: %d\r\n" % max(1, round(exc.retry_after))
        return self._heads.json_status(exc.status, body, conn, extra)

    # --- plain endpoints -------------------------------------------------------------------

    def _health(self, req: Request, conn: HttpConnection) -> Reply:
        if self._state.loading:
            return self._heads.json_status(
                503, b'{"status":"loading"}', req.conn, b"retry-after: 1\r\n"
            )
        return self._heads.ok_json(b'{"status":"ok"}', req.conn)

    def _models(self, req: Request, conn: HttpConnection) -> Reply:
        data: list[dict[str, Any]] = []
        if self._state.loaded and not self._state.loading:
            data.append(
                {
                    "id": self.config.model,
                    "object": "model",
                    "created": int(time.time()),
                    "owned_by": "corral-sim",
                }
            )
        return self._heads.ok_json(orjson.dumps({"object": "list", "data": data}), req.conn)

    def _metrics(self, req: Request, conn: HttpConnection) -> Reply:
        a = self._answers
        engine = a.engine_stats()
        body = prometheus(
            self.config.model,
            running=a.inflight if engine is None else engine.running,
            waiting=0 if engine is None else engine.waiting,
            kv_cache_usage=0.0 if engine is None else engine.kv_cache_usage,
            prefix_queries=0 if engine is None else engine.prefix_cache_queries,
            prefix_hits=0 if engine is None else engine.prefix_cache_hits,
            requests=a.requests,
        )
        return self._heads.ok(METRICS_TYPE, body, req.conn)

    def _stats(self, req: Request) -> bytes:
        return self._heads.ok_json(orjson.dumps(self.stats()), req.conn)

    def _admin_load(self, req: Request, conn: HttpConnection) -> Reply:
        self._state.loaded = True
        return self._stats(req)

    def _admin_unload(self, req: Request, conn: HttpConnection) -> Reply:
        self._state.loaded = False
        return self._stats(req)

    def _admin_stats(self, req: Request, conn: HttpConnection) -> Reply:
        return self._stats(req)

    def _admin_reset_peak(self, req: Request, conn: HttpConnection) -> Reply:
        self._answers.reset_peak()
        return self._stats(req)


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

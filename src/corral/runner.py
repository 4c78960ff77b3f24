"""Running the processes: frontends on Corral's HTTP server, a worker, and `corral up`.

Signals are handled here, so shutdown happens in order: worker (backends stopped), frontend
children, this process's frontend, then the embedded NATS and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import secrets
import signal
import socket
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from corral.config import FrontendSettings, WorkerSettings

if TYPE_CHECKING:  # imported lazily: a worker never loads the frontend's libraries
    from corral.frontend.http import HttpServer
    from corral.frontend.service import Frontend
    from corral.frontends import FrontendGroup
    from corral.worker.agent import Agent

log = logging.getLogger(__name__)


def install_stop_handler(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)


def listen(host: str, port: int, processes: int = 1) -> socket.socket:
    """The frontends' socket, bound now: `corral up` binds it before anything else starts, so
    a port in use is one ListenError, not a server that fails half-way up."""
    from corral.frontend.http import bind_socket

    return bind_socket(host, port, reuse_port=processes > 1)


class FrontendProcess:
    """One frontend on Corral's own HTTP server, in this process.

    `start()` runs the app's lifespan (which starts the frontend: migrations, bus, loops),
    then listens on `sock` (or a socket bound from the settings); `stop()` undoes it.
    """

    def __init__(self, settings: FrontendSettings, *, sock: socket.socket | None = None) -> None:
        self.settings = settings
        self.sock = sock
        self.frontend: Frontend | None = None
        self.server: HttpServer | None = None

    async def start(self) -> None:
        from corral.frontend.app import create_app
        from corral.frontend.http import HttpLimits, HttpServer, bind_socket
        from corral.frontend.http.server import tls_context
        from corral.frontend.service import Frontend

        s = self.settings
        self.frontend = Frontend(s)
        app = create_app(self.frontend)
        limits = HttpLimits(
            header_timeout=s.header_timeout,
            body_timeout=s.body_timeout,
            body_min_rate=s.body_min_rate,
            keep_alive_timeout=s.keep_alive_timeout,
            shutdown_timeout=s.shutdown_timeout,
        )
        tls = tls_context(s.tls_cert, s.tls_key) if s.tls_cert and s.tls_key else None
        self.server = HttpServer(
            app,
            native=app.native_routes(),
            native_prefixes=app.native_prefixes(),
            limits=limits,
            ssl_context=tls,
            max_body_bytes=s.max_body_bytes,
        )
        await self.server.startup()
        try:
            sock = self.sock or bind_socket(s.host, s.port, reuse_port=s.processes > 1)
            await self.server.start(sock)
        except BaseException:
            await self.server.shutdown()
            raise

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.port

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop()
            await self.server.shutdown()


class Frontends:
    """`settings.processes` frontends on one port: one in this process, the others children
    (`corral.frontends.FrontendGroup`), each a full frontend with its own id."""

    def __init__(self, settings: FrontendSettings, *, sock: socket.socket | None = None) -> None:
        self.settings = settings
        self.primary = FrontendProcess(settings, sock=sock)  # None: `start` binds one
        self.group: FrontendGroup | None = None

    async def start(self) -> None:
        from corral.frontends import FrontendGroup

        s = self.settings
        if self.primary.sock is None:
            self.primary.sock = listen(s.host, s.port, s.processes)
        await self.primary.start()
        if s.processes > 1:
            self.group = FrontendGroup(s, port=self.port, children=s.processes - 1)
            try:
                await self.group.start()
            except BaseException:
                await self.stop()
                raise

    @property
    def port(self) -> int:
        return self.primary.port

    @property
    def url(self) -> str:
        host = self.settings.host
        host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        return f"{self.settings.scheme}://{host}:{self.port}"

    async def stop(self) -> None:
        """Children first, then this process's frontend."""
        if self.group is not None:
            await self.group.stop()
        await self.primary.stop()


async def serve_frontend(settings: FrontendSettings, stop: asyncio.Event) -> None:
    """Run `settings.processes` frontends until `stop` is set."""
    frontends = Frontends(settings)
    await frontends.start()
    try:
        settle_heap()
        log.info(
            "frontend listening on %s (%d process%s)",
            frontends.url,
            settings.processes,
            "es" if settings.processes > 1 else "",
        )
        await stop.wait()
    finally:
        await frontends.stop()


async def serve_worker(agent: Agent, stop: asyncio.Event) -> None:
    await agent.start()
    await stop.wait()
    await agent.stop(drain=True)


def make_agent(settings: WorkerSettings) -> Agent:
    """A worker agent with the built-in catalog plus the settings' backends directory."""
    from corral.backends.catalog import Catalog
    from corral.worker.agent import Agent

    catalog = Catalog.builtin().with_dir(settings.backends_dir)
    return Agent(settings, catalog=catalog)


def settle_heap() -> None:
    """Move start-up objects out of the collector's way: a full collection then scans only
    what requests allocate, which keeps the proxy's tail latency down."""
    gc.collect()
    gc.freeze()


def run_async(main: Callable[[], Any]) -> None:
    """Run `main()` on uvloop when available."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        asyncio.run(main())
    else:
        uvloop.run(main())


def read_or_create_token(path: Path) -> str:
    """The cluster token `corral up` keeps in its data dir (created once, mode 600)."""
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(24)
    path.touch(mode=0o600)
    path.write_text(token + "\n")
    return token

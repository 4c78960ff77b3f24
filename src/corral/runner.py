"""Running the processes: a frontend under uvicorn, a worker, and `corral up` (all in one).

Signals are handled here, not by uvicorn, so shutdown happens in order: worker (backends
stopped), frontend, then the embedded NATS and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import logging
import secrets
import signal
import socket
from collections.abc import Callable, Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvicorn

from corral.config import FrontendSettings, WorkerSettings
from corral.errors import ListenError

if TYPE_CHECKING:  # imported lazily: a worker never loads the frontend's libraries
    from corral.frontend.service import Frontend
    from corral.worker.agent import Agent

log = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling (the runner owns signals)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def install_stop_handler(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)


def listen(host: str, port: int) -> socket.socket:
    """The frontend's listening socket, bound now, before anything else starts: a port that is
    taken is one clear ListenError instead of a server that fails half-way up."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise ListenError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ListenError(
                f"port {port} on {host} is already in use: stop what listens there, "
                "or choose another --port"
            ) from None
        raise ListenError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock


def frontend_server(settings: FrontendSettings) -> tuple[Frontend, _Server]:
    from corral.frontend.app import create_app
    from corral.frontend.service import Frontend

    frontend = Frontend(settings)
    config = uvicorn.Config(
        create_app(frontend),
        host=settings.host,
        port=settings.port,
        http="httptools",
        loop="none",
        lifespan="on",
        log_level="warning",
        access_log=False,
        timeout_keep_alive=30,
        backlog=4096,
        proxy_headers=False,  # a middleware on every request; Corral does not use client IPs
        server_header=False,
        date_header=False,
    )
    server = _Server(config)
    return frontend, server


async def serve_frontend(
    settings: FrontendSettings, stop: asyncio.Event, sock: socket.socket
) -> None:
    """Run one frontend on `sock` (see `listen`) until `stop` is set."""
    _, server = frontend_server(settings)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    await _until_started(server, task)
    settle_heap()
    log.info("frontend listening on http://%s:%d", settings.host, settings.port)
    await _wait_either(stop, task)
    server.should_exit = True
    await task


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


async def _until_started(server: uvicorn.Server, task: asyncio.Task[None]) -> None:
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError("the frontend stopped during start-up")
        await asyncio.sleep(0.02)


async def _wait_either(stop: asyncio.Event, task: asyncio.Task[None]) -> None:
    waiter = asyncio.create_task(stop.wait())
    await asyncio.wait({waiter, task}, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()


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

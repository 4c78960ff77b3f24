"""HttpServer: listening sockets (SO_REUSEPORT for several processes), TLS, the deadline sweep,
routing between native handlers and the ASGI app, and an orderly stop."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from corral.errors import ListenError
from corral.frontend.asgi import Scope
from corral.frontend.http.asgi_bridge import AsgiApp, AsgiBridge, Lifespan
from corral.frontend.http.protocol import Handler, HttpConnection
from corral.frontend.http.request import Request
from corral.frontend.http.request_id import RequestIds

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HttpLimits:
    """How long and how much a client may take (seconds, bytes per second)."""

    header_timeout: float = 10.0  # request line and headers, from the first byte (or accept)
    body_timeout: float = 30.0  # request body, extended while it moves at body_min_rate
    body_min_rate: float = 1024.0  # bytes/s a body must average per body_timeout window
    keep_alive_timeout: float = 30.0  # an idle keep-alive connection then closes
    shutdown_timeout: float = 10.0  # requests in progress get this long at stop()


def bind_socket(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A bound TCP socket (not yet listening) for `host`:`port`; ListenError, in words a user
    can act on, when the port is taken or the address cannot be used.

    With `reuse_port`, several processes bind the same port and the kernel spreads new
    connections over them.
    """
    try:
        return _bind(host, port, reuse_port)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise ListenError(
                f"port {port} on {host} is already in use: stop what listens there, "
                "or choose another --port"
            ) from None
        reason = exc.strerror or str(exc)
        raise ListenError(f"cannot listen on {host}:{port}: {reason}") from None


def _bind(host: str, port: int, reuse_port: bool) -> socket.socket:
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server TLS context (TLS 1.2 or newer) with this certificate chain and key."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(cert), str(key))
    return context


class HttpServer:
    """Serves `native` paths with their handlers and everything else with the ASGI `app`."""

    def __init__(
        self,
        app: AsgiApp,
        *,
        native: Mapping[bytes, Handler] | None = None,
        native_prefixes: Sequence[tuple[bytes, Handler]] = (),
        limits: HttpLimits | None = None,
        ssl_context: ssl.SSLContext | None = None,
        max_body_bytes: int = 32 * 1024 * 1024,
    ) -> None:
        self.app = app
        self.native = dict(native or {})
        self.native_prefixes = tuple(native_prefixes)  # (prefix, handler): paths below prefix
        self.limits = limits or HttpLimits()
        self.ssl_context = ssl_context
        self.max_body_bytes = max_body_bytes
        self.request_ids = RequestIds()  # the id of each request (x-request-id)
        self.connections: set[HttpConnection] = set()
        self.stopping = False
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # set by start()
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._bridge: AsgiBridge | None = None
        self._lifespan: Lifespan | None = None
        self._quiet = asyncio.Event()  # set when a connection finished its work during stop()

    def connection_quiet(self) -> None:
        """A connection closed or finished its last request (stop() waits for these)."""
        if self.stopping:
            self._quiet.set()

    def route(self, req: Request) -> Handler:
        handler = self.native.get(req.path)
        if handler is not None:
            return handler
        path = req.path
        for prefix, below in self.native_prefixes:
            if path.startswith(prefix) and len(path) > len(prefix):
                return below
        assert self._bridge is not None
        return self._bridge

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def startup(self) -> None:
        """Run the app's lifespan start-up (FastAPI's lifespan starts the frontend)."""
        self.loop = asyncio.get_running_loop()
        self._lifespan = Lifespan(self.app)
        await self._lifespan.startup()

    async def start(self, sock: socket.socket, *, backlog: int = 4096) -> None:
        """Listen on `sock` (from `bind_socket`) and serve until `stop()`."""
        self.loop = asyncio.get_running_loop()
        state = self._lifespan.state if self._lifespan is not None else {}
        scope: Scope = {"scheme": "https" if self.ssl_context else "http", "state": state}
        self._bridge = AsgiBridge(self.app, scope, self.max_body_bytes)
        self._server = await self.loop.create_server(
            lambda: HttpConnection(self),
            sock=sock,
            backlog=backlog,
            ssl=self.ssl_context,
            ssl_handshake_timeout=self.limits.header_timeout if self.ssl_context else None,
        )
        self._sweeper = self.loop.create_task(self._sweep(), name="http-deadlines")

    async def _sweep(self) -> None:
        limits = self.limits
        shortest = min(limits.header_timeout, limits.body_timeout, limits.keep_alive_timeout)
        interval = min(0.5, max(0.02, shortest / 8))
        while True:
            await asyncio.sleep(interval)
            now = self.loop.time()
            for conn in [c for c in self.connections if c.deadline <= now]:
                try:
                    conn.expire(now)
                except Exception:  # one broken connection must not stop the sweep
                    log.exception("deadline check failed")
                    conn.close()

    async def stop(self) -> None:
        """Stop accepting, close idle connections, give requests in progress
        `shutdown_timeout` to finish, close what is left, then run the lifespan shutdown."""
        self.stopping = True
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            if conn.idle:
                conn.close()
        deadline = self.loop.time() + self.limits.shutdown_timeout
        while any(not c.idle for c in self.connections):
            left = deadline - self.loop.time()
            if left <= 0:
                break
            self._quiet.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._quiet.wait(), left)
        for conn in list(self.connections):
            conn.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
        await asyncio.sleep(0)  # let transports run connection_lost

    async def shutdown(self) -> None:
        if self._lifespan is not None:
            await self._lifespan.shutdown()

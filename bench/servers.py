"""The same Corral frontend under other HTTP servers, for `bench/run.py --servers`.

    python bench/servers.py uvicorn     # uvicorn, its httptools protocol tuned (below)
    python bench/servers.py uvicorn-stock
    python bench/servers.py granian     # needs `uv pip install granian` into .venv

Settings come from CORRAL_* variables, as for `corral serve`. This is an experiment kept to
re-run the comparison recorded in bench/RESULTS.md, not a supported way to run Corral: the
product serves on its own server (corral.frontend.http).

"Tuned" uvicorn: the issue's profile showed uvicorn writing a response's head and body with
two `write` calls. The tuned protocol holds the head back and writes it with the first body
message, so a whole response is one write, as on Corral's own server; everything else is
uvicorn's (one ASGI cycle object, scope and messages per request).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Generator
from typing import Any

import uvicorn
from uvicorn.protocols.http import httptools_impl

from corral.config import FrontendSettings
from corral.frontend.app import CorralApp, create_app
from corral.frontend.service import Frontend
from corral.runner import settle_heap


class _HeldTransport:
    """Forwards to a transport, except that writes made while `held` are joined into one."""

    __slots__ = ("held", "parts", "transport")

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self.held = False
        self.parts: list[bytes] = []

    def write(self, data: bytes) -> None:
        if self.held:
            self.parts.append(data)
        else:
            self.transport.write(data)

    def flush(self) -> None:
        self.held = False
        if self.parts:
            self.transport.write(b"".join(self.parts))
            self.parts.clear()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


class _OneWriteCycle(httptools_impl.RequestResponseCycle):
    """uvicorn's request cycle with the response head written together with the body."""

    async def send(self, message: Any) -> None:
        if message["type"] == "http.response.start":
            held = _HeldTransport(self.transport)
            held.held = True
            self.transport = held  # type: ignore[assignment]
            await super().send(message)
            return
        await super().send(message)
        transport = self.transport
        if isinstance(transport, _HeldTransport):
            transport.flush()
            self.transport = transport.transport


def app() -> CorralApp:
    return create_app(Frontend(FrontendSettings()))


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


async def _uvicorn(tuned: bool) -> None:
    settings = FrontendSettings()
    if tuned:
        httptools_impl.RequestResponseCycle = _OneWriteCycle  # type: ignore[misc]
    config = uvicorn.Config(
        app(),
        host=settings.host,
        port=settings.port,
        http="httptools",
        loop="none",
        lifespan="on",
        log_level="warning",
        access_log=False,
        timeout_keep_alive=30,
        backlog=4096,
        proxy_headers=False,
        server_header=False,
        date_header=False,
    )
    server = _Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
            return
        await asyncio.sleep(0.02)
    settle_heap()
    await task


def _granian() -> None:
    from granian import Granian  # type: ignore[import-not-found]
    from granian.constants import Interfaces, Loops  # type: ignore[import-not-found]

    settings = FrontendSettings()
    Granian(
        "servers:app",
        address=settings.host,
        port=settings.port,
        interface=Interfaces.ASGI,
        workers=1,
        loop=Loops.uvloop,
        factory=True,
        log_enabled=False,
        backlog=4096,
    ).serve()


def main() -> None:
    kind = sys.argv[1] if len(sys.argv) > 1 else "uvicorn"
    if kind == "granian":
        _granian()
        return
    import uvloop

    uvloop.run(_uvicorn(tuned=kind == "uvicorn"))


if __name__ == "__main__":
    main()

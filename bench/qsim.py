"""The `sim` backend with a capacity: at most --slots requests are served at once, the rest queue.

    python bench/qsim.py --slots 4 [every option of python -m corral.backends.sim]

The plain sim serves any number of concurrent requests in parallel (each one only sleeps),
so a slow replica is slow but never overloaded, and load balancing cannot matter. A real
model server has a bounded batch: past it, requests wait. The balance and recovery
workloads use this wrapper so that sending too much work to the slow replica shows up as
queueing, as it would on a GPU. Everything else is the unchanged simulator.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from typing import Any

import uvloop

from corral.backends.sim.__main__ import parse_args
from corral.backends.sim.config import SimConfig
from corral.backends.sim.server import SimServer


class SlotSim(SimServer):
    """SimServer whose delayed answers hold one of `slots` slots while they are produced."""

    def __init__(self, config: SimConfig, slots: int) -> None:
        super().__init__(config)
        self._slots = slots
        self._sem: asyncio.Semaphore | None = None

    async def start(self) -> int:
        self._sem = asyncio.Semaphore(self._slots)
        return await super().start()

    async def _complete_later(self, *args: Any) -> None:
        assert self._sem is not None
        async with self._sem:
            await super()._complete_later(*args)

    async def _stream_later(self, *args: Any) -> None:
        assert self._sem is not None
        async with self._sem:
            await super()._stream_later(*args)


async def serve(config: SimConfig, slots: int) -> None:
    loop = asyncio.get_running_loop()
    stopped = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopped.set)
    server = SlotSim(config, slots)
    try:
        await server.start()
        print(f"sim listening on {server.url}", flush=True)
        await stopped.wait()
    finally:
        await server.stop()


def main() -> None:
    argv = sys.argv[1:]
    slots = 4
    if "--slots" in argv:
        i = argv.index("--slots")
        slots = int(argv[i + 1])
        del argv[i : i + 2]
    uvloop.run(serve(parse_args(argv), slots))


if __name__ == "__main__":
    main()

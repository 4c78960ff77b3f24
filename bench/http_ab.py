"""Microseconds per request through Corral's own HTTP server: one native handler, one
keep-alive client sending requests one after another over a raw socket.

    PYTHONPATH=/path/to/other/checkout/src python bench/http_ab.py   # the code to compare
    python bench/http_ab.py                                          # this checkout

Prints the best batch (µs per request). Alternate the two a few times and compare the best:
on a shared machine single runs vary a lot.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import uvloop

from corral.frontend.http import HttpServer, bind_socket
from corral.frontend.http.request import Request

REQUEST = (
    b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nuser-agent: ab\r\naccept: */*\r\n"
    b"content-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
)
BODY = b'{"ok":true}'


async def handler(req: Request) -> None:
    await req.body(1 << 20)
    await req.respond(200, [(b"content-type", b"application/json")], BODY)


async def measure(requests: int, rounds: int) -> float:
    server = HttpServer(None, native={b"/v1/chat/completions": handler})  # type: ignore[arg-type]
    server.loop = asyncio.get_running_loop()
    await server.start(bind_socket("127.0.0.1", 0))
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)

    async def one() -> None:
        writer.write(REQUEST)
        await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(len(BODY))

    for _ in range(500):  # warm up
        await one()
    batches = []
    for _ in range(rounds):
        began = time.perf_counter()
        for _ in range(requests):
            await one()
        batches.append((time.perf_counter() - began) / requests * 1e6)
    writer.close()
    await server.stop()
    return min(batches)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=1000, help="requests per batch")
    p.add_argument("--rounds", type=int, default=15, help="batches; the best one counts")
    args = p.parse_args()
    print(f"{uvloop.run(measure(args.requests, args.rounds)):.1f}")


if __name__ == "__main__":
    main()

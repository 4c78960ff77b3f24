"""Micro-benchmark: what metrics and usage add to one request on the proxy's path.

    python bench/metering_bench.py [--n 200000] [--rounds 3]

CPU time (process time) per request, the best of the rounds. Each case runs against a
stand-in exchange whose methods do nothing, so the numbers are the metering's own cost: a
`Tally` around the exchange, the key's admission (usage and limits), the answer's usage found
in its bytes, and `Metering.done` (request and first-byte histograms, the autoscaler's TTFT
window, the usage row). The baseline is the same loop without them.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any, cast

import orjson

from corral.domain.access import Grant, Role
from corral.domain.usage import Limits, StreamTail, usage_of
from corral.frontend.http.exchange import Headers
from corral.frontend.inflight import InflightTracker
from corral.frontend.metering import Metering
from corral.frontend.metrics import FrontendMetrics
from corral.frontend.tally import Tally
from corral.frontend.usage import UsageMeter
from corral.store.usage import KeyInfo

CHAT = orjson.dumps(
    {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 0,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "word " * 150},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 25, "completion_tokens": 150, "total_tokens": 175},
    }
)
EMBEDDINGS = orjson.dumps(
    {
        "object": "list",
        "data": [{"object": "embedding", "index": 0, "embedding": [0.123456] * 4096}],
        "usage": {"prompt_tokens": 8, "total_tokens": 8},
    }
)
CHUNK = (
    b'data: {"id":"c","object":"chat.completion.chunk","choices":[{"delta":{"content":" w"}}]}\n\n'
)
GRANT = Grant(Role.INFERENCE, key_id="key-1")
USAGE_CHUNK = b'data: {"choices":[],"usage":{"prompt_tokens":25,"completion_tokens":100}}\n\n'


class NullExchange:
    """An exchange that answers into nothing."""

    method = b"POST"
    path = b"/v1/chat/completions"
    query = b""
    headers: Headers = []
    on_disconnect = None
    gone = False

    async def body(self, limit: int) -> bytes:
        return b""

    async def respond(self, status: int, headers: Headers, body: bytes) -> None:
        return None

    async def start(self, status: int, headers: Headers, first: bytes = b"") -> None:
        return None

    async def write(self, data: bytes) -> None:
        return None

    async def end(self, last: bytes = b"") -> None:
        return None


def metering(limited: bool) -> Metering:
    usage = UsageMeter(cast(Any, None))
    limits = Limits(requests_per_minute=10**9, tokens_per_day=10**15) if limited else Limits()
    usage.keys["key-1"] = KeyInfo("key-1", "bench", limits)
    return Metering(FrontendMetrics(), InflightTracker("fe"), usage)


async def whole(n: int, m: Metering | None) -> float:
    ex = NullExchange()
    started = time.process_time()
    for _ in range(n):
        if m is None:
            await ex.respond(200, [], CHAT)
            continue
        tally = Tally(cast(Any, ex), time.perf_counter())
        tally.endpoint = "/v1/chat/completions"
        tally.grant = GRANT
        tally.model = "m"
        m.admit(tally)
        await tally.respond(200, [], CHAT)
        tally.usage = usage_of(CHAT)
        tally.close()
        m.done(tally)
    return (time.process_time() - started) / n * 1e6


async def stream(n: int, chunks: int, m: Metering | None) -> float:
    ex = NullExchange()
    started = time.process_time()
    for _ in range(n):
        if m is None:
            await ex.start(200, [], b"")
            for _ in range(chunks):
                await ex.write(CHUNK)
            await ex.write(USAGE_CHUNK)
            await ex.end()
            continue
        tally = Tally(cast(Any, ex), time.perf_counter())
        tally.endpoint = "/v1/chat/completions"
        tally.grant = GRANT
        tally.model = "m"
        m.admit(tally)
        tail = StreamTail()
        await tally.start(200, [], b"")
        for _ in range(chunks):
            await tally.write(CHUNK)
            tail.feed(CHUNK)
        await tally.write(USAGE_CHUNK)
        tail.feed(USAGE_CHUNK)
        tally.usage = tail.usage()
        await tally.end()
        tally.close()
        m.done(tally)
    return (time.process_time() - started) / n * 1e6


def scan(n: int, body: bytes) -> float:
    started = time.process_time()
    for _ in range(n):
        usage_of(body)
    return (time.process_time() - started) / n * 1e6


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200_000)
    p.add_argument("--rounds", type=int, default=3)
    n = p.parse_args().n
    rounds = p.parse_args().rounds
    rows: dict[str, list[float]] = {}

    def add(name: str, value: float) -> None:
        rows.setdefault(name, []).append(value)

    for _ in range(rounds):
        base = await whole(n, None)
        add("whole answer: metering (µs/request)", await whole(n, metering(False)) - base)
        add("whole answer, key with limits", await whole(n, metering(True)) - base)
        base = await stream(n // 10, 100, None)
        add("stream of 100 chunks: metering", await stream(n // 10, 100, metering(False)) - base)
        add(
            "  of which per chunk (tail)",
            (await stream(n // 10, 100, metering(False)) - base) / 100,
        )
        add("usage_of(1.4 KB chat answer)", scan(n, CHAT))
        add("usage_of(37 KB embedding)", scan(n // 10, EMBEDDINGS))
    for name, values in rows.items():
        best = min(values)
        print(
            f"{name:45s} {best:7.2f} µs (min of {len(values)}; all: "
            + ", ".join(f"{v:.2f}" for v in values)
            + ")"
        )


if __name__ == "__main__":
    asyncio.run(main())

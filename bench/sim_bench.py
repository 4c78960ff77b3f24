"""Load generator for the simulator backend: non-streaming req/s and streaming chunks/s.

    .venv/bin/python bench/sim_bench.py                       # starts its own sim process
    .venv/bin/python bench/sim_bench.py --url http://127.0.0.1:8001 --client wrk

The default client is a raw asyncio protocol (uvloop when installed) over keep-alive
connections, one request in flight per connection (`--pipeline N` for more), which costs
far less per request than httpx or aiohttp so the server, not the client, is measured.
`--client wrk` drives the same requests with wrk (apt-get install wrk) instead.
When the bench starts the sim itself it also reports the sim's CPU time per request, a
figure that holds even when other processes share the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import orjson
import psutil

HEADER_END = b"\r\n\r\n"
STREAM_END = b"\r\n0\r\n\r\n"
EVENT = b"\r\ndata: "


@dataclass
class Scenario:
    name: str
    body: dict[str, object]
    streaming: bool
    tokens: int


@dataclass
class Result:
    scenario: Scenario
    concurrency: int
    seconds: float
    responses: int
    events: int = 0  # SSE events received (streaming only)
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    p50: float | None = None  # seconds; from `latencies` unless the client reports it
    p99: float | None = None
    server_cpu: float | None = None  # CPU seconds the sim process used (when we started it)

    def __post_init__(self) -> None:
        if self.latencies:
            lat = sorted(self.latencies)
            self.p50 = statistics.median(lat)
            self.p99 = lat[int(len(lat) * 0.99)]

    @property
    def rps(self) -> float:
        return self.responses / self.seconds

    @property
    def chunks_per_s(self) -> float:
        return (
            self.responses * self.scenario.tokens / self.seconds if self.scenario.streaming else 0
        )


class _Client(asyncio.Protocol):
    """One keep-alive connection sending `request` until the deadline, `depth` in flight."""

    def __init__(self, request: bytes, streaming: bool, depth: int, deadline: float) -> None:
        self.request = request
        self.streaming = streaming
        self.depth = depth
        self.deadline = deadline
        self.buf = b""
        self.sent: list[float] = []
        self.responses = 0
        self.events = 0
        self.errors = 0
        self.latencies: list[float] = []
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        now = time.perf_counter()
        self.sent = [now] * self.depth
        transport.write(self.request * self.depth)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        while True:
            end = buf.find(HEADER_END)
            if end < 0:
                break
            if self.streaming:
                stop = buf.find(STREAM_END, end)
                if stop < 0:
                    break
                stop += len(STREAM_END)
                self.events += buf.count(EVENT, end, stop)
            else:
                start = buf.find(b"content-length: ", 0, end) + 16
                stop = end + 4 + int(buf[start : buf.find(b"\r", start)])
                if len(buf) < stop:
                    break
            if not buf.startswith(b"HTTP/1.1 200"):
                self.errors += 1
            buf = buf[stop:]
            now = time.perf_counter()
            self.latencies.append(now - self.sent.pop(0))
            self.responses += 1
            if now < self.deadline:
                self.sent.append(now)
                assert self.transport is not None
                self.transport.write(self.request)
            elif not self.sent and not self.done.done():
                self.done.set_result(None)
        self.buf = buf

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


def _raw_request(host: str, port: int, path: str, body: dict[str, object]) -> bytes:
    payload = orjson.dumps(body)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    return head.encode() + payload


async def _run_asyncio(
    url: str, scenario: Scenario, concurrency: int, seconds: float, pipeline: int
) -> Result:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    request = _raw_request(host, port, "/v1/chat/completions", scenario.body)
    loop = asyncio.get_running_loop()
    start = time.perf_counter()
    deadline = start + seconds
    clients = []
    for _ in range(concurrency):
        _, proto = await loop.create_connection(
            lambda: _Client(request, scenario.streaming, pipeline, deadline), host, port
        )
        clients.append(proto)
    await asyncio.wait_for(asyncio.gather(*(c.done for c in clients)), seconds + 30)
    elapsed = time.perf_counter() - start
    for c in clients:
        assert c.transport is not None
        c.transport.close()
    return Result(
        scenario,
        concurrency,
        elapsed,
        sum(c.responses for c in clients),
        sum(c.events for c in clients),
        [lat for c in clients for lat in c.latencies],
        sum(c.errors for c in clients),
    )


def _run_wrk(url: str, scenario: Scenario, concurrency: int, seconds: float) -> Result:
    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("wrk is not installed (apt-get install wrk)")
    body = orjson.dumps(scenario.body).decode()
    script = (
        'wrk.method = "POST"\n'
        f"wrk.body = [[{body}]]\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
    )
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(script)
    try:
        out = subprocess.run(
            [
                wrk,
                "-t1",
                f"-c{concurrency}",
                f"-d{max(1, round(seconds))}s",
                "-s",
                f.name,
                "--latency",
                url.rstrip("/") + "/v1/chat/completions",
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    finally:
        os.unlink(f.name)
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    took = re.search(r"requests in ([\d.]+)(m?s)", out)
    assert took is not None
    secs = float(took.group(1)) / (1000 if took.group(2) == "ms" else 1)
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    result = Result(scenario, concurrency, secs, total, errors=int(bad.group(1)) if bad else 0)
    for pct in ("50", "99"):
        m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", out, re.MULTILINE)
        if m:
            scale = {"us": 1e-6, "ms": 1e-3, "s": 1.0}[m.group(2)]
            setattr(result, f"p{pct}", float(m.group(1)) * scale)
    return result


def _start_sim(tokens: int) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "corral.backends.sim", "--port", "0", "--tokens", str(tokens)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    match = re.search(r"(http://\S+)", line)
    if match is None:
        proc.kill()
        raise SystemExit(f"sim did not start: {line!r}")
    return proc, match.group(1)


def _print(results: list[Result], client: str) -> None:
    print(f"\nclient: {client}")
    print(
        f"{'scenario':<34}{'conc':>6}{'responses':>11}{'req/s':>11}{'chunks/s':>12}"
        f"{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}{'sim cpu us/req':>16}"
    )
    for r in results:
        p50 = f"{r.p50 * 1000:.2f}" if r.p50 is not None else "-"
        p99 = f"{r.p99 * 1000:.2f}" if r.p99 is not None else "-"
        chunks = f"{r.chunks_per_s:,.0f}" if r.scenario.streaming else "-"
        cpu = f"{r.server_cpu / r.responses * 1e6:.1f}" if r.server_cpu and r.responses else "-"
        print(
            f"{r.scenario.name:<34}{r.concurrency:>6}{r.responses:>11,}{r.rps:>11,.0f}"
            f"{chunks:>12}{p50:>9}{p99:>9}{r.errors:>8}{cpu:>16}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="an already running sim (default: start one)")
    parser.add_argument("--client", choices=("asyncio", "wrk"), default="asyncio")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per scenario")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--pipeline", type=int, default=1, help="requests in flight per conn")
    parser.add_argument("--stream-tokens", type=int, default=100)
    args = parser.parse_args()

    proc = None
    url = args.url
    if url is None:
        proc, url = _start_sim(max(args.stream_tokens, 16))
    msgs = [{"role": "user", "content": "Say something about corrals."}]
    scenarios = [
        Scenario(
            "chat non-stream (16 tokens)",
            {"model": "demo", "messages": msgs, "max_tokens": 16},
            False,
            16,
        ),
        Scenario(
            f"chat stream ({args.stream_tokens} tokens)",
            {"model": "demo", "messages": msgs, "max_tokens": args.stream_tokens, "stream": True},
            True,
            args.stream_tokens,
        ),
    ]
    try:
        results = []
        for sc in scenarios:
            cpu_before = _cpu_seconds(proc)
            if args.client == "wrk":
                result = _run_wrk(url, sc, args.concurrency, args.duration)
            else:
                with asyncio.Runner(loop_factory=_loop_factory()) as runner:
                    result = runner.run(
                        _run_asyncio(url, sc, args.concurrency, args.duration, args.pipeline)
                    )
            if proc is not None:
                result.server_cpu = _cpu_seconds(proc) - cpu_before
            results.append(result)
        _print(results, args.client)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)


def _cpu_seconds(proc: subprocess.Popen[str] | None) -> float:
    if proc is None:
        return 0.0
    times = psutil.Process(proc.pid).cpu_times()
    return float(times.user + times.system)


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


if __name__ == "__main__":
    main()

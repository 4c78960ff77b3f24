"""Overload: two tenants offering twice a replica's capacity, one sending 9x the other.

    python bench/overload.py [--seconds 10] [--out bench/out/overload.json]

One Corral cluster (private PostgreSQL and NATS, one frontend, one worker) runs one sim
replica with the engine model: 4 slots, answers of about 200 ms (the sim queues FIFO past its
slots, as a GPU server does). Corral caps the replica at its 4 slots (the catalog's default
`max_concurrency` for the sim is its `slots` option) and queues the rest, fair between API
keys. `direct` sends the same load straight to the sim, as any pass-through gateway does
(vllm-router, LiteLLM: nothing holds requests back, so they wait in the engine's FIFO).

Measured per target: the light tenant's p50/p99 latency and its share of the answers, the
same tenant's p99 alone (unloaded), and the backend's peak concurrency (the sim's
`peak_inflight`: requests it held at once, queued or running). The load is open-loop: each
tenant sends at a fixed rate whatever the answers do.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
from loadgen import chat_body
from targets import Corral, Infra, replica_url

SLOTS = 4
OPTIONS = {"slots": SLOTS, "tokens": 4, "decode_base": 0.05, "prefill_per_token": 0.0}
KEYS = {"heavy": "key-heavy", "light": "key-light"}


async def offer(
    url: str, rates: dict[str, float], seconds: float, grace: float
) -> list[tuple[str, float, int]]:
    """Send each tenant's requests at its rate for `seconds`; (tenant, latency, status) of
    every answer that came within `grace` seconds after the end."""
    body = chat_body("m", max_tokens=4)
    done: list[tuple[str, float, int]] = []
    limits = httpx.Limits(max_connections=4096, max_keepalive_connections=4096)
    # a client per tenant: the heavy one's hundreds of open requests do not slow the other's
    clients = {t: httpx.AsyncClient(base_url=url, limits=limits, timeout=120) for t in rates}

    async def one(tenant: str) -> None:
        headers = {"content-type": "application/json"}
        headers["authorization"] = f"Bearer {KEYS[tenant]}"
        started = time.monotonic()
        r = await clients[tenant].post("/v1/chat/completions", content=body, headers=headers)
        done.append((tenant, time.monotonic() - started, r.status_code))

    async def tenant_loop(tenant: str, rate: float) -> list[asyncio.Task[None]]:
        tasks = []
        begin = time.monotonic()
        n = 0
        while (due := begin + n / rate) < begin + seconds:
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            tasks.append(asyncio.create_task(one(tenant)))
            n += 1
        return tasks

    try:
        loops = [tenant_loop(t, r) for t, r in rates.items() if r > 0]
        tasks = [t for batch in await asyncio.gather(*loops) for t in batch]
        _, pending = await asyncio.wait(tasks, timeout=grace)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    finally:
        for client in clients.values():
            await client.aclose()
    return done


def _tenant(
    url: str, tenant: str, rate: float, seconds: float, results: multiprocessing.Queue[Any]
) -> None:
    results.put(asyncio.run(offer(url, {tenant: rate}, seconds, grace=30)))


def summary(done: list[tuple[str, float, int]], tenant: str) -> dict[str, Any]:
    ok = sorted(lat for t, lat, status in done if t == tenant and status == 200)
    answered = sum(1 for _, _, status in done if status == 200)
    refused = sum(1 for t, _, status in done if t == tenant and status != 200)
    if not ok:
        return {"ok": 0, "refused": refused}
    return {
        "ok": len(ok),
        "refused": refused,
        "share": round(len(ok) / max(1, answered), 3),
        "p50_ms": round(1000 * statistics.median(ok), 1),
        "p99_ms": round(1000 * ok[min(len(ok) - 1, int(0.99 * len(ok)))], 1),
    }


def peak(sim_url: str, reset: bool = False) -> int:
    if reset:
        httpx.post(sim_url + "/admin/reset-peak", timeout=5)
    return int(httpx.get(sim_url + "/admin/stats", timeout=5).json()["peak_inflight"])


async def measure(url: str, sim: str, seconds: float, capacity: float) -> dict[str, Any]:
    light = 0.2 * capacity  # 2x capacity in all: 9 parts heavy, 1 part light
    peak(sim, reset=True)
    alone = await offer(url, {"light": light}, seconds / 2, grace=30)
    await asyncio.sleep(1)
    peak(sim, reset=True)
    # the heavy tenant in a process of its own: its hundreds of open requests cost a Python
    # client enough CPU to delay the light tenant's answers in the same event loop
    ctx = multiprocessing.get_context("spawn")
    results: multiprocessing.Queue[list[tuple[str, float, int]]] = ctx.Queue()
    heavy = ctx.Process(target=_tenant, args=(url, "heavy", 9 * light, seconds, results))
    heavy.start()
    loaded = await offer(url, {"light": light}, seconds, grace=30)
    loaded += await asyncio.to_thread(results.get)
    heavy.join()
    return {
        "unloaded_p99_ms": summary(alone, "light").get("p99_ms"),
        "light": summary(loaded, "light"),
        "heavy": summary(loaded, "heavy"),
        "backend_peak": peak(sim),
    }


async def capacity_of(sim: str) -> float:
    """Requests/s the replica serves with every slot busy (closed loop, 2x slots users)."""
    body = chat_body("m", max_tokens=4)
    count = 0
    stop = time.monotonic() + 3
    async with httpx.AsyncClient(base_url=sim, timeout=30) as client:

        async def user() -> None:
            nonlocal count
            while time.monotonic() < stop:
                r = await client.post("/v1/chat/completions", content=body)
                count += r.status_code == 200

        await asyncio.gather(*(user() for _ in range(2 * SLOTS)))
    return count / 3


async def main(seconds: float, out: Path) -> None:
    root = Path(tempfile.mkdtemp(prefix="corral-overload-"))
    infra = Infra(root)
    infra.start(None)
    env = {"CORRAL_API_KEYS": ",".join(KEYS.values())}
    corral = Corral(infra, root, "o", env=env)
    corral.write_model("m", options=OPTIONS, scheduling={"min_replicas": 1, "max_replicas": 1})
    try:
        await corral.start()
        corral.start_worker("w1", labels="role=main")
        sim = replica_url(corral.wait_replicas("m", 1, 120)[0])
        capacity = await capacity_of(sim)
        print(f"capacity {capacity:.0f} req/s; offering {2 * capacity:.0f} req/s (9:1)")
        results = {"seconds": seconds, "capacity_rps": round(capacity, 1), "targets": {}}
        for name, url in (("direct", sim), ("corral", corral.url)):
            results["targets"][name] = await measure(url, sim, seconds, capacity)
            print(name, orjson.dumps(results["targets"][name]).decode())
        queues = corral.api("/api/queues")["queues"]["m"]
        results["corral_max_concurrency"] = queues["max_concurrency"]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    finally:
        corral.stop()
        infra.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out/overload.json")
    args = parser.parse_args()
    sys.exit(asyncio.run(main(args.seconds, args.out)))

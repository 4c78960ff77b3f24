"""NATS auth costs: connect time per identity, publish throughput with and without auth, kick time.

    .venv/bin/python bench/nats_auth.py [--connects 50] [--messages 50000] [--rounds 9]

Starts two nats-servers on loopback: one without authentication (as before) and one with
Corral's auth callout (the test helper `tests/natsauth_infra.py`), then measures
* connect time: no auth; frontend nkey (bypasses the callout); worker user/password through
  the callout, answered by a frontend connection in this process (the digest check is an
  in-memory dict here, PostgreSQL adds its query time in production);
* publish throughput of a frontend connection (256-byte messages, one subscriber receiving
  all of them) on each server, and of a worker on its progress subject (permission checked);
* revocation: from `WorkerSessions.revoke` to the worker's disconnect.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from nats.aio.client import Client as NatsClient  # noqa: E402
from nats.aio.msg import Msg  # noqa: E402

import infra  # noqa: E402
from corral.bus.authservice import AuthCallout, WorkerSessions  # noqa: E402
from corral.bus.client import Bus  # noqa: E402
from corral.bus.natsauth import NatsCredentials, worker_credentials  # noqa: E402
from natsauth_infra import CredentialStore, auth_nats_server, connect  # noqa: E402

PREFIX = "bench"
PAYLOAD = b"x" * 256


async def connect_ms(url: str, creds: NatsCredentials, n: int) -> dict[str, float]:
    times = []
    for _ in range(n):
        began = time.perf_counter()
        client = await connect(url, creds)
        times.append((time.perf_counter() - began) * 1000)
        await client.nc.close()
    return {"median_ms": round(statistics.median(times), 2), "p90_ms": round(_p90(times), 2)}


def _p90(values: list[float]) -> float:
    return sorted(values)[int(len(values) * 0.9) - 1]


async def publish_rate(
    pub: NatsClient, sub: NatsClient, subject: str, listen: str, n: int
) -> float:
    """Messages per second from the first publish until the subscriber has all `n`."""
    done = asyncio.Event()
    count = 0

    async def on_msg(_: Msg) -> None:
        nonlocal count
        count += 1
        if count == n:
            done.set()

    s = await sub.subscribe(listen, cb=on_msg, pending_msgs_limit=n + 1)
    await sub.flush()
    await pub.flush()
    began = time.perf_counter()
    for _ in range(n):
        await pub.publish(subject, PAYLOAD)
    await pub.flush()
    await asyncio.wait_for(done.wait(), 60)
    took = time.perf_counter() - began
    await s.unsubscribe()
    return n / took


async def measure(args: argparse.Namespace, plain_url: str, auth_url: str, keys: Any) -> None:
    frontend = Bus(auth_url, prefix=PREFIX, credentials=keys.frontend_credentials())
    await frontend.connect()
    store = CredentialStore()
    callout = AuthCallout(frontend, keys.issuer, store.verify)
    await callout.start()
    system = Bus(auth_url, prefix=PREFIX, credentials=keys.system_credentials())
    await system.connect()
    sessions = WorkerSessions(system)
    worker_creds = worker_credentials(PREFIX, "n1", store.issue("n1"))
    out: dict[str, Any] = {}
    try:
        out["connect"] = {
            "no_auth": await connect_ms(plain_url, NatsCredentials(), args.connects),
            "frontend_nkey": await connect_ms(auth_url, keys.frontend_credentials(), args.connects),
            "worker_callout": await connect_ms(auth_url, worker_creds, args.connects),
        }
        rates: dict[str, list[float]] = {"no_auth": [], "frontend_auth": [], "worker_auth": []}
        plain_pub = await connect(plain_url, NatsCredentials())
        plain_sub = await connect(plain_url, NatsCredentials())
        fe_pub = await connect(auth_url, keys.frontend_credentials())
        fe_sub = await connect(auth_url, keys.frontend_credentials())
        worker = await connect(auth_url, worker_creds)
        events = f"{PREFIX}.events.replica"
        progress = f"{PREFIX}.progress.n1.install"
        runs = {
            "no_auth": (plain_pub.nc, plain_sub.nc, events),
            "frontend_auth": (fe_pub.nc, fe_sub.nc, events),
            "worker_auth": (worker.nc, fe_sub.nc, progress),
        }
        order = list(runs)
        for i in range(args.rounds):  # interleaved, the order rotating: load drifts cancel out
            for name in order[i % 3 :] + order[: i % 3]:
                pub, sub, subject = runs[name]
                rates[name].append(await publish_rate(pub, sub, subject, subject, args.messages))
        out["publish_msgs_per_s"] = {k: round(statistics.median(v)) for k, v in rates.items()}
        out["publish_rounds"] = {k: [round(x) for x in v] for k, v in rates.items()}
        for c in (plain_pub, plain_sub, fe_pub, fe_sub, worker):
            await c.nc.close()
        kicks = []
        for i in range(5):
            node = f"k{i}"
            victim = await connect(auth_url, worker_credentials(PREFIX, node, store.issue(node)))
            digest = store.revoke(node)
            began = time.perf_counter()
            revoking = asyncio.create_task(sessions.revoke(node, digest))
            while victim.nc.is_connected:
                await asyncio.sleep(0.001)
            kicks.append((time.perf_counter() - began) * 1000)
            await revoking
        out["revoke_to_disconnect_ms"] = round(statistics.median(kicks), 1)
        print(json.dumps(out, indent=2))
    finally:
        await sessions.close()
        await callout.stop()
        await system.close()
        await frontend.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--connects", type=int, default=50)
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    with infra.nats_server() as plain_url, auth_nats_server() as auth:
        asyncio.run(measure(args, plain_url, auth.url, auth.keys))


if __name__ == "__main__":
    main()

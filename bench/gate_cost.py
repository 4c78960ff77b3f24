"""The admission gate's cost on the warm path, when nothing waits: microseconds per request.

    python bench/gate_cost.py

Times what the proxy adds per request for admission (`now`, `released`, and the
disconnect watch around the wait), against an empty loop of the same shape, on a view with
one model and its loaded replicas: once with `max_concurrency` 0 (unlimited: no slot
accounting) and once with a limit (free slots counted on every replica).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

from corral.domain.entities import ModelSpec, Node, NodeStatus, Replica, ReplicaState, Scheduling
from corral.frontend.abort import AbortOnDisconnect
from corral.frontend.admission import AdmissionGate
from corral.frontend.inflight import InflightTracker
from corral.frontend.view import ClusterView

N = 200_000
HEADERS = [(b"authorization", b"Bearer sk-x"), (b"content-type", b"application/json")]


class _Exchange:
    on_disconnect = None


async def _no_replica(_: ModelSpec, __: float) -> None:
    raise AssertionError("warm path only")


async def per_request(limit: int, replicas: int) -> tuple[float, float, float]:
    """µs per request: with the gate and the disconnect watch, with the gate, without."""
    view = ClusterView()
    view.put_node(Node(id="n1", name="n1", status=NodeStatus.HEALTHY))
    spec = dataclasses.replace(
        ModelSpec(name="m", backend="sim"), scheduling=Scheduling(max_concurrency=limit)
    )
    view.put_model(spec)
    for i in range(replicas):
        view.put_replica(Replica("m", i, "n1", ReplicaState.LOADED, address=f"127.0.0.1:{i}"))
    inflight = InflightTracker("fe")
    gate = AdmissionGate(view, inflight, limit_of=lambda s: limit, ensure_replica=_no_replica)
    exchange = _Exchange()
    key = ("m", 0)
    tried: set[tuple[str, int, str | None]] = set()

    started = time.perf_counter()
    for _ in range(N):
        with AbortOnDisconnect(exchange):  # type: ignore[arg-type]
            if gate.now(spec, tried) is None:
                await gate.enter(spec, HEADERS, 120, tried)
            slot = inflight.acquire(key)
            slot.release()
            gate.released("m")
    both = time.perf_counter() - started

    started = time.perf_counter()
    for _ in range(N):
        if gate.now(spec, tried) is None:
            await gate.enter(spec, HEADERS, 120, tried)
        slot = inflight.acquire(key)
        slot.release()
        gate.released("m")
    gate_only = time.perf_counter() - started

    started = time.perf_counter()
    for _ in range(N):
        slot = inflight.acquire(key)
        slot.release()
    without = time.perf_counter() - started
    return both / N * 1e6, gate_only / N * 1e6, without / N * 1e6


async def main() -> None:
    print(
        "| max_concurrency | replicas | baseline µs/req | + gate µs/req | + gate and"
        " disconnect watch µs/req |"
    )
    print("|---:|---:|---:|---:|---:|")
    for limit, replicas in ((0, 1), (4, 1), (4, 8)):
        runs = [await per_request(limit, replicas) for _ in range(5)]
        both, gate, without = (min(r[i] for r in runs) for i in range(3))
        print(
            f"| {limit} | {replicas} | {without:.2f} | +{gate - without:.2f} |"
            f" +{both - without:.2f} |"
        )


if __name__ == "__main__":
    asyncio.run(main())

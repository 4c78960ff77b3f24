"""Workload 7, scale in simulation: no processes, the real domain, view and store code.

* routing decision: `ClusterView.candidates` + `pick_replica` exactly as the proxy calls them
  (in-flight view, rotating tie breaker, last-used map), with 1,000 nodes and 10,000 loaded
  replicas: spread over 1,000 models (10 each), and the worst case of one model holding all
  10,000; plus the cost after a change invalidated the cached candidate list;
* registry writes against a private PostgreSQL: node heartbeats per second
  (`registry.nodes.heartbeat`, 16 concurrent writers, the frontend's pool) and last-used
  batches (`registry.replicas.touch` of 1,000 and 10,000 replicas);
* a full resync of the view from PostgreSQL (`ClusterView.resync`).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

from sqlalchemy.dialects.postgresql import insert

from corral.domain.entities import (
    ModelSpec,
    Node,
    NodeStatus,
    Replica,
    ReplicaState,
    Resources,
    Scheduling,
)
from corral.domain.pick import pick_replica
from corral.frontend.inflight import InflightTracker
from corral.frontend.view import ClusterView
from corral.store.registry import Registry
from corral.store.tables import replicas as replicas_table

ZONES = 10


def _nodes(n: int) -> list[Node]:
    return [
        Node(
            id=f"n{i:05d}",
            name=f"node-{i}",
            status=NodeStatus.HEALTHY,
            address=f"10.{i // 250}.{i % 250}.1",
            labels={"zone": f"z{i % ZONES}", "gpu": "a100" if i % 2 else "h100"},
            resources=Resources(cpu_count=64, ram_total=512 << 30, ram_free=(100 + i) << 30),
        )
        for i in range(n)
    ]


def _view(nodes: list[Node], models: int, per_model: int) -> tuple[ClusterView, list[str]]:
    view = ClusterView()
    names = [f"m{j:04d}" for j in range(models)]
    for node in nodes:
        view.put_node(node)
    for j, name in enumerate(names):
        selector = {"zone": f"z{j % ZONES}"} if j % 3 == 0 else {}
        view.put_model(
            ModelSpec(name=name, backend="sim", scheduling=Scheduling(node_selector=selector))
        )
        for k in range(per_model):
            if selector:
                node = nodes[(j % ZONES + ZONES * (k + j)) % len(nodes)]
            else:
                node = nodes[(j * per_model + k) % len(nodes)]
            view.put_replica(
                Replica(
                    model=name,
                    index=k,
                    node_id=node.id,
                    state=ReplicaState.LOADED,
                    address=f"{node.address}:{20000 + k}",
                    last_used=1000.0 + k,
                )
            )
    return view, names


def _decisions(view: ClusterView, names: list[str], n: int, *, invalidate: bool) -> float:
    """Mean seconds per routing decision (candidates + pick + slot), as the proxy does it."""
    inflight = InflightTracker("bench")
    totals = inflight.view()
    last_used = view.last_used
    m = len(names)
    clock = time.perf_counter
    t0 = clock()
    for turn in range(n):
        name = names[turn % m]
        if invalidate:
            view._touch(name)
        cands = view.candidates(name)
        chosen = pick_replica(cands, totals, {}, turn, last_used=last_used)
        assert chosen is not None
        last_used[chosen.key] = 2000.0 + turn
        inflight.acquire(chosen.key).release()
    return (clock() - t0) / n


def routing(nodes_n: int = 1000, replicas_n: int = 10000, *, quick: bool = False) -> dict[str, Any]:
    nodes = _nodes(nodes_n)
    reps = 3 if quick else 7
    out: dict[str, Any] = {"nodes": nodes_n, "replicas": replicas_n}
    cases = [
        ("spread", replicas_n // 10, 10, 20000, False),
        ("one_model", 1, replicas_n, 300 if quick else 1000, False),
        ("spread_after_change", replicas_n // 10, 10, 5000, True),
        ("one_model_after_change", 1, replicas_n, 50 if quick else 200, True),
    ]
    for label, models, per_model, n, invalidate in cases:
        view, names = _view(nodes, models, per_model)
        assert len(view.replicas) == replicas_n
        _decisions(view, names, min(n, 1000), invalidate=invalidate)  # warm caches
        samples = [_decisions(view, names, n, invalidate=invalidate) for _ in range(reps)]
        out[label] = {
            "models": models,
            "per_model": per_model,
            "us": statistics.median(samples) * 1e6,
        }
    return out


async def registry_writes(database_url: str, *, quick: bool = False) -> dict[str, Any]:
    nodes = _nodes(1000)
    registry = Registry.from_url(database_url, pool_size=16)
    out: dict[str, Any] = {}
    try:
        await registry.migrate()
        t0 = time.perf_counter()
        sem = asyncio.Semaphore(16)

        async def upsert(node: Node) -> None:
            async with sem:
                await registry.nodes.upsert(
                    node_id=node.id,
                    name=node.name,
                    address=node.address,
                    token_hash=f"h{node.id}",
                    labels=node.labels,
                    memory_budget="80%",
                    max_replicas_per_model=0,
                    backends=["sim"],
                )

        await asyncio.gather(*(upsert(n) for n in nodes))
        out["node_upserts_s"] = time.perf_counter() - t0
        names = [f"m{j:04d}" for j in range(1000)]
        for name in names:
            await registry.models.upsert(ModelSpec(name=name, backend="sim"), source="bench")
        now = time.time()
        rows = [
            {
                "model": names[i // 10],
                "replica_index": i % 10,
                "node_id": nodes[i % 1000].id,
                "state": "loaded",
                "address": f"{nodes[i % 1000].address}:{20000 + i % 10}",
                "memory": 1 << 30,
                "last_used": now,
                "updated": now,
            }
            for i in range(10000)
        ]
        async with registry.engine.begin() as conn:
            await conn.execute(insert(replicas_table), rows)

        resources = {
            "cpu_count": 64,
            "ram_total": 512 << 30,
            "ram_free": 100 << 30,
            "disk_free": 1 << 40,
            "gpus": [],
        }
        processes = [
            {"model": names[j], "index": 0, "address": f"10.0.0.1:{20000 + j}", "pid": 1000 + j}
            for j in range(10)
        ]
        duration = 3.0 if quick else 8.0
        count = 0
        stop_at = time.perf_counter() + duration

        async def beat(worker: int) -> None:
            nonlocal count
            i = worker
            while time.perf_counter() < stop_at:
                node = nodes[i % len(nodes)]
                await registry.nodes.heartbeat(
                    node.id,
                    resources=resources,
                    processes=processes,
                    backends=["sim"],
                    artifacts=[],
                )
                count += 1
                i += 16

        t0 = time.perf_counter()
        await asyncio.gather(*(beat(w) for w in range(16)))
        out["heartbeats_per_s"] = count / (time.perf_counter() - t0)
        keys = [(names[i // 10], i % 10) for i in range(10000)]
        for size in (1000, 10000):
            times = []
            for rep in range(3 if quick else 5):
                batch = {k: now + rep + 1 for k in keys[:size]}
                t0 = time.perf_counter()
                await registry.replicas.touch(batch)
                times.append(time.perf_counter() - t0)
            best = statistics.median(times)
            out[f"touch_{size}_s"] = best
            out[f"touch_{size}_rows_per_s"] = size / best
        view = ClusterView()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            await view.resync(registry)
            times.append(time.perf_counter() - t0)
        out["resync_s"] = statistics.median(times)
        out["resync_rows"] = len(view.replicas)
    finally:
        await registry.close()
    return out

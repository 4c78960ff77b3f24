"""Workload 7, scale in simulation: no processes, the real domain, view and store code.

* routing decision: `ClusterView.candidates` + `pick_replica` exactly as the proxy calls them
  (in-flight view, rotating tie breaker, last-used map), with 1,000 nodes and 10,000 loaded
  replicas: spread over 1,000 models (10 each), and the worst case of one model holding all
  10,000; plus the cost after a change invalidated the cached candidate list;
* registry writes against a private PostgreSQL: node heartbeats per second
  (`registry.nodes.heartbeat`, 16 concurrent writers, the frontend's pool) and last-used
  batches (`registry.replicas.touch` of 1,000 and 10,000 replicas);
* a full resync of the view from PostgreSQL (`ClusterView.resync`);
* churn: the same routing decisions while 1,000 nodes heartbeat every 5 s (200/s, interleaved
  at the throughput target's request rate), compared with no heartbeats.
"""

from __future__ import annotations

import asyncio
import dataclasses
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


#: churn: 1,000 nodes heartbeating every 5 s (200/s) against a frontend serving ~14,000
#: requests/s (the throughput target) is one heartbeat per 70 routing decisions
HEARTBEATS_PER_S = 200
REQUESTS_PER_S = 14000


def _heartbeats(nodes: list[Node], n: int) -> list[Node]:
    """`n` heartbeats round the nodes: same status and labels, new resources and time."""
    out = []
    for i in range(n):
        node = nodes[i % len(nodes)]
        free = node.resources.ram_free - (i % 7 + 1) * (1 << 20)
        out.append(
            dataclasses.replace(
                node,
                resources=dataclasses.replace(node.resources, ram_free=free),
                last_heartbeat=1000.0 + i,
            )
        )
    return out


def _decisions(
    view: ClusterView,
    names: list[str],
    n: int,
    *,
    invalidate: bool,
    heartbeats: list[Node] | None = None,
    legacy: bool = False,
) -> float:
    """Mean seconds per routing decision (candidates + pick + slot), as the proxy does it;
    with `heartbeats`, one of them goes into the view (`put_node`, as the heartbeat handler
    does) every REQUESTS_PER_S / HEARTBEATS_PER_S decisions, its cost counted in; `legacy`
    also drops every cached candidate list at each heartbeat, as `put_node` did before the
    view became incremental."""
    inflight = InflightTracker("bench")
    totals = inflight.view()
    last_used = view.last_used
    m = len(names)
    every = REQUESTS_PER_S // HEARTBEATS_PER_S
    beats = heartbeats or []
    clock = time.perf_counter
    t0 = clock()
    for turn in range(n):
        name = names[turn % m]
        if invalidate:
            view._touch(name)
        if beats and turn % every == 0:
            view.put_node(beats[(turn // every) % len(beats)])
            if legacy:
                view._touch_all()
        cands = view.candidates(name)
        chosen = pick_replica(cands, totals, view.free_memory(), turn, last_used=last_used)
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
    out.update(churn(nodes, replicas_n, quick=quick))
    return out


def churn(nodes: list[Node], replicas_n: int, *, quick: bool = False) -> dict[str, Any]:
    """Routing decisions with and without heartbeats, alternated on the same view (so noise
    hits both alike); `*_churn` rows give the ratio to the quiet row of the same shape."""
    beats = _heartbeats(nodes, 2 * len(nodes))
    reps = 5 if quick else 11
    out: dict[str, Any] = {}
    for label, models, per_model, n in (
        ("spread", replicas_n // 10, 10, 14000),
        ("one_model", 1, replicas_n, 7000 if quick else 14000),
    ):
        view, names = _view(nodes, models, per_model)
        _decisions(view, names, 2000, invalidate=False, heartbeats=beats)  # warm
        quiet, busy = [], []
        for _ in range(reps):
            quiet.append(_decisions(view, names, n, invalidate=False))
            busy.append(_decisions(view, names, n, invalidate=False, heartbeats=beats))
        # the fastest of the alternated runs is the least disturbed by other load
        q, b = min(quiet) * 1e6, min(busy) * 1e6
        out[f"{label}_quiet"] = {"models": models, "per_model": per_model, "us": q}
        out[f"{label}_churn"] = {
            "models": models,
            "per_model": per_model,
            "us": b,
            "ratio": b / q,
            "median_ratio": statistics.median(busy) / statistics.median(quiet),
            "heartbeats_per_s": HEARTBEATS_PER_S,
            "requests_per_s": REQUESTS_PER_S,
        }
        n_legacy = 700 if label == "one_model" else 7000
        legacy = [
            _decisions(view, names, n_legacy, invalidate=False, heartbeats=beats, legacy=True)
            for _ in range(3)
        ]
        out[f"{label}_churn_before"] = {"us": min(legacy) * 1e6}
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

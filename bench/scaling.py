"""Workload 8, scaling over cores: Corral with N frontend processes against vllm-router on N
cores (`bench/run.py --processes 1,2,4,8`).

One Corral cluster runs R sim replicas of `bench`; for each N its frontend is restarted with
`--processes N`, pinned to N cores of their own, and vllm-router runs on the same N cores
(TOKIO_WORKER_THREADS=N) in front of the same R sims. The load comes from several load
generator processes (bench/loadgen.py) so the client is not the limit; `direct` (the
clients round-robin over the sims themselves) shows what the client and sims can do at all.
Targets alternate per round; the table gives medians, the frontend's own CPU (its process
tree: the parent and its N-1 children), and throughput relative to N = 1.
"""

# ruff: noqa: RUF001 - tables use multiplication signs and dashes

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
from loadgen import chat_body, first_byte
from procs import CpuMeter, pin
from targets import BENCH, Corral, Infra, replica_url, start_vllm_router

USERS_PER_PROCESS = 64  # closed-loop users per proxy process, as in workload 2


class Layout:
    """Which cores run the proxy under test, the load generators and everything else."""

    def __init__(self, cores: int, most: int) -> None:
        self.cores = cores
        self.pinned = cores >= most + 2
        if self.pinned:
            self.proxy = list(range(cores - most, cores))
            rest = list(range(cores - most))
            half = max(1, len(rest) // 2)
            self.clients = rest[:half]
            self.others = rest[half:] or rest
        else:
            self.proxy = self.clients = self.others = list(range(cores))
        self.sims = max(1, min(8, len(self.others)))
        self.loaders = max(1, min(8, len(self.clients)))


async def multi_load(
    urls: Sequence[str], users: int, seconds: float, layout: Layout, policy: str = "first"
) -> dict[str, Any]:
    """`users` closed-loop users spread over the layout's load generator processes."""
    procs = []
    n = min(layout.loaders, users)
    start_at = time.time() + 1.0
    for i in range(n):
        share = users // n + (1 if i < users % n else 0)
        argv = [sys.executable, str(BENCH / "loadgen.py"), "--users", str(share)]
        argv += ["--seconds", str(seconds), "--start-at", str(start_at), "--policy", policy]
        for u in urls:
            argv += ["--url", u]
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        if layout.pinned:
            pin(proc.pid, [layout.clients[i % len(layout.clients)]])
        procs.append(proc)
    outs = []
    for proc in procs:
        out, err = await asyncio.wait_for(proc.communicate(), seconds + 120)
        if proc.returncode != 0:
            raise RuntimeError(f"load generator failed: {err.decode(errors='replace')[-2000:]}")
        outs.append(orjson.loads(out))
    lat = sorted(x for o in outs for x in o["latencies"])
    return {
        "rps": sum(o["ok"] / o["elapsed"] for o in outs if o["elapsed"]),
        "ok": sum(o["ok"] for o in outs),
        "errors": sum(o["errors"] for o in outs),
        "p50_ms": lat[len(lat) // 2] * 1e3 if lat else None,
        "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3 if lat else None,
    }


async def run(
    infra: Infra, root: Path, processes: Sequence[int], *, seconds: float, rounds: int
) -> dict[str, Any]:
    most = max(processes)
    layout = Layout(os.cpu_count() or 1, most)
    env = {
        "CORRAL_HEARTBEAT_INTERVAL": "1",
        "CORRAL_RECONCILE_INTERVAL": "0.5",
        "CORRAL_WORKER_DRAIN_TIMEOUT": "3",
    }
    corral = Corral(infra, root, "s", env=env, frontend_cpus=layout.proxy[:1], other_cpus=None)
    corral.write_model(
        "bench",
        options={"tokens": 16},
        scheduling={
            "min_replicas": layout.sims,
            "max_replicas": layout.sims,
            "scale_down_delay": 86400,
        },
    )
    print(
        f"w8: scaling, {processes} frontend processes; {layout.sims} sims, "
        f"{layout.loaders} load generators, {layout.cores} cores "
        f"({'pinned' if layout.pinned else 'not pinned: too few cores'})"
    )
    results: dict[str, Any] = {
        "processes": list(processes),
        "sims": layout.sims,
        "loaders": layout.loaders,
        "cores": layout.cores,
        "pinned": layout.pinned,
        "seconds": seconds,
        "rounds": [],
    }
    try:
        await corral.start()
        corral.start_worker("w1", labels="role=main")
        status, _, took = await first_byte(corral.url, chat_body("bench", max_tokens=4), 180)
        print(f"  first request {status} after {took:.2f}s; waiting for {layout.sims} replicas")
        sims = [replica_url(r) for r in corral.wait_replicas("bench", layout.sims, 300)]
        if layout.pinned:
            corral.pin_backends(layout.others)
            for pid in (infra.pg.pid, infra.nats.pid):
                if pid is not None:
                    pin(pid, layout.others)
        for n in processes:
            cpus = layout.proxy[:n] if layout.pinned else None
            await asyncio.to_thread(corral.restart_frontend, {"CORRAL_PROCESSES": str(n)}, cpus)
            vr, vr_url = start_vllm_router(
                root / "s" / "logs",
                sims,
                cpus=cpus,
                name=f"vllm-router-{n}",
                env={"TOKIO_WORKER_THREADS": str(n)},
            )
            try:
                assert corral.frontend is not None
                targets = {
                    "direct": (sims, "rr", 0),
                    "corral": ([corral.url], "first", corral.frontend.pid),
                    "vllm-router": ([vr_url], "first", vr.pid),
                }
                users = USERS_PER_PROCESS * n
                for urls, policy, _ in targets.values():  # warm every connection path
                    await multi_load(urls, users, 1.0, layout, policy)
                for r in range(rounds):
                    for name, (urls, policy, pid) in targets.items():
                        meter = CpuMeter([pid] if pid else [])
                        meter.start()
                        row = await multi_load(urls, users, seconds, layout, policy)
                        row["cpu_cores"] = meter.stop() if pid else None
                        row.update({"n": n, "target": name, "round": r + 1})
                        results["rounds"].append(row)
                        print(
                            f"  N={n} round {r + 1} {name:<12} {row['rps']:9.0f} req/s  "
                            f"p50 {_ms(row['p50_ms'])}  p99 {_ms(row['p99_ms'])}  cpu "
                            f"{_ms(row['cpu_cores'])}  errors {row['errors']}",
                            flush=True,
                        )
            finally:
                vr.stop()
    finally:
        corral.stop()
    results["median"] = _medians(results["rounds"])
    return results


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _medians(rows: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float | None]]]:
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for row in rows:
        out.setdefault(str(row["n"]), {}).setdefault(row["target"], {})
    for n, targets in out.items():
        for target in targets:
            mine = [r for r in rows if str(r["n"]) == n and r["target"] == target]
            for key in ("rps", "p50_ms", "p99_ms", "cpu_cores", "errors"):
                values = [r[key] for r in mine if r.get(key) is not None]
                targets[target][key] = statistics.median(values) if values else None
    return out


def table(w8: dict[str, Any]) -> list[str]:
    """Markdown rows for RESULTS.md."""
    med = w8["median"]
    base = {t: (med.get("1", {}).get(t, {}).get("rps") or None) for t in ("corral", "vllm-router")}
    lines = [
        "| N | target | req/s | × N=1 | p50 ms | p99 ms | CPU cores (own tree) | req/s per core |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n in w8["processes"]:
        for target in ("direct", "corral", "vllm-router"):
            x = med.get(str(n), {}).get(target)
            if not x:
                continue
            b = base.get(target)
            scale = f"{x['rps'] / b:.2f}" if b and x.get("rps") else "–"
            cores = x.get("cpu_cores")
            per_core = f"{x['rps'] / cores:,.0f}" if cores else "–"
            lines.append(
                f"| {n} | {target} | {x['rps']:,.0f} | {scale} | {_ms(x['p50_ms'])} | "
                f"{_ms(x['p99_ms'])} | {_ms(cores)} | {per_core} |"
            )
    return lines

"""The bench's orchestration: phases of processes, the seven workloads, results on disk."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import psutil
import report
import scale
import uvloop
from loadgen import Stats, chat_body, first_byte, run_load
from procs import Background, CpuMeter, Proc, pin
from targets import (
    BENCH,
    Corral,
    Infra,
    bench_bin,
    replica_url,
    sim_override,
    start_litellm,
    start_sim,
    start_vllm_router,
)

#: Frontend settings for the throughput phase: the defaults, with a faster heartbeat so the
#: bench does not wait long for the worker; nothing here touches the request path.
ENV_A = {"CORRAL_HEARTBEAT_INTERVAL": "2", "CORRAL_WORKER_DRAIN_TIMEOUT": "3"}
#: Short ticks for balance and recovery (the reconciler must act within seconds).
ENV_FAST = {
    "CORRAL_HEARTBEAT_INTERVAL": "0.5",
    "CORRAL_UNHEALTHY_AFTER": "2",
    "CORRAL_OFFLINE_AFTER": "3",
    "CORRAL_RECONCILE_INTERVAL": "0.5",
    "CORRAL_RESYNC_INTERVAL": "2",
    "CORRAL_CAPACITY_COOLDOWN": "1",
    "CORRAL_ORPHAN_GRACE": "3",
    "CORRAL_WORKER_DRAIN_TIMEOUT": "3",
    "CORRAL_PLACEMENT": "spread",
}

COLD_LOAD_TIME = 1.0  # seconds the sim's /health says "loading" (its own load time)
BAL_SLOTS = 4
BAL_FAST = 0.020  # seconds per non-streamed answer on a fast replica
BAL_SLOW = 0.060  # the 3x slower replica


class Config:
    def __init__(self, quick: bool, rounds: int | None) -> None:
        self.quick = quick
        self.rounds = rounds or (2 if quick else 3)
        self.w1_requests = 200 if quick else 2000
        self.w2_seconds = 3.0 if quick else 15.0
        self.w3_seconds = 3.0 if quick else 10.0
        self.w4_seconds = 4.0 if quick else 15.0
        self.w4_litellm = not quick  # its start takes ~40 s; no target depends on it here
        self.w4_users = 16
        self.w5_loads = 2 if quick else 5
        self.w6_seconds = 15.0 if quick else 40.0
        self.w6_kill_at = 5.0
        self.w6_users = 16
        self.warmup = 0.5 if quick else 1.0


class Harness:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.cfg = Config(args.quick, args.rounds)
        self.only = {w.strip() for w in args.only.split(",") if w.strip()}
        self.targets = {t.strip() for t in args.targets.split(",") if t.strip()}
        self.servers = [k.strip() for k in args.servers.split(",") if k.strip()]
        self.processes = [int(n) for n in args.processes.split(",") if n.strip()]
        if self.processes:
            self.only.add("w8")
        pinned = not args.no_pin and (os.cpu_count() or 1) >= 2
        # Core 1 belongs to the proxy under test; the client, the sim backends, PostgreSQL,
        # NATS and the workers share core 0. Direct runs leave core 1 idle.
        self.client_cpus: list[int] | None = [0] if pinned else None
        self.proxy_cpus: list[int] | None = [1] if pinned else None
        self.backend_cpus = self.client_cpus
        self.other_cpus = self.client_cpus
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.dir = args.out / stamp
        self.dir.mkdir(parents=True, exist_ok=True)
        self.results: dict[str, Any] = {
            "meta": self._meta(stamp, pinned),
            "workloads": {},
        }
        self.infra: Infra | None = None
        self.started = time.monotonic()
        self._cleanup: list[Callable[[], None]] = []

    # --- lifecycle -------------------------------------------------------------------------
    def run(self) -> None:
        if self.client_cpus is not None:
            os.sched_setaffinity(0, set(self.client_cpus))
        print(
            f"bench: {'quick' if self.cfg.quick else 'full'} run, {self.cfg.rounds} rounds, "
            f"workloads {','.join(sorted(self.only))}; logs and raw data in {self.dir}",
            flush=True,
        )
        self.infra = Infra(self.dir / "infra")
        self.infra.start(self.other_cpus)
        self._cleanup.append(self.infra.stop)
        try:
            uvloop.run(self._main())
        finally:
            self.results["meta"]["wall_seconds"] = round(time.monotonic() - self.started, 1)
            self._write()

    def close(self) -> None:
        for fn in reversed(self._cleanup):
            with contextlib.suppress(Exception):
                fn()
        self._cleanup.clear()

    async def _main(self) -> None:
        if self.only & {"w1", "w2", "w3", "w5"}:
            await self._guard("phase A (w1, w2, w3, w5)", self.phase_a)
        if "w4" in self.only:
            await self._guard("phase B (w4)", self.phase_b)
        if "w6" in self.only:
            await self._guard("phase C (w6)", self.phase_c)
        if "w7" in self.only:
            await self._guard("w7", self.w7)
        if self.processes:
            await self._guard("w8", self.w8)

    async def _guard(self, what: str, fn: Callable[[], Any]) -> None:
        """Run one phase; a failure is recorded and the next phase still runs."""
        print(f"\n=== {what} ===", flush=True)
        try:
            await fn()
        except Exception as exc:
            import traceback

            traceback.print_exc()
            self.results.setdefault("errors", []).append(f"{what}: {type(exc).__name__}: {exc}")
        finally:
            self._save()

    # --- phase A: one worker, one sim per model, every gateway in front of the same sims --
    async def phase_a(self) -> None:
        assert self.infra is not None
        logs = self.dir / "phase-a"
        corral = Corral(
            self.infra,
            self.dir,
            "a",
            env=ENV_A,
            frontend_cpus=self.proxy_cpus,
            other_cpus=self.other_cpus,
        )
        # one replica each (max 1), like the single backend behind the other gateways
        # (min = max = 1, never scaled down while the bench runs)
        main = {
            "node_selector": {"role": "main"},
            "min_replicas": 1,
            "max_replicas": 1,
            "scale_down_delay": 86400,
        }
        corral.write_model("bench", options={"tokens": 16}, scheduling=main)
        corral.write_model("bench-stream", options={"tokens": 100, "tpot": 0.005}, scheduling=main)
        for i in range(self.cfg.w5_loads):
            corral.write_model(
                f"cold-{i}",
                options={"tokens": 16, "load_time": COLD_LOAD_TIME},
                scheduling={"node_selector": {"role": "main"}, "max_replicas": 1},
            )
        try:
            await corral.start()
            corral.start_worker("w1", labels="role=main")
            for model in ("bench", "bench-stream"):
                status, _, took = await first_byte(corral.url, chat_body(model, max_tokens=4))
                print(f"  {model}: first request {status} after {took:.2f}s (cold load)")
            direct = replica_url(corral.wait_replicas("bench", 1, 120)[0])
            direct_stream = replica_url(corral.wait_replicas("bench-stream", 1, 120)[0])
            corral.pin_backends(self.backend_cpus)
            want = self.targets
            ll, ll_url = (
                start_litellm(
                    logs, {"bench": [direct], "bench-stream": [direct_stream]}, cpus=self.proxy_cpus
                )
                if "litellm" in want
                else (None, "")
            )
            vr, vr_url = start_vllm_router(
                logs, [direct], cpus=self.proxy_cpus, name="vllm-router-bench"
            )
            vrs, vrs_url = start_vllm_router(
                logs, [direct_stream], cpus=self.proxy_cpus, name="vllm-router-stream"
            )
            assert corral.frontend is not None
            pids = {
                "direct": _listening_pid(direct),
                "corral": corral.frontend.pid,
                "litellm": ll.pid if ll else 0,
                "vllm-router": vr.pid,
            }
            variants: dict[str, str] = {}
            for kind in self.servers:
                proc, variant_url = corral.start_variant(kind)
                variants[f"corral-{kind}"] = variant_url
                pids[f"corral-{kind}"] = proc.pid
                want = want | {f"corral-{kind}"}
            self.results["meta"]["backend_pids"] = {"sim": pids["direct"]}
            nonstream = {
                "direct": direct,
                "corral": corral.url,
                "litellm": ll_url,
                "vllm-router": vr_url,
            }
            stream = {
                "direct": direct_stream,
                "corral": corral.url,
                "litellm": ll_url,
                "vllm-router": vrs_url,
            }
            nonstream = {k: v for k, v in {**nonstream, **variants}.items() if k in want}
            stream = {k: v for k, v in {**stream, **variants}.items() if k in want}
            if "w1" in self.only:
                await self.w1(nonstream)
                self._save()
            if "w2" in self.only:
                await self.w2(nonstream, pids)
                self._save()
            if "w3" in self.only:
                spids = dict(pids, direct=_listening_pid(direct_stream), **{"vllm-router": vrs.pid})
                await self.w3(stream, spids)
                self._save()
            if self.args.profile:
                await self.profile("corral", corral.frontend.pid, corral.url)
                for name in variants:
                    await self.profile(name, pids[name], variants[name])
            for p in (ll, vr, vrs):
                if p is not None:
                    p.stop()
            if "w5" in self.only:
                await self.w5(corral, logs)
        finally:
            corral.stop()
            with contextlib.suppress(OSError):
                lines = (corral.root / "logs" / "frontend.log").read_text(errors="replace")
                self.results["meta"]["frontend_log_lines_phase_a"] = lines.count("\n")

    async def _warm(self, targets: Mapping[str, str], body: bytes, users: int) -> None:
        for url in targets.values():
            s = await run_load(url, body, users=users, duration=self.cfg.warmup)
            if s.ok == 0:
                raise RuntimeError(
                    f"{url}: warm-up got no successful answer: {dict(s.error_kinds)}"
                )

    async def w1(self, targets: Mapping[str, str]) -> None:
        n = self.cfg.w1_requests
        print(f"w1: added latency, concurrency 1, {n} requests x {self.cfg.rounds} rounds")
        body = chat_body("bench", max_tokens=16)
        await self._warm(targets, body, 4)
        rounds: list[dict[str, Any]] = []
        samples: dict[str, list[float]] = {t: [] for t in targets}
        for r in range(self.cfg.rounds):
            row = {}
            for name, url in targets.items():
                bg = self._bg()
                s = await run_load(url, body, users=1, count=n)
                row[name] = {
                    "p50_ms": s.pct(0.5) * 1e3,
                    "p99_ms": s.pct(0.99) * 1e3,
                    "background_cores": bg.stop(),
                    "mean_ms": statistics.fmean(s.latencies) * 1e3 if s.latencies else None,
                    "ok": s.ok,
                    "errors": s.errors,
                }
                samples[name] += s.latencies
                print(
                    f"  round {r + 1} {name:<12} p50 {row[name]['p50_ms']:.3f} ms  "
                    f"p99 {row[name]['p99_ms']:.3f} ms  errors {s.errors}",
                    flush=True,
                )
                await asyncio.sleep(0.2)
            rounds.append(row)
        self.results["workloads"]["w1"] = {
            "requests": n,
            "rounds": rounds,
            "median": _medians(rounds),
            "samples_ms": {t: [x * 1e3 for x in v] for t, v in samples.items()},
        }

    async def w2(self, targets: Mapping[str, str], pids: Mapping[str, int]) -> None:
        secs = self.cfg.w2_seconds
        print(f"w2: throughput, concurrency 64, {secs:g}s x {self.cfg.rounds} rounds")
        body = chat_body("bench", max_tokens=16)
        await self._warm(targets, body, 64)
        rounds: list[dict[str, Any]] = []
        for r in range(self.cfg.rounds):
            row = {}
            for name, url in targets.items():
                meter = CpuMeter([pids[name]])
                meter.start()
                bg = self._bg()
                s = await run_load(url, body, users=64, duration=secs)
                cores = meter.stop()
                row[name] = {
                    "rps": s.rps,
                    "cpu_cores": cores,
                    "background_cores": bg.stop(),
                    "rps_per_core": s.rps / cores if cores > 0.01 else None,
                    "p50_ms": s.pct(0.5) * 1e3,
                    "p99_ms": s.pct(0.99) * 1e3,
                    "ok": s.ok,
                    "errors": s.errors,
                }
                print(
                    f"  round {r + 1} {name:<12} {s.rps:9.0f} req/s  cpu {cores:.2f} cores  "
                    f"p50 {row[name]['p50_ms']:.2f} ms  errors {s.errors}",
                    flush=True,
                )
                await asyncio.sleep(0.5)
            rounds.append(row)
        self.results["workloads"]["w2"] = {
            "seconds": secs,
            "users": 64,
            "rounds": rounds,
            "median": _medians(rounds),
        }

    async def w3(self, targets: Mapping[str, str], pids: Mapping[str, int]) -> None:
        secs = self.cfg.w3_seconds
        print(f"w3: streaming, 64 streams of 100 chunks (tpot 5 ms), {secs:g}s x {self.cfg.rounds}")
        body = chat_body("bench-stream", stream=True)
        await self._warm(targets, body, 64)
        rounds: list[dict[str, Any]] = []
        ttfb: dict[str, list[float]] = {t: [] for t in targets}
        for r in range(self.cfg.rounds):
            row = {}
            for name, url in targets.items():
                meter = CpuMeter([pids[name]])
                meter.start()
                bg = self._bg()
                s = await run_load(url, body, users=64, duration=secs)
                cores = meter.stop()
                row[name] = {
                    "chunks_per_s": s.events_per_s,
                    "streams_per_s": s.rps,
                    "background_cores": bg.stop(),
                    "events_per_stream": s.events / s.ok if s.ok else None,
                    "ttfb_p50_ms": s.pct(0.5, "ttfb") * 1e3,
                    "ttfb_p99_ms": s.pct(0.99, "ttfb") * 1e3,
                    "cpu_cores": cores,
                    "ok": s.ok,
                    "errors": s.errors,
                }
                ttfb[name] += s.ttfb
                print(
                    f"  round {r + 1} {name:<12} {s.events_per_s:9.0f} chunks/s  "
                    f"ttfb p50 {row[name]['ttfb_p50_ms']:.2f} ms  cpu {cores:.2f}  "
                    f"errors {s.errors}",
                    flush=True,
                )
                await asyncio.sleep(0.5)
            rounds.append(row)
        self.results["workloads"]["w3"] = {
            "seconds": secs,
            "users": 64,
            "rounds": rounds,
            "median": _medians(rounds),
            "ttfb_samples_ms": {t: [x * 1e3 for x in v[:20000]] for t, v in ttfb.items()},
        }

    async def w5(self, corral: Corral, logs: Path) -> None:
        n = self.cfg.w5_loads
        print(f"w5: cold start, {n} loads of a model whose backend loads for {COLD_LOAD_TIME:g}s")
        rows = []
        for i in range(n):
            status, c_ttfb, _ = await first_byte(
                corral.url, chat_body(f"cold-{i}", stream=True, max_tokens=16), timeout=180
            )
            if status != 200:
                raise RuntimeError(f"cold-{i}: HTTP {status}")
            d_ttfb = await self._direct_cold(logs, i)
            rows.append(
                {"corral_s": c_ttfb, "direct_s": d_ttfb, "overhead_ms": (c_ttfb - d_ttfb) * 1e3}
            )
            print(
                f"  load {i + 1}: corral {c_ttfb:.3f}s  sim alone {d_ttfb:.3f}s  "
                f"overhead {(c_ttfb - d_ttfb) * 1e3:.0f} ms",
                flush=True,
            )
        corral_med = statistics.median(r["corral_s"] for r in rows)
        direct_med = statistics.median(r["direct_s"] for r in rows)
        self.results["workloads"]["w5"] = {
            "load_time_s": COLD_LOAD_TIME,
            "loads": rows,
            "median": {
                "corral_s": corral_med,
                "direct_s": direct_med,
                "overhead_ms": (corral_med - direct_med) * 1e3,
            },
        }

    async def _direct_cold(self, logs: Path, i: int) -> float:
        """Spawn the sim as a worker would, poll /health every 5 ms, send the request: the
        time to its first byte is the backend's own start + load time."""
        t0 = time.perf_counter()
        proc, url = start_sim(
            logs,
            f"cold-direct-{i}",
            model="cold-direct",
            cpus=self.backend_cpus,
            tokens=16,
            load_time=COLD_LOAD_TIME,
        )
        try:
            async with httpx.AsyncClient(timeout=5) as client:
                while (await client.get(url + "/health")).status_code != 200:
                    await asyncio.sleep(0.005)
            t_req = time.perf_counter()
            _, ttfb, _ = await first_byte(url, chat_body("cold-direct", stream=True, max_tokens=16))
            return t_req - t0 + ttfb
        finally:
            proc.stop()

    def _bg(self) -> Background:
        extra = []
        if self.infra is not None:
            extra = [p for p in (self.infra.pg.pid, self.infra.nats.pid) if p is not None]
        bg = Background(extra)
        bg.start()
        return bg

    # --- profile ---------------------------------------------------------------------------
    async def profile(self, name: str, pid: int, url: str) -> None:
        """py-spy on one frontend under workload 2: raw samples, flame graph, hot spots."""
        secs = max(8.0, self.cfg.w2_seconds)
        raw = self.dir / f"profile-w2-{name}.txt"
        svg = self.dir / f"profile-w2-{name}.svg"
        print(f"profile: py-spy on {name} (pid {pid}) under w2 for {secs:g}s")
        body = chat_body("bench", max_tokens=16)
        results = {}
        for fmt, path in (("raw", raw), ("flamegraph", svg)):
            spy = subprocess.Popen(
                [
                    bench_bin("py-spy"),
                    "record",
                    "--pid",
                    str(pid),
                    "--subprocesses",
                    "--rate",
                    "200",
                    "--duration",
                    str(int(secs)),
                    "--format",
                    fmt,
                    "--output",
                    str(path),
                    "--nonblocking",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            if self.client_cpus is not None:
                pin(spy.pid, self.client_cpus)
            await asyncio.sleep(0.5)
            s = await run_load(url, body, users=64, duration=secs - 1)
            results[fmt] = s.rps
            try:
                _, err = spy.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                spy.kill()
                _, err = spy.communicate()
            if spy.returncode != 0:
                raise RuntimeError(f"py-spy failed: {err.decode(errors='replace')[-2000:]}")
        summary = report.summarize_profile(raw.read_text())
        summary["rps_while_sampled"] = results.get("raw")
        summary["raw"] = str(raw)
        summary["flamegraph"] = str(svg)
        if (BENCH / "plots").is_dir():
            shutil.copy(svg, BENCH / "plots" / f"profile-w2-{name}.svg")
        if name == "corral":
            self.results["profile"] = summary
        else:
            self.results.setdefault("profiles", {})[name] = summary
        for line in report.profile_lines(summary)[:40]:
            print("  " + line)

    def _three_replicas(self, phase: str, role: str) -> Corral:
        """A Corral whose model `bench` keeps exactly 3 replicas on nodes labelled role=`role`."""
        assert self.infra is not None
        corral = Corral(
            self.infra,
            self.dir,
            phase,
            env=ENV_FAST,
            frontend_cpus=self.proxy_cpus,
            other_cpus=self.other_cpus,
        )
        corral.write_model(
            "bench",
            options={"tokens": 16},
            scheduling={
                "min_replicas": 3,
                "max_replicas": 3,
                "scale_down_delay": 86400,
                "node_selector": {"role": role},
            },
        )
        return corral

    # --- phase B: balance -----------------------------------------------------------------
    async def phase_b(self) -> None:
        assert self.infra is not None
        logs = self.dir / "phase-b"
        cfg = self.cfg
        corral = self._three_replicas("b", "bal")
        fast = sim_override(logs / "backends-fast", slots=BAL_SLOTS, ttft=BAL_FAST)
        slow = sim_override(logs / "backends-slow", slots=BAL_SLOTS, ttft=BAL_SLOW)
        own: list[Proc] = []
        pending = None
        try:
            await corral.start()
            for name, d in (("b1", fast), ("b2", fast), ("b3", slow)):
                corral.start_worker(
                    name, labels="role=bal", backends_dir=d, max_replicas_per_model=1
                )
            status, _, took = await first_byte(
                corral.url, chat_body("bench", max_tokens=4), timeout=120
            )
            print(f"  first request {status} after {took:.2f}s")
            try:
                replicas = corral.wait_replicas("bench", 3, 60)
                nodes = {n["id"]: n["name"] for n in corral.nodes()}
                replicas.sort(key=lambda r: nodes[r["node_id"]])
                urls = [replica_url(r) for r in replicas]
                service = [BAL_SLOW if nodes[r["node_id"]] == "b3" else BAL_FAST for r in replicas]
                corral.pin_backends(self.backend_cpus)
            except TimeoutError as exc:
                pending = (
                    f"Corral did not bring the model to 3 replicas ({exc}): reconciler missing?"
                )
                print(f"  {pending}; the other targets run on sims the bench starts itself")
                urls, service = [], []
                for i, t in enumerate((BAL_FAST, BAL_FAST, BAL_SLOW)):
                    p, u = start_sim(
                        logs,
                        f"bal-sim-{i}",
                        cpus=self.backend_cpus,
                        slots=BAL_SLOTS,
                        ttft=t,
                        tokens=16,
                    )
                    own.append(p)
                    urls.append(u)
                    service.append(t)
            ll_url = ""
            if cfg.w4_litellm and "litellm" in self.targets:
                ll, ll_url = start_litellm(logs, {"bench": urls}, cpus=self.proxy_cpus)
                own.append(ll)
            vr, vr_url = start_vllm_router(logs, urls, cpus=self.proxy_cpus, policy="round_robin")
            own.append(vr)
            body = chat_body("bench", max_tokens=16)
            targets: dict[str, dict[str, Any]] = {}
            if pending is None:
                targets["corral"] = {"urls": [corral.url]}
            targets["vllm-router (round robin)"] = {"urls": [vr_url]}
            if ll_url:
                targets["litellm (simple-shuffle)"] = {"urls": [ll_url]}
            targets["client round robin"] = {"urls": urls, "policy": "rr"}
            targets["oracle"] = {
                "urls": urls,
                "policy": "oracle",
                "service": service,
                "slots": [BAL_SLOTS] * 3,
            }
            print(
                f"w4: balance, 3 replicas ({BAL_SLOTS} slots each; {BAL_FAST * 1e3:.0f}/"
                f"{BAL_FAST * 1e3:.0f}/{BAL_SLOW * 1e3:.0f} ms), {cfg.w4_users} users, "
                f"{cfg.w4_seconds:g}s x {cfg.rounds}"
            )
            for spec in targets.values():
                await run_load(body=body, users=cfg.w4_users, duration=cfg.warmup, **spec)
            rounds: list[dict[str, Any]] = []
            samples: dict[str, list[float]] = {t: [] for t in targets}
            slow_idx = service.index(max(service))
            for r in range(cfg.rounds):
                row = {}
                for name, spec in targets.items():
                    before = _sim_counts(urls)
                    bg = self._bg()
                    s = await run_load(
                        body=body, users=cfg.w4_users, duration=cfg.w4_seconds, **spec
                    )
                    after = _sim_counts(urls)
                    served = [a - b for a, b in zip(after, before, strict=True)]
                    total = sum(served) or 1
                    row[name] = {
                        "p50_ms": s.pct(0.5) * 1e3,
                        "p99_ms": s.pct(0.99) * 1e3,
                        "rps": s.rps,
                        "slow_share": served[slow_idx] / total,
                        "background_cores": bg.stop(),
                        "ok": s.ok,
                        "errors": s.errors,
                    }
                    samples[name] += s.latencies
                    print(
                        f"  round {r + 1} {name:<26} p50 {row[name]['p50_ms']:6.1f} ms  "
                        f"p99 {row[name]['p99_ms']:6.1f} ms  {s.rps:5.0f} req/s  slow replica "
                        f"{row[name]['slow_share'] * 100:4.1f}%  errors {s.errors}",
                        flush=True,
                    )
                    await asyncio.sleep(0.3)
                rounds.append(row)
            self.results["workloads"]["w4"] = {
                "users": cfg.w4_users,
                "seconds": cfg.w4_seconds,
                "slots": BAL_SLOTS,
                "service_ms": [x * 1e3 for x in service],
                "pending": pending,
                "rounds": rounds,
                "median": _medians(rounds),
                "samples_ms": {t: [x * 1e3 for x in v[:50000]] for t, v in samples.items()},
            }
        finally:
            for p in own:
                p.stop()
            corral.stop()

    # --- phase C: recovery ----------------------------------------------------------------
    async def phase_c(self) -> None:
        assert self.infra is not None
        logs = self.dir / "phase-c"
        cfg = self.cfg
        corral = self._three_replicas("c", "rec")
        fast = sim_override(logs / "backends", slots=BAL_SLOTS, ttft=BAL_FAST)
        try:
            await corral.start()
            for name in ("r1", "r2", "r3"):
                corral.start_worker(name, labels="role=rec", backends_dir=fast)
            await first_byte(corral.url, chat_body("bench", max_tokens=4), timeout=120)
            try:
                replicas = corral.wait_replicas("bench", 3, 60)
            except TimeoutError as exc:
                self.results["workloads"]["w6"] = {
                    "pending": f"Corral did not bring the model to 3 replicas ({exc}): "
                    "the reconciler (min_replicas) is not there yet"
                }
                print(f"  w6 pending: {exc}")
                return
            corral.pin_backends(self.backend_cpus)
            nodes = {n["id"]: n["name"] for n in corral.nodes()}
            per_node: dict[str, int] = {}
            for r in replicas:
                per_node[nodes[r["node_id"]]] = per_node.get(nodes[r["node_id"]], 0) + 1
            victim = min(per_node, key=lambda n: (per_node[n], n != "r3"))
            print(
                f"w6: recovery, {cfg.w6_users} users for {cfg.w6_seconds:g}s, SIGKILL worker "
                f"{victim} and its backends at t={cfg.w6_kill_at:g}s "
                f"(replicas per node: {per_node})"
            )
            body = chat_body("bench", max_tokens=16)
            await run_load(corral.url, body, users=cfg.w6_users, duration=cfg.warmup)
            poll = _ReplicaPoller(corral, "bench")
            poll.start()
            loop = asyncio.get_running_loop()
            killed_at: list[float] = []

            def kill() -> None:
                proc = corral.workers[victim]
                tree = proc.tree()
                killed_at.append(time.perf_counter())
                for p in tree:
                    with contextlib.suppress(psutil.Error):
                        p.kill()

            from loadgen import Run

            run = Run([corral.url], body, users=cfg.w6_users, duration=cfg.w6_seconds)
            handle = loop.call_later(cfg.w6_kill_at, kill)
            t_start = time.perf_counter()
            s = await run.run()
            handle.cancel()
            poll.stop()
            kill_t = (killed_at[0] - run.started) if killed_at else cfg.w6_kill_at
            self.results["workloads"]["w6"] = _recovery(
                s, poll.samples, t_start, run.started, kill_t, victim, cfg
            )
            w6 = self.results["workloads"]["w6"]
            print(
                f"  failed requests {w6['failed']} {w6['error_kinds']}; replicas back to 3 after "
                f"{_fmt(w6['replicas_back_s'])} s; throughput back after "
                f"{_fmt(w6['throughput_back_s'])} s",
                flush=True,
            )
        finally:
            corral.stop()

    # --- w7 ---------------------------------------------------------------------------------
    async def w7(self) -> None:
        assert self.infra is not None
        print("w7: scale in simulation, 1,000 nodes and 10,000 replicas")
        routing = scale.routing(quick=self.cfg.quick)
        for key in ("spread", "one_model", "spread_after_change", "one_model_after_change"):
            c = routing[key]
            print(
                f"  routing decision, {c['models']} model(s) x {c['per_model']} replicas "
                f"({key}): {c['us']:.1f} us"
            )
        for key in ("spread", "one_model"):
            c = routing[f"{key}_churn"]
            print(
                f"  with 200 heartbeats/s ({key}): {c['us']:.1f} us vs "
                f"{routing[f'{key}_quiet']['us']:.1f} us quiet ({c['ratio']:.3f}x; before "
                f"the incremental view {routing[f'{key}_churn_before']['us']:.0f} us)"
            )
        url = await self.infra.create_database("bench_scale")
        writes = await scale.registry_writes(url, quick=self.cfg.quick)
        print(
            f"  heartbeats {writes['heartbeats_per_s']:.0f}/s; touch 10,000 replicas "
            f"{writes['touch_10000_s'] * 1e3:.0f} ms; resync {writes['resync_s'] * 1e3:.0f} ms"
        )
        self.results["workloads"]["w7"] = {"routing": routing, "registry": writes}

    # --- w8 ---------------------------------------------------------------------------------
    async def w8(self) -> None:
        assert self.infra is not None
        import scaling

        seconds = 4.0 if self.cfg.quick else 10.0
        self.results["workloads"]["w8"] = await scaling.run(
            self.infra, self.dir, self.processes, seconds=seconds, rounds=self.cfg.rounds
        )

    # --- output -----------------------------------------------------------------------------
    def _meta(self, stamp: str, pinned: bool) -> dict[str, Any]:
        return {
            "stamp": stamp,
            "command": "python bench/run.py " + " ".join(sys.argv[1:]),
            "mode": "quick" if self.cfg.quick else "full",
            "rounds": self.cfg.rounds,
            "pinned": pinned,
            "versions": _versions(),
            "source": _source(),
            "machine": _machine(),
        }

    def _save(self) -> None:
        (self.dir / "results.json").write_text(json.dumps(self.results, indent=1, default=str))

    def _write(self) -> None:
        self._save()
        out = self.args.out
        latest = out / "latest.json"
        shutil.copy(self.dir / "results.json", latest)
        if not self.args.no_plots:
            plots = BENCH / "plots"
            plots.mkdir(exist_ok=True)
            if "profile" in self.results and Path(self.results["profile"]["flamegraph"]).exists():
                shutil.copy(self.results["profile"]["flamegraph"], plots / "profile-w2-corral.svg")
            done = subprocess.run(
                [bench_bin("python"), str(BENCH / "plots.py"), str(latest), str(plots)],
                capture_output=True,
                text=True,
                timeout=300,
            )
            if done.returncode != 0:
                print(f"plots failed:\n{done.stderr[-3000:]}", file=sys.stderr)
        text = report.results_md(self.results)
        self.args.results.write_text(text)
        print("\n" + report.console(self.results))
        plots = "" if self.args.no_plots else f" and {BENCH / 'plots'}"
        print(f"\nwrote {self.args.results}{plots}; raw data {self.dir}")


# --- helpers ---------------------------------------------------------------------------------


def _medians(rounds: Sequence[Mapping[str, Mapping[str, Any]]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name in rounds[0]:
        out[name] = {}
        for key in rounds[0][name]:
            values = [r[name][key] for r in rounds if r.get(name, {}).get(key) is not None]
            out[name][key] = statistics.median(values) if values else None
    return out


def _listening_pid(url: str) -> int:
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    for c in psutil.net_connections(kind="tcp"):
        if c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN and c.pid:
            return c.pid
    raise RuntimeError(f"no process listens on port {port}")


def _sim_counts(urls: Sequence[str]) -> list[int]:
    return [int(httpx.get(u + "/admin/stats", timeout=5).json()["requests"]) for u in urls]


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1f}"


class _ReplicaPoller:
    """Counts loaded replicas of a model every 0.2 s from a thread (the loop runs the load)."""

    def __init__(self, corral: Corral, model: str) -> None:
        self.corral = corral
        self.model = model
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=2, headers=self.corral.admin_headers) as client:
            while not self._stop.is_set():
                try:
                    reps = client.get(self.corral.url + "/api/replicas").json()["replicas"]
                    n = sum(1 for r in reps if r["model"] == self.model and r["state"] == "loaded")
                    self.samples.append((time.perf_counter(), n))
                except (httpx.HTTPError, ValueError, KeyError):
                    pass
                self._stop.wait(0.2)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def _recovery(
    s: Stats,
    polls: Sequence[tuple[float, int]],
    t_start: float,
    started: float,
    kill_t: float,
    victim: str,
    cfg: Config,
) -> dict[str, Any]:
    bucket = 0.5
    n_buckets = max(1, int(s.elapsed / bucket))  # whole buckets only
    counts = [0] * n_buckets
    for t in s.done_at:
        counts[min(n_buckets - 1, int(t / bucket))] += 1
    series = [c / bucket for c in counts]
    pre = [series[i] for i in range(n_buckets) if 1.0 <= i * bucket < kill_t - 0.5]
    pre_rps = statistics.fmean(pre) if pre else 0.0
    replicas = [(t - started, n) for t, n in polls]
    dropped = next((t for t, n in replicas if t > kill_t and n < 3), None)
    back = None
    if dropped is not None:
        back = next((t - kill_t for t, n in replicas if t > dropped and n >= 3), None)
    throughput_back = None
    first_dip = next(
        (i for i in range(n_buckets) if i * bucket >= kill_t and series[i] < 0.9 * pre_rps), None
    )
    if first_dip is not None:
        for i in range(first_dip, n_buckets - 2):
            window = series[i : i + 3]
            if all(x >= 0.9 * pre_rps for x in window):
                throughput_back = i * bucket - kill_t
                break
    else:
        throughput_back = 0.0
    return {
        "victim": victim,
        "users": cfg.w6_users,
        "seconds": s.elapsed,
        "kill_at_s": kill_t,
        "ok": s.ok,
        "failed": s.errors,
        "error_kinds": dict(s.error_kinds),
        "failed_at_s": s.failed_at[:1000],
        "pre_kill_rps": pre_rps,
        "replicas_dropped_s": None if dropped is None else dropped - kill_t,
        "replicas_back_s": back,
        "throughput_back_s": throughput_back,
        "series_rps": series,
        "bucket_s": bucket,
        "replica_samples": replicas,
    }


def _source() -> dict[str, Any]:
    """Which code ran: the commit and whether src/ had uncommitted changes (read-only git)."""
    root = BENCH.parent
    out: dict[str, Any] = {}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out["commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "src"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.splitlines()
        out["src_changes"] = len(dirty)
    return out


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    import corral

    out = {"python": platform.python_version(), "corral": corral.__version__}
    code = (
        "import importlib.metadata as m, platform;"
        "print(m.version('litellm'), m.version('vllm-router'), m.version('matplotlib'),"
        " m.version('py-spy'))"
    )
    try:
        done = subprocess.run(
            [bench_bin("python"), "-c", code],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        ll, vr, mpl, spy = done.stdout.split()
        out.update({"litellm": ll, "vllm-router": vr, "matplotlib": mpl, "py-spy": spy})
    except (subprocess.SubprocessError, ValueError, OSError):
        pass
    for mod in ("uvicorn", "uvloop", "httptools", "fastapi"):
        with contextlib.suppress(Exception):
            out[mod] = version(mod)
    return out


def _machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": model or platform.processor(),
        "cores": os.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "kernel": platform.release(),
        "os": platform.platform(),
    }

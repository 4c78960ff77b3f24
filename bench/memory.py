"""The frontend's memory: RSS at start and under a long load, with one or several processes.

    python bench/memory.py                       # 10 minutes per process count, N = 1 and 2
    python bench/memory.py --minutes 2 --processes 1,2,4

For each N: a private PostgreSQL + NATS, `corral serve --processes N`, one worker and a sim;
after one warm-up request the RSS of every frontend process is read, then 64 closed-loop
users (workload 2's load: non-streamed chat, plus one stream in eight) run for the given
time while RSS is sampled every 10 s. Prints a table and writes bench/out/memory-<stamp>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import psutil  # noqa: E402
import uvloop  # noqa: E402
from loadgen import chat_body, first_byte, run_load  # noqa: E402
from procs import stop_all  # noqa: E402
from targets import Corral, Infra  # noqa: E402

MIB = 1024 * 1024
WHOLE = chat_body("bench", max_tokens=16)
STREAM = chat_body("bench-stream", stream=True)


def rss(root_pid: int) -> dict[int, float]:
    """RSS in MiB of a process and its descendants (the frontend's processes)."""
    root = psutil.Process(root_pid)
    out = {}
    for p in [root, *root.children(recursive=True)]:
        try:
            out[p.pid] = p.memory_info().rss / MIB
        except psutil.Error:
            pass
    return out


def pss(root_pid: int) -> float:
    """Proportional set size in MiB of the process tree: pages shared between the
    processes (libraries) counted once in total, unlike RSS."""
    root = psutil.Process(root_pid)
    total = 0.0
    for p in [root, *root.children(recursive=True)]:
        try:
            total += p.memory_full_info().pss / MIB
        except (psutil.Error, AttributeError):
            pass
    return total


async def measure(infra: Infra, out: Path, n: int, minutes: float) -> dict[str, Any]:
    corral = Corral(infra, out, f"mem{n}", env={"CORRAL_PROCESSES": str(n)})
    corral.write_model("bench", options={"tokens": 16})
    corral.write_model("bench-stream", options={"tokens": 100, "tpot": 0.005})
    try:
        await corral.start()
        corral.start_worker("w1", labels="role=main")
        for model, stream in (("bench", False), ("bench-stream", True)):
            await first_byte(corral.url, chat_body(model, stream=stream, max_tokens=4))
        corral.restart_frontend({"CORRAL_PROCESSES": str(n)}, None)  # wait for all N
        assert corral.frontend is not None
        pid = corral.frontend.pid
        for model, stream in (("bench", False), ("bench-stream", True)):
            await first_byte(corral.url, chat_body(model, stream=stream, max_tokens=4))
        start = rss(pid)
        start_pss = pss(pid)
        samples = [(0.0, sum(start.values()))]
        t0 = time.monotonic()
        deadline = t0 + minutes * 60
        done = 0
        while time.monotonic() < deadline:
            left = min(10.0, deadline - time.monotonic())
            whole, streams = await asyncio.gather(
                run_load(corral.url, chat_body("bench", max_tokens=16), users=56, duration=left),
                run_load(
                    corral.url, chat_body("bench-stream", stream=True), users=8, duration=left
                ),
            )
            done += whole.ok + streams.ok
            samples.append((time.monotonic() - t0, sum(rss(pid).values())))
            print(
                f"  N={n} t={samples[-1][0]:5.0f}s RSS {samples[-1][1]:7.1f} MiB, {done} requests"
            )
        end = rss(pid)
        return {
            "processes": n,
            "minutes": minutes,
            "requests": done,
            "start_mib": start,
            "end_mib": end,
            "start_total_mib": sum(start.values()),
            "end_total_mib": sum(end.values()),
            "start_pss_mib": start_pss,
            "end_pss_mib": pss(pid),
            "max_total_mib": max(s for _, s in samples),
            "samples": samples,
        }
    finally:
        corral.stop()


async def main(args: argparse.Namespace) -> list[dict[str, Any]]:
    out = BENCH / "out" / f"memory-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    infra = Infra(out / "infra")
    infra.start(None)
    try:
        results = []
        for n in args.processes:
            results.append(await measure(infra, out, n, args.minutes))
        (out / "memory.json").write_text(json.dumps(results, indent=1))
        return results
    finally:
        infra.stop()


def table(results: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| processes | requests | RSS at start (MiB, per process) | after the load "
        "| total RSS start → end | total PSS start → end |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        start = ", ".join(f"{v:.0f}" for v in r["start_mib"].values())
        end = ", ".join(f"{v:.0f}" for v in r["end_mib"].values())
        lines.append(
            f"| {r['processes']} | {r['requests']:,} in {r['minutes']:g} min | {start} | {end} | "
            f"{r['start_total_mib']:.0f} → {r['end_total_mib']:.0f} "
            f"(max {r['max_total_mib']:.0f}) | {r['start_pss_mib']:.0f} → {r['end_pss_mib']:.0f} |"
        )
    return lines


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--processes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2])
    try:
        res = uvloop.run(main(p.parse_args()))
        print("\n".join(table(res)))
    finally:
        stop_all()

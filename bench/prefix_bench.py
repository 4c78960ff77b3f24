"""Shared-prefix routing bench: Corral's default pipeline against least-loaded and round robin.

One Corral (private PostgreSQL and NATS, one `corral serve`, four `corral worker`s) serves one
model per policy, each with four replicas of the sim's engine model (4 slots, prefill per
uncached token, a block-hashed LRU prefix cache holding about five of the system prompts), so
no two policies share a cache:

- `corral`: the default routing weights (load 1, prefix 1, session 1);
- `least-loaded`: `routing: {prefix: 0, session: 0}` (load and speed only);
- `round-robin`: every weight 0, so every candidate ties and ties rotate.

Workloads, open-loop Poisson arrivals of streamed chat requests through the frontend:
`shared-prefix` (many users over 20 system prompts of 2-8 k characters, Zipf-popular, a short
user line each) and `uniform` (every prompt unique, same sizes). Per policy and workload: a
warm-up, then the measured window: TTFT (first body byte) p50/p99, completed requests/s, and
the sims' prefix-cache hit rate (cached prompt tokens / prompt tokens, from /admin/stats).

    .venv/bin/python bench/prefix_bench.py [--seconds 20] [--rate 45] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from procs import stop_all  # noqa: E402
from targets import Corral, Infra  # noqa: E402

#: The engine model of every replica (the sim's flags).
ENGINE = {
    "slots": 4,
    "prefill_per_token": 0.0001,  # 1250 tokens (5 k chars) uncached: 125 ms
    "decode_base": 0.012,
    "decode_slope": 0.002,
    "tokens": 8,
    "block_tokens": 16,
    "cache_blocks": 400,  # 6,400 tokens: about five of the 20 system prompts
}
POLICIES: dict[str, dict[str, float]] = {
    "corral": {},
    "least-loaded": {"prefix": 0.0, "session": 0.0},
    "round-robin": {"load": 0.0, "prefix": 0.0, "session": 0.0, "speed": 0.0},
}
REPLICAS = 4
PROMPTS = 20


def system_prompts(rng: random.Random) -> list[str]:
    words = [f"w{i:03d}" for i in range(997)]
    out = []
    for i in range(PROMPTS):
        size = rng.randint(2000, 8000)
        text = f"System prompt {i}: you are a careful assistant. "
        while len(text) < size:
            text += rng.choice(words) + " "
        out.append(text[:size])
    return out


def arrivals(kind: str, seconds: float, rate: float, seed: int) -> list[tuple[float, str, str]]:
    """(offset, system, user) of every request in `seconds` (Zipf over the prompts)."""
    rng = random.Random(f"{kind}/{seed}")
    prompts = system_prompts(random.Random(seed))
    weights = [1.0 / (i + 1) for i in range(PROMPTS)]
    out: list[tuple[float, str, str]] = []
    t = 0.0
    n = 0
    while True:
        t += rng.expovariate(rate)
        if t >= seconds:
            return out
        n += 1
        user = f"user {rng.randrange(10_000)} asks question {n}"
        if kind == "uniform":
            size = rng.randint(2000, 8000)
            system = "".join(rng.choice("abcdefghij ") for _ in range(size))
        else:
            system = rng.choices(prompts, weights)[0]
        out.append((t, system, user))


async def run_open_loop(
    url: str, model: str, plan: list[tuple[float, str, str]]
) -> tuple[list[float], int, float]:
    """Send `plan` at its offsets; return TTFTs (s), errors and the wall time."""
    ttfts: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=512)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def one(system: str, user: str) -> None:
            nonlocal errors
            body = {
                "model": model,
                "stream": True,
                "messages": [
                    {"role": "system", "content": system},
                    {"role": "user", "content": user},
                ],
            }
            started = time.perf_counter()
            first = None
            try:
                async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                    async for _ in r.aiter_raw():
                        if first is None:
                            first = time.perf_counter() - started
                    if r.status_code != 200:
                        errors += 1
                        return
            except httpx.HTTPError:
                errors += 1
                return
            if first is not None:
                ttfts.append(first)

        start = time.perf_counter()
        tasks = []
        for offset, system, user in plan:
            delay = start + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(system, user)))
        await asyncio.gather(*tasks)
        return ttfts, errors, time.perf_counter() - start


def cache_counters(corral: Corral, model: str) -> tuple[int, int, list[int]]:
    hits = queries = 0
    served = []
    for r in corral.replicas(model):
        stats = httpx.get(f"http://{r['address']}/admin/stats", timeout=10).json()
        hits += stats["engine"]["prefix_cache_hits"]
        queries += stats["engine"]["prefix_cache_queries"]
        served.append(stats["requests"])
    return hits, queries, served


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=20.0, help="measured window per run")
    p.add_argument("--warmup", type=float, default=6.0, help="unmeasured arrivals first")
    p.add_argument("--rate", type=float, default=45.0, help="arrivals per second")
    p.add_argument("--workloads", default="shared-prefix,uniform")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="corral-prefix-bench-"))
    infra = Infra(root)
    infra.start(None)
    corral = Corral(infra, root, "pfx", env={"CORRAL_RECONCILE_INTERVAL": "0.5"})
    workloads = args.workloads.split(",")
    try:
        for wl in workloads:
            for policy, weights in POLICIES.items():
                corral.write_model(
                    f"{wl}-{policy}",
                    options=ENGINE,
                    routing=weights,
                    scheduling={
                        "min_replicas": REPLICAS,
                        "max_replicas": REPLICAS,
                        "scale_down_delay": 86400,
                    },
                )
        await corral.start()
        for i in range(REPLICAS):
            corral.start_worker(f"w{i}", labels="role=pfx", max_replicas_per_model=1)
        for wl in workloads:
            for policy in POLICIES:
                corral.wait_replicas(f"{wl}-{policy}", REPLICAS, 180)
        results: dict[str, dict[str, Any]] = {}
        for wl in workloads:
            warm = arrivals(wl, args.warmup, args.rate, seed=1)
            plan = arrivals(wl, args.seconds, args.rate, seed=2)
            for policy in POLICIES:
                model = f"{wl}-{policy}"
                await run_open_loop(corral.url, model, warm)
                h0, q0, s0 = cache_counters(corral, model)
                ttfts, errors, wall = await run_open_loop(corral.url, model, plan)
                h1, q1, s1 = cache_counters(corral, model)
                served = [b - a for a, b in zip(s0, s1, strict=True)]
                row = {
                    "requests": len(plan),
                    "errors": errors,
                    "ttft_p50_ms": pct(ttfts, 0.5) * 1e3,
                    "ttft_p99_ms": pct(ttfts, 0.99) * 1e3,
                    "ttft_mean_ms": statistics.fmean(ttfts) * 1e3 if ttfts else float("nan"),
                    "throughput_rps": len(ttfts) / wall,
                    "cache_hit_rate": (h1 - h0) / (q1 - q0) if q1 > q0 else 0.0,
                    "served": served,
                }
                results.setdefault(wl, {})[policy] = row
                print(
                    f"{wl:<14} {policy:<13} TTFT p50 {row['ttft_p50_ms']:7.1f} ms"
                    f"  p99 {row['ttft_p99_ms']:7.1f} ms  {row['throughput_rps']:5.1f} req/s"
                    f"  hit {row['cache_hit_rate'] * 100:5.1f} %  served {served}"
                    f"  errors {errors}",
                    flush=True,
                )
        out = {"engine": ENGINE, "rate": args.rate, "seconds": args.seconds, "results": results}
        if args.json:
            args.json.write_text(json.dumps(out, indent=2))
    finally:
        corral.stop()
        infra.stop()
        stop_all()


if __name__ == "__main__":
    asyncio.run(main())

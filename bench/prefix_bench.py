"""Shared-prefix routing bench: Corral's default pipeline against least-loaded and round robin.

One Corral (private PostgreSQL and NATS, one `corral serve`, four `corral worker`s) serves one
model per policy, each with four replicas of the sim's engine model (4 slots, prefill per
uncached token, a block-hashed LRU prefix cache holding about five of the system prompts), so
no two policies share a cache:

- `corral`: the default routing weights (load 1, prefix 1, session 1);
- `corral-c4`: the same with `routing: {concurrency: 4}`, the replicas' real batch size (the
  default load scale is 8 requests, so the affinity guard lets a replica run 4 more than the
  least loaded one: a whole batch);
- `least-loaded`: `routing: {prefix: 0, session: 0}` (load and speed only);
- `round-robin`: every weight 0, so every candidate ties and ties rotate;
- `vllm-router`: vllm-router's `cache_aware` policy (the Rust router) straight in front of a
  fourth set of four sims Corral started (when a `vllm-router` binary is found: bench/.venv,
  PATH, or `--vllm-router PATH`).

Workloads, open-loop Poisson arrivals of streamed chat requests through the frontend:
`shared-prefix` (many users over 20 system prompts of 2-8 k characters, Zipf-popular, a short
user line each) and `uniform` (every prompt unique, same sizes), at `--rate` (22/s: about 80 %
of what the 16 slots serve with no cache hit, 45 % with every system prompt cached). Per
workload: a warm-up per policy, then `--rounds` measured windows, the policies in a rotated
order each round (a busy machine hurts each alike); pooled: TTFT (first body byte) p50/p99,
completed requests/s, and the sims' prefix-cache hit rate (cached prompt tokens / prompt
tokens, from /admin/stats).

    .venv/bin/python bench/prefix_bench.py [--seconds 8] [--rounds 3] [--rate 22] [--json F]
        [--vllm-router PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
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
from targets import Corral, Infra, bench_bin, start_vllm_router  # noqa: E402

#: The engine model of every replica (the sim's flags).
ENGINE = {
    "slots": 4,
    "prefill_per_token": 0.0002,  # 1250 tokens (5 k chars) uncached: 250 ms
    "decode_base": 0.025,
    "decode_slope": 0.004,
    "tokens": 8,
    "block_tokens": 16,
    "cache_blocks": 400,  # 6,400 tokens: about five of the 20 system prompts
}
POLICIES: dict[str, dict[str, float]] = {
    "corral": {},
    "corral-c4": {"concurrency": 4},  # the default weights, load scaled to the 4 slots
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
    p.add_argument("--seconds", type=float, default=8.0, help="measured window per round")
    p.add_argument("--rounds", type=int, default=3, help="rounds, policies in rotated order")
    p.add_argument("--warmup", type=float, default=5.0, help="unmeasured arrivals first")
    p.add_argument("--rate", type=float, default=22.0, help="arrivals per second")
    p.add_argument("--workloads", default="shared-prefix,uniform")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--vllm-router", default=bench_bin("vllm-router"), help="its binary")
    args = p.parse_args()
    policies = list(POLICIES)
    if Path(args.vllm_router).is_file():
        policies.append("vllm-router")
        os.environ["PATH"] = f"{Path(args.vllm_router).parent}{os.pathsep}{os.environ['PATH']}"
    root = Path(tempfile.mkdtemp(prefix="corral-prefix-bench-"))
    infra = Infra(root)
    infra.start(None)
    corral = Corral(infra, root, "pfx", env={"CORRAL_RECONCILE_INTERVAL": "0.5"})
    workloads = args.workloads.split(",")
    own = []
    try:
        for wl in workloads:
            for policy in policies:
                corral.write_model(
                    f"{wl}-{policy}",
                    options=ENGINE,
                    routing=POLICIES.get(policy, {}),
                    scheduling={
                        "min_replicas": REPLICAS,
                        "max_replicas": REPLICAS,
                        "scale_down_delay": 86400,
                    },
                )
        await corral.start()
        for i in range(REPLICAS):
            corral.start_worker(f"w{i}", labels="role=pfx", max_replicas_per_model=1)
        routers: dict[str, str] = {}

        def urls_of(policy: str, wl: str) -> str:
            return routers[wl] if policy == "vllm-router" else corral.url

        for wl in workloads:
            for policy in policies:
                found = corral.wait_replicas(f"{wl}-{policy}", REPLICAS, 180)
                if policy == "vllm-router":
                    urls = [f"http://{r['address']}" for r in found]
                    proc, url = start_vllm_router(
                        root, urls, cpus=None, policy="cache_aware", name=f"vr-{wl}"
                    )
                    own.append(proc)
                    routers[wl] = url
        results: dict[str, dict[str, Any]] = {}
        for wl in workloads:
            pooled: dict[str, list[float]] = {p: [] for p in policies}
            totals: dict[str, list[float]] = {p: [0, 0, 0, 0.0, 0, 0] for p in policies}
            served: dict[str, list[int]] = {p: [0] * REPLICAS for p in policies}
            warm = arrivals(wl, args.warmup, args.rate, seed=1)
            for policy in policies:
                await run_open_loop(urls_of(policy, wl), f"{wl}-{policy}", warm)
            for r in range(args.rounds):
                plan = arrivals(wl, args.seconds, args.rate, seed=2 + r)
                order = policies[r % len(policies) :] + policies[: r % len(policies)]
                for policy in order:  # each policy in a different slot each round
                    model = f"{wl}-{policy}"
                    h0, q0, s0 = cache_counters(corral, model)
                    ttfts, errors, wall = await run_open_loop(urls_of(policy, wl), model, plan)
                    h1, q1, s1 = cache_counters(corral, model)
                    pooled[policy] += ttfts
                    t = totals[policy]
                    t[0] += len(plan)
                    t[1] += errors
                    t[2] += len(ttfts)
                    t[3] += wall
                    t[4] += h1 - h0
                    t[5] += q1 - q0
                    served[policy] = [
                        x + b - a for x, a, b in zip(served[policy], s0, s1, strict=True)
                    ]
                    print(
                        f"  round {r + 1} {wl:<14} {policy:<13} TTFT p50"
                        f" {pct(ttfts, 0.5) * 1e3:7.1f} ms  p99 {pct(ttfts, 0.99) * 1e3:7.1f} ms"
                        f"  hit {(h1 - h0) / max(1, q1 - q0) * 100:5.1f} %",
                        flush=True,
                    )
            for policy in policies:
                ttfts, t = pooled[policy], totals[policy]
                row = {
                    "requests": t[0],
                    "errors": t[1],
                    "ttft_p50_ms": pct(ttfts, 0.5) * 1e3,
                    "ttft_p99_ms": pct(ttfts, 0.99) * 1e3,
                    "ttft_mean_ms": statistics.fmean(ttfts) * 1e3 if ttfts else float("nan"),
                    "throughput_rps": t[2] / t[3] if t[3] else 0.0,
                    "cache_hit_rate": t[4] / t[5] if t[5] else 0.0,
                    "served": served[policy],
                }
                results.setdefault(wl, {})[policy] = row
                print(
                    f"{wl:<14} {policy:<13} TTFT p50 {row['ttft_p50_ms']:7.1f} ms"
                    f"  p99 {row['ttft_p99_ms']:7.1f} ms  {row['throughput_rps']:5.1f} req/s"
                    f"  hit {row['cache_hit_rate'] * 100:5.1f} %  served {row['served']}"
                    f"  errors {t[1]}",
                    flush=True,
                )
        out = {
            "engine": ENGINE,
            "rate": args.rate,
            "seconds": args.seconds,
            "rounds": args.rounds,
            "results": results,
        }
        if args.json:
            args.json.write_text(json.dumps(out, indent=2))
    finally:
        for proc in own:
            proc.stop()
        corral.stop()
        infra.stop()
        stop_all()


if __name__ == "__main__":
    asyncio.run(main())

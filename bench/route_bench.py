"""Micro-benchmark of the pure routing code, and the routing simulation's table.

    .venv/bin/python bench/route_bench.py            # timings, then the simulation table
    .venv/bin/python bench/route_bench.py --no-sim   # timings only

Each timing is the best of 21 repeats of the mean CPU time (process time) per call:
prefix hashing of an 8 KB prompt, prefix index match and record, `route` over 3, 10 and
10,000 candidates (load only, and with a prefix match, a session and speed data), the legacy
`pick_replica`, the whole per-request routing path, the frontend's `Router.choose` against the
`pick_replica` call it replaced, and admission queue operations.
"""

from __future__ import annotations

import itertools
import random
import sys
import time
import timeit
from collections.abc import Callable
from pathlib import Path

import orjson

from corral.domain.admission import AdmissionQueue, Priority
from corral.domain.entities import ModelSpec, Replica, ReplicaKey, ReplicaState
from corral.domain.pick import pick_replica
from corral.domain.prefix import BLOCK_BYTES, PrefixIndex, block_hashes
from corral.domain.routing import Candidates, SpeedTracker, route
from corral.frontend.request import parse_request
from corral.frontend.router import Router


def best_us(fn: Callable[[], object], number: int = 500, repeat: int = 21) -> float:
    """Best-of-`repeat` mean microseconds of CPU time per call (process time: other processes
    on a shared machine delay the run but do not count)."""
    runs = timeit.repeat(fn, number=number, repeat=repeat, timer=time.process_time)
    return min(runs) / number * 1e6


def candidates(n: int) -> Candidates:
    return Candidates.of(
        Replica("m", i, f"n{i}", ReplicaState.LOADED, address=f"h:{i}") for i in range(n)
    )


def timings() -> list[tuple[str, float]]:
    rng = random.Random(1)
    out: list[tuple[str, float]] = []
    prompt = rng.randbytes(8192)
    out.append(("block_hashes, 8 KB prompt (32 blocks)", best_us(lambda: block_hashes(prompt))))

    index = PrefixIndex()
    now = 1000.0
    heads = [rng.randbytes(24 * BLOCK_BYTES) for _ in range(64)]
    for i in range(2000):  # a warm index: 64 shared heads on 8 replicas, unique tails
        data = heads[i % 64] + rng.randbytes(8 * BLOCK_BYTES)
        index.record(("m", i % 8), block_hashes(data), now)
    hit = block_hashes(heads[3] + rng.randbytes(8 * BLOCK_BYTES))
    miss = block_hashes(rng.randbytes(8192))
    out.append(
        (
            f"PrefixIndex.match, 32 blocks, hit ({len(index)} entries)",
            best_us(lambda: index.match(hit, now)),
        )
    )
    out.append(("PrefixIndex.match, 32 blocks, miss", best_us(lambda: index.match(miss, now))))
    out.append(
        (
            "PrefixIndex.record, 32 blocks, all fresh",
            best_us(lambda: index.record(("m", 3), hit, now)),
        )
    )
    tails = itertools.count()

    def record_new() -> None:
        data = heads[5] + next(tails).to_bytes(8, "little") * (BLOCK_BYTES // 8) * 8
        index.record(("m", 5), block_hashes(data), now)

    out.append(("block_hashes + record, 24 shared + 8 new blocks", best_us(record_new, 200)))

    turn = itertools.count()
    for n in (3, 10, 10_000):
        cs = candidates(n)
        inflight = {k: i % 3 for i, k in enumerate(cs.keys)}
        matched = {cs.keys[-1]: 0.75, cs.keys[n // 2]: 0.25}
        speed = {cs.keys[0]: 2.0}
        sticky = cs.keys[1]
        out.append(
            (
                f"route, {n} candidates, load only",
                best_us(lambda cs=cs, inflight=inflight: route(cs, inflight, next(turn))),
            )
        )
        out.append(
            (
                f"route, {n} candidates, prefix + session + speed",
                best_us(
                    lambda cs=cs, inflight=inflight, matched=matched, speed=speed, sticky=sticky: (
                        route(cs, inflight, next(turn), prefix=matched, session=sticky, speed=speed)
                    )
                ),
            )
        )
        out.append(
            (
                f"route, {n} candidates, max_concurrency 4",
                best_us(
                    lambda cs=cs, inflight=inflight: route(
                        cs, inflight, next(turn), max_concurrency=4
                    )
                ),
            )
        )
        reps = list(cs.replicas)
        out.append(
            (
                f"legacy pick_replica, {n} candidates",
                best_us(
                    lambda reps=reps, inflight=inflight: pick_replica(
                        reps, inflight, {}, next(turn)
                    )
                ),
            )
        )

    cs = candidates(10)
    tracker = SpeedTracker()
    for k in cs.keys:
        tracker.observe(k, 0.02, now)
    inflight: dict[ReplicaKey, int] = {}

    def request() -> None:
        hashes = block_hashes(prompt)
        chosen = route(
            cs, inflight, next(turn), prefix=index.match(hashes, now), speed=tracker.ratios(now)
        )
        assert chosen is not None
        index.record(chosen.key, hashes, now)

    out.append(("whole request: hash 8 KB + match + route (10) + record", best_us(request, 200)))

    out += frontend_router(now)

    q = AdmissionQueue(max_entries=10**9, max_bytes=10**12)
    ids = itertools.count()

    def admit_pop() -> None:
        i = next(ids)
        q.admit(i, f"k{i % 50}", Priority.NORMAL, 100 + i % 900, 1000, now + 60, now)
        q.pop(now)

    for i in range(1000):  # a standing queue of 1,000 over 50 keys
        q.admit(-i - 1, f"k{i % 50}", Priority.NORMAL, 100, 1000, now + 60, now)
    out.append(("AdmissionQueue admit + pop (1,000 waiting, 50 keys)", best_us(admit_pop)))
    return out


def frontend_router(now: float) -> list[tuple[str, float]]:
    """What the proxy's `_choose` costs per request: `Router.choose` (features from the raw
    body, the pipeline, the records) against the legacy `pick_replica` call it replaced."""
    out: list[tuple[str, float]] = []
    reps = list(candidates(3).replicas)
    short = orjson.dumps(
        {"model": "m", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 16}
    )
    system = "You are a helpful assistant. " * 220  # ~6 KB
    long = orjson.dumps(
        {
            "model": "m",
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": "hello"},
            ],
        }
    )
    spec = ModelSpec("m", "sim")
    headers = [(b"accept", b"*/*"), (b"user-agent", b"bench"), (b"content-type", b"json")]
    inflight: dict[ReplicaKey, int] = {}
    router = Router(inflight, clock=lambda: now)
    for name, body in (("short chat", short), ("6 KB system prompt", long)):
        req = parse_request(b"/v1/chat/completions", body)
        out.append(
            (
                f"Router.choose, 3 replicas, {name}",
                best_us(lambda req=req: router.choose(spec, reps, req, headers)),
            )
        )
    turn = itertools.count()
    free = {r.node_id: 1 for r in reps}
    used = {r.key: 0.0 for r in reps}
    out.append(
        (
            "legacy pick_replica as the proxy called it, 3 replicas",
            best_us(
                lambda: pick_replica(reps, inflight, free, next(turn), last_used=used, latency={})
            ),
        )
    )
    return out


def main(argv: list[str]) -> None:
    print("| operation | CPU us per call (best of 21) |\n|---|---:|")
    for name, us in timings():
        print(f"| {name} | {us:.2f} |")
    if "--no-sim" not in argv:
        sys.path.insert(0, str(Path(__file__).parent))
        import routesim

        cfg = routesim.SimConfig()
        print(f"\nRouting simulation: {cfg}\n")
        print(routesim.table(routesim.run_all(cfg)))


if __name__ == "__main__":
    main(sys.argv[1:])

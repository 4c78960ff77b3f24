"""Deterministic discrete-event simulation of routing policies over replicas with prefix caches.

No processes, no clock: a heap of events in simulated seconds. Each replica serves at most
`slots` requests at once (the rest wait in its FIFO) and keeps an LRU prefix cache of
`cache_blocks` block hashes; a request costs `prefill_per_block` per block not already cached
(the longest cached prefix is reused, as vLLM and SGLang do) plus its decode time. A policy
sees what a frontend sees: the requests in flight per replica (its own, exact) and the request's
prompt bytes. The real `domain.prefix.block_hashes`, `PrefixIndex` and `routing.route` run the
`corral` policy; `least-loaded` (fewest in flight, ties rotated) and `round-robin` are the
baselines.

Workloads (`WORKLOADS`): `shared-prefix` (64 prompt families, Zipf-popular, a 24-block shared
head and 4 unique blocks each), `uniform` (every prompt unique) and `mixed` (half and half).

    .venv/bin/python bench/routesim.py            # the table for every workload and policy
"""

from __future__ import annotations

import heapq
import itertools
import random
import statistics
import sys
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from corral.domain.entities import Replica, ReplicaKey, ReplicaState
from corral.domain.prefix import BLOCK_BYTES, PrefixIndex, block_hashes
from corral.domain.routing import DEFAULT_WEIGHTS, Candidates, RoutingWeights, route


@dataclass(frozen=True)
class SimConfig:
    replicas: int = 4
    slots: int = 4
    cache_blocks: int = 512
    prefill_per_block: float = 0.004  # seconds per uncached 64-token block
    decode: float = 0.15  # mean decode seconds (exponential, deterministic by seed)
    requests: int = 4000
    rate: float = 45.0  # arrivals per second (Poisson)
    families: int = 64
    zipf: float = 1.0
    shared_blocks: int = 24
    unique_blocks: int = 4
    seed: int = 7


@dataclass(frozen=True)
class Request:
    at: float
    prompt: bytes
    decode: float


@dataclass
class Result:
    policy: str
    workload: str
    latencies: list[float] = field(default_factory=list)
    blocks: int = 0
    cached: int = 0

    @property
    def hit_rate(self) -> float:
        return self.cached / self.blocks if self.blocks else 0.0

    @property
    def mean(self) -> float:
        return statistics.fmean(self.latencies)

    @property
    def p99(self) -> float:
        return statistics.quantiles(self.latencies, n=100)[98]


def workload(kind: str, cfg: SimConfig) -> list[Request]:
    """The arrivals of one workload (same seed, same requests for every policy)."""
    rng = random.Random(f"{kind}/{cfg.seed}")
    heads = [rng.randbytes(cfg.shared_blocks * BLOCK_BYTES) for _ in range(cfg.families)]
    weights = [1.0 / (i + 1) ** cfg.zipf for i in range(cfg.families)]
    t = 0.0
    out: list[Request] = []
    for _ in range(cfg.requests):
        t += rng.expovariate(cfg.rate)
        shared = kind == "shared-prefix" or (kind == "mixed" and rng.random() < 0.5)
        if shared:
            head = rng.choices(heads, weights)[0]
        else:
            head = rng.randbytes(cfg.shared_blocks * BLOCK_BYTES)
        tail = rng.randbytes(cfg.unique_blocks * BLOCK_BYTES)
        out.append(Request(t, head + tail, rng.expovariate(1.0 / cfg.decode)))
    return out


WORKLOADS = ("shared-prefix", "uniform", "mixed")

#: A policy: (request's block hashes, in-flight per replica, now) -> replica index; and a hook
#: told which replica served which hashes.
Choose = Callable[[list[int], dict[ReplicaKey, int], float], int]


class Policy:
    """A routing policy under test."""

    name = "?"

    def choose(self, hashes: list[int], inflight: dict[ReplicaKey, int], now: float) -> int:
        raise NotImplementedError


class RoundRobin(Policy):
    name = "round-robin"

    def __init__(self, n: int) -> None:
        self.n = n
        self.turn = itertools.count()

    def choose(self, hashes: list[int], inflight: dict[ReplicaKey, int], now: float) -> int:
        return next(self.turn) % self.n


class LeastLoaded(Policy):
    name = "least-loaded"

    def __init__(self, n: int) -> None:
        self.n = n
        self.turn = itertools.count()

    def choose(self, hashes: list[int], inflight: dict[ReplicaKey, int], now: float) -> int:
        loads = [inflight.get(("m", i), 0) for i in range(self.n)]
        least = min(loads)
        ties = [i for i, x in enumerate(loads) if x == least]
        return ties[next(self.turn) % len(ties)]


class Corral(Policy):
    """The real pipeline: prefix match, `route`, record."""

    def __init__(self, n: int, weights: RoutingWeights = DEFAULT_WEIGHTS, name: str = "") -> None:
        self.name = name or "corral (defaults)"
        self.weights = weights
        self.cands = Candidates.of(
            Replica("m", i, f"n{i}", ReplicaState.LOADED, address=f"h:{i}") for i in range(n)
        )
        self.index = PrefixIndex()
        self.turn = itertools.count()

    def choose(self, hashes: list[int], inflight: dict[ReplicaKey, int], now: float) -> int:
        matched = self.index.match(hashes, now)
        chosen = route(self.cands, inflight, next(self.turn), weights=self.weights, prefix=matched)
        assert chosen is not None
        self.index.record(chosen.key, hashes, now)
        return chosen.index


class _Server:
    """One simulated replica: slots, a FIFO and an LRU prefix cache."""

    def __init__(self, cfg: SimConfig) -> None:
        self.cfg = cfg
        self.busy = 0
        self.waiting: list[tuple[int, list[int]]] = []
        self.cache: OrderedDict[int, None] = OrderedDict()

    def service(self, hashes: list[int], result: Result) -> float:
        """Seconds of work for a request starting now; updates the cache."""
        cache = self.cache
        hit = 0
        for h in hashes:
            if h not in cache:
                break
            hit += 1
        for h in hashes:
            cache[h] = None
            cache.move_to_end(h)
        while len(cache) > self.cfg.cache_blocks:
            cache.popitem(last=False)
        result.blocks += len(hashes)
        result.cached += hit
        return (len(hashes) - hit) * self.cfg.prefill_per_block


def simulate(policy: Policy, requests: list[Request], cfg: SimConfig, kind: str) -> Result:
    """Run one policy over one arrival sequence; latency = finish - arrival."""
    result = Result(policy.name, kind)
    servers = [_Server(cfg) for _ in range(cfg.replicas)]
    inflight: dict[ReplicaKey, int] = {}
    hashes = [block_hashes(r.prompt) for r in requests]
    events: list[tuple[float, int, int, int]] = []  # (time, seq, kind 0=arrive 1=done, id)
    seq = itertools.count()
    served_by: dict[int, int] = {}
    for i, r in enumerate(requests):
        heapq.heappush(events, (r.at, next(seq), 0, i))

    def start(s: int, i: int, now: float) -> None:
        server = servers[s]
        server.busy += 1
        work = server.service(hashes[i], result) + requests[i].decode
        heapq.heappush(events, (now + work, next(seq), 1, i))

    while events:
        now, _, kind_, i = heapq.heappop(events)
        if kind_ == 0:
            s = policy.choose(hashes[i], inflight, now)
            served_by[i] = s
            inflight[("m", s)] = inflight.get(("m", s), 0) + 1
            if servers[s].busy < cfg.slots:
                start(s, i, now)
            else:
                servers[s].waiting.append((i, hashes[i]))
        else:
            s = served_by[i]
            inflight[("m", s)] -= 1
            result.latencies.append(now - requests[i].at)
            server = servers[s]
            server.busy -= 1
            if server.waiting:
                j, _ = server.waiting.pop(0)
                start(s, j, now)
    return result


def policies(n: int) -> list[Policy]:
    return [Corral(n), LeastLoaded(n), RoundRobin(n)]


def run_all(cfg: SimConfig) -> list[Result]:
    out: list[Result] = []
    for kind in WORKLOADS:
        requests = workload(kind, cfg)
        out.extend(simulate(p, requests, cfg, kind) for p in policies(cfg.replicas))
    return out


def table(results: list[Result]) -> str:
    lines = [
        "| workload | policy | prefix hit rate | mean latency (s) | p99 latency (s) |",
        "|---|---|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.workload} | {r.policy} | {r.hit_rate:.1%} | {r.mean:.3f} | {r.p99:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    cfg = SimConfig()
    if argv:
        cfg = SimConfig(rate=float(argv[0]))
    print(f"{cfg}\n")
    print(table(run_all(cfg)))


if __name__ == "__main__":
    main(sys.argv[1:])

"""Unit tables of the sim's engine model: token rule, chained block hashes, the LRU prefix
cache, and the timing, queueing and counters of EngineModel on a fake clock."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from corral.backends.sim.scheduler import (
    EngineModel,
    EngineParams,
    EngineRequest,
    Phase,
    PrefixCache,
    block_hashes,
    count_tokens,
)

# --- tokens and blocks -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "tokens"), [(0, 1), (1, 1), (4, 1), (5, 2), (8, 2), (9, 3), (400, 100)]
)
def test_four_bytes_make_a_token(size: int, tokens: int) -> None:
    assert count_tokens(b"x" * size) == tokens


def test_block_hashes_are_chained_and_cover_full_blocks_only() -> None:
    a = block_hashes(b"A" * 8 + b"B" * 8 + b"C" * 3, block_tokens=2)  # 8 bytes per block
    assert len(a) == 2  # the 3 trailing bytes make no block
    same_start = block_hashes(b"A" * 8 + b"B" * 8 + b"D" * 8, block_tokens=2)
    assert same_start[:2] == a
    other_first = block_hashes(b"Z" * 8 + b"B" * 8, block_tokens=2)
    # The second block's bytes are equal but its chain is not: no hit past a difference.
    assert other_first[0] != a[0] and other_first[1] != a[1]
    assert block_hashes(b"short", block_tokens=16) == []


# --- prefix cache ------------------------------------------------------------------------


def test_cache_hits_the_longest_cached_chain_prefix() -> None:
    cache = PrefixCache(capacity=10)
    assert cache.use([b"a", b"b", b"c"]) == 0
    assert cache.match([b"a", b"b", b"x"]) == 2
    assert cache.match([b"x", b"b"]) == 0  # a chain must match from its start
    assert cache.use([b"a", b"b", b"c", b"d"]) == 3
    assert len(cache) == 4


def test_cache_evicts_least_recently_used_tails_first() -> None:
    cache = PrefixCache(capacity=4)
    cache.use([b"a1", b"a2"])
    cache.use([b"b1", b"b2"])
    cache.use([b"a1", b"a2"])  # a is now newer than b
    cache.use([b"c1"])  # over capacity by one: b's tail goes
    assert b"b2" not in cache and b"b1" in cache
    assert cache.match([b"a1", b"a2"]) == 2
    cache.use([b"d1", b"d2"])  # b1 then a2 (a's tail) go
    assert b"b1" not in cache and b"a2" not in cache and b"a1" in cache
    assert len(cache) == 4


@pytest.mark.parametrize(("capacity", "second_hit"), [(0, 0), (2, 2), (3, 3)])
def test_cache_capacity(capacity: int, second_hit: int) -> None:
    cache = PrefixCache(capacity)
    chain = [b"1", b"2", b"3"]
    cache.use(chain)
    assert cache.use(chain) == second_hit
    assert len(cache) <= capacity


# --- the model on a fake clock -----------------------------------------------------------


@dataclass
class Arrival:
    at: float
    prompt: bytes
    tokens: int
    cancel_at: float | None = None


@dataclass
class Trace:
    token_times: list[list[float]] = field(default_factory=list)
    requests: list[EngineRequest] = field(default_factory=list)


def _simulate(params: EngineParams, arrivals: list[Arrival]) -> tuple[EngineModel, Trace]:
    """Drive the model as the server does, on a fake clock that jumps to each next event."""
    model = EngineModel(params)
    trace = Trace(token_times=[[] for _ in arrivals])
    events: list[tuple[float, int, str]] = []
    for i, a in enumerate(arrivals):
        events.append((a.at, i, "arrive"))
        if a.cancel_at is not None:
            events.append((a.cancel_at, i, "cancel"))
    events.sort()
    reqs: dict[int, EngineRequest] = {}
    by_id: dict[int, int] = {}
    seen: dict[int, int] = {}

    def record(changed: list[EngineRequest], now: float) -> None:
        for req in changed:
            i = by_id[id(req)]
            assert req.emitted - seen[i] <= 1  # one token per request per event time
            if req.emitted > seen[i]:
                seen[i] = req.emitted
                trace.token_times[i].append(now)

    while events or model.next_due() is not None:
        due = model.next_due()
        if due is not None and (not events or due < events[0][0]):  # arrivals first on ties
            record(model.advance(due), due)
            continue
        at, i, kind = events.pop(0)
        if kind == "arrive":
            a = arrivals[i]
            req = model.request(a.prompt, a.tokens)
            reqs[i], by_id[id(req)], seen[i] = req, i, 0
            model.submit(req, at)
        else:
            model.cancel(reqs[i], at)
    trace.requests = [reqs[i] for i in range(len(arrivals))]
    return model, trace


P40 = b"p" * 40  # 10 tokens
TIMING = [
    # (case, params, arrivals, expected token times per request)
    (
        "prefill then decode",
        EngineParams(slots=1, prefill_base=0.1, prefill_per_token=0.01, decode_base=0.05),
        [Arrival(0.0, P40, 3)],
        [[0.2, 0.25, 0.3]],
    ),
    (
        "FIFO behind one slot",
        EngineParams(slots=1, prefill_per_token=0.01, decode_base=0.1),
        [Arrival(0.0, P40, 2), Arrival(0.01, P40 + b"x", 1), Arrival(0.02, P40 + b"y", 1)],
        # second starts when the first ends (0.2) and prefills 11 tokens
        [[0.1, 0.2], [0.31], [0.42]],
    ),
    (
        "decode slows with the running count",
        EngineParams(slots=2, decode_base=0.1, decode_slope=0.05),
        [Arrival(0.0, b"a", 3), Arrival(0.0, b"b", 3)],
        [[0.0, 0.2, 0.4], [0.0, 0.2, 0.4]],
    ),
    (
        "a finished neighbour speeds the rest up",
        EngineParams(slots=2, decode_base=0.1, decode_slope=0.05),
        [Arrival(0.0, b"a", 2), Arrival(0.0, b"b", 4)],
        # after 0.2 only b runs: 0.1 + 0.05 * 1 per token
        [[0.0, 0.2], [0.0, 0.2, 0.35, 0.5]],
    ),
    (
        "a prefill-only request (embeddings)",
        EngineParams(slots=1, prefill_base=0.5),
        [Arrival(1.0, b"e", 0)],
        [[]],
    ),
]


@pytest.mark.parametrize(
    ("params", "arrivals", "expected"),
    [c[1:] for c in TIMING],
    ids=[c[0] for c in TIMING],
)
def test_token_times(
    params: EngineParams, arrivals: list[Arrival], expected: list[list[float]]
) -> None:
    model, trace = _simulate(params, arrivals)
    for got, want in zip(trace.token_times, expected, strict=True):
        assert got == pytest.approx(want)
    assert all(r.done for r in trace.requests)
    assert model.running == 0 and model.waiting == 0 and model.next_due() is None


def test_prefill_only_request_finishes_after_its_prefill() -> None:
    _, trace = _simulate(EngineParams(slots=1, prefill_base=0.5), [Arrival(1.0, b"e", 0)])
    assert trace.requests[0].finished_at == pytest.approx(1.5)


def test_cached_prefix_shortens_prefill() -> None:
    prompt = b"s" * 128  # 32 tokens = 2 blocks of 16
    params = EngineParams(slots=1, prefill_per_token=0.01, block_tokens=16)
    model, trace = _simulate(params, [Arrival(0.0, prompt, 1), Arrival(1.0, prompt, 1)])
    first, second = trace.requests
    assert first.cached_tokens == 0 and trace.token_times[0] == pytest.approx([0.32])
    assert second.cached_tokens == 31  # everything but the last token, as engines do
    assert trace.token_times[1] == pytest.approx([1.01])
    stats = model.stats()
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (64, 31)
    assert (stats.prefix_cache_requests, stats.prefix_cache_hit_requests) == (2, 1)
    assert stats.prefix_cache_hit_rate == pytest.approx(31 / 64)


def test_partial_prefix_hit() -> None:
    shared = b"s" * 64  # one block of 16 tokens
    params = EngineParams(slots=1, prefill_per_token=0.01, block_tokens=16)
    _, trace = _simulate(
        params, [Arrival(0.0, shared + b"a" * 64, 1), Arrival(1.0, shared + b"b" * 64, 1)]
    )
    assert trace.requests[1].cached_tokens == 16
    assert trace.token_times[1] == pytest.approx([1.16])


def test_no_cache_with_zero_blocks() -> None:
    prompt = b"s" * 128
    params = EngineParams(slots=1, cache_blocks=0)
    model, trace = _simulate(params, [Arrival(0.0, prompt, 1), Arrival(1.0, prompt, 1)])
    assert trace.requests[1].cached_tokens == 0
    assert model.stats().kv_cache_usage == 0.0


def test_cancel_a_waiting_and_a_running_request() -> None:
    params = EngineParams(slots=1, decode_base=0.1)
    arrivals = [
        Arrival(0.0, b"a", 5, cancel_at=0.15),  # leaves mid-decode
        Arrival(0.0, b"b", 1, cancel_at=0.05),  # leaves the queue
        Arrival(0.0, b"c", 2),
    ]
    model, trace = _simulate(params, arrivals)
    a, b, c = trace.requests
    assert a.phase is Phase.CANCELLED and a.emitted == 2
    assert b.phase is Phase.CANCELLED and b.started is None
    assert c.started == pytest.approx(0.15)  # took a's slot when it left
    assert trace.token_times[2] == pytest.approx([0.15, 0.25])
    assert model.stats().finished == 1


def test_a_late_clock_changes_nothing() -> None:
    """Events are handled at their due times even when advance() is called late."""
    params = EngineParams(slots=1, decode_base=0.1)
    model = EngineModel(params)
    first, second = model.request(b"a", 3), model.request(b"b", 2)
    model.submit(first, 0.0)
    model.submit(second, 0.0)
    model.advance(10.0)  # one very late tick
    assert first.finished_at == pytest.approx(0.2)
    assert second.started == pytest.approx(0.2) and second.finished_at == pytest.approx(0.3)


def test_gauges_peak_and_reset() -> None:
    params = EngineParams(slots=2, decode_base=1.0, cache_blocks=10, block_tokens=4)
    model = EngineModel(params)
    reqs = [model.request(b"x" * 16, 4) for _ in range(3)]  # 4 + 4 tokens = 2 blocks each
    for r in reqs:
        model.submit(r, 0.0)
    stats = model.stats()
    assert (stats.running, stats.waiting, stats.peak_running) == (2, 1, 2)
    assert stats.kv_cache_usage == pytest.approx(4 / 10)
    model.advance(3.0)  # the first two finish at 3.0; the third starts
    stats = model.stats()
    assert (stats.running, stats.waiting, stats.peak_running) == (1, 0, 2)
    model.reset_peak()
    assert model.stats().peak_running == 1
    model.advance(100.0)
    assert model.stats().as_dict()["finished"] == 3
    assert model.stats().kv_cache_usage == 0.0


def test_kv_usage_is_capped_at_one() -> None:
    model = EngineModel(EngineParams(slots=4, cache_blocks=1, block_tokens=1))
    model.submit(model.request(b"x" * 40, 10), 0.0)
    assert model.stats().kv_cache_usage == 1.0

"""The engine model: a replica's slots, FIFO queue, block-hashed LRU prefix cache and timings.

Pure and clock-free: the caller passes `now` in, asks `next_due()` when something happens next,
and calls `advance(now)` then. Every event is handled at its own due time, not at `now`, so a
late timer never changes the outcome: the same arrivals give the same token times.

The model, after CPU engine simulators used to test routers (SGLang's mock worker, llm-d's
inference simulator):
- tokens: 4 bytes of the rendered prompt are one token (no tokenizer);
- prefix cache: the prompt is cut into blocks of `block_tokens` tokens, each block's hash
  chained with the one before; a request reuses the longest chain prefix already cached
  (at least one token is always computed, as engines do), then its blocks become the most
  recently used; the least recently used blocks go when the cache is over `cache_blocks`,
  a chain's tail first;
- a request takes one of `slots` when it is at the head of the FIFO queue and one is free;
- prefill: `prefill_base + prefill_per_token * (prompt tokens - cached tokens)`, then the
  first token; every further token after `decode_base + decode_slope * running`, `running`
  counted when that token's time is set.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
from collections import OrderedDict, deque
from dataclasses import dataclass
from enum import Enum

BYTES_PER_TOKEN = 4


def count_tokens(data: bytes) -> int:
    """The engine's token count of a prompt: one per 4 bytes started, at least 1."""
    return max(1, -(-len(data) // BYTES_PER_TOKEN))


def block_hashes(data: bytes, block_tokens: int) -> list[bytes]:
    """Chained hashes of the prompt's full blocks (a partial last block is never cached)."""
    size = block_tokens * BYTES_PER_TOKEN
    out: list[bytes] = []
    previous = b""
    view = memoryview(data)
    for start in range(0, len(data) - size + 1, size):
        h = hashlib.blake2b(previous, digest_size=16)
        h.update(view[start : start + size])
        previous = h.digest()
        out.append(previous)
    return out


class PrefixCache:
    """An LRU set of block hashes with a fixed capacity (0 caches nothing)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._blocks: OrderedDict[bytes, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, block: bytes) -> bool:
        return block in self._blocks

    def match(self, hashes: list[bytes]) -> int:
        """How many leading blocks of the chain are cached."""
        n = 0
        blocks = self._blocks
        for h in hashes:
            if h not in blocks:
                break
            n += 1
        return n

    def use(self, hashes: list[bytes]) -> int:
        """Look the chain up, then make all its blocks the most recent; return the hit count."""
        hit = self.match(hashes)
        if self.capacity <= 0:
            return hit
        blocks = self._blocks
        # Newest last; the chain's head ends up newest so its tail is evicted first.
        for h in reversed(hashes[: self.capacity]):
            if h in blocks:
                blocks.move_to_end(h)
            else:
                blocks[h] = None
        while len(blocks) > self.capacity:
            blocks.popitem(last=False)
        return hit


@dataclass(frozen=True, slots=True)
class EngineParams:
    """The engine model's knobs (see the module docstring)."""

    slots: int
    prefill_base: float = 0.0
    prefill_per_token: float = 0.0
    decode_base: float = 0.0
    decode_slope: float = 0.0
    cache_blocks: int = 4096
    block_tokens: int = 16


class Phase(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    DONE = "done"
    CANCELLED = "cancelled"


@dataclass(slots=True, eq=False)
class EngineRequest:
    """One request in the model; the model fills in everything after `output_tokens`."""

    prompt_tokens: int
    blocks: list[bytes]
    output_tokens: int
    phase: Phase = Phase.WAITING
    arrived: float = 0.0
    started: float | None = None  # took a slot
    first_token_at: float | None = None
    finished_at: float | None = None
    cached_tokens: int = 0
    emitted: int = 0  # output tokens produced so far
    due: float = 0.0  # when the next token (or the end of a prefill-only request) is due
    held_blocks: int = 0  # KV blocks it occupies while running

    @property
    def done(self) -> bool:
        return self.phase is Phase.DONE


@dataclass(frozen=True, slots=True)
class EngineStats:
    """Counters and gauges of the model (token counts are the engine's 4-byte tokens)."""

    slots: int
    running: int
    waiting: int
    peak_running: int
    cache_blocks: int
    cached_blocks: int
    kv_cache_usage: float  # KV blocks held by running requests / cache_blocks, at most 1
    prefix_cache_queries: int  # prompt tokens looked up
    prefix_cache_hits: int  # of those, found in the cache
    prefix_cache_requests: int  # requests looked up
    prefix_cache_hit_requests: int  # of those, with at least one cached token
    finished: int

    @property
    def prefix_cache_hit_rate(self) -> float:
        q = self.prefix_cache_queries
        return self.prefix_cache_hits / q if q else 0.0

    def as_dict(self) -> dict[str, int | float]:
        return {
            "slots": self.slots,
            "running": self.running,
            "waiting": self.waiting,
            "peak_running": self.peak_running,
            "cache_blocks": self.cache_blocks,
            "cached_blocks": self.cached_blocks,
            "kv_cache_usage": self.kv_cache_usage,
            "prefix_cache_queries": self.prefix_cache_queries,
            "prefix_cache_hits": self.prefix_cache_hits,
            "prefix_cache_hit_rate": self.prefix_cache_hit_rate,
            "prefix_cache_requests": self.prefix_cache_requests,
            "prefix_cache_hit_requests": self.prefix_cache_hit_requests,
            "finished": self.finished,
        }


class EngineModel:
    """Slots, queue, prefix cache and token times of one replica; driven by its caller."""

    def __init__(self, params: EngineParams) -> None:
        self.params = params
        self.cache = PrefixCache(params.cache_blocks)
        self._waiting: deque[EngineRequest] = deque()
        self._running: set[EngineRequest] = set()
        self._heap: list[tuple[float, int, EngineRequest]] = []
        self._order = itertools.count()
        self._held_blocks = 0
        self._peak_running = 0
        self._queried = 0
        self._hits = 0
        self._lookups = 0
        self._hit_lookups = 0
        self._finished = 0

    # --- requests --------------------------------------------------------------------------

    def request(self, prompt: bytes, output_tokens: int) -> EngineRequest:
        """A request for a rendered prompt, not yet submitted."""
        return EngineRequest(
            prompt_tokens=count_tokens(prompt),
            blocks=block_hashes(prompt, self.params.block_tokens),
            output_tokens=output_tokens,
        )

    def submit(self, req: EngineRequest, now: float) -> list[EngineRequest]:
        """Queue a request at `now`; return the requests that took a slot (it may be one)."""
        req.arrived = now
        self._waiting.append(req)
        return self._admit(now)

    def cancel(self, req: EngineRequest, now: float) -> list[EngineRequest]:
        """Drop a request (its client left); return the requests that took its slot."""
        if req.phase is Phase.WAITING:
            self._waiting.remove(req)
            req.phase = Phase.CANCELLED
            return []
        if req.phase is Phase.RUNNING:
            self._release(req)
            req.phase = Phase.CANCELLED
            return self._admit(now)
        return []

    def next_due(self) -> float | None:
        """When the next event is due, or None when nothing runs."""
        heap = self._heap
        while heap:
            due, _, req = heap[0]
            if req.phase is Phase.RUNNING and req.due == due:
                return due
            heapq.heappop(heap)  # a cancelled request's stale entry
        return None

    def advance(self, now: float) -> list[EngineRequest]:
        """Handle every event due by `now`; return the requests that emitted or finished,
        and those that took a slot."""
        changed: dict[int, EngineRequest] = {}
        heap = self._heap
        p = self.params
        while heap and heap[0][0] <= now:
            due, _, req = heapq.heappop(heap)
            if req.phase is not Phase.RUNNING or req.due != due:
                continue
            changed[id(req)] = req
            if req.emitted < req.output_tokens:
                req.emitted += 1
                if req.emitted == 1:
                    req.first_token_at = due
            if req.emitted >= req.output_tokens:
                self._release(req)
                req.phase = Phase.DONE
                req.finished_at = due
                self._finished += 1
                for admitted in self._admit(due):
                    changed[id(admitted)] = admitted
                continue
            req.due = due + p.decode_base + p.decode_slope * len(self._running)
            heapq.heappush(heap, (req.due, next(self._order), req))
        return list(changed.values())

    # --- state -----------------------------------------------------------------------------

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def reset_peak(self) -> None:
        """Start counting the peak of running requests again from now."""
        self._peak_running = len(self._running)

    def stats(self) -> EngineStats:
        p = self.params
        usage = min(1.0, self._held_blocks / p.cache_blocks) if p.cache_blocks else 0.0
        return EngineStats(
            slots=p.slots,
            running=len(self._running),
            waiting=len(self._waiting),
            peak_running=self._peak_running,
            cache_blocks=p.cache_blocks,
            cached_blocks=len(self.cache),
            kv_cache_usage=usage,
            prefix_cache_queries=self._queried,
            prefix_cache_hits=self._hits,
            prefix_cache_requests=self._lookups,
            prefix_cache_hit_requests=self._hit_lookups,
            finished=self._finished,
        )

    # --- internals -------------------------------------------------------------------------

    def _admit(self, now: float) -> list[EngineRequest]:
        p = self.params
        admitted: list[EngineRequest] = []
        while self._waiting and len(self._running) < p.slots:
            req = self._waiting.popleft()
            hit_blocks = self.cache.use(req.blocks)
            cached = min(hit_blocks * p.block_tokens, req.prompt_tokens - 1)
            req.cached_tokens = cached
            self._queried += req.prompt_tokens
            self._hits += cached
            self._lookups += 1
            self._hit_lookups += cached > 0
            req.phase = Phase.RUNNING
            req.started = now
            req.held_blocks = -(-(req.prompt_tokens + req.output_tokens) // p.block_tokens)
            self._held_blocks += req.held_blocks
            self._running.add(req)
            self._peak_running = max(self._peak_running, len(self._running))
            req.due = now + p.prefill_base + p.prefill_per_token * (req.prompt_tokens - cached)
            heapq.heappush(self._heap, (req.due, next(self._order), req))
            admitted.append(req)
        return admitted

    def _release(self, req: EngineRequest) -> None:
        self._running.discard(req)
        self._held_blocks -= req.held_blocks

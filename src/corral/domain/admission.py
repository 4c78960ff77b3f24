"""Admission order: the pure wait queue of one model, and the free-slot rule it waits on.

A request that finds no free replica slot waits here. `AdmissionQueue` is a data structure with
methods (no asyncio, no clock: every call takes `now`); the frontend wraps it with futures.
Call contract:

- `admit(id, key, priority, tokens, size, deadline, now)` -> `Queued` or `Rejected`
  (`queue_full` with a Retry-After estimate; `deadline` when it is already past);
- when a slot frees (or a replica appears): `pop(now)` -> the next `Entry` to dispatch, or None;
- on the caller's timer (`next_deadline()`) and after `pop`: `expire(now)` -> the entries whose
  deadline passed; the caller answers them (504/429). They never held a slot;
- when a client leaves: `cancel(id)`; the entry leaves without ever holding a slot.

Order (why these rules):

- Priority classes `high`, `normal`, `low`: strict between classes, except that a backlogged
  class never waits more than `starvation_limit` dispatches of higher classes in a row (then
  it gets the next one), so `low` keeps at least 1 in `starvation_limit + 1` slots when both
  are backlogged: slow under pressure, never starved.
- Within a class, fair between API keys, weighted by requested tokens: start-time fair queueing
  with tags assigned at the head of each key's FIFO. Each backlogged key has a start tag `S`;
  the key with the smallest `S` goes next (ties: the earliest to become head), its request
  costs `tokens / weight`, and its next request's tag is `S + cost`; a key that becomes
  backlogged starts at `max(V, its last finish)` where `V` is the start tag last served, so an
  idle key saves no credit. Chosen over deficit round robin because a decision is one heap
  operation whatever the request sizes (DRR needs a quantum of the largest request, or several
  rounds per dispatch), and over arrival-time tags because a request is charged only when it
  is dispatched: a cancelled or expired request costs its key nothing. A key sending 10x the
  requests of another gets half the slots while both are backlogged (with equal sizes).
- Bounded: at most `max_entries` waiting entries and `max_bytes` of their bodies per model.
  Retry-After of a rejection = the time the measured drain rate (dispatches over the last
  `rate_window` seconds) needs to empty the queue, within [1, `max_retry_after`] seconds;
  `default_retry_after` while nothing was dispatched.

Slots: `has_free_slot(max_concurrency, inflight)` with the cluster-wide in-flight count.
Frontends see each other's counts through reports every `T` seconds (plus bus delay `d`), so
each one may dispatch what the others sent since their last report without seeing it. With `F`
frontends each dispatching to a replica at most `r` requests/second, the in-flight count of a
replica stays below `max_concurrency + overshoot_bound(...)`, where the bound is
`(F - 1) * min(max_concurrency, ceil(r * (T + d)))`: a frontend never exceeds the limit in its
own view, which counts its own dispatches exactly and misses at most what each other frontend
dispatched within one report period (and never more than the limit, since that one also
respected it in its view).
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from corral.errors import ConfigError


class Priority(StrEnum):
    """Priority class of a waiting request."""

    HIGH = "high"  # served before the others
    NORMAL = "normal"  # the default
    LOW = "low"  # batch work: served when nothing else waits (bounded starvation)


_CLASSES = (Priority.HIGH, Priority.NORMAL, Priority.LOW)


@dataclass(slots=True, eq=False)
class Entry:
    """One waiting request, as the queue knows it."""

    id: int  # the caller's handle
    key: str  # fairness flow: the API key (or its id)
    priority: Priority
    tokens: int  # requested tokens (prompt estimate + max_tokens): its fairness cost
    size: int  # bytes held while waiting (the body)
    deadline: float
    enqueued: float
    waiting: bool = field(default=True, repr=False)  # False once dispatched, expired or cancelled


@dataclass(frozen=True, slots=True)
class Queued:
    """The request waits in the queue."""

    entry: Entry


@dataclass(frozen=True, slots=True)
class Rejected:
    """The request is answered at once: `queue_full` (429) or `deadline` (already past)."""

    code: str
    retry_after: float
    reason: str


Admission = Queued | Rejected


class _Flow:
    """One API key's FIFO within a class, with its fair-queueing tags."""

    __slots__ = ("entries", "finish", "live", "start", "token")

    def __init__(self) -> None:
        self.entries: deque[Entry] = deque()  # may hold cancelled/expired leftovers
        self.live = 0  # entries still waiting
        self.start = 0.0  # start tag of the head entry while backlogged
        self.finish = 0.0  # finish tag of its last dispatched entry
        self.token = 0  # the seq of its one valid heap item


class _Class:
    """Start-time fair queueing over the API keys of one priority class."""

    __slots__ = ("count", "flows", "heap", "seq", "vtime")

    def __init__(self) -> None:
        self.flows: dict[str, _Flow] = {}
        self.heap: list[tuple[float, int, str]] = []  # (start tag, seq, key); stale ones skipped
        self.vtime = 0.0
        self.count = 0  # waiting entries
        self.seq = 0

    def push(self, entry: Entry) -> None:
        flow = self.flows.get(entry.key)
        if flow is None:
            flow = self.flows[entry.key] = _Flow()
        if not flow.live:  # becomes backlogged: a fresh tag, no credit from the past
            flow.entries.clear()  # only leftovers
            flow.start = max(self.vtime, flow.finish)
            self._schedule(entry.key, flow)
        flow.entries.append(entry)
        flow.live += 1
        self.count += 1

    def drop(self, entry: Entry) -> None:
        """A waiting entry left (cancelled or expired); it stays in its FIFO as a leftover."""
        self.flows[entry.key].live -= 1
        self.count -= 1

    def pop(self, now: float, weights: Mapping[str, float], expired: list[Entry]) -> Entry | None:
        """The next live entry; expired heads go to `expired`, leftovers are dropped."""
        while self.heap:
            start, token, key = heapq.heappop(self.heap)
            flow = self.flows.get(key)
            if flow is None or flow.token != token:
                continue  # stale item of a key re-scheduled since
            entry = None
            while flow.entries:
                head = flow.entries.popleft()
                if not head.waiting:
                    continue
                head.waiting = False
                flow.live -= 1
                self.count -= 1
                if head.deadline < now:
                    expired.append(head)
                    continue
                entry = head
                break
            if entry is None:
                self._idle(key, flow)
                continue
            self.vtime = start
            flow.finish = start + max(1, entry.tokens) / weights.get(key, 1.0)
            if flow.live:
                flow.start = flow.finish
                self._schedule(key, flow)
            else:
                self._idle(key, flow)
            return entry
        return None

    def compact(self) -> None:
        """Drop leftovers from the FIFOs; one heap item per backlogged key."""
        self.heap = []
        for key, flow in list(self.flows.items()):
            flow.entries = deque(e for e in flow.entries if e.waiting)
            if flow.live:
                self._schedule(key, flow)
            else:
                self._idle(key, flow)

    def _schedule(self, key: str, flow: _Flow) -> None:
        self.seq += 1
        flow.token = self.seq
        heapq.heappush(self.heap, (flow.start, self.seq, key))

    def _idle(self, key: str, flow: _Flow) -> None:
        flow.entries.clear()
        if flow.finish <= self.vtime:
            del self.flows[key]  # max(V, finish) = V: nothing to remember


class AdmissionQueue:
    """The wait queue of one model (contract and order in the module doc)."""

    def __init__(
        self,
        max_entries: int = 1024,
        max_bytes: int = 64 * 1024 * 1024,
        *,
        starvation_limit: int = 20,
        key_weights: Mapping[str, float] | None = None,
        rate_window: float = 30.0,
        default_retry_after: float = 5.0,
        max_retry_after: float = 60.0,
    ) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.starvation_limit = starvation_limit
        self.key_weights: Mapping[str, float] = key_weights or {}
        for key, weight in self.key_weights.items():
            if not weight > 0:
                raise ConfigError(f"must be > 0, got {weight}", field=f"key_weights.{key}")
        self.rate_window = rate_window
        self.default_retry_after = default_retry_after
        self.max_retry_after = max_retry_after
        self._classes = {p: _Class() for p in _CLASSES}
        self._skipped = dict.fromkeys(_CLASSES, 0)
        self._by_id: dict[int, Entry] = {}
        self._deadlines: list[tuple[float, int, Entry]] = []  # (deadline, seq, entry)
        self._seq = 0
        self._expired: list[Entry] = []
        self._dispatched: deque[float] = deque(maxlen=1024)
        self._bytes = 0
        self._garbage = 0  # cancelled entries still inside the FIFOs

    def __len__(self) -> int:
        return len(self._by_id)

    @property
    def bytes(self) -> int:
        return self._bytes

    def admit(
        self,
        id: int,
        key: str,
        priority: Priority,
        tokens: int,
        size: int,
        deadline: float,
        now: float,
    ) -> Admission:
        """Queue a request, or say why not (module doc)."""
        if deadline <= now:
            return Rejected("deadline", 0.0, "the request's deadline has already passed")
        if len(self._by_id) >= self.max_entries or self._bytes + size > self.max_bytes:
            retry = self.retry_after(now)
            reason = f"{len(self._by_id)} requests ({self._bytes} bytes) are already waiting"
            return Rejected("queue_full", retry, reason)
        if id in self._by_id:
            raise ValueError(f"entry {id} is already queued")
        entry = Entry(id, key, priority, tokens, size, deadline, now)
        cls = self._classes[priority]
        cls.push(entry)
        self._by_id[id] = entry
        self._bytes += size
        self._seq += 1
        heapq.heappush(self._deadlines, (deadline, self._seq, entry))
        return Queued(entry)

    def pop(self, now: float) -> Entry | None:
        """The entry to dispatch into a free slot now (None: nothing waits)."""
        for priority in self._order():
            cls = self._classes[priority]
            if not cls.count:
                continue
            expired_before = len(self._expired)
            entry = cls.pop(now, self.key_weights, self._expired)
            for e in self._expired[expired_before:]:
                self._forget(e)
            if entry is None:
                continue
            self._forget(entry)
            self._skipped[priority] = 0
            rank = _CLASSES.index(priority)
            for lower in _CLASSES[rank + 1 :]:
                if self._classes[lower].count:
                    self._skipped[lower] += 1
            self._dispatched.append(now)
            return entry
        return None

    def cancel(self, id: int) -> bool:
        """The client left: drop its entry (True when it was still waiting)."""
        entry = self._by_id.get(id)
        if entry is None:
            return False
        entry.waiting = False
        self._classes[entry.priority].drop(entry)
        self._forget(entry)
        self._garbage += 1
        if self._garbage > max(64, len(self._by_id)):
            self._compact()
        return True

    def expire(self, now: float) -> list[Entry]:
        """Remove and return every waiting entry whose deadline is before `now`."""
        out, self._expired = self._expired, []
        heap = self._deadlines
        while heap and heap[0][0] < now:
            _, _, entry = heapq.heappop(heap)
            if entry.waiting:
                entry.waiting = False
                self._classes[entry.priority].drop(entry)
                self._forget(entry)
                self._garbage += 1
                out.append(entry)
        return out

    def next_deadline(self) -> float | None:
        """The earliest deadline of a waiting entry (when to call `expire` next)."""
        heap = self._deadlines
        while heap and not heap[0][2].waiting:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def oldest(self) -> float | None:
        """When the longest-waiting entry was queued (None: nothing waits)."""
        return min((e.enqueued for e in self._by_id.values()), default=None)

    def retry_after(self, now: float) -> float:
        """Seconds until the queue has drained at the measured rate (see the module doc)."""
        times = self._dispatched
        while times and times[0] < now - self.rate_window:
            times.popleft()
        if not times:
            return self.default_retry_after
        span = max(now - times[0], 1e-3)
        wait = len(self._by_id) * span / len(times)
        return min(self.max_retry_after, max(1.0, math.ceil(wait)))

    def _order(self) -> list[Priority]:
        """Classes in the order to try: a starved lower class first, else by priority."""
        for priority in reversed(_CLASSES):
            if self._skipped[priority] >= self.starvation_limit and self._classes[priority].count:
                return [priority, *(p for p in _CLASSES if p != priority)]
        return list(_CLASSES)

    def _forget(self, entry: Entry) -> None:
        if self._by_id.pop(entry.id, None) is not None:
            self._bytes -= entry.size

    def _compact(self) -> None:
        """Drop cancelled and expired entries from the FIFOs (amortized over cancels)."""
        for cls in self._classes.values():
            cls.compact()
        self._deadlines = [d for d in self._deadlines if d[2].waiting]
        heapq.heapify(self._deadlines)
        self._garbage = 0


def has_free_slot(max_concurrency: int | None, inflight: int) -> bool:
    """True when a replica with `inflight` requests (cluster-wide) may take one more."""
    return max_concurrency is None or inflight < max_concurrency


def overshoot_bound(
    max_concurrency: int,
    frontends: int,
    report_interval: float,
    dispatch_rate: float,
    bus_delay: float = 0.0,
) -> int:
    """Most requests a replica can hold above `max_concurrency` (formula in the module doc)."""
    if frontends <= 1:
        return 0
    unseen = math.ceil(max(0.0, dispatch_rate) * (report_interval + bus_delay) - 1e-9)
    return (frontends - 1) * min(max_concurrency, unseen)

"""The admission gate: whether and when a request may go to a replica of its model.

A replica takes at most its model's `max_concurrency` requests in flight, counted cluster-wide
(this frontend's own in-flight slots plus what the other frontends report; the bound on the
overshoot is in `corral.domain.admission`). `enter()` returns at once when nothing waits for
the model and a replica has a free slot (the warm path: no lock, no DB, a few dict reads);
otherwise the request waits in the model's `AdmissionQueue` (priority classes, start-time
fair queueing between API keys, deadlines, bounded length and bytes) until a slot frees.

A slot frees when this frontend releases one (`released()`, called by the proxy), when the
other frontends' reports show fewer in flight, or when a replica appears; the last two are
noticed by a per-model pump that runs while requests wait (every `poll` seconds, and at the
next deadline). A granted request reserves its slot until it takes it (`granted`), so one
free slot is never handed to two waiters. The caller picks the replica among those with a
free slot (`full()` names the others) and reserves it in the same event-loop step.

A request past its deadline leaves with 504 `deadline_exceeded`: it never held a slot, so the
backend never saw it. A full queue answers 429 `queue_full` with Retry-After from the measured
drain rate. A client that leaves while waiting (the task is cancelled) leaves the queue without
using a slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping

from corral.domain.admission import AdmissionQueue, Priority, Rejected
from corral.domain.entities import ModelSpec
from corral.errors import BadRequest, DeadlineExceeded, QueueFull
from corral.frontend.auth import bearer_of, digest
from corral.frontend.inflight import InflightTracker
from corral.frontend.view import ClusterView

#: Seconds between looks at remote in-flight counts and new replicas while requests wait.
POLL = 0.05
UNLIMITED = 1 << 30
PRIORITY_HEADER = b"x-corral-priority"
DEADLINE_HEADER = b"x-corral-deadline"
Tried = set[tuple[str, int, str | None]]
_RANK = {Priority.HIGH: 0, Priority.NORMAL: 1, Priority.LOW: 2}


class _Waiter:
    """A request waiting in a model's queue: its future, and whether it was granted a slot."""

    __slots__ = ("future", "granted")

    def __init__(self, future: asyncio.Future[None]) -> None:
        self.future = future
        self.granted = False


class _Model:
    """One model's queue, waiters and pump."""

    __slots__ = ("granted", "limit", "pump", "queue", "spec", "waiters")

    def __init__(self, queue: AdmissionQueue) -> None:
        self.queue = queue
        self.waiters: dict[int, _Waiter] = {}
        self.granted = 0  # slots handed to waiters that have not taken them yet
        self.pump: asyncio.Task[None] | None = None
        self.spec: ModelSpec | None = None
        self.limit = 0


class AdmissionGate:
    """Per-model wait queues in front of the replicas (module doc)."""

    def __init__(
        self,
        view: ClusterView,
        inflight: InflightTracker,
        *,
        limit_of: Callable[[ModelSpec], int],
        ensure_replica: Callable[[ModelSpec, float], Awaitable[None]],
        max_entries: int = 1024,
        max_bytes: int = 64 * 1024 * 1024,
        default_deadline: float = 60.0,
        max_deadline: float = 600.0,
        key_priorities: Mapping[str, str] | None = None,
        poll: float = POLL,
        clock: Callable[[], float] = time.monotonic,
        on_wait: Callable[[str, float], None] | None = None,
    ) -> None:
        self.view = view
        self.inflight = inflight
        self.limit_of = limit_of
        self.ensure_replica = ensure_replica
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.default_deadline = default_deadline
        self.max_deadline = max_deadline
        #: API key digest -> its priority class (its default and the most it may ask for)
        self.key_priorities = {digest(k): Priority(v) for k, v in (key_priorities or {}).items()}
        self.poll = poll
        self.clock = clock
        self.on_wait = on_wait  # (model, seconds) of each request that waited for a slot
        self._models: dict[str, _Model] = {}
        self._limits: dict[str, tuple[ModelSpec, int]] = {}
        self._ids = itertools.count(1)
        self.rejected = 0  # 429 queue_full answers (metrics)
        self.expired = 0  # 504 deadline_exceeded answers
        self.abandoned = 0  # clients that left while waiting

    # --- the proxy's side ----------------------------------------------------------------
    def limit(self, spec: ModelSpec) -> int:
        """Requests one replica of `spec` may have in flight (0 = unlimited)."""
        known = self._limits.get(spec.name)
        if known is None or known[0] is not spec:
            if len(self._limits) > 4 * len(self.view.models) + 64:
                self._limits.clear()  # names of removed models
            known = self._limits[spec.name] = (spec, self.limit_of(spec))
        return known[1]

    async def enter(
        self, spec: ModelSpec, headers: Iterable[tuple[bytes, bytes]], size: int
    ) -> None:
        """Return when a request for `spec` may take a slot now (in this event-loop step).

        Raises QueueFull, DeadlineExceeded, BadRequest (a malformed priority or deadline
        header), or the cold path's errors while the model has no replica."""
        name = spec.name
        model = self._models.get(name)
        limit = self.limit(spec)
        if (
            (model is None or not model.waiters)
            and self._free(name, limit, 0) > 0
            and self.view.candidates(name)
        ):
            return  # the warm path
        headers = list(headers)
        now = self.clock()
        deadline = now + self._deadline(spec, headers)
        while not self.view.candidates(name):  # a cold model: the cold path waits for a load
            left = deadline - self.clock()
            if left <= 0:
                raise self._expired(name, deadline - now)
            await self.ensure_replica(spec, left)  # its 503s carry the load's progress
        await self._wait(spec, limit, headers, size, now, deadline)

    def exclude(self, spec: ModelSpec, tried: Tried) -> Tried:
        """`tried` plus the candidate replicas at their limit, as (model, index, address): the
        replicas not to pick now."""
        limit = self.limit(spec)
        if not limit:
            return tried
        total = self.inflight.total
        candidates = self.view.candidates(spec.name)
        full = {(r.model, r.index, r.address) for r in candidates if total(r.key) >= limit}
        if not full:
            return tried
        excluded = tried | full
        if len(excluded) >= len(candidates) and all(
            (r.model, r.index, r.address) in excluded for r in candidates
        ):
            # granted, but a report since then counts the slot as taken elsewhere: the
            # request goes on (its overshoot is within the documented bound)
            return tried
        return excluded

    def released(self, model: str) -> None:
        """A slot of `model` was released on this frontend: the next waiter may go."""
        state = self._models.get(model)
        if state is not None and state.waiters:
            self._grant(state)

    # --- waiting -------------------------------------------------------------------------
    async def _wait(
        self,
        spec: ModelSpec,
        limit: int,
        headers: list[tuple[bytes, bytes]],
        size: int,
        now: float,
        deadline: float,
    ) -> None:
        name = spec.name
        state = self._models.get(name)
        if state is None:
            queue = AdmissionQueue(self.max_entries, self.max_bytes)
            state = self._models[name] = _Model(queue)
        state.spec, state.limit = spec, limit
        key, priority = self._class(headers)
        entry_id = next(self._ids)
        tokens = max(1, size // 4)  # a prompt's tokens, roughly: its fairness cost
        verdict = state.queue.admit(entry_id, key, priority, tokens, size, deadline, now)
        if isinstance(verdict, Rejected):
            if verdict.code == "queue_full":
                self.rejected += 1
                raise QueueFull(
                    f"the queue of model '{name}' is full: {verdict.reason}",
                    retry_after=verdict.retry_after,
                )
            raise self._expired(name, 0.0)
        waiter = _Waiter(asyncio.get_running_loop().create_future())
        state.waiters[entry_id] = waiter
        self._grant(state)
        if not waiter.future.done() and (state.pump is None or state.pump.done()):
            state.pump = asyncio.create_task(self._pump(name, state), name=f"admission:{name}")
        if len(state.waiters) == 1:
            self._export(name, state)
        taken = False
        try:
            await waiter.future
            taken = True
            if self.on_wait is not None:
                self.on_wait(name, self.clock() - now)
        except asyncio.CancelledError:
            if state.queue.cancel(entry_id):
                self.abandoned += 1
            raise
        finally:
            state.waiters.pop(entry_id, None)
            if waiter.granted:
                state.granted -= 1  # taken now, or given up by a client that left
                if not taken:
                    self._grant(state)  # then it goes to the next one
            if not state.waiters:
                self._export(name, state)

    def _grant(self, state: _Model) -> None:
        """Hand every free slot of the model to the next waiters, in queue order."""
        spec = state.spec
        if spec is None:
            return
        now = self.clock()
        free = self._free(spec.name, state.limit, state.granted)
        while free > 0:
            entry = state.queue.pop(now)
            if entry is None:
                break
            waiter = state.waiters.get(entry.id)
            if waiter is None or waiter.future.done():
                continue
            waiter.granted = True
            state.granted += 1
            waiter.future.set_result(None)
            free -= 1
        self._expire(state, now)

    def _expire(self, state: _Model, now: float) -> None:
        for entry in state.queue.expire(now):
            waiter = state.waiters.get(entry.id)
            if waiter is not None and not waiter.future.done():
                self.expired += 1
                waited = now - entry.enqueued
                assert state.spec is not None
                waiter.future.set_exception(self._expired(state.spec.name, waited))

    async def _pump(self, name: str, state: _Model) -> None:
        """While requests wait: grant slots freed elsewhere (other frontends, new replicas)
        and answer those past their deadline."""
        while state.waiters:
            wake = self.poll
            next_deadline = state.queue.next_deadline()
            if next_deadline is not None:
                wake = min(wake, max(0.0, next_deadline - self.clock()) + 1e-3)
            await asyncio.sleep(wake)
            spec = self.view.models.get(name)
            if spec is not None and spec is not state.spec:
                state.spec, state.limit = spec, self.limit(spec)
            self._grant(state)
            self._export(name, state)

    def _free(self, name: str, limit: int, granted: int) -> int:
        """Free slots on the model's candidate replicas, less those already granted."""
        if not limit:
            return UNLIMITED
        total = self.inflight.total
        free = 0
        for replica in self.view.candidates(name):
            free += max(0, limit - total(replica.key))
        return free - granted

    # --- request attributes --------------------------------------------------------------
    def _class(self, headers: list[tuple[bytes, bytes]]) -> tuple[str, Priority]:
        """The request's fairness key (its API key's digest) and its priority class."""
        token = bearer_of(headers)
        key = digest(token) if token is not None else "anonymous"
        tier = self.key_priorities.get(key)
        cap = tier or Priority.HIGH
        priority = tier or Priority.NORMAL
        asked = _header(headers, PRIORITY_HEADER)
        if asked is not None:
            try:
                priority = Priority(asked.decode("latin-1").strip().lower())
            except ValueError:
                raise BadRequest(
                    f"x-corral-priority must be high, normal or low, not {asked[:20]!r}",
                    param="x-corral-priority",
                ) from None
        if _RANK[priority] < _RANK[cap]:
            priority = cap  # a key may not ask for more than its class
        return key, priority

    def _deadline(self, spec: ModelSpec, headers: list[tuple[bytes, bytes]]) -> float:
        """Seconds the request may wait: its header's, bounded by `max_deadline`, else its
        model's default, else the server's."""
        asked = _header(headers, DEADLINE_HEADER)
        if asked is None:
            return spec.scheduling.deadline or self.default_deadline
        try:
            seconds = float(asked)
        except ValueError:
            seconds = math.nan
        if not seconds > 0 or math.isinf(seconds):
            raise BadRequest(
                f"x-corral-deadline must be a positive number of seconds, not {asked[:20]!r}",
                param="x-corral-deadline",
            )
        return min(seconds, self.max_deadline)

    def _expired(self, name: str, waited: float) -> DeadlineExceeded:
        return DeadlineExceeded(
            f"no replica of model '{name}' had a free slot within the request's deadline"
            f" (waited {waited:.1f}s); it was never sent",
            retry_after=None,
        )

    # --- signals -------------------------------------------------------------------------
    def _export(self, name: str, state: _Model) -> None:
        """The queue's depth and its longest wait, for the autoscaler and the other frontends."""
        depth = len(state.waiters)
        self.inflight.set_queue(name, depth, self._longest(state) if depth else 0.0)

    def _longest(self, state: _Model) -> float:
        oldest = state.queue.oldest()
        return 0.0 if oldest is None else max(0.0, self.clock() - oldest)

    def queues(self) -> dict[str, dict[str, float]]:
        """Per model: requests waiting, their bytes, the longest wait and the drain estimate."""
        now = self.clock()
        return {
            name: {
                "depth": len(state.waiters),
                "bytes": state.queue.bytes,
                "longest_wait": round(self._longest(state), 3),
                "retry_after": state.queue.retry_after(now),
                "limit": state.limit,
            }
            for name, state in sorted(self._models.items())
        }

    async def close(self) -> None:
        for state in self._models.values():
            if state.pump is not None:
                state.pump.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await state.pump


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for key, value in headers:
        if key == name:
            return value
    return None

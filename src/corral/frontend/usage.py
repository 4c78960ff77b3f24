"""Usage per API key and model: counted in memory on the request path, flushed in batches.

Every `flush` adds what this frontend counted to PostgreSQL in one statement, then reads back
the cluster's totals of the keys that have limits. A key's count for its limits is those
totals plus what this frontend admitted since: another frontend's requests are seen once it
flushed, so the limits hold across frontends within one flush interval of their traffic.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from corral.domain.access import Grant
from corral.domain.usage import Limits, Usage, day_of, limit_decision, minute_of
from corral.errors import RateLimited
from corral.store.usage import KeyInfo, UsageStore

log = logging.getLogger(__name__)

NO_KEY = KeyInfo("", "")  # /v1 is open: usage of nobody in particular
STATIC_KEY = KeyInfo("static", "--api-keys")  # a key from the settings (not stored: no id)


class KeyCount:
    """One limited key's requests in a minute and tokens in a day."""

    __slots__ = ("day", "minute", "requests", "tokens")

    def __init__(self, minute: float, day: float, requests: int = 0, tokens: int = 0) -> None:
        self.minute = minute
        self.day = day
        self.requests = requests
        self.tokens = tokens

    def of(self, minute: float, day: float) -> tuple[int, int]:
        """(requests, tokens) within the minute and the day given (0 once they passed)."""
        return (
            self.requests if self.minute == minute else 0,
            self.tokens if self.day == day else 0,
        )

    def add(self, minute: float, day: float, requests: int, tokens: int) -> None:
        if minute != self.minute:
            self.minute, self.requests = minute, 0
        if day != self.day:
            self.day, self.tokens = day, 0
        self.requests += requests
        self.tokens += tokens


class UsageMeter:
    """This frontend's usage counts, the keys it knows, and their limits."""

    def __init__(
        self,
        store: UsageStore,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.clock = clock
        self.keys: dict[str, KeyInfo] = {}  # stored keys, by id
        #: (key id, model, minute) -> [requests, errors, limited, prompt, completion]
        self.pending: dict[tuple[str, str, float], list[int]] = {}
        self.names: dict[str, str] = {}  # key id -> name, of the pending rows
        self.cluster: dict[str, KeyCount] = {}  # limited keys: totals at the last flush
        self.since: dict[str, KeyCount] = {}  # limited keys: admitted here since
        self.flushing: dict[str, KeyCount] = {}  # limited keys: in the flush under way
        self._flush_lock = asyncio.Lock()  # the loop's and the usage API's flushes, in turn

    # --- the request path ---------------------------------------------------------------
    def key(self, grant: Grant | None) -> KeyInfo:
        """Who a request's key is (`grant`: None while /v1 is open)."""
        if grant is None:
            return NO_KEY
        key_id = grant.key_id
        if key_id is None:
            return STATIC_KEY
        info = self.keys.get(key_id)
        if info is None:  # stored since the last load: its name and limits come with the next
            info = self.keys[key_id] = KeyInfo(key_id, "")
        return info

    def admit(self, grant: Grant | None, model: str) -> None:
        """Count one request; RateLimited (counted as refused) when its key is over a limit."""
        info = self.key(grant)
        now = self.clock()
        minute = minute_of(now)
        row = self._row(info, model, minute)
        if info.limits.any:
            day = day_of(now)
            requests, tokens = self._counted(info.id, minute, day)
            refused = limit_decision(info.limits, requests, tokens, now)
            if refused is not None:
                row[0] += 1
                row[1] += 1  # answered 429
                row[2] += 1
                why, wait = refused
                raise RateLimited(f"API key '{info.name}' is over its {why}", retry_after=wait)
            self._since(info.id, minute, day).add(minute, day, 1, 0)
        row[0] += 1

    def done(self, grant: Grant | None, model: str, status: int, usage: Usage | None) -> None:
        """An admitted request ended with `status` and the backend's `usage` (if any)."""
        if status < 400 and usage is None:
            return
        info = self.key(grant)
        now = self.clock()
        minute = minute_of(now)
        row = self._row(info, model, minute)
        if status >= 400:
            row[1] += 1
        if usage is not None:
            row[3] += usage.prompt_tokens
            row[4] += usage.completion_tokens
            if info.limits.any:
                day = day_of(now)
                tokens = usage.prompt_tokens + usage.completion_tokens
                self._since(info.id, minute, day).add(minute, day, 0, tokens)

    def _row(self, info: KeyInfo, model: str, minute: float) -> list[int]:
        key = (info.id, model, minute)
        row = self.pending.get(key)
        if row is None:
            row = self.pending[key] = [0, 0, 0, 0, 0]
            self.names[info.id] = info.name
        return row

    def _since(self, key_id: str, minute: float, day: float) -> KeyCount:
        count = self.since.get(key_id)
        if count is None:
            count = self.since[key_id] = KeyCount(minute, day)
        return count

    def _counted(self, key_id: str, minute: float, day: float) -> tuple[int, int]:
        requests = tokens = 0
        for counts in (self.cluster, self.flushing, self.since):
            count = counts.get(key_id)
            if count is not None:
                r, t = count.of(minute, day)
                requests += r
                tokens += t
        return requests, tokens

    # --- the flush loop -----------------------------------------------------------------
    async def load_keys(self) -> None:
        """Take the stored keys (names, limits) from PostgreSQL."""
        self.keys = await self.store.keys()

    def set_limits(self, key_id: str, limits: Limits) -> None:
        """A key's limits changed on this frontend: use them at once."""
        info = self.keys.get(key_id)
        if info is not None:
            self.keys[key_id] = KeyInfo(info.id, info.name, limits)

    async def flush(self) -> None:
        """Add the counts so far to PostgreSQL (one statement), then read the totals of the
        limited keys back."""
        async with self._flush_lock:
            await self._flush()

    async def _flush(self) -> None:
        pending, self.pending = self.pending, {}
        names, self.names = self.names, {}
        self.flushing, self.since = self.since, {}
        try:
            await self.store.add(pending, names)
        except BaseException:
            self._restore(pending, names)
            raise
        limited = {info.id for info in self.keys.values() if info.limits.any}
        now = self.clock()
        minute, day = minute_of(now), day_of(now)
        try:
            totals = await self.store.totals(limited, minute, day) if limited else {}
        finally:
            self.flushing = {}
        self.cluster = {k: KeyCount(minute, day, r, t) for k, (r, t) in totals.items()}

    def _restore(
        self, pending: dict[tuple[str, str, float], list[int]], names: dict[str, str]
    ) -> None:
        """A failed flush: its counts go back, to be flushed the next time."""
        for key, values in pending.items():
            row = self.pending.setdefault(key, [0, 0, 0, 0, 0])
            for i, v in enumerate(values):
                row[i] += v
        for key_id, name in names.items():
            self.names.setdefault(key_id, name)
        for key_id, count in self.flushing.items():
            mine = self.since.get(key_id)
            if mine is None:
                self.since[key_id] = count
            else:
                requests, tokens = count.of(mine.minute, mine.day)
                mine.requests += requests
                mine.tokens += tokens
        self.flushing = {}

"""The usage meter's bookkeeping: rows per key, model and minute; limits counted from the
cluster's totals plus this frontend's own since; a failed flush keeps its counts."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, cast

import pytest

from corral.domain.access import Grant, Role
from corral.domain.usage import Limits, Usage
from corral.errors import RateLimited
from corral.frontend.usage import UsageMeter
from corral.store.usage import NO_LIMITS, Counts, KeyInfo

NOW = 1_800_000_000.0 + 10  # 10 s into a minute
KEY = Grant(Role.INFERENCE, key_id="key-1")


class TableInMemory:
    """The two calls the meter makes of its store, kept in a dict (`fail`: the next add
    raises, as a lost database would)."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str, float], list[int]] = {}
        self.fail = False

    async def add(self, counts: Counts, names: dict[str, str]) -> None:
        if self.fail:
            self.fail = False
            raise ConnectionError("database gone")
        for key, values in counts.items():
            row = self.rows.setdefault(key, [0] * 5)
            for i, v in enumerate(values):
                row[i] += v

    async def totals(
        self, key_ids: Collection[str], minute: float, day: float
    ) -> dict[str, tuple[int, int]]:
        out: dict[str, tuple[int, int]] = {}
        for (key_id, _, bucket), (req, _, limited, p, c) in self.rows.items():
            if key_id in key_ids and bucket >= day:
                r, t = out.get(key_id, (0, 0))
                out[key_id] = (r + (req - limited if bucket == minute else 0), t + p + c)
        return out


def meter(table: TableInMemory, limits: Limits = NO_LIMITS) -> UsageMeter:
    m = UsageMeter(cast(Any, table), clock=lambda: NOW)
    m.keys["key-1"] = KeyInfo("key-1", "team", limits)
    return m


async def test_requests_and_tokens_are_counted_per_key_model_and_minute() -> None:
    table = TableInMemory()
    m = meter(table)
    for status, usage in ((200, Usage(10, 5)), (200, None), (500, None)):
        m.admit(KEY, "chat")
        m.done(KEY, "chat", status, usage)
    m.admit(None, "chat")  # the API open: no key
    await m.flush()
    minute = NOW - 10
    assert table.rows == {
        ("key-1", "chat", minute): [3, 1, 0, 10, 5],
        ("", "chat", minute): [1, 0, 0, 0, 0],
    }
    await m.flush()  # nothing new: nothing added twice
    assert table.rows[("key-1", "chat", minute)] == [3, 1, 0, 10, 5]


async def test_a_failed_flush_keeps_its_counts_for_the_next_one() -> None:
    table = TableInMemory()
    m = meter(table, Limits(requests_per_minute=3))
    m.admit(KEY, "chat")
    m.admit(KEY, "chat")
    table.fail = True
    with pytest.raises(ConnectionError):
        await m.flush()
    m.admit(KEY, "chat")  # the two before still count for the limit
    with pytest.raises(RateLimited):
        m.admit(KEY, "chat")
    await m.flush()
    assert table.rows[("key-1", "chat", NOW - 10)] == [4, 1, 1, 0, 0]


async def test_other_frontends_count_once_they_flushed() -> None:
    table = TableInMemory()
    here, there = meter(table, Limits(tokens_per_day=100)), meter(table, Limits(tokens_per_day=100))
    there.admit(KEY, "chat")
    there.done(KEY, "chat", 200, Usage(60, 40))
    here.admit(KEY, "chat")  # not flushed there yet: within the tolerance
    await there.flush()
    await here.flush()
    with pytest.raises(RateLimited) as refused:
        here.admit(KEY, "chat")
    assert refused.value.retry_after == pytest.approx(86400 - NOW % 86400)

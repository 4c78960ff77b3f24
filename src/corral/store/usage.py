"""Usage rows (per API key, model and minute), the keys' identities and their limits."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import case, func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncEngine

from corral.domain.usage import Limits
from corral.store.tables import api_keys, usage

#: Counters of a usage row, in the order `Counts` lists them.
COUNTERS = ("requests", "errors", "limited", "prompt_tokens", "completion_tokens")
#: (key id, model, minute) -> [requests, errors, limited, prompt tokens, completion tokens]
Counts = Mapping[tuple[str, str, float], Sequence[int]]
NO_LIMITS = Limits()
#: How usage can be grouped: columns, or a time bucket.
GROUPS = ("key", "model", "minute", "hour", "day")


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """An API key as the request path needs it: who it is, and its limits."""

    id: str
    name: str
    limits: Limits = NO_LIMITS


class UsageStore:
    """The `usage` table and the key columns it needs from `api_keys`."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def keys(self) -> dict[str, KeyInfo]:
        """Every stored key by its id."""
        query = select(
            api_keys.c.id,
            api_keys.c.name,
            api_keys.c.requests_per_minute,
            api_keys.c.tokens_per_day,
        )
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return {r[0]: KeyInfo(r[0], r[1], Limits(r[2], r[3])) for r in rows}

    async def limits(self, key_id: str) -> Limits | None:
        """A key's limits; None when there is no such key."""
        query = select(api_keys.c.requests_per_minute, api_keys.c.tokens_per_day).where(
            api_keys.c.id == key_id
        )
        async with self.engine.connect() as conn:
            row = (await conn.execute(query)).first()
        return None if row is None else Limits(row[0], row[1])

    async def set_limits(self, key_id: str, limits: Limits) -> bool:
        """Set a key's limits; False when there is no such key."""
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(api_keys)
                .where(api_keys.c.id == key_id)
                .values(
                    requests_per_minute=limits.requests_per_minute,
                    tokens_per_day=limits.tokens_per_day,
                )
            )
            return bool(result.rowcount)

    async def add(self, counts: Counts, names: Mapping[str, str]) -> None:
        """Add `counts` to their rows in one statement (rows are created as needed)."""
        if not counts:
            return
        rows = [
            {
                "key_id": key_id,
                "model": model,
                "bucket": bucket,
                "key_name": names.get(key_id, ""),
                **dict(zip(COUNTERS, values, strict=True)),
            }
            for (key_id, model, bucket), values in counts.items()
        ]
        stmt = insert(usage).values(rows)
        stmt = stmt.on_conflict_do_update(
            index_elements=[usage.c.key_id, usage.c.model, usage.c.bucket],
            set_={c: getattr(usage.c, c) + getattr(stmt.excluded, c) for c in COUNTERS},
        )
        async with self.engine.begin() as conn:
            await conn.execute(stmt)

    async def totals(
        self, key_ids: Collection[str], minute: float, day: float
    ) -> dict[str, tuple[int, int]]:
        """Per key, across every frontend's flushes: requests admitted in the minute starting
        at `minute`, and tokens since `day`."""
        if not key_ids:
            return {}
        admitted = case((usage.c.bucket == minute, usage.c.requests - usage.c.limited), else_=0)
        query = (
            select(
                usage.c.key_id,
                func.coalesce(func.sum(admitted), 0),
                func.coalesce(func.sum(usage.c.prompt_tokens + usage.c.completion_tokens), 0),
            )
            .where(usage.c.key_id.in_(list(key_ids)), usage.c.bucket >= day)
            .group_by(usage.c.key_id)
        )
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return {r[0]: (int(r[1]), int(r[2])) for r in rows}

    async def query(
        self,
        *,
        key: str | None = None,
        model: str | None = None,
        since: float | None = None,
        until: float | None = None,
        group_by: Sequence[str] = ("key", "model"),
    ) -> list[dict[str, Any]]:
        """Summed usage rows, grouped by `group_by` (of `GROUPS`); `key` matches a key's id or
        its name, `since`/`until` the minute buckets (seconds since the epoch, until exclusive)."""
        columns: list[Any] = []
        if "key" in group_by:
            columns += [usage.c.key_id, func.max(usage.c.key_name).label("key_name")]
        if "model" in group_by:
            columns.append(usage.c.model)
        steps = (("day", 86400), ("hour", 3600), ("minute", 60))
        step = next((s for g, s in steps if g in group_by), 0)
        if step:
            columns.append((func.floor(usage.c.bucket / step) * step).label("bucket"))
        sums = [func.coalesce(func.sum(getattr(usage.c, c)), 0).label(c) for c in COUNTERS]
        query = select(*columns, *sums)
        if key is not None:
            query = query.where((usage.c.key_id == key) | (usage.c.key_name == key))
        if model is not None:
            query = query.where(usage.c.model == model)
        if since is not None:
            query = query.where(usage.c.bucket >= since - since % 60)
        if until is not None:
            query = query.where(usage.c.bucket < until)
        grouping = [c for c in columns if c.name != "key_name"]
        if grouping:
            query = query.group_by(*grouping).order_by(*grouping)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        out = []
        for row in rows:
            item = dict(row._mapping)
            for c in COUNTERS:
                item[c] = int(item[c])
            item["total_tokens"] = item["prompt_tokens"] + item["completion_tokens"]
            if "key_id" in item and item["key_id"] == "":
                item["key_id"] = None  # the API was open: no key
            out.append(item)
        return out

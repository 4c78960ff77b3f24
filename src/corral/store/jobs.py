"""Load jobs: the cluster-wide claim that makes one frontend, and only one, load a cold model."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncEngine

from corral.store.tables import load_jobs


@dataclass(frozen=True, slots=True)
class LoadJob:
    """A model load in progress (or just failed), owned by one frontend."""

    model: str
    owner: str
    state: str
    phase: str | None
    percent: float | None
    node_id: str | None
    index: int | None
    error: str | None
    started_at: float
    updated_at: float
    expires_at: float
    error_code: str | None = None  # the wire code of a failed job's error
    failures: int = 0  # failed loads in a row (the backoff grows with them)

    def as_progress(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "phase": self.phase,
            "percent": self.percent,
            "node_id": self.node_id,
            "elapsed": round(max(0.0, self.updated_at - self.started_at), 3),
            "error": self.error,
        }


class LoadJobStore:
    """Rows of `load_jobs`: at most one per model; an expired claim may be taken over."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def claim(self, model: str, owner: str, *, ttl: float, now: float | None = None) -> bool:
        """Try to become the loader of `model`.

        Succeeds when no job exists or the existing one expired: its owner died, or it failed
        more than `keep` seconds ago (see `fail`). Exactly one of concurrent callers succeeds.
        """
        now = time.time() if now is None else now
        fresh = {
            "owner": owner,
            "state": "placing",
            "phase": None,
            "percent": None,
            "node_id": None,
            "replica_index": None,
            "error": None,
            "error_code": None,
            "started_at": now,
            "updated_at": now,
            "expires_at": now + ttl,
        }
        stmt = (
            insert(load_jobs)
            .values(model=model, **fresh)
            .on_conflict_do_update(
                index_elements=[load_jobs.c.model],
                set_=fresh,
                where=load_jobs.c.expires_at < now,
            )
            .returning(load_jobs.c.owner)
        )
        async with self.engine.begin() as conn:
            row = (await conn.execute(stmt)).first()
        return row is not None and row.owner == owner

    async def update(self, model: str, owner: str, *, ttl: float, **fields: Any) -> bool:
        """Update the owner's job (state, phase, percent, node_id, replica_index, error)."""
        now = time.time()
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(load_jobs)
                .where(load_jobs.c.model == model, load_jobs.c.owner == owner)
                .values(updated_at=now, expires_at=now + ttl, **fields)
            )
            return bool(result.rowcount)

    async def fail(
        self,
        model: str,
        owner: str,
        error: str,
        *,
        code: str | None = None,
        keep: float = 5.0,
        backoff: tuple[float, float] | None = None,
    ) -> float:
        """Mark the job failed so waiters on every frontend see the error (and its wire `code`)
        for `keep` seconds, during which nobody claims the model.

        With `backoff` (base, cap), the failure counts: the n-th failure in a row keeps the
        job `min(cap, base * 2**(n-1))` seconds instead (a success deletes the row, which
        resets the count). Returns the seconds it is kept."""
        now = time.time()
        async with self.engine.begin() as conn:
            row = (
                await conn.execute(
                    select(load_jobs.c.failures)
                    .where(load_jobs.c.model == model, load_jobs.c.owner == owner)
                    .with_for_update()
                )
            ).first()
            failures = row.failures if row is not None else 0
            if backoff is not None:
                base, cap = backoff
                keep = min(cap, base * 2.0 ** min(failures, 30))
                failures += 1
            await conn.execute(
                update(load_jobs)
                .where(load_jobs.c.model == model, load_jobs.c.owner == owner)
                .values(
                    state="failed",
                    error=error,
                    error_code=code,
                    failures=failures,
                    updated_at=now,
                    expires_at=now + keep,
                )
            )
        return keep

    async def forget_failed(self, model: str | None = None) -> int:
        """Delete failed jobs (of `model`, or of every model): their verdict was judged on a
        cluster that has changed since. Returns how many there were."""
        stmt = delete(load_jobs).where(load_jobs.c.state == "failed")
        if model is not None:
            stmt = stmt.where(load_jobs.c.model == model)
        async with self.engine.begin() as conn:
            return (await conn.execute(stmt)).rowcount

    async def finish(self, model: str, owner: str) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(
                delete(load_jobs).where(load_jobs.c.model == model, load_jobs.c.owner == owner)
            )

    async def get(self, model: str) -> LoadJob | None:
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(load_jobs).where(load_jobs.c.model == model))).first()
        return row_to_job(row._mapping) if row else None

    async def all(self) -> list[LoadJob]:
        async with self.engine.connect() as conn:
            rows = (await conn.execute(select(load_jobs).order_by(load_jobs.c.model))).all()
        return [row_to_job(r._mapping) for r in rows]


def row_to_job(row: Mapping[Any, Any]) -> LoadJob:
    return LoadJob(
        model=row["model"],
        owner=row["owner"],
        state=row["state"],
        phase=row["phase"],
        percent=row["percent"],
        node_id=row["node_id"],
        index=row["replica_index"],
        error=row["error"],
        started_at=row["started_at"],
        updated_at=row["updated_at"],
        expires_at=row["expires_at"],
        error_code=row["error_code"],
        failures=row["failures"],
    )

"""Queries on replicas and on the load information per (model, revision) that outlives them."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Integer, bindparam, delete, func, select, text, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncEngine

from corral.domain.entities import ModelSpec, Replica, ReplicaKey, ReplicaState
from corral.domain.rollout import LoadFailure
from corral.store.tables import model_load_info, replicas

#: Load records kept per model (the newest revisions; older ones are deleted).
KEEP_REVISIONS = 8


@dataclass(frozen=True, slots=True)
class LoadInfo:
    """The last load of one revision of a model: what it used, how long it took, and whether it
    failed (`error`). A replica is only ever started from its own revision's record."""

    model: str
    backend: str
    artifact: str | None
    options: Mapping[str, Any]
    memory: int
    node_id: str | None
    load_seconds: float
    loaded_at: float  # 0: never loaded
    revision: str = ""
    error: str | None = None  # the last load of this revision failed with this
    failed_at: float = 0.0

    @property
    def key(self) -> tuple[str, str]:
        return (self.model, self.revision)


class ReplicaStore:
    """Rows of `replicas` and `model_load_info`."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def add(
        self,
        model: str,
        node_id: str,
        *,
        memory: int,
        state: ReplicaState = ReplicaState.SCHEDULED,
        index: int | None = None,
        revision: str = "",
        replaces: int | None = None,
    ) -> Replica | None:
        """Insert a replica with the lowest free index of its model (or `index`).

        Returns None when `index` is given and already taken.
        """
        now = time.time()
        async with self.engine.begin() as conn:
            await conn.execute(
                text("SELECT pg_advisory_xact_lock(hashtext(:k))"), {"k": f"replica:{model}"}
            )
            taken = set(
                (
                    await conn.execute(
                        select(replicas.c.replica_index).where(replicas.c.model == model)
                    )
                ).scalars()
            )
            if index is None:
                index = next(i for i in range(len(taken) + 1) if i not in taken)
            elif index in taken:
                return None
            await conn.execute(
                insert(replicas).values(
                    model=model,
                    replica_index=index,
                    node_id=node_id,
                    state=state.value,
                    memory=memory,
                    last_used=now,
                    updated=now,
                    revision=revision,
                    replaces=replaces,
                )
            )
        return Replica(
            model=model,
            index=index,
            node_id=node_id,
            state=state,
            memory=memory,
            last_used=now,
            updated=now,
            revision=revision,
            replaces=replaces,
        )

    async def update(
        self,
        model: str,
        index: int,
        *,
        state: ReplicaState | None = None,
        address: str | None = None,
        load_error: str | None = None,
        node_id: str | None = None,
    ) -> Replica | None:
        """Update one replica (only the fields given); returns the new row or None if gone."""
        values: dict[str, Any] = {"updated": time.time()}
        if state is not None:
            values["state"] = state.value
        if address is not None:
            values["address"] = address
        if load_error is not None:
            values["load_error"] = load_error
        stmt = (
            update(replicas)
            .where(replicas.c.model == model, replicas.c.replica_index == index)
            .values(**values)
            .returning(*replicas.c)
        )
        if node_id is not None:
            stmt = stmt.where(replicas.c.node_id == node_id)
        async with self.engine.begin() as conn:
            row = (await conn.execute(stmt)).first()
        return row_to_replica(row._mapping) if row else None

    async def remove(
        self,
        model: str,
        index: int,
        *,
        node_id: str | None = None,
        address: str | None = None,
    ) -> Replica | None:
        """Delete exactly one replica; with node_id/address given, only if they still match."""
        stmt = delete(replicas).where(replicas.c.model == model, replicas.c.replica_index == index)
        if node_id is not None:
            stmt = stmt.where(replicas.c.node_id == node_id)
        if address is not None:
            stmt = stmt.where(replicas.c.address == address)
        async with self.engine.begin() as conn:
            row = (await conn.execute(stmt.returning(*replicas.c))).first()
        return row_to_replica(row._mapping) if row else None

    async def remove_on_node(self, node_id: str) -> list[Replica]:
        async with self.engine.begin() as conn:
            rows = await conn.execute(
                delete(replicas).where(replicas.c.node_id == node_id).returning(*replicas.c)
            )
            return [row_to_replica(r._mapping) for r in rows]

    async def get(self, model: str, index: int) -> Replica | None:
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    select(replicas).where(
                        replicas.c.model == model, replicas.c.replica_index == index
                    )
                )
            ).first()
        return row_to_replica(row._mapping) if row else None

    async def all(self, model: str | None = None) -> list[Replica]:
        query = select(replicas).order_by(replicas.c.model, replicas.c.replica_index)
        if model is not None:
            query = query.where(replicas.c.model == model)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [row_to_replica(r._mapping) for r in rows]

    async def touch(self, last_used: Mapping[ReplicaKey, float]) -> None:
        """Write a batch of last-used times (never moving one backwards)."""
        if not last_used:
            return
        stmt = (
            update(replicas)
            .where(
                replicas.c.model == bindparam("m"),
                replicas.c.replica_index == bindparam("i", type_=Integer),
            )
            .values(last_used=func.greatest(replicas.c.last_used, bindparam("t")))
        )
        params = [{"m": m, "i": i, "t": t} for (m, i), t in last_used.items()]
        async with self.engine.begin() as conn:
            await conn.execute(stmt, params)

    # --- load information -------------------------------------------------------------

    async def record_load_info(self, info: LoadInfo) -> None:
        """Record a successful load of `info.revision` (clearing a failure recorded before)."""
        values = {
            "backend": info.backend,
            "artifact": info.artifact,
            "options": dict(info.options),
            "memory": info.memory,
            "node_id": info.node_id,
            "load_seconds": info.load_seconds,
            "loaded_at": info.loaded_at,
            "error": None,
        }
        await self._put(info, values, values)

    async def record_load_failure(self, info: LoadInfo) -> None:
        """Record that a load of `info.revision` failed with `info.error` at `info.failed_at`;
        what an earlier successful load of the revision recorded is kept."""
        failure = {"error": info.error, "failed_at": info.failed_at}
        values = {
            "backend": info.backend,
            "artifact": info.artifact,
            "options": dict(info.options),
            "memory": info.memory,
            "node_id": info.node_id,
            **failure,
        }
        await self._put(info, values, failure)

    async def _put(
        self, info: LoadInfo, values: Mapping[str, Any], on_conflict: Mapping[str, Any]
    ) -> None:
        t = model_load_info
        async with self.engine.begin() as conn:
            await conn.execute(
                insert(t)
                .values(model=info.model, revision=info.revision, **values)
                .on_conflict_do_update(index_elements=[t.c.model, t.c.revision], set_=on_conflict)
            )
            newest = (
                select(t.c.revision)
                .where(t.c.model == info.model)
                .order_by(func.greatest(t.c.loaded_at, t.c.failed_at).desc())
                .limit(KEEP_REVISIONS)
            )
            await conn.execute(
                delete(t).where(t.c.model == info.model, t.c.revision.not_in(newest))
            )

    async def load_info(
        self, models: Iterable[str] | None = None
    ) -> dict[tuple[str, str], LoadInfo]:
        """Load records by (model, revision)."""
        query = select(model_load_info)
        if models is not None:
            query = query.where(model_load_info.c.model.in_(list(models)))
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        infos = (
            LoadInfo(
                model=r.model,
                backend=r.backend,
                artifact=r.artifact,
                options=dict(r.options or {}),
                memory=r.memory,
                node_id=r.node_id,
                load_seconds=r.load_seconds,
                loaded_at=r.loaded_at,
                revision=r.revision,
                error=r.error,
                failed_at=r.failed_at,
            )
            for r in rows
        )
        return {i.key: i for i in infos}


def row_to_replica(row: Mapping[Any, Any]) -> Replica:
    return Replica(
        model=row["model"],
        index=row["replica_index"],
        node_id=row["node_id"],
        state=ReplicaState(row["state"]),
        address=row["address"],
        memory=row["memory"],
        last_used=row["last_used"],
        load_error=row["load_error"],
        updated=row["updated"],
        revision=row["revision"],
        replaces=row["replaces"],
    )


def revision_failures(
    models: Iterable[ModelSpec], load_info: Mapping[tuple[str, str], LoadInfo]
) -> dict[str, LoadFailure]:
    """Per model, the last load of its current revision, when it failed."""
    out: dict[str, LoadFailure] = {}
    for spec in models:
        info = load_info.get((spec.name, spec.config_revision))
        if info is not None and info.error is not None:
            out[spec.name] = LoadFailure(info.revision, info.error, info.failed_at)
    return out

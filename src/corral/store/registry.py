"""The registry: one object that owns the engine and groups the stores of each table family."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from corral.domain.entities import ModelSpec, Node, Replica
from corral.domain.reconcile import ReportedProcess
from corral.store.audit import AuditStore
from corral.store.db import create_engine, migrate, on_error
from corral.store.installs import InstallStore
from corral.store.jobs import LoadJobStore
from corral.store.models import ModelStore
from corral.store.nodes import NodeStore
from corral.store.replicas import LoadInfo, ReplicaStore
from corral.store.usage import UsageStore


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The whole cluster as the registry holds it, read at one moment (for the reconciler)."""

    nodes: Sequence[Node]
    models: Sequence[ModelSpec]
    replicas: Sequence[Replica]
    load_info: Mapping[tuple[str, str], LoadInfo]  # (model, revision) -> its last load
    processes: Mapping[str, Sequence[ReportedProcess]]  # node -> what its heartbeat reported


class Lease:
    """A session-level advisory lock this process holds; it lives as long as its connection."""

    def __init__(self, conn: AsyncConnection) -> None:
        self.conn = conn

    async def renew(self) -> None:
        """Use the connection (raises when it died, and with it the lock), and never leave it
        idle in a transaction."""
        await self.conn.execute(text("SELECT 1"))
        await self.conn.commit()

    async def backend_pid(self) -> int:
        """The PostgreSQL server process of the lock's session."""
        pid = (await self.conn.execute(text("SELECT pg_backend_pid()"))).scalar_one()
        await self.conn.commit()
        return int(pid)


class Registry:
    """PostgreSQL, the source of truth: nodes, models, replicas, load info, jobs, audit."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.nodes = NodeStore(engine)
        self.models = ModelStore(engine)
        self.replicas = ReplicaStore(engine)
        self.jobs = LoadJobStore(engine)
        self.audit = AuditStore(engine)
        self.installs = InstallStore(engine)
        self.usage = UsageStore(engine)
        self.errors = 0  # errors PostgreSQL (or the way to it) raised (metrics)

    @classmethod
    def from_url(cls, database_url: str, *, pool_size: int = 10) -> Registry:
        registry = cls(create_engine(database_url, pool_size=pool_size))
        on_error(registry.engine, registry._count_error)
        return registry

    def _count_error(self) -> None:
        self.errors += 1

    async def migrate(self) -> None:
        await migrate(self.engine)

    async def ping(self) -> None:
        async with self.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    async def close(self) -> None:
        await self.engine.dispose()

    async def snapshot(self) -> Snapshot:
        return Snapshot(
            nodes=await self.nodes.all(),
            models=await self.models.all(),
            replicas=await self.replicas.all(),
            load_info=await self.replicas.load_info(),
            processes=await self.nodes.reported_processes(),
        )

    async def lock_held(self, key: int) -> bool:
        """Whether some session holds the advisory lock `key` now (e.g. a reconciler leads)."""
        query = text(
            "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted"
            " AND objsubid = 1 AND ((classid::bigint << 32) | objid::bigint) = :k)"
        )
        async with self.engine.connect() as conn:
            return bool((await conn.execute(query, {"k": key})).scalar_one())

    @asynccontextmanager
    async def advisory_lock(self, key: int) -> AsyncIterator[Lease | None]:
        """Hold a session-level advisory lock while the context runs.

        Yields the lease, or None when another session holds the lock. The lock is released
        when the context exits or the connection dies (frontend crash).
        """
        async with self.engine.connect() as conn:
            got = (
                await conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key})
            ).scalar_one()
            await conn.commit()
            if not got:
                yield None
                return
            try:
                yield Lease(conn)
            finally:
                try:
                    await conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                    await conn.commit()
                except Exception:  # noqa: S110 - the connection may be gone; PG frees the lock
                    pass

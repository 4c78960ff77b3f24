"""The registry: one object that owns the engine and groups the stores of each table family."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from corral.store.audit import AuditStore
from corral.store.db import create_engine, migrate
from corral.store.installs import InstallStore
from corral.store.jobs import LoadJobStore
from corral.store.models import ModelStore
from corral.store.nodes import NodeStore
from corral.store.replicas import ReplicaStore


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

    @classmethod
    def from_url(cls, database_url: str, *, pool_size: int = 10) -> Registry:
        return cls(create_engine(database_url, pool_size=pool_size))

    async def migrate(self) -> None:
        await migrate(self.engine)

    async def ping(self) -> None:
        async with self.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    async def close(self) -> None:
        await self.engine.dispose()

    @asynccontextmanager
    async def advisory_lock(self, key: int) -> AsyncIterator[AsyncConnection | None]:
        """Hold a session-level advisory lock while the context runs.

        Yields the connection holding the lock, or None when another session holds it. The
        lock is released when the context exits or the connection dies (frontend crash).
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
                yield conn
            finally:
                try:
                    await conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                    await conn.commit()
                except Exception:  # noqa: S110 - the connection may be gone; PG frees the lock
                    pass

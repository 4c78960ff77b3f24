"""The bounded audit log (`events`) and API keys."""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Mapping
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncEngine

from corral.domain.access import Grant, Role
from corral.store.tables import api_keys, events


def hash_secret(secret: str) -> str:
    """SHA-256 hex digest of a secret; secrets are stored and compared only as digests."""
    return hashlib.sha256(secret.encode()).hexdigest()


class AuditStore:
    """Rows of `events` (kept to the newest `keep`) and `api_keys`."""

    def __init__(self, engine: AsyncEngine, *, keep: int = 10_000) -> None:
        self.engine = engine
        self.keep = keep

    async def add(
        self, kind: str, message: str, *, subject: str = "", data: Mapping[str, Any] | None = None
    ) -> None:
        async with self.engine.begin() as conn:
            result = await conn.execute(
                insert(events)
                .values(
                    at=time.time(), kind=kind, subject=subject, message=message, data=data or {}
                )
                .returning(events.c.id)
            )
            new_id = result.scalar_one()
            if new_id % 100 == 0:
                await conn.execute(delete(events).where(events.c.id <= new_id - self.keep))

    async def recent(
        self, limit: int = 100, kind: str | None = None, subject: str | None = None
    ) -> list[dict[str, Any]]:
        """The newest entries first (of one kind, about one subject, when given)."""
        query = select(events).order_by(events.c.id.desc()).limit(limit)
        if kind:
            query = query.where(events.c.kind == kind)
        if subject is not None:
            query = query.where(events.c.subject == subject)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [dict(r._mapping) for r in rows]

    async def after(self, event_id: int, limit: int = 100) -> list[dict[str, Any]]:
        """The entries newer than `event_id`, oldest first (for following the log)."""
        query = select(events).where(events.c.id > event_id).order_by(events.c.id).limit(limit)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [dict(r._mapping) for r in rows]

    async def create_api_key(
        self, name: str, role: Role = Role.INFERENCE, models: list[str] | None = None
    ) -> tuple[str, str]:
        """Create a key; returns (id, secret). Only the digest is stored."""
        secret = "sk-corral-" + secrets.token_urlsafe(32)
        key_id = "key-" + secrets.token_hex(6)
        async with self.engine.begin() as conn:
            await conn.execute(
                insert(api_keys).values(
                    id=key_id,
                    name=name,
                    key_hash=hash_secret(secret),
                    role=role.value,
                    models=models,
                )
            )
        return key_id, secret

    async def api_key_grants(self) -> dict[str, Grant]:
        """Every stored key's digest and what it grants."""
        query = select(api_keys.c.key_hash, api_keys.c.role, api_keys.c.models, api_keys.c.id)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return {r.key_hash: Grant.of(r.role, r.models, r.id) for r in rows}

    async def delete_api_key(self, key_id: str) -> bool:
        async with self.engine.begin() as conn:
            result = await conn.execute(delete(api_keys).where(api_keys.c.id == key_id))
            return bool(result.rowcount)

    async def list_api_keys(self) -> list[dict[str, Any]]:
        async with self.engine.connect() as conn:
            rows = (
                await conn.execute(
                    select(
                        api_keys.c.id,
                        api_keys.c.name,
                        api_keys.c.role,
                        api_keys.c.models,
                        api_keys.c.created_at,
                    ).order_by(api_keys.c.created_at)
                )
            ).all()
        return [dict(r._mapping) for r in rows]

    async def count(self) -> int:
        async with self.engine.connect() as conn:
            return int((await conn.execute(select(func.count()).select_from(events))).scalar_one())

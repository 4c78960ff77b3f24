"""Backend install states per node, as their workers last reported them."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncEngine

from corral.store.tables import backend_installs


class InstallStore:
    """Rows of `backend_installs`: one per (node, backend)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def report(self, node_id: str, installs: Mapping[str, Mapping[str, Any]]) -> None:
        """Replace the node's install states with what its worker reports now."""
        now = time.time()
        rows = [
            {
                "node_id": node_id,
                "backend": name,
                "version": str(status.get("version") or "") or None,
                "state": str(status.get("state") or "missing"),
                "percent": status.get("percent"),
                "error": status.get("error"),
                "attempts": int(status.get("attempts") or 0),
                "updated_at": float(status.get("updated_at") or now),
            }
            for name, status in installs.items()
        ]
        async with self.engine.begin() as conn:
            await conn.execute(
                delete(backend_installs).where(backend_installs.c.node_id == node_id)
            )
            if rows:
                await conn.execute(insert(backend_installs), rows)

    async def of_node(self, node_id: str) -> dict[str, dict[str, Any]]:
        async with self.engine.connect() as conn:
            rows = (
                await conn.execute(
                    select(backend_installs).where(backend_installs.c.node_id == node_id)
                )
            ).all()
        return {
            r.backend: {
                "state": r.state,
                "percent": r.percent,
                "error": r.error,
                "attempts": r.attempts,
                "updated_at": r.updated_at,
            }
            for r in rows
        }

"""Queries on nodes and their labels."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import case, delete, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from corral.bus.messages import resources_from_wire
from corral.domain.entities import Node, NodeStatus
from corral.domain.reconcile import ReportedProcess
from corral.domain.sizes import MemoryBudget
from corral.store.tables import node_labels, nodes


class NodeStore:
    """Rows of `nodes` and `node_labels` as domain Nodes."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def upsert(
        self,
        *,
        node_id: str,
        name: str,
        address: str,
        token_hash: str,
        labels: Mapping[str, str],
        memory_budget: str,
        max_replicas_per_model: int,
        backends: Sequence[str],
        nats_credential_hash: str | None = None,
    ) -> str | None:
        """Create the node or update what its worker declares; status becomes pending.

        A node an operator drains stays draining across worker restarts (`undrain` ends it).
        `nats_credential_hash` replaces the node's NATS credential digest when given; the
        digest it replaced is returned (None when there was none), for revoking.
        """
        values: dict[str, Any] = {
            "name": name,
            "address": address,
            "token_hash": token_hash,
            "memory_budget": memory_budget,
            "max_replicas_per_model": max_replicas_per_model,
            "backends": list(backends),
            "status": NodeStatus.PENDING.value,
        }
        if nats_credential_hash is not None:
            values["nats_credential_hash"] = nats_credential_hash
        async with self.engine.begin() as conn:
            before = (
                await conn.execute(
                    select(nodes.c.nats_credential_hash)
                    .where(nodes.c.id == node_id)
                    .with_for_update()
                )
            ).scalar_one_or_none()
            await conn.execute(
                insert(nodes)
                .values(id=node_id, **values)
                .on_conflict_do_update(
                    index_elements=[nodes.c.id],
                    set_={
                        **values,
                        "status": case(
                            (nodes.c.status == NodeStatus.DRAINING.value, nodes.c.status),
                            else_=NodeStatus.PENDING.value,
                        ),
                    },
                )
            )
            await _write_labels(conn, node_id, labels)
        return before if nats_credential_hash is not None else None

    async def nats_credential_hash(self, node_id: str) -> str | None:
        """The digest of the node's current NATS secret (None: unknown node or none issued)."""
        async with self.engine.connect() as conn:
            row = await conn.execute(
                select(nodes.c.nats_credential_hash).where(nodes.c.id == node_id)
            )
            return row.scalar_one_or_none()

    async def remove(self, node_id: str) -> str | None:
        """Delete the node's row (labels, installs and replica rows go with it); returns its
        NATS credential digest ("" when it had none), None when there was no such node."""
        async with self.engine.begin() as conn:
            row = (
                await conn.execute(
                    delete(nodes)
                    .where(nodes.c.id == node_id)
                    .returning(nodes.c.nats_credential_hash)
                )
            ).first()
        if row is None:
            return None
        return row.nats_credential_hash or ""

    async def token_hash(self, node_id: str) -> str | None:
        async with self.engine.connect() as conn:
            row = await conn.execute(select(nodes.c.token_hash).where(nodes.c.id == node_id))
            return row.scalar_one_or_none()

    async def id_by_token_hash(self, token_hash: str) -> str | None:
        async with self.engine.connect() as conn:
            row = await conn.execute(select(nodes.c.id).where(nodes.c.token_hash == token_hash))
            return row.scalar_one_or_none()

    async def heartbeat(
        self,
        node_id: str,
        *,
        resources: Mapping[str, Any],
        processes: Sequence[Mapping[str, Any]],
        backends: Sequence[str],
        artifacts: Sequence[str],
        now: float | None = None,
    ) -> NodeStatus | None:
        """Record a heartbeat; a pending, unhealthy or offline node becomes healthy.

        Each process keeps the time it was first reported (`first_seen`, this heartbeat's time
        for a new one). Returns the status before the heartbeat (None if the node does not
        exist).
        """
        now = time.time() if now is None else now
        async with self.engine.begin() as conn:
            row = (
                await conn.execute(
                    select(nodes.c.status, nodes.c.processes)
                    .where(nodes.c.id == node_id)
                    .with_for_update()
                )
            ).first()
            if row is None:
                return None
            before = row.status
            seen = {
                (p.get("model"), p.get("index"), p.get("address")): p.get("first_seen", 0.0)
                for p in row.processes or []
            }
            reported = [
                {
                    **p,
                    "first_seen": seen.get((p.get("model"), p.get("index"), p.get("address")), now),
                }
                for p in processes
            ]
            status = before if before == NodeStatus.DRAINING else NodeStatus.HEALTHY.value
            await conn.execute(
                update(nodes)
                .where(nodes.c.id == node_id)
                .values(
                    resources=dict(resources),
                    processes=reported,
                    backends=list(backends),
                    artifacts=list(artifacts),
                    last_heartbeat=now,
                    status=status,
                )
            )
            return NodeStatus(before)

    async def processes(self, node_id: str) -> list[dict[str, Any]]:
        async with self.engine.connect() as conn:
            row = await conn.execute(select(nodes.c.processes).where(nodes.c.id == node_id))
            value = row.scalar_one_or_none()
            return list(value or [])

    async def reported_processes(self) -> dict[str, list[ReportedProcess]]:
        """Per node that ever sent a heartbeat, the processes its latest one reported."""
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                select(nodes.c.id, nodes.c.processes).where(nodes.c.last_heartbeat > 0)
            )
            return {r.id: [row_to_process(p) for p in r.processes or []] for r in rows}

    async def set_status(
        self, node_id: str, status: NodeStatus, *, only_from: Sequence[NodeStatus] = ()
    ) -> bool:
        """Set a node's status (only when its current status is in `only_from`, if given)."""
        stmt = update(nodes).where(nodes.c.id == node_id).values(status=status.value)
        if only_from:
            stmt = stmt.where(nodes.c.status.in_([s.value for s in only_from]))
        async with self.engine.begin() as conn:
            result = await conn.execute(stmt)
            return bool(result.rowcount)

    async def set_labels(self, node_id: str, labels: Mapping[str, str]) -> bool:
        async with self.engine.begin() as conn:
            found = await conn.execute(select(nodes.c.id).where(nodes.c.id == node_id))
            if found.scalar_one_or_none() is None:
                return False
            await _write_labels(conn, node_id, labels)
            return True

    async def patch_labels(
        self, node_id: str, changes: Mapping[str, str | None]
    ) -> dict[str, str] | None:
        """Set the labels given a value and remove those given None, in one transaction;
        returns the node's labels after it (None for an unknown node)."""
        async with self.engine.begin() as conn:
            found = await conn.execute(
                select(nodes.c.id).where(nodes.c.id == node_id).with_for_update()
            )
            if found.scalar_one_or_none() is None:
                return None
            if changes:
                await conn.execute(
                    delete(node_labels)
                    .where(node_labels.c.node_id == node_id)
                    .where(node_labels.c.key.in_(list(changes)))
                )
            kept = [
                {"node_id": node_id, "key": k, "value": v}
                for k, v in changes.items()
                if v is not None
            ]
            if kept:
                await conn.execute(insert(node_labels), kept)
            rows = await conn.execute(
                select(node_labels.c.key, node_labels.c.value).where(
                    node_labels.c.node_id == node_id
                )
            )
            return {r.key: r.value for r in rows}

    async def find(self, ref: str) -> list[Node]:
        """The nodes whose id or name is `ref` (a name may be shared, e.g. by a node that
        rejoined with a new identity)."""
        ids = select(nodes.c.id).where((nodes.c.id == ref) | (nodes.c.name == ref))
        async with self.engine.connect() as conn:
            found = [row.id for row in await conn.execute(ids)]
        return [n for node_id in found for n in await self._load(node_id)]

    async def delete(self, node_id: str) -> bool:
        async with self.engine.begin() as conn:
            result = await conn.execute(delete(nodes).where(nodes.c.id == node_id))
            return bool(result.rowcount)

    async def get(self, node_id: str) -> Node | None:
        found = await self._load(node_id)
        return found[0] if found else None

    async def all(self) -> list[Node]:
        return await self._load(None)

    async def _load(self, node_id: str | None) -> list[Node]:
        query = select(nodes)
        label_query = select(node_labels)
        if node_id is not None:
            query = query.where(nodes.c.id == node_id)
            label_query = label_query.where(node_labels.c.node_id == node_id)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query.order_by(nodes.c.name, nodes.c.id))).all()
            label_rows = (await conn.execute(label_query)).all()
        labels: dict[str, dict[str, str]] = {}
        for lr in label_rows:
            labels.setdefault(lr.node_id, {})[lr.key] = lr.value
        return [row_to_node(row._mapping, labels.get(row.id, {})) for row in rows]


async def _write_labels(conn: AsyncConnection, node_id: str, labels: Mapping[str, str]) -> None:
    await conn.execute(delete(node_labels).where(node_labels.c.node_id == node_id))
    if labels:
        await conn.execute(
            insert(node_labels),
            [{"node_id": node_id, "key": k, "value": v} for k, v in labels.items()],
        )


def row_to_node(row: Mapping[Any, Any], labels: Mapping[str, str]) -> Node:
    try:
        budget = MemoryBudget.parse(row["memory_budget"])
    except ValueError:
        budget = MemoryBudget(fraction=0.8)
    return Node(
        id=row["id"],
        name=row["name"],
        status=NodeStatus(row["status"]),
        address=row["address"],
        labels=dict(labels),
        resources=resources_from_wire(row["resources"] or {}),
        memory_budget=budget,
        max_replicas_per_model=row["max_replicas_per_model"],
        backends=frozenset(row["backends"] or []),
        artifacts=frozenset(row["artifacts"] or []),
        last_heartbeat=row["last_heartbeat"],
    )


def _identity(process: Mapping[str, Any]) -> tuple[Any, Any, Any]:
    return process.get("model"), process.get("index"), process.get("address")


def row_to_process(p: Mapping[str, Any]) -> ReportedProcess:
    return ReportedProcess(
        model=str(p["model"]),
        index=int(p["index"]),
        address=p.get("address"),
        first_seen=float(p.get("first_seen", 0.0)),
        ready=p.get("state", "ready") == "ready",
    )

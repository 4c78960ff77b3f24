"""Queries on declared models and their scheduling settings."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncEngine

from corral.domain.autoscale import ScalingTarget, Signal
from corral.domain.entities import ModelSpec, Rollout, RolloutStrategy, Scheduling
from corral.domain.routing_weights import DEFAULT_WEIGHTS, weights_from_row, weights_to_row
from corral.store.tables import models


class ModelStore:
    """Rows of `models` as domain ModelSpecs."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def upsert(self, spec: ModelSpec, *, source: str) -> bool:
        """Create or replace a model; returns True when the spec changed (revision bumped).

        Idempotent: the same spec again changes nothing, whatever declares it (`source` alone
        is updated quietly, so frontends that see one directory under two paths do not take
        turns bumping the revision)."""
        values = spec_to_row(spec)
        while True:  # at most twice: a concurrent first insert (two frontends starting) won
            async with self.engine.begin() as conn:
                current = (
                    await conn.execute(
                        select(models).where(models.c.name == spec.name).with_for_update()
                    )
                ).first()
                if current is None:
                    inserted = await conn.execute(
                        insert(models)
                        .values(name=spec.name, revision=1, source=source, **values)
                        .on_conflict_do_nothing(index_elements=[models.c.name])
                    )
                    if inserted.rowcount:
                        return True
                    continue
                old = current._mapping
                if all(old[k] == v for k, v in values.items()):
                    if old["source"] != source:
                        await conn.execute(
                            update(models).where(models.c.name == spec.name).values(source=source)
                        )
                    return False
                await conn.execute(
                    update(models)
                    .where(models.c.name == spec.name)
                    .values(
                        revision=old["revision"] + 1,
                        updated_at=func.now(),
                        source=source,
                        **values,
                    )
                )
                return True

    async def set_scheduling(self, name: str, scheduling: Scheduling) -> bool:
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(models)
                .where(models.c.name == name)
                .values(
                    revision=models.c.revision + 1,
                    updated_at=func.now(),
                    **scheduling_to_row(scheduling),
                )
            )
            return bool(result.rowcount)

    async def update_scheduling(
        self, name: str, change: Callable[[Scheduling], Scheduling]
    ) -> Scheduling | None:
        """Replace a model's scheduling by `change(current)` with the row locked, so that
        concurrent partial updates all count; None for an unknown model. An exception from
        `change` leaves the row as it was."""
        async with self.engine.begin() as conn:
            row = (
                await conn.execute(select(models).where(models.c.name == name).with_for_update())
            ).first()
            if row is None:
                return None
            scheduling = change(row_to_spec(row._mapping).scheduling)
            await conn.execute(
                update(models)
                .where(models.c.name == name)
                .values(
                    revision=models.c.revision + 1,
                    updated_at=func.now(),
                    **scheduling_to_row(scheduling),
                )
            )
            return scheduling

    async def delete(self, name: str) -> bool:
        async with self.engine.begin() as conn:
            result = await conn.execute(delete(models).where(models.c.name == name))
            return bool(result.rowcount)

    async def delete_from_sources(self, prefix: str, keep: set[str]) -> list[str]:
        """Delete models whose source starts with `prefix` and whose name is not in `keep`."""
        async with self.engine.begin() as conn:
            result = await conn.execute(
                delete(models)
                .where(models.c.source.startswith(prefix, autoescape=True))
                .where(models.c.name.not_in(keep) if keep else models.c.name.is_not(None))
                .returning(models.c.name)
            )
            return [r.name for r in result]

    async def get(self, name: str) -> ModelSpec | None:
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(models).where(models.c.name == name))).first()
        return row_to_spec(row._mapping) if row else None

    async def all(self) -> list[ModelSpec]:
        async with self.engine.connect() as conn:
            rows = (await conn.execute(select(models).order_by(models.c.name))).all()
        return [row_to_spec(r._mapping) for r in rows]

    async def sources(self) -> dict[str, str]:
        async with self.engine.connect() as conn:
            rows = (await conn.execute(select(models.c.name, models.c.source))).all()
        return {r.name: r.source for r in rows}


def scheduling_to_row(s: Scheduling) -> dict[str, Any]:
    """The scheduling columns (also the admin API's JSON of a model's scheduling)."""
    return {
        "min_replicas": s.min_replicas,
        "max_replicas": s.max_replicas,
        "spread_all": s.spread_all,
        "node_selector": dict(s.node_selector),
        "scale_down_delay": s.scale_down_delay,
        "scaling": scaling_to_row(s.scaling),
        "max_concurrency": s.max_concurrency,
        "deadline": s.deadline,
    }


def scaling_to_row(t: ScalingTarget | None) -> dict[str, Any] | None:
    if t is None:
        return None
    return {
        "metric": t.metric.value,
        "target": t.target,
        "window": t.window,
        "idle_timeout": t.idle_timeout,
        "max_step": t.max_step,
    }


def rollout_to_row(r: Rollout) -> dict[str, Any]:
    return {"strategy": r.strategy.value, "newest_only": r.newest_only}


def spec_to_row(spec: ModelSpec) -> dict[str, Any]:
    return {
        "backend": spec.backend,
        "artifact": spec.artifact,
        "options": dict(spec.options),
        "memory": spec.memory,
        "spec_hash": spec.config_revision,
        "rollout": rollout_to_row(spec.rollout),
        "capabilities": None if spec.capabilities is None else list(spec.capabilities),
        "routing": None if spec.routing == DEFAULT_WEIGHTS else weights_to_row(spec.routing),
        **scheduling_to_row(spec.scheduling),
    }


def row_to_spec(row: Mapping[Any, Any]) -> ModelSpec:
    scaling = row["scaling"]
    rollout = row["rollout"] or {}
    return ModelSpec(
        name=row["name"],
        backend=row["backend"],
        artifact=row["artifact"],
        options=dict(row["options"] or {}),
        memory=row["memory"],
        scheduling=Scheduling(
            min_replicas=row["min_replicas"],
            max_replicas=row["max_replicas"],
            spread_all=row["spread_all"],
            node_selector=dict(row["node_selector"] or {}),
            scale_down_delay=row["scale_down_delay"],
            max_concurrency=row["max_concurrency"],
            deadline=row["deadline"],
            scaling=None
            if not scaling
            else ScalingTarget(
                metric=Signal(scaling["metric"]),
                target=float(scaling["target"]),
                window=float(scaling.get("window", 30.0)),
                idle_timeout=scaling.get("idle_timeout"),
                max_step=int(scaling.get("max_step", 0)),
            ),
        ),
        revision=row["revision"],
        created_at=row["created_at"].timestamp(),
        spec_hash=row["spec_hash"],
        rollout=Rollout(
            strategy=RolloutStrategy(rollout.get("strategy", "rolling")),
            newest_only=bool(rollout.get("newest_only", True)),
        ),
        capabilities=None if row["capabilities"] is None else tuple(row["capabilities"]),
        routing=weights_from_row(row.get("routing")),
    )

"""The registry's revisions on real PostgreSQL: the 0002 migration, rollout and scaling settings,
load records per (model, revision) with failures, replica revisions."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

import asyncpg
import pytest
from alembic import command
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, text

from corral.domain.autoscale import ScalingTarget, Signal
from corral.domain.entities import ModelSpec, Rollout, RolloutStrategy, Scheduling
from corral.domain.rollout import LoadFailure
from corral.store.db import alembic_config, create_engine
from corral.store.registry import Registry
from corral.store.replicas import KEEP_REVISIONS, LoadInfo, revision_failures


@pytest.fixture
async def registry(database_url: str) -> AsyncIterator[Registry]:
    reg = Registry.from_url(database_url, pool_size=5)
    await reg.migrate()
    try:
        yield reg
    finally:
        await reg.close()


def spec(name: str = "m", **kw: object) -> ModelSpec:
    return ModelSpec(name=name, backend="sim", **kw)  # type: ignore[arg-type]


async def test_0002_keeps_the_load_information_of_before_under_an_unknown_revision(
    database_url: str,
) -> None:
    engine = create_engine(database_url, pool_size=1)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(_upgrade_to, "0001")
            await conn.execute(
                text(
                    "INSERT INTO model_load_info (model, backend, options, memory) "
                    "VALUES ('m', 'sim', '{\"tokens\": 4}', 64)"
                )
            )
        registry = Registry(engine)
        await registry.migrate()
        (info,) = (await registry.replicas.load_info()).values()
        got = (info.model, info.revision, info.options, info.error)
        assert got == ("m", "", {"tokens": 4}, None)
        await registry.replicas.record_load_info(dataclasses.replace(info, revision="r1"))
        assert set(await registry.replicas.load_info()) == {("m", ""), ("m", "r1")}
        versions = await _versions(database_url)
        assert versions == [ScriptDirectory.from_config(alembic_config()).get_current_head()]
    finally:
        await engine.dispose()


def _upgrade_to(connection: Connection, target: str) -> None:
    cfg = alembic_config()
    cfg.attributes["connection"] = connection
    command.upgrade(cfg, target)


async def _versions(database_url: str) -> list[str]:
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        return [r[0] for r in await conn.fetch("SELECT version_num FROM alembic_version")]
    finally:
        await conn.close()


async def test_rollout_scaling_and_stored_revision_round_trip(registry: Registry) -> None:
    target = ScalingTarget(Signal.QUEUE_WAIT, 1.5, window=10, idle_timeout=60, max_step=2)
    declared = spec(
        rollout=Rollout(RolloutStrategy.RECREATE, newest_only=False),
        scheduling=Scheduling(max_replicas=4, scaling=target),
        spec_hash="with-digest",
    )
    assert await registry.models.upsert(declared, source="api")
    assert await registry.models.get("m") == declared
    scaling = Scheduling(min_replicas=1, scaling=dataclasses.replace(target, target=3.0))
    assert await registry.models.set_scheduling("m", scaling)
    stored = await registry.models.get("m")
    assert stored is not None and stored.scheduling == scaling
    assert stored.spec_hash == "with-digest", "scheduling is not part of the revision"


async def test_a_failed_load_is_recorded_per_revision_and_cleared_by_a_success(
    registry: Registry,
) -> None:
    ok = LoadInfo("m", "sim", None, {}, 64, "n1", 1.0, 1000.0, revision="r1")
    await registry.replicas.record_load_info(ok)
    failed = dataclasses.replace(ok, node_id="n2", error="exit 2", failed_at=1500.0)
    await registry.replicas.record_load_failure(failed)
    (got,) = (await registry.replicas.load_info()).values()
    assert (got.error, got.failed_at, got.loaded_at) == ("exit 2", 1500.0, 1000.0)
    assert got.node_id == "n1", "what the successful load recorded stays"
    never = dataclasses.replace(
        ok, revision="r2", load_seconds=0.0, loaded_at=0.0, error="bad flag", failed_at=9.0
    )
    await registry.replicas.record_load_failure(never)
    assert (await registry.replicas.load_info())[("m", "r2")] == never
    await registry.replicas.record_load_info(dataclasses.replace(ok, loaded_at=2000.0))
    assert (await registry.replicas.load_info())[("m", "r1")].error is None
    spec_now = ModelSpec("m", "sim", spec_hash="r2")
    assert revision_failures([spec_now], await registry.replicas.load_info()) == {
        "m": LoadFailure("r2", "bad flag", 9.0)
    }


async def test_only_the_newest_revisions_keep_load_records(registry: Registry) -> None:
    for i in range(KEEP_REVISIONS + 3):
        info = LoadInfo("m", "sim", None, {}, 64, None, 1.0, 1000.0 + i, revision=f"r{i}")
        await registry.replicas.record_load_info(info)
    kept = sorted(int(rev[1:]) for _, rev in await registry.replicas.load_info())
    assert kept == list(range(3, KEEP_REVISIONS + 3))


async def test_a_replica_row_keeps_its_revision_and_what_it_replaces(registry: Registry) -> None:
    await registry.nodes.upsert(
        node_id="n1",
        name="n1",
        address="10.0.0.1",
        token_hash="h",
        labels={},
        memory_budget="80%",
        max_replicas_per_model=0,
        backends=["sim"],
    )
    await registry.models.upsert(spec(), source="api")
    added = await registry.replicas.add("m", "n1", memory=1, revision="r2", replaces=4)
    assert added is not None and (added.revision, added.replaces) == ("r2", 4)
    row = await registry.replicas.get("m", added.index)
    assert row is not None and (row.revision, row.replaces) == ("r2", 4)

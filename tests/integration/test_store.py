"""The registry on real PostgreSQL: migrations, nodes, models, replicas, load info, jobs, locks."""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest

from corral.domain.entities import Gpu, ModelSpec, NodeStatus, ReplicaState, Resources, Scheduling
from corral.domain.reconcile import ReportedProcess
from corral.domain.sizes import MemoryBudget
from corral.store.registry import Registry
from corral.store.replicas import LoadInfo
from infra import apoll_until


@pytest.fixture
async def registry(database_url: str) -> AsyncIterator[Registry]:
    reg = Registry.from_url(database_url, pool_size=5)
    await reg.migrate()
    try:
        yield reg
    finally:
        await reg.close()


async def add_node(
    registry: Registry,
    node_id: str = "n1",
    *,
    labels: dict[str, str] | None = None,
    token_hash: str | None = None,
) -> None:
    await registry.nodes.upsert(
        node_id=node_id,
        name=f"name-{node_id}",
        address="10.0.0.1",
        token_hash=token_hash or f"hash-{node_id}",
        labels=labels or {},
        memory_budget="75%",
        max_replicas_per_model=2,
        backends=["sim"],
    )


async def heartbeat(
    registry: Registry, node_id: str = "n1", now: float = 1000.0
) -> NodeStatus | None:
    return await registry.nodes.heartbeat(
        node_id, resources={}, processes=[], backends=["sim"], artifacts=[], now=now
    )


def spec(name: str = "m", **kw: object) -> ModelSpec:
    return ModelSpec(name=name, backend="sim", **kw)  # type: ignore[arg-type]


# --- migrations ----------------------------------------------------------------------------------


async def _versions(database_url: str) -> list[str]:
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        return [r[0] for r in await conn.fetch("SELECT version_num FROM alembic_version")]
    finally:
        await conn.close()


async def test_migrate_twice_is_a_no_op(registry: Registry, database_url: str) -> None:
    await add_node(registry)
    before = await _versions(database_url)
    await registry.migrate()
    assert await _versions(database_url) == before
    assert len(before) == 1
    node = await registry.nodes.get("n1")
    assert node is not None, "a second migration keeps the data"


async def test_concurrent_migrations_on_an_empty_database(database_url: str) -> None:
    registries = [Registry.from_url(database_url, pool_size=1) for _ in range(3)]
    try:
        await asyncio.gather(*(r.migrate() for r in registries))
        assert len(await _versions(database_url)) == 1
        await add_node(registries[0])
        assert [n.id for n in await registries[2].nodes.all()] == ["n1"]
    finally:
        for r in registries:
            await r.close()


# --- nodes ---------------------------------------------------------------------------------------


async def test_node_upsert_and_get(registry: Registry) -> None:
    await add_node(registry, labels={"zone": "eu", "gpu": "none"})
    node = await registry.nodes.get("n1")
    assert node is not None
    assert node.status == NodeStatus.PENDING
    assert (node.name, node.address) == ("name-n1", "10.0.0.1")
    assert node.labels == {"zone": "eu", "gpu": "none"}
    assert node.memory_budget == MemoryBudget(fraction=0.75)
    assert node.max_replicas_per_model == 2
    assert node.backends == frozenset({"sim"})
    assert await registry.nodes.get("nope") is None


@pytest.mark.parametrize(
    ("before", "after"),
    [
        (NodeStatus.HEALTHY, NodeStatus.PENDING),
        (NodeStatus.OFFLINE, NodeStatus.PENDING),
        (NodeStatus.DRAINING, NodeStatus.DRAINING),  # an operator's drain survives a restart
    ],
    ids=["healthy", "offline", "draining"],
)
async def test_reregistering_resets_status_but_keeps_a_drain(
    registry: Registry, before: NodeStatus, after: NodeStatus
) -> None:
    await add_node(registry)
    await registry.nodes.set_status("n1", before)
    await add_node(registry)
    node = await registry.nodes.get("n1")
    assert node is not None and node.status == after


async def test_heartbeat_makes_pending_node_healthy(registry: Registry) -> None:
    await add_node(registry)
    resources = {
        "cpu_count": 8,
        "ram_total": 64,
        "ram_free": 32,
        "disk_free": 100,
        "gpus": [{"index": 0, "name": "H100", "memory_total": 80, "memory_free": 70}],
    }
    before = await registry.nodes.heartbeat(
        "n1",
        resources=resources,
        processes=[{"model": "m", "index": 0}],
        backends=["sim", "vllm"],
        artifacts=["sha256:abc"],
        now=1234.5,
    )
    assert before == NodeStatus.PENDING
    node = await registry.nodes.get("n1")
    assert node is not None
    assert node.status == NodeStatus.HEALTHY
    assert node.last_heartbeat == 1234.5
    assert node.resources == Resources(8, 64, 32, 100, (Gpu(0, "H100", 80, 70),))
    assert node.backends == frozenset({"sim", "vllm"})
    assert node.artifacts == frozenset({"sha256:abc"})
    assert await registry.nodes.processes("n1") == [
        {"model": "m", "index": 0, "first_seen": 1234.5}
    ]
    assert await registry.nodes.reported_processes() == {
        "n1": [ReportedProcess("m", 0, None, first_seen=1234.5)]
    }
    assert await heartbeat(registry) == NodeStatus.HEALTHY


@pytest.mark.parametrize(
    ("status", "after"),
    [
        (NodeStatus.UNHEALTHY, NodeStatus.HEALTHY),
        (NodeStatus.OFFLINE, NodeStatus.HEALTHY),
        (NodeStatus.DRAINING, NodeStatus.DRAINING),
    ],
    ids=["unhealthy-recovers", "offline-recovers", "draining-stays-draining"],
)
async def test_heartbeat_status_transitions(
    registry: Registry, status: NodeStatus, after: NodeStatus
) -> None:
    await add_node(registry)
    assert await registry.nodes.set_status("n1", status)
    assert await heartbeat(registry) == status
    node = await registry.nodes.get("n1")
    assert node is not None and node.status == after


async def test_heartbeat_of_unknown_node(registry: Registry) -> None:
    assert await heartbeat(registry, "ghost") is None
    assert await registry.nodes.all() == []


async def test_set_status_only_from(registry: Registry) -> None:
    await add_node(registry)
    await heartbeat(registry)
    moved = await registry.nodes.set_status(
        "n1", NodeStatus.UNHEALTHY, only_from=[NodeStatus.PENDING]
    )
    assert not moved
    moved = await registry.nodes.set_status(
        "n1", NodeStatus.UNHEALTHY, only_from=[NodeStatus.HEALTHY]
    )
    assert moved
    node = await registry.nodes.get("n1")
    assert node is not None and node.status == NodeStatus.UNHEALTHY
    assert not await registry.nodes.set_status("ghost", NodeStatus.HEALTHY)


async def test_labels_replace_and_reupsert(registry: Registry) -> None:
    await add_node(registry, labels={"zone": "eu", "old": "1"})
    await heartbeat(registry)
    assert await registry.nodes.set_labels("n1", {"zone": "us"})
    node = await registry.nodes.get("n1")
    assert node is not None and node.labels == {"zone": "us"}
    assert not await registry.nodes.set_labels("ghost", {"a": "b"})
    await add_node(registry, labels={"tier": "gold"})  # the worker registers again
    node = await registry.nodes.get("n1")
    assert node is not None
    assert node.labels == {"tier": "gold"}
    assert node.status == NodeStatus.PENDING
    assert await registry.nodes.set_labels("n1", {})
    node = await registry.nodes.get("n1")
    assert node is not None and node.labels == {}


async def test_node_token_lookup(registry: Registry) -> None:
    await add_node(registry, "n1", token_hash="aaa")
    await add_node(registry, "n2", token_hash="bbb")
    assert await registry.nodes.token_hash("n1") == "aaa"
    assert await registry.nodes.token_hash("ghost") is None
    assert await registry.nodes.id_by_token_hash("bbb") == "n2"
    assert await registry.nodes.id_by_token_hash("ccc") is None


async def test_node_delete_cascades(registry: Registry) -> None:
    await add_node(registry, labels={"a": "b"})
    await registry.models.upsert(spec(), source="api")
    await registry.replicas.add("m", "n1", memory=1)
    assert await registry.nodes.delete("n1")
    assert not await registry.nodes.delete("n1")
    assert await registry.replicas.all() == []
    assert await registry.nodes.all() == []


# --- models --------------------------------------------------------------------------------------


async def test_model_upsert_changes_and_revision(registry: Registry) -> None:
    base = spec(
        options={"n_ctx": 4096},
        memory=10,
        scheduling=Scheduling(min_replicas=1, node_selector={"zone": "eu"}),
    )
    assert await registry.models.upsert(base, source="api")
    assert await registry.models.get("m") == hashed(base)
    assert not await registry.models.upsert(base, source="api"), "nothing changed"
    assert (await registry.models.get("m")) == hashed(base)

    steps: list[tuple[ModelSpec, str]] = [
        (dataclasses.replace(base, options={"n_ctx": 8192}), "api"),
        (dataclasses.replace(base, options={"n_ctx": 8192}, memory=20), "api"),
        (
            dataclasses.replace(
                base, options={"n_ctx": 8192}, memory=20, scheduling=Scheduling(min_replicas=2)
            ),
            "api",
        ),
    ]
    for revision, (changed, source) in enumerate(steps, start=2):
        assert await registry.models.upsert(changed, source=source)
        assert not await registry.models.upsert(changed, source=source)
        stored = await registry.models.get("m")
        assert stored == dataclasses.replace(hashed(changed), revision=revision)


def hashed(spec: ModelSpec) -> ModelSpec:
    """The spec as the store returns it: with the revision hash it stored."""
    return dataclasses.replace(spec, spec_hash=spec.config_revision)


async def test_model_source_change_alone_moves_the_source_quietly(registry: Registry) -> None:
    """Frontends that mount one models directory under two paths must not take turns bumping
    the revision: the declaring source moves, the spec (and its revision) stays."""
    assert await registry.models.upsert(spec(), source="file:/models/m")
    assert not await registry.models.upsert(spec(), source="file:/mnt/models/m")
    assert not await registry.models.upsert(spec(), source="api")
    assert await registry.models.sources() == {"m": "api"}
    stored = await registry.models.get("m")
    assert stored is not None and stored.revision == 1


async def test_concurrent_first_upserts_create_one_model(registry: Registry) -> None:
    results = await asyncio.gather(
        *(registry.models.upsert(spec(), source="api") for _ in range(8))
    )
    assert sorted(results) == [False] * 7 + [True]
    stored = await registry.models.get("m")
    assert stored is not None and stored.revision == 1


async def test_model_set_scheduling_and_delete(registry: Registry) -> None:
    await registry.models.upsert(spec(), source="api")
    assert await registry.models.set_scheduling("m", Scheduling(max_replicas=4, spread_all=True))
    stored = await registry.models.get("m")
    assert stored is not None
    assert stored.scheduling == Scheduling(max_replicas=4, spread_all=True)
    assert stored.revision == 2
    assert not await registry.models.set_scheduling("ghost", Scheduling())
    limits = Scheduling(max_concurrency=3, deadline=12.5)
    assert await registry.models.set_scheduling("m", limits)
    stored = await registry.models.get("m")
    assert stored is not None and stored.scheduling == limits
    assert await registry.models.delete("m")
    assert not await registry.models.delete("m")
    assert await registry.models.all() == []


async def test_model_delete_from_sources(registry: Registry) -> None:
    for name, source in [("a", "file:/d/a"), ("b", "file:/d/b"), ("c", "api"), ("x_1", "file:/e")]:
        await registry.models.upsert(spec(name), source=source)
    deleted = await registry.models.delete_from_sources("file:/d/", keep={"a"})
    assert deleted == ["b"]
    assert sorted(await registry.models.sources()) == ["a", "c", "x_1"]
    assert sorted(await registry.models.delete_from_sources("file:", keep=set())) == ["a", "x_1"]


# --- replicas ------------------------------------------------------------------------------------


@pytest.fixture
async def cluster(registry: Registry) -> Registry:
    await add_node(registry, "n1")
    await add_node(registry, "n2")
    await registry.models.upsert(spec("m"), source="api")
    await registry.models.upsert(spec("other"), source="api")
    return registry


async def test_replica_add_allocates_lowest_free_index(cluster: Registry) -> None:
    got = [await cluster.replicas.add("m", "n1", memory=5) for _ in range(3)]
    assert [r.index for r in got if r] == [0, 1, 2]
    assert got[0] is not None and got[0].state == ReplicaState.SCHEDULED
    assert await cluster.replicas.remove("m", 1) is not None
    again = await cluster.replicas.add("m", "n2", memory=5)
    assert again is not None and again.index == 1
    other = await cluster.replicas.add("other", "n1", memory=5)
    assert other is not None and other.index == 0, "indexes are per model"
    last = await cluster.replicas.add("m", "n1", memory=5)
    assert last is not None and last.index == 3


async def test_replica_add_with_explicit_index(cluster: Registry) -> None:
    chosen = await cluster.replicas.add("m", "n1", memory=1, index=5)
    assert chosen is not None and chosen.index == 5
    assert await cluster.replicas.add("m", "n2", memory=1, index=5) is None
    lowest = await cluster.replicas.add("m", "n2", memory=1)
    assert lowest is not None and lowest.index == 0


async def test_concurrent_replica_adds_never_collide(cluster: Registry) -> None:
    added = await asyncio.gather(
        *(cluster.replicas.add("m", f"n{1 + i % 2}", memory=1) for i in range(20))
    )
    indexes = sorted(r.index for r in added if r is not None)
    assert indexes == list(range(20))
    assert [r.index for r in await cluster.replicas.all("m")] == list(range(20))


async def test_replica_update_and_state(cluster: Registry) -> None:
    r = await cluster.replicas.add("m", "n1", memory=7)
    assert r is not None
    updated = await cluster.replicas.update(
        "m", 0, state=ReplicaState.LOADED, address="10.0.0.1:20001"
    )
    assert updated is not None
    assert (updated.state, updated.address, updated.memory) == (
        ReplicaState.LOADED,
        "10.0.0.1:20001",
        7,
    )
    assert updated.updated >= r.updated
    assert await cluster.replicas.update("m", 0, state=ReplicaState.FAILED, node_id="n2") is None
    failed = await cluster.replicas.update("m", 0, state=ReplicaState.FAILED, load_error="oom")
    assert failed is not None and failed.load_error == "oom"
    assert failed.address == "10.0.0.1:20001", "fields not given are kept"
    assert await cluster.replicas.update("m", 9, state=ReplicaState.LOADED) is None


@pytest.mark.parametrize(
    ("guard", "removed"),
    [
        ({}, True),
        ({"node_id": "n1"}, True),
        ({"node_id": "n2"}, False),
        ({"address": "10.0.0.1:20001"}, True),
        ({"address": "10.0.0.1:20002"}, False),
        ({"node_id": "n1", "address": "10.0.0.1:20002"}, False),
        ({"node_id": "n1", "address": "10.0.0.1:20001"}, True),
    ],
    ids=[
        "no-guard",
        "right-node",
        "wrong-node",
        "right-address",
        "wrong-address",
        "right-node-wrong-address",
        "both-right",
    ],
)
async def test_replica_remove_guards(
    cluster: Registry, guard: dict[str, str], removed: bool
) -> None:
    await cluster.replicas.add("m", "n1", memory=1)
    await cluster.replicas.add("m", "n1", memory=1)
    await cluster.replicas.update("m", 0, address="10.0.0.1:20001")
    gone = await cluster.replicas.remove("m", 0, **guard)
    assert (gone is not None) is removed
    remaining = [r.index for r in await cluster.replicas.all("m")]
    assert remaining == ([1] if removed else [0, 1]), "exactly that replica, or none"


async def test_replica_remove_on_node(cluster: Registry) -> None:
    await cluster.replicas.add("m", "n1", memory=1)
    await cluster.replicas.add("m", "n2", memory=1)
    await cluster.replicas.add("other", "n1", memory=1)
    gone = await cluster.replicas.remove_on_node("n1")
    assert sorted(r.key for r in gone) == [("m", 0), ("other", 0)]
    assert [r.key for r in await cluster.replicas.all()] == [("m", 1)]


async def test_touch_never_moves_last_used_backwards(cluster: Registry) -> None:
    r0 = await cluster.replicas.add("m", "n1", memory=1)
    r1 = await cluster.replicas.add("m", "n1", memory=1)
    assert r0 is not None and r1 is not None
    future = r0.last_used + 1000
    await cluster.replicas.touch({("m", 0): future, ("m", 1): r1.last_used - 500})
    got = {r.index: r.last_used for r in await cluster.replicas.all("m")}
    assert got == {0: future, 1: r1.last_used}
    await cluster.replicas.touch({("m", 0): future - 10, ("ghost", 3): 1.0})
    again = await cluster.replicas.get("m", 0)
    assert again is not None and again.last_used == future
    await cluster.replicas.touch({})


async def test_load_info_per_revision_survives_every_replica_row(cluster: Registry) -> None:
    info = LoadInfo(
        model="m",
        backend="sim",
        artifact="hf://org/m",
        options={"n_ctx": 2048},
        memory=123,
        node_id="n1",
        load_seconds=4.5,
        loaded_at=1000.0,
        revision="r1",
    )
    await cluster.replicas.add("m", "n1", memory=1)
    await cluster.replicas.add("m", "n2", memory=1)
    await cluster.replicas.record_load_info(info)
    await cluster.replicas.remove("m", 0)
    await cluster.replicas.remove_on_node("n2")
    assert await cluster.replicas.all("m") == []
    assert await cluster.replicas.load_info() == {("m", "r1"): info}
    assert await cluster.nodes.delete("n1")
    newer = dataclasses.replace(info, memory=456, node_id=None, loaded_at=2000.0)
    await cluster.replicas.record_load_info(newer)
    other = dataclasses.replace(info, revision="r2", options={"n_ctx": 4096}, loaded_at=3000.0)
    await cluster.replicas.record_load_info(other)
    assert await cluster.replicas.load_info(["m", "x"]) == {("m", "r1"): newer, ("m", "r2"): other}
    assert await cluster.replicas.load_info([]) == {}


# --- load jobs -----------------------------------------------------------------------------------


async def test_exactly_one_concurrent_claim_wins(registry: Registry) -> None:
    owners = [f"fe-{i}" for i in range(20)]
    results = await asyncio.gather(*(registry.jobs.claim("m", o, ttl=30) for o in owners))
    assert sum(results) == 1
    winner = owners[results.index(True)]
    job = await registry.jobs.get("m")
    assert job is not None and job.owner == winner and job.state == "placing"


async def test_claims_of_different_models_are_independent(registry: Registry) -> None:
    assert await registry.jobs.claim("a", "fe-1", ttl=30)
    assert await registry.jobs.claim("b", "fe-2", ttl=30)
    assert [j.model for j in await registry.jobs.all()] == ["a", "b"]


async def test_expired_claim_can_be_taken_over(registry: Registry) -> None:
    assert await registry.jobs.claim("m", "fe-a", ttl=10, now=1000.0)
    assert not await registry.jobs.claim("m", "fe-b", ttl=10, now=1009.0)
    assert await registry.jobs.claim("m", "fe-b", ttl=10, now=1010.5)
    job = await registry.jobs.get("m")
    assert job is not None
    assert (job.owner, job.started_at, job.expires_at) == ("fe-b", 1010.5, 1020.5)
    assert not await registry.jobs.update("m", "fe-a", ttl=10, state="loading"), "old owner lost it"


async def test_failed_job_blocks_claims_until_it_expires(registry: Registry) -> None:
    assert await registry.jobs.claim("m", "fe-a", ttl=30)
    await registry.jobs.fail("m", "fe-a", "backend exploded", keep=5.0)
    assert not await registry.jobs.claim("m", "fe-b", ttl=30)
    job = await registry.jobs.get("m")
    assert job is not None
    assert (job.state, job.error, job.owner) == ("failed", "backend exploded", "fe-a")
    assert job.as_progress()["error"] == "backend exploded"
    assert await registry.jobs.claim("m", "fe-b", ttl=30, now=time.time() + 6)
    job = await registry.jobs.get("m")
    assert job is not None and (job.owner, job.state, job.error) == ("fe-b", "placing", None)


async def test_failed_loads_in_a_row_back_off_longer_until_a_success(registry: Registry) -> None:
    kept = []
    now = time.time()
    for attempt in range(5):
        assert await registry.jobs.claim("m", "fe-a", ttl=30, now=now + 1000 * attempt)
        kept.append(await registry.jobs.fail("m", "fe-a", "boom", code="x", backoff=(5, 30)))
    assert kept == [5, 10, 20, 30, 30]
    job = await registry.jobs.get("m")
    assert job is not None and (job.failures, job.error_code) == (5, "x")
    assert 29 < job.expires_at - time.time() <= 30
    assert await registry.jobs.claim("m", "fe-a", ttl=30, now=now + 10_000)
    await registry.jobs.finish("m", "fe-a")  # a success
    assert await registry.jobs.claim("m", "fe-a", ttl=30)
    assert await registry.jobs.fail("m", "fe-a", "boom", backoff=(5, 30)) == 5, "reset"


async def test_job_update_and_finish_by_owner_only(registry: Registry) -> None:
    assert await registry.jobs.claim("m", "fe-a", ttl=30)
    assert not await registry.jobs.update("m", "fe-x", ttl=30, state="loading")
    assert await registry.jobs.update(
        "m", "fe-a", ttl=30, state="loading", phase="weights", percent=40.0, node_id="n1"
    )
    job = await registry.jobs.get("m")
    assert job is not None
    progress = job.as_progress()
    assert (progress["state"], progress["phase"], progress["percent"], progress["node_id"]) == (
        "loading",
        "weights",
        40.0,
        "n1",
    )
    await registry.jobs.finish("m", "fe-x")
    assert await registry.jobs.get("m") is not None, "only the owner ends its job"
    await registry.jobs.finish("m", "fe-a")
    assert await registry.jobs.get("m") is None
    assert await registry.jobs.claim("m", "fe-x", ttl=30)


# --- advisory lock -------------------------------------------------------------------------------


async def test_advisory_lock_excludes_a_second_holder(
    registry: Registry, database_url: str
) -> None:
    key = secrets.randbits(62)
    other = Registry.from_url(database_url, pool_size=2)
    try:
        async with registry.advisory_lock(key) as first:
            assert first is not None
            async with registry.advisory_lock(key) as second:
                assert second is None, "another session of the same frontend"
            async with other.advisory_lock(key) as third:
                assert third is None, "another frontend"
            async with other.advisory_lock(key + 1) as unrelated:
                assert unrelated is not None, "other keys are free"
        async with other.advisory_lock(key) as after:
            assert after is not None, "released when the holder leaves the context"
    finally:
        await other.close()


async def test_advisory_lock_frees_when_holder_connection_dies(
    registry: Registry, database_url: str
) -> None:
    key = secrets.randbits(62)
    other = Registry.from_url(database_url, pool_size=2)
    try:
        async with registry.advisory_lock(key) as held:
            assert held is not None
            pid = await held.backend_pid()
            killer = await asyncpg.connect(database_url, timeout=10)
            try:
                await killer.execute("SELECT pg_terminate_backend($1)", pid)
            finally:
                await killer.close()

            async def lock_free() -> bool:
                async with other.advisory_lock(key) as got:
                    return got is not None

            await apoll_until(
                lock_free, timeout=10, what="the lock to be free"
            )  # the crashed holder's lock is gone
    finally:
        await other.close()

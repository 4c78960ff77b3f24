"""Self-heal in one process: a replica that lost its model or its process is dropped (a
`DropReplica` action) and the request is served elsewhere, without a failed request; repeated
probe misses drop an idle replica the same way."""

from __future__ import annotations

import httpx
from harness import FakeWorker, InProcessCluster, chat, client, declare

from corral.domain.actions import StartReplica
from corral.domain.entities import Replica
from corral.frontend.health import PROBE_MISSES
from corral.frontend.service import Frontend
from factories import MB, model
from infra import apoll_until


async def start(
    cluster: InProcessCluster, n: int
) -> tuple[list[Replica], list[FakeWorker], Frontend]:
    fe = await cluster.frontend()
    workers = [await cluster.worker(fe, f"n{i + 1}") for i in range(n)]
    await declare(fe, model("m"))
    replicas = [
        await fe.actuator.apply(StartReplica("m", w.node_id, None, "sim", 64 * MB, "test"))
        for w in workers
    ]
    return replicas, workers, fe


async def unload(address: str) -> None:
    async with httpx.AsyncClient() as c:
        assert (await c.post(f"http://{address}/admin/unload")).status_code == 200


async def test_a_replica_that_lost_its_model_is_dropped_and_no_request_fails(
    cluster: InProcessCluster,
) -> None:
    (good, bad), (w1, w2), fe = await start(cluster, 2)
    assert bad.address is not None
    await unload(bad.address)
    async with client(fe) as c:
        answers = [await chat(c, "m") for _ in range(6)]
    assert [r.status_code for r in answers] == [200] * 6
    assert [r.key for r in await fe.registry.replicas.all()] == [good.key]
    assert bad.key not in fe.view.replicas
    (event,) = await fe.registry.audit.recent(1, kind="replica.removed")
    assert "not loaded" in event["message"] and event["subject"] == "m"
    await apoll_until(lambda: not w2.sims, timeout=5, what="its process stopped in the background")
    assert w1.sims


async def test_a_replica_whose_process_vanished_is_dropped_and_no_request_fails(
    cluster: InProcessCluster,
) -> None:
    (first, second), (w1, w2), fe = await start(cluster, 2)
    await w2.sims.pop(second.key).stop()  # the process died; nobody said so yet
    async with client(fe) as c:
        answers = [await chat(c, "m") for _ in range(4)]
    assert [r.status_code for r in answers] == [200] * 4
    assert [r.key for r in await fe.registry.replicas.all()] == [first.key]
    (event,) = await fe.registry.audit.recent(1, kind="replica.removed")
    assert f"{second.model}#{second.index} on n2" in event["message"]
    assert len(w1.starts) == len(w2.starts) == 1, "no new replica was needed"


async def test_an_idle_replica_that_misses_probes_in_a_row_is_dropped(
    cluster: InProcessCluster,
) -> None:
    (replica,), (worker,), fe = await start(cluster, 1)
    health = fe.reconciler.health
    assert replica.address is not None
    await unload(replica.address)
    for _ in range(PROBE_MISSES - 1):
        await health.probe([replica])
        assert replica.key in fe.view.replicas, "a miss or two is not death"
    slot = fe.inflight.acquire(replica.key)
    await health.probe([replica])
    assert replica.key in fe.view.replicas, "a busy replica is never probed"
    slot.release()
    await health.probe([replica])
    assert await fe.registry.replicas.all() == []
    (event,) = await fe.registry.audit.recent(1, kind="replica.removed")
    assert f"{PROBE_MISSES} probes failed" in event["message"]
    await apoll_until(lambda: not worker.sims, timeout=5, what="its process stopped")


async def test_the_only_replica_lost_its_model_and_its_reload_under_the_same_index_serves(
    cluster: InProcessCluster,
) -> None:
    (only,), (w1,), fe = await start(cluster, 1)
    assert only.address is not None and only.index == 0
    await unload(only.address)
    async with client(fe) as c:
        answer = await chat(c, "m")
    assert answer.status_code == 200, answer.text
    (fresh,) = await fe.registry.replicas.all()
    assert fresh.index == only.index, "the reload took the freed index"
    assert fresh.address != only.address
    assert len(w1.starts) == 2

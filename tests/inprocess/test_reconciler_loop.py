"""The reconciler in one process: observe the registry, plan, and have the actuator apply it.

Ticks are driven by hand and the reconciler reads a fake clock, so "60 seconds later" takes no
time: heartbeats carry the times the test gives them, rows and processes their real ones.
"""

from __future__ import annotations

import asyncio
import time

from harness import FakeWorker, InProcessCluster, chat, client, declare, heartbeat

from corral.domain.actions import (
    AdoptReplica,
    MarkNode,
    RemoveNodeReplicas,
    RemoveReplicaRow,
    SetScheduling,
    StartReplica,
    StopOrphan,
    StopReplica,
)
from corral.domain.entities import NodeStatus, ReplicaState, Scheduling
from corral.frontend.service import Frontend
from factories import MB, FakeClock, model
from infra import apoll_until

GRACE = 30.0  # the harness's orphan grace (missing and orphan rules alike)


async def setup(
    cluster: InProcessCluster, *nodes: str, **scheduling: object
) -> tuple[Frontend, list[FakeWorker], FakeClock]:
    """A frontend whose reconciler reads a fake clock, workers, and model "m" loaded once
    (so its load information exists) and stopped again."""
    fe = await cluster.frontend()
    clock = FakeClock(time.time())
    fe.reconciler.clock = clock
    workers = [await cluster.worker(fe, n) for n in nodes]
    await declare(fe, model("m"))
    first = await fe.actuator.apply(StartReplica("m", nodes[0], None, "sim", 64 * MB, "test"))
    await fe.actuator.apply(StopReplica.of(first, "test"))
    if scheduling:
        await fe.actuator.apply(SetScheduling("m", Scheduling(**scheduling)))  # type: ignore[arg-type]
    return fe, workers, clock


async def rows(fe: Frontend) -> list[tuple[int, str, ReplicaState]]:
    return [(r.index, r.node_id, r.state) for r in await fe.registry.replicas.all("m")]


async def loaded(fe: Frontend, count: int) -> None:
    async def enough() -> bool:
        got = await rows(fe)
        return len(got) == count and all(state == ReplicaState.LOADED for *_, state in got)

    await apoll_until(enough, timeout=5, what=f"{count} loaded replicas")


async def test_below_minimum_starts_replicas_once_while_they_load(
    cluster: InProcessCluster,
) -> None:
    fe, (worker,), _ = await setup(cluster, "n1", min_replicas=2)
    worker.gate = asyncio.Event()
    plan = await fe.reconciler.tick()
    assert [type(a) for a in plan.actions] == [StartReplica, StartReplica]
    await apoll_until(lambda: len(worker.starts) == 3, timeout=5, what="both starts sent")
    again = await fe.reconciler.tick()
    assert again.of(StartReplica) == [], "starts in flight count: nothing is planned twice"
    worker.gate.set()
    await loaded(fe, 2)
    assert (await fe.reconciler.tick()).actions == ()


async def test_a_declared_model_preloads_its_minimum_before_any_request(
    cluster: InProcessCluster,
) -> None:
    fe = await cluster.frontend()
    worker = await cluster.worker(fe, "n1")
    await declare(fe, model("new", min_replicas=2))
    assert await fe.registry.replicas.load_info() == {}, "never loaded before"
    plan = await fe.reconciler.tick()
    assert [(a.index, a.reason) for a in plan.of(StartReplica)] == [
        (0, "below minimum"),
        (1, "below minimum"),
    ]
    await apoll_until(
        lambda: len(fe.view.candidates("new")) == 2, timeout=5, what="two preloaded replicas"
    )
    assert await fe.registry.audit.recent(10, kind="model.waiting") == []
    async with client(fe) as c:
        answer = await chat(c, "new")
    assert answer.status_code == 200
    assert fe.cold.starts == 0, "the first request paid no load"
    assert len(worker.starts) == 2


async def test_an_idle_replica_above_minimum_stops_after_the_scale_down_delay(
    cluster: InProcessCluster,
) -> None:
    fe, (worker,), clock = await setup(cluster, "n1", min_replicas=2, scale_down_delay=60.0)
    await fe.reconciler.tick()
    await loaded(fe, 2)
    await fe.actuator.apply(SetScheduling("m", Scheduling(min_replicas=1, scale_down_delay=60.0)))
    assert (await fe.reconciler.tick()).of(StopReplica) == [], "used recently"
    clock.now += 120
    await heartbeat(fe, worker, at=clock.now)
    (stop,) = (await fe.reconciler.tick()).of(StopReplica)
    assert (stop.index, stop.reason) == (1, "idle above minimum")
    await loaded(fe, 1)
    assert [i for i, *_ in await rows(fe)] == [0]
    assert ("m", 1) not in worker.sims


async def test_a_start_whose_frontend_died_is_adopted_when_its_process_is_ready(
    cluster: InProcessCluster,
) -> None:
    fe, (worker,), clock = await setup(cluster, "n1")
    await fe.registry.replicas.add("m", "n1", memory=64 * MB, state=ReplicaState.LOADING)
    address = await worker.run("m", 0)
    clock.now += GRACE + 1
    await heartbeat(fe, worker, at=clock.now)
    plan = await fe.reconciler.tick()
    assert plan.of(AdoptReplica) == [AdoptReplica("m", 0, "n1", address)]
    assert await rows(fe) == [(0, "n1", ReplicaState.LOADED)]
    assert [r.key for r in fe.view.candidates("m")] == [("m", 0)]
    assert await fe.registry.audit.recent(1, kind="replica.adopted")


async def test_a_start_its_node_knows_nothing_of_is_removed(cluster: InProcessCluster) -> None:
    fe, (worker,), clock = await setup(cluster, "n1")
    await fe.registry.replicas.add("m", "n1", memory=64 * MB, state=ReplicaState.LOADING)
    clock.now += GRACE + 1
    await heartbeat(fe, worker, at=clock.now)
    (removed,) = (await fe.reconciler.tick()).of(RemoveReplicaRow)
    assert removed.reason == "start lost: its node is not working on it"
    assert await rows(fe) == []


async def test_a_process_no_row_claims_is_stopped_by_exact_identity(
    cluster: InProcessCluster,
) -> None:
    fe, (worker,), clock = await setup(cluster, "n1")
    address = await worker.run("m", 5)
    await heartbeat(fe, worker, at=clock.now)  # first seen now
    assert (await fe.reconciler.tick()).of(StopOrphan) == [], "within the grace"
    clock.now += GRACE + 1
    await heartbeat(fe, worker, at=clock.now)
    assert (await fe.reconciler.tick()).of(StopOrphan) == [StopOrphan("n1", "m", 5, address)]
    await apoll_until(lambda: not worker.sims, timeout=5, what="the orphan stopped")
    assert (worker.stops[-1].index, worker.stops[-1].address) == (5, address)
    await apoll_until(
        lambda: fe.registry.audit.recent(1, kind="replica.orphan"),
        timeout=5,
        what="the stop in the audit log",
    )


async def test_a_row_whose_process_is_gone_is_removed(cluster: InProcessCluster) -> None:
    fe, (worker,), clock = await setup(cluster, "n1", min_replicas=1)
    await fe.reconciler.tick()
    await loaded(fe, 1)
    await worker.sims.pop(("m", 0)).stop()  # it died without a word
    clock.now += GRACE + 1
    await heartbeat(fe, worker, at=clock.now)
    plan = await fe.reconciler.tick()
    assert plan.of(RemoveReplicaRow) == [RemoveReplicaRow("m", 0, "n1", "process not running")]
    assert [(a.index, a.node_id) for a in plan.of(StartReplica)] == [(1, "n1")], "replaced"
    await loaded(fe, 1)
    assert await fe.registry.audit.recent(1, kind="replica.gone")


async def test_an_offline_node_loses_its_rows_and_its_replicas_move(
    cluster: InProcessCluster,
) -> None:
    fe, (w1, w2), clock = await setup(cluster, "n1", "n2", min_replicas=1)
    await fe.reconciler.tick()
    await loaded(fe, 1)
    assert (await rows(fe))[0][1] == "n1"
    clock.now += 70  # past offline_after (60 s) for n1; n2 keeps heartbeating
    await heartbeat(fe, w2, at=clock.now)
    plan = await fe.reconciler.tick()
    assert plan.of(MarkNode) == [MarkNode("n1", NodeStatus.OFFLINE, NodeStatus.HEALTHY)]
    assert plan.of(RemoveNodeReplicas) == [RemoveNodeReplicas("n1")]
    assert [a.node_id for a in plan.of(StartReplica)] == ["n2"]
    await loaded(fe, 1)
    assert (await rows(fe))[0][1] == "n2"
    assert fe.view.nodes["n1"].status == NodeStatus.OFFLINE
    assert w1.sims, "an unreachable node's process is left to its own fate"


async def test_one_frontend_leads_and_another_takes_over_when_it_stops(
    cluster: InProcessCluster,
) -> None:
    one = await cluster.frontend(reconcile_interval=0.2)
    two = await cluster.frontend(reconcile_interval=0.2)
    first = asyncio.create_task(one.reconciler.run())
    await apoll_until(lambda: one.reconciler.leader, timeout=5, what="a leader")
    second = asyncio.create_task(two.reconciler.run())
    try:
        await apoll_until(lambda: two.reconciler.ticks == 0 and one.reconciler.ticks > 1, timeout=5)
        assert not two.reconciler.leader
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
        await apoll_until(lambda: two.reconciler.ticks > 0, timeout=5, what="the takeover")
        assert two.reconciler.leader and not one.reconciler.leader
    finally:
        second.cancel()
        await asyncio.gather(second, return_exceptions=True)
    leaders = await one.registry.audit.recent(10, kind="reconciler.leader")
    assert [e["message"] for e in reversed(leaders)] == [one.id, two.id]

"""Draining in one process: the replacement first, then UNLOADING everywhere, the in-flight
requests finish, then the stop; every step an action of the actuator."""

from __future__ import annotations

import asyncio

import pytest
from harness import InProcessCluster, declare

from corral.domain.actions import StartReplica
from corral.domain.entities import NodeStatus, ReplicaState
from corral.errors import NotFound
from factories import MB, model
from infra import apoll_until


async def test_drain_replaces_a_needed_replica_before_stopping_it(
    cluster: InProcessCluster,
) -> None:
    fe = await cluster.frontend()
    w1 = await cluster.worker(fe, "n1")
    w2 = await cluster.worker(fe, "n2")
    await declare(fe, model("m", min_replicas=1))
    old = await fe.actuator.apply(StartReplica("m", "n1", None, "sim", 64 * MB, "test"))
    reply = await fe.drainer.request("n1", wait=True)
    assert (reply.status, reply.stopped_replicas) == ("drained", 1)
    rows = await fe.registry.replicas.all()
    assert [(r.node_id, r.state) for r in rows] == [("n2", ReplicaState.LOADED)]
    assert not w1.sims and len(w2.sims) == 1
    assert w1.stops[0].index == old.index
    node = await fe.registry.nodes.get("n1")
    assert node is not None and node.status == NodeStatus.DRAINING
    kinds = [e["kind"] for e in reversed(await fe.registry.audit.recent(4))]
    assert kinds == ["node.draining", "replica.loaded", "replica.removed", "node.drained"]


async def test_a_draining_replica_takes_no_new_requests_and_finishes_its_own(
    cluster: InProcessCluster,
) -> None:
    fe = await cluster.frontend()
    worker = await cluster.worker(fe, "n1")
    await declare(fe, model("m"))
    replica = await fe.actuator.apply(StartReplica("m", "n1", None, "sim", 64 * MB, "test"))
    slot = fe.inflight.acquire(replica.key)  # a request is still being answered
    reply = await fe.drainer.request("n1", wait=False)
    assert reply.status == "draining"

    async def unloading() -> bool:
        row = await fe.registry.replicas.get("m", replica.index)
        return row is not None and row.state == ReplicaState.UNLOADING

    await apoll_until(unloading, timeout=5, what="the replica marked UNLOADING")
    assert fe.view.candidates("m") == [], "no new request goes to it"
    await asyncio.sleep(0.2)  # a window in which a wrong stop would happen
    assert worker.sims and worker.stops == [], "not stopped under a running request"
    slot.release()
    await apoll_until(lambda: not worker.sims, timeout=5, what="the stop after the request")

    async def row_gone() -> bool:
        return await fe.registry.replicas.all() == []

    await apoll_until(row_gone, timeout=5, what="the row removed after the stop")


async def test_draining_an_unknown_node_is_not_found(cluster: InProcessCluster) -> None:
    fe = await cluster.frontend()
    with pytest.raises(NotFound):
        await fe.drainer.request("ghost", wait=True)

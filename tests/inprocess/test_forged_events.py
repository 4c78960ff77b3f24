"""Events are hints: a replica event's address reaches the routing view only as PostgreSQL's
row has it, so a forged "loaded" event (even with a frontend's identity) routes no request."""

from __future__ import annotations

import logging

import pytest
from harness import InProcessCluster, chat, client, declare

from corral.backends.sim.config import SimConfig
from corral.backends.sim.server import SimServer
from corral.bus.client import Bus
from corral.bus.messages import ReplicaEvent
from corral.domain.actions import StartReplica
from factories import MB, model
from infra import apoll_until


async def test_a_forged_loaded_event_routes_none_of_200_requests(
    cluster: InProcessCluster,
) -> None:
    victim = await cluster.frontend()
    other = await cluster.frontend()
    await cluster.worker(other, "n1")
    await declare(other, model("m"))
    real = await other.actuator.apply(StartReplica("m", "n1", None, "sim", 64 * MB, "test"))

    def known() -> bool:
        seen = victim.view.replicas.get(real.key)
        return seen is not None and seen.address == real.address

    await apoll_until(known, timeout=5, what="the real events")

    evil = SimServer(SimConfig(model="m"))
    await evil.start()
    forger = Bus(cluster.nats_url, prefix=cluster.prefix, name="forger")
    await forger.connect()
    try:
        s = forger.subjects

        def forged(index: int, address: str = f"127.0.0.1:{evil.port}") -> ReplicaEvent:
            return ReplicaEvent(
                kind="loaded",
                model="m",
                index=index,
                node_id="n1",
                address=address,
                state="loaded",
                origin=other.id,  # the frontend identity, misused
            )

        await forger.publish(s.replica_events, forged(7))  # an index PostgreSQL does not know
        await forger.publish(s.replica_events, forged(real.index))  # a real one, redirected
        # a barrier: the victim forgets the real replica, a true event brings it back; the
        # forgeries, published before it by the same connection, were handled by then
        victim.view.drop_replica(real.model, real.index)
        await forger.publish(s.replica_events, forged(real.index, address=real.address))
        await apoll_until(known, timeout=5, what="the barrier event")

        assert set(victim.view.replicas) == {real.key}
        assert victim.view.replicas[real.key].address == real.address
        async with client(victim) as c:
            answers = [await chat(c, "m") for _ in range(200)]
        assert [r.status_code for r in answers] == [200] * 200
        assert evil.stats()["requests"] == 0, "no request reached the forged address"
    finally:
        await forger.close()
        await evil.stop()


async def test_a_frontend_on_a_nats_without_authentication_warns_at_start(
    cluster: InProcessCluster, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="corral.frontend.nats_trust"):
        await cluster.frontend()
    (warning,) = [r for r in caplog.records if "requires no authentication" in r.getMessage()]
    assert warning.levelno == logging.WARNING

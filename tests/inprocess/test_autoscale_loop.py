"""Autoscaling in one process: the reconciler samples a model's signal each tick, scales up when
it stays above target for the window, back down (highest index first) after the scale-down
delay, and to zero after the idle timeout; the next request wakes the model.

In-flight requests are held as the proxy holds them (slots of the in-flight tracker); the
reconciler reads a fake clock, so the windows pass without waiting.
"""

from __future__ import annotations

import time

from harness import InProcessCluster, chat, client, declare, heartbeat

from corral.domain.actions import ReportScaling, StartReplica, StopReplica
from corral.domain.autoscale import ScalingTarget, Signal
from corral.domain.entities import ReplicaState
from corral.frontend.model_view import model_detail
from corral.frontend.service import Frontend
from factories import FakeClock, model
from infra import apoll_until


async def settle(fe: Frontend) -> None:
    await apoll_until(lambda: fe.actuator.pending() == 0, timeout=10, what="background actions")


async def indexes(fe: Frontend) -> list[int]:
    return [r.index for r in await fe.registry.replicas.all("m") if r.state == ReplicaState.LOADED]


async def test_load_above_target_scales_up_then_back_down_highest_first(
    cluster: InProcessCluster,
) -> None:
    fe = await cluster.frontend()
    clock = FakeClock(time.time())
    fe.reconciler.clock = clock
    await cluster.worker(fe, "n1")
    scaling = ScalingTarget(Signal.INFLIGHT, target=1.0, window=2.0)
    spec = model("m", min_replicas=1, max_replicas=4, scale_down_delay=5.0, scaling=scaling)
    await declare(fe, spec)
    await fe.reconciler.tick()
    await settle(fe)
    assert await indexes(fe) == [0]

    slots = [fe.inflight.acquire(("m", 0)) for _ in range(3)]  # 3x one replica's target
    assert (await fe.reconciler.tick()).actions == (), "the window has only begun"
    clock.now += 3
    up = await fe.reconciler.tick()
    assert [a.index for a in up.of(StartReplica)] == [1, 2]
    (decision,) = up.of(ReportScaling)
    assert (decision.before, decision.after) == (1, 3)
    await settle(fe)
    assert await indexes(fe) == [0, 1, 2]
    (event,) = await fe.registry.audit.recent(1, kind="model.scaled")
    assert event["message"] == "scaled up 1 -> 3: inflight_per_replica 3 above target 1 for 2s"
    detail = await model_detail(fe, fe.view.models["m"])
    assert detail["scaling"]["metric"] == "inflight_per_replica"
    assert detail["scaling"]["last_decision"]["message"] == event["message"]

    for slot in slots:
        slot.release()
    assert (await fe.reconciler.tick()).of(StopReplica) == [], "the new count is just in"
    clock.now += 6
    down = await fe.reconciler.tick()
    assert [(a.index, a.reason.split(":")[0]) for a in down.of(StopReplica)] == [
        (2, "scale down"),
        (1, "scale down"),
    ]
    await settle(fe)
    assert await indexes(fe) == [0]


async def test_an_idle_model_scales_to_zero_and_the_next_request_wakes_it(
    cluster: InProcessCluster,
) -> None:
    fe = await cluster.frontend()
    clock = FakeClock(time.time())
    fe.reconciler.clock = clock
    worker = await cluster.worker(fe, "n1")
    scaling = ScalingTarget(Signal.QUEUE_WAIT, target=1.0, window=2.0, idle_timeout=30.0)
    await declare(fe, model("m", scaling=scaling))
    async with client(fe) as c:
        assert (await chat(c, "m")).status_code == 200
    assert fe.cold.starts == 1
    assert (await fe.reconciler.tick()).of(StopReplica) == [], "used a moment ago"
    clock.now += 60
    await heartbeat(fe, worker, at=clock.now)
    (stop,) = (await fe.reconciler.tick()).of(StopReplica)
    assert stop.reason == "scale down: idle for 60s (idle_timeout 30s)"
    await settle(fe)
    assert await fe.registry.replicas.all("m") == []
    async with client(fe) as c:
        assert (await chat(c, "m")).status_code == 200
    assert fe.cold.starts == 2, "woken through the cold path"

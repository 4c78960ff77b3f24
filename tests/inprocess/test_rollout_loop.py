"""Rollouts in one process: a changed spec moves replica by replica (or recreated), a failed
revision halts, a fixed one resumes; routing follows the newest ready revision.

Ticks are driven by hand; `unload_grace` is 0 so a retired replica stops at the next tick.
The fake worker runs each replica as a sim whose fingerprint is the start's `fingerprint`
option, so answers say which revision served them.
"""

from __future__ import annotations

from harness import FakeWorker, InProcessCluster, chat, client, declare

from corral.domain.actions import MarkUnloading, StartReplica, StopReplica
from corral.domain.entities import Replica, ReplicaState, Rollout, RolloutStrategy
from corral.frontend.model_view import model_detail
from corral.frontend.service import Frontend
from factories import model
from infra import apoll_until

LOADED = ReplicaState.LOADED
RECREATE = Rollout(RolloutStrategy.RECREATE)


async def settle(fe: Frontend) -> None:
    """Wait until the starts and stops the last tick handed out are done."""
    await apoll_until(lambda: fe.actuator.pending() == 0, timeout=10, what="background actions")


async def rows(fe: Frontend) -> list[Replica]:
    return await fe.registry.replicas.all("m")


async def serving(fe: Frontend, count: int, fingerprint: str) -> list[Replica]:
    """Tick until `count` loaded replicas of "m" run the spec's revision."""
    for _ in range(10):
        await fe.reconciler.tick()
        await settle(fe)
        revision = fe.view.models["m"].config_revision
        loaded = [r for r in await rows(fe) if r.state == LOADED and r.revision == revision]
        if len(loaded) == count and len(await rows(fe)) == count:
            async with client(fe) as c:
                answer = await chat(c, "m")
            assert answer.json()["system_fingerprint"] == fingerprint
            return loaded
    raise AssertionError(f"never {count} replicas at {fingerprint}: {await rows(fe)}")


async def started(cluster: InProcessCluster, **kw: object) -> tuple[Frontend, FakeWorker]:
    fe = await cluster.frontend(unload_grace=0.0)
    worker = await cluster.worker(fe, "n1")
    await declare(fe, model("m", options={"fingerprint": "v1"}, **kw))  # type: ignore[arg-type]
    return fe, worker


async def test_a_changed_spec_rolls_one_replica_at_a_time(cluster: InProcessCluster) -> None:
    fe, worker = await started(cluster, min_replicas=3)
    old = {r.address for r in await serving(fe, 3, "v1")}
    await declare(fe, model("m", options={"fingerprint": "v2"}, min_replicas=3))
    new = fe.view.models["m"].config_revision
    for _ in range(12):
        plan = await fe.reconciler.tick()
        assert len(plan.of(StartReplica)) <= 1, "one replica moves at a time"
        await settle(fe)
        now = await rows(fe)
        assert sum(1 for r in now if r.state == LOADED) >= 3, "never below the minimum"
        if any(r.revision == new and r.state == LOADED for r in now):
            assert {r.revision for r in fe.view.candidates("m")} == {new}, "newest only"
            async with client(fe) as c:
                assert (await chat(c, "m")).json()["system_fingerprint"] == "v2"
        if all(r.revision == new for r in now) and len(now) == 3:
            break
    final = await rows(fe)
    assert [r.revision for r in final] == [new] * 3
    assert not {r.address for r in final} & old, "new processes at new addresses"
    replacements = [s for s in worker.starts if s.options.get("fingerprint") == "v2"]
    assert len(replacements) == 3
    for index, replaced in [(r.index, r.replaces) for r in final]:
        stop = worker.log.index(("stop", replaced))  # type: ignore[arg-type]
        assert worker.log.index(("start", index)) < stop, "each old one goes after its successor"
    events = [e["message"] for e in await fe.registry.audit.recent(20, kind="model.rollout")]
    assert [e.split(" (")[0] for e in reversed(events)] == ["m rolling", "m finished"]


async def test_a_failed_revision_halts_and_a_fixed_one_resumes(cluster: InProcessCluster) -> None:
    fe, worker = await started(cluster, min_replicas=2)
    await serving(fe, 2, "v1")
    worker.fail = "sim: error: unrecognized arguments: --bogus 1"
    await declare(fe, model("m", options={"fingerprint": "v2", "bogus": 1}, min_replicas=2))
    for _ in range(3):
        await fe.reconciler.tick()
        await settle(fe)
    assert len(worker.starts) == 3, "one try, then halted"
    assert [
        (r.state, r.revision != fe.view.models["m"].config_revision) for r in await rows(fe)
    ] == [
        (LOADED, True),
        (LOADED, True),
    ], "the old replicas keep serving"
    async with client(fe) as c:
        assert (await chat(c, "m")).json()["system_fingerprint"] == "v1"
    detail = await model_detail(fe, fe.view.models["m"])
    assert detail["rollout"]["phase"] == "halted"
    assert "unrecognized arguments" in detail["rollout"]["last_error"]
    (halted,) = await fe.registry.audit.recent(1, kind="model.rollout")
    assert "halted" in halted["message"] and "unrecognized arguments" in halted["message"]

    worker.fail = None
    await declare(fe, model("m", options={"fingerprint": "v3"}, min_replicas=2))
    await serving(fe, 2, "v3")
    detail = await model_detail(fe, fe.view.models["m"])
    assert (detail["rollout"]["phase"], detail["rollout"]["last_error"]) == ("idle", None)


async def test_recreate_stops_the_old_replicas_before_starting_new_ones(
    cluster: InProcessCluster,
) -> None:
    fe, worker = await started(cluster, min_replicas=2, rollout=RECREATE)
    await serving(fe, 2, "v1")
    began = len(worker.log)
    await declare(fe, model("m", options={"fingerprint": "v2"}, min_replicas=2, rollout=RECREATE))
    first = await fe.reconciler.tick()
    assert [type(a) for a in first.actions[:2]] == [MarkUnloading, MarkUnloading]
    assert first.of(StartReplica) == []
    await settle(fe)
    assert fe.view.candidates("m") == [], "out of routing"
    second = await fe.reconciler.tick()
    assert len(second.of(StopReplica)) == 2 and second.of(StartReplica) == []
    await serving(fe, 2, "v2")
    log = worker.log[began:]
    assert [kind for kind, _ in log] == ["stop", "stop", "start", "start"]

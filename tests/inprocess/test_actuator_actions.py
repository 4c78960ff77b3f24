"""The actuator's table: each domain action -> its registry row, view entry, event and audit entry.

One frontend (no loops), one fake worker "n1" answering over NATS with in-process sims, and a
listener standing in for the other frontends. Each case prepares what its action needs, applies
the action once, and checks the four places it must reach (or must not).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from harness import FakeWorker, InProcessCluster, declare

from corral.domain.actions import (
    Action,
    AdoptReplica,
    DeregisterNode,
    DrainNode,
    DropReplica,
    MarkNode,
    MarkUnloading,
    RecordUse,
    RegisterNode,
    RemoveModel,
    RemoveNodeReplicas,
    RemoveReplicaRow,
    ReplicaExited,
    ReportDrained,
    ReportLeader,
    ReportLoad,
    ReportRollout,
    ReportScaling,
    ReportWaiting,
    SetCooldown,
    SetNodeLabels,
    SetScheduling,
    StartReplica,
    StopOrphan,
    StopReplica,
    UndrainNode,
)
from corral.domain.entities import NodeStatus, Replica, ReplicaState, Scheduling
from corral.errors import LoadFailed, NotFound
from corral.frontend.service import Frontend
from factories import MB, model
from infra import apoll_until

LOADED, UNLOADING = ReplicaState.LOADED, ReplicaState.UNLOADING


@dataclass
class World:
    """What a case works on, and what it leaves behind."""

    cluster: InProcessCluster
    fe: Frontend
    worker: FakeWorker
    replica: Replica | None = None  # a loaded replica of "m", when the case started one
    result: Any = None
    notes: dict[str, Any] = field(default_factory=dict)

    async def start(self, name: str = "m") -> Replica:
        action = StartReplica(name, "n1", None, "sim", 64 * MB, "test")
        self.replica = await self.fe.actuator.apply(action)
        return self.replica

    async def row(self, name: str = "m", index: int = 0) -> Replica | None:
        return await self.fe.registry.replicas.get(name, index)

    async def status(self, node_id: str = "n1") -> NodeStatus | None:
        node = await self.fe.registry.nodes.get(node_id)
        return node.status if node else None


Act = Callable[[World], Awaitable[Action]]
Check = Callable[[World], Awaitable[bool]]


@dataclass(frozen=True)
class Case:
    name: str
    act: Act  # prepares the world, returns the action to apply
    row: Check  # the registry after the action
    view: Callable[[World], bool]  # this frontend's view after the action
    event: tuple[str, str] | None  # (replica|node|model, kind) the other frontends get
    audit: tuple[str, ...]  # audit kinds the action adds, in order


# --- replicas ----------------------------------------------------------------------------


async def start(w: World) -> Action:
    return StartReplica("m", "n1", None, "sim", 64 * MB, "test")


async def started_row(w: World) -> bool:
    """Loaded at its address, at the spec's revision, and that revision's load recorded."""
    row = await w.row()
    revision = w.fe.view.models["m"].config_revision
    info = (await w.fe.registry.replicas.load_info()).get(("m", revision))
    assert len(w.worker.starts) == 1 and w.worker.starts[0].backend == "sim"
    return (
        row is not None
        and row.state == LOADED
        and row.address == w.worker.address(("m", 0))
        and row.revision == revision
        and info is not None
        and info.backend == "sim"
        and info.loaded_at > 0
    )


async def stop(w: World) -> Action:
    return StopReplica.of(await w.start(), "test")


async def gone(w: World) -> bool:
    return await w.row() is None


def not_in_view(w: World) -> bool:
    return ("m", 0) not in w.fe.view.replicas


async def stopped_on_node(w: World) -> bool:
    assert w.result is True
    return await w.row() is None and not w.worker.sims


async def drop(w: World) -> Action:
    return DropReplica.of(await w.start(), "backend said not loaded")


async def dropped(w: World) -> bool:
    assert w.result is True
    await apoll_until(lambda: not w.worker.sims, timeout=5, what="the background stop")
    return await w.row() is None


async def unloading(w: World) -> Action:
    r = await w.start()
    return MarkUnloading(r.model, r.index, r.node_id)


async def retiring(w: World) -> Action:
    replica = await w.start()
    return MarkUnloading.of(replica, "replaced by its new revision")


async def row_unloading(w: World) -> bool:
    row = await w.row()
    return row is not None and row.state == UNLOADING


def view_unloading(w: World) -> bool:
    r = w.fe.view.replicas.get(("m", 0))
    return r is not None and r.state == UNLOADING and w.fe.view.candidates("m") == []


async def adopt(w: World) -> Action:
    await w.fe.registry.replicas.add("m", "n1", memory=64 * MB, state=ReplicaState.LOADING)
    address = await w.worker.run("m", 0)  # its starter died before it could say "loaded"
    w.notes["address"] = address
    return AdoptReplica("m", 0, "n1", address)


async def adopted(w: World) -> bool:
    row = await w.row()
    return row is not None and row.state == LOADED and row.address == w.notes["address"]


def routable(w: World) -> bool:
    return [r.key for r in w.fe.view.candidates("m")] == [("m", 0)]


async def remove_row(w: World) -> Action:
    r = await w.start()
    return RemoveReplicaRow(r.model, r.index, r.node_id, "process not running")


async def exited(w: World) -> Action:
    r = await w.start()
    return ReplicaExited(r.model, r.index, r.node_id, r.address, -9, "killed")


async def exited_elsewhere(w: World) -> Action:
    r = await w.start()
    return ReplicaExited(r.model, r.index, r.node_id, "127.0.0.1:1", -9, "an older process")


async def still_there(w: World) -> bool:
    assert w.result is False
    row = await w.row()
    return row is not None and row.state == LOADED


def in_view(w: World) -> bool:
    return ("m", 0) in w.fe.view.replicas


async def orphan(w: World) -> Action:
    address = await w.worker.run("m", 7)
    return StopOrphan("n1", "m", 7, address)


async def orphan_stopped(w: World) -> bool:
    return w.result is True and ("m", 7) not in w.worker.sims and await w.row("m", 7) is None


async def orphan_unknown(w: World) -> Action:
    return StopOrphan("n1", "m", 7, "127.0.0.1:1")


async def nothing_stopped(w: World) -> bool:
    return w.result is False


async def node_replicas(w: World) -> Action:
    await w.start()
    return RemoveNodeReplicas("n1")


# --- nodes -------------------------------------------------------------------------------


async def register(w: World) -> Action:
    return RegisterNode("n2", "second", "10.0.0.2", "digest", {"zone": "a"}, "50%", 2, ["sim"])


async def registered(w: World) -> bool:
    node = await w.fe.registry.nodes.get("n2")
    return node is not None and node.status == NodeStatus.PENDING and node.labels == {"zone": "a"}


def n2_in_view(w: World) -> bool:
    return "n2" in w.fe.view.nodes


async def mark_unhealthy(w: World) -> Action:
    return MarkNode("n1", NodeStatus.UNHEALTHY, NodeStatus.HEALTHY)


async def unhealthy(w: World) -> bool:
    return w.result is True and await w.status() == NodeStatus.UNHEALTHY


def view_unhealthy(w: World) -> bool:
    return w.fe.view.nodes["n1"].status == NodeStatus.UNHEALTHY


async def mark_stale(w: World) -> Action:
    return MarkNode("n1", NodeStatus.OFFLINE, NodeStatus.UNHEALTHY)  # a heartbeat won meanwhile


async def healthy(w: World) -> bool:
    return w.result in (False, None) and await w.status() == NodeStatus.HEALTHY


def view_healthy(w: World) -> bool:
    return w.fe.view.nodes["n1"].status == NodeStatus.HEALTHY


async def labels(w: World) -> Action:
    return SetNodeLabels("n1", {"gpu": "none"})


async def labelled(w: World) -> bool:
    node = await w.fe.registry.nodes.get("n1")
    return node is not None and node.labels == {"gpu": "none"}


async def drain(w: World) -> Action:
    return DrainNode("n1")


async def draining(w: World) -> bool:
    return await w.status() == NodeStatus.DRAINING


def view_draining(w: World) -> bool:
    return w.fe.view.nodes["n1"].status == NodeStatus.DRAINING


async def undrain(w: World) -> Action:
    await w.fe.actuator.apply(DrainNode("n1"))
    return UndrainNode("n1")


async def deregister(w: World) -> Action:
    await w.start()
    return DeregisterNode("n1")


async def deregistered(w: World) -> bool:
    return w.result == 1 and await w.status() == NodeStatus.OFFLINE and await w.row() is None


# --- models ------------------------------------------------------------------------------


async def scheduling(w: World) -> Action:
    return SetScheduling("m", Scheduling(min_replicas=2, scale_down_delay=60.0))


async def scheduled(w: World) -> bool:
    spec = await w.fe.registry.models.get("m")
    return spec is not None and spec.scheduling.min_replicas == 2


def view_scheduled(w: World) -> bool:
    return w.fe.view.models["m"].scheduling.min_replicas == 2


async def remove_model(w: World) -> Action:
    await w.start()
    return RemoveModel("m")


async def model_gone(w: World) -> bool:
    return await w.fe.registry.models.get("m") is None and not w.worker.sims


def model_not_in_view(w: World) -> bool:
    return "m" not in w.fe.view.models and not_in_view(w)


# --- reports -----------------------------------------------------------------------------


async def cooldown(w: World) -> Action:
    return SetCooldown("m", 0.0, "no node fits m")


async def waiting(w: World) -> Action:
    return ReportWaiting("m", "no load information yet")


async def rollout(w: World) -> Action:
    return ReportRollout("m", "halted", "abc", "exit 2")


async def scaled(w: World) -> Action:
    return ReportScaling("m", 2, 4, "queue_wait 3.1 above target 1 for 10s")


async def drained(w: World) -> Action:
    return ReportDrained("n1", 2)


async def leader(w: World) -> Action:
    return ReportLeader(w.fe.id)


async def load(w: World) -> Action:
    return ReportLoad("m", "evicting", node_id="n1")


def progress_in_view(w: World) -> bool:
    progress = w.fe.view.progress.get("m")
    return progress is not None and progress.state == "evicting" and progress.node_id == "n1"


async def use(w: World) -> Action:
    await w.start()
    return RecordUse({("m", 0): 4_000_000_000.0})


async def used(w: World) -> bool:
    row = await w.row()
    return row is not None and row.last_used == 4_000_000_000.0


async def unchanged(w: World) -> bool:
    return True


def anything(w: World) -> bool:
    return True


CASES = [
    Case("start", start, started_row, routable, ("replica", "loaded"), ("replica.loaded",)),
    Case("stop", stop, stopped_on_node, not_in_view, ("replica", "removed"), ("replica.removed",)),
    Case("drop", drop, dropped, not_in_view, ("replica", "removed"), ("replica.removed",)),
    Case("unload", unloading, row_unloading, view_unloading, ("replica", "updated"), ()),
    Case(
        "retire",
        retiring,
        row_unloading,
        view_unloading,
        ("replica", "updated"),
        ("replica.unloading",),
    ),
    Case("adopt", adopt, adopted, routable, ("replica", "loaded"), ("replica.adopted",)),
    Case("remove-row", remove_row, gone, not_in_view, ("replica", "removed"), ("replica.gone",)),
    Case("exited", exited, gone, not_in_view, ("replica", "removed"), ("replica.exited",)),
    Case("exited-elsewhere", exited_elsewhere, still_there, in_view, None, ()),
    Case("orphan", orphan, orphan_stopped, anything, None, ("replica.orphan",)),
    Case("orphan-gone", orphan_unknown, nothing_stopped, anything, None, ()),
    Case("node-replicas", node_replicas, gone, not_in_view, ("replica", "removed"), ()),
    Case("register", register, registered, n2_in_view, ("node", "joined"), ("node.registered",)),
    Case("mark", mark_unhealthy, unhealthy, view_unhealthy, ("node", "status"), ("node.status",)),
    Case("mark-stale", mark_stale, healthy, view_healthy, None, ()),
    Case("labels", labels, labelled, anything, ("node", "labels"), ("node.labels",)),
    Case("drain", drain, draining, view_draining, ("node", "status"), ("node.draining",)),
    Case(
        "undrain",
        undrain,
        healthy,
        view_healthy,
        ("node", "status"),
        ("node.undrained",),
    ),
    Case(
        "deregister",
        deregister,
        deregistered,
        not_in_view,
        ("node", "status"),
        ("node.deregistered",),
    ),
    Case(
        "schedule",
        scheduling,
        scheduled,
        view_scheduled,
        ("model", "updated"),
        ("model.scheduling",),
    ),
    Case(
        "remove-model",
        remove_model,
        model_gone,
        model_not_in_view,
        ("model", "removed"),
        ("replica.removed", "model.deleted"),
    ),
    Case("cooldown", cooldown, unchanged, anything, None, ("model.capacity",)),
    Case("waiting", waiting, unchanged, anything, None, ("model.waiting",)),
    Case("rollout", rollout, unchanged, anything, None, ("model.rollout",)),
    Case("scaled", scaled, unchanged, anything, None, ("model.scaled",)),
    Case("drained", drained, unchanged, anything, None, ("node.drained",)),
    Case("leader", leader, unchanged, anything, None, ("reconciler.leader",)),
    Case("load", load, unchanged, progress_in_view, None, ()),
    Case("use", use, used, anything, None, ()),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_action(cluster: InProcessCluster, case: Case) -> None:
    fe = await cluster.frontend()
    worker = await cluster.worker(fe, "n1")
    await declare(fe, model("m"))
    w = World(cluster, fe, worker)
    action = await case.act(w)
    await cluster.events.barrier(fe.bus)  # what `act` announced is in, and not counted below
    before = await fe.registry.audit.count()
    seen = len(cluster.events.replicas), len(cluster.events.nodes), len(cluster.events.models)
    w.result = await fe.actuator.apply(action)

    assert await case.row(w), "the registry"
    assert case.view(w), "this frontend's view"
    if case.event is not None:
        topic, kind = case.event
        index = ("replica", "node", "model").index(topic)
        events = (cluster.events.replicas, cluster.events.nodes, cluster.events.models)[index]
        await apoll_until(
            lambda: kind in [e.kind for e in events[seen[index] :]],
            timeout=5,
            what=f"a {topic} event {kind!r}",
        )
        assert all(e.origin == fe.id for e in events[seen[index] :])
    audit = await fe.registry.audit.recent(50)
    added = [e["kind"] for e in reversed(audit[: (await fe.registry.audit.count()) - before])]
    assert added == list(case.audit), "the audit log"


async def test_a_failed_start_leaves_no_row_and_says_why(cluster: InProcessCluster) -> None:
    fe = await cluster.frontend()
    worker = await cluster.worker(fe, "n1")
    await declare(fe, model("m"))
    worker.fail = "backend crashed: CUDA out of memory"
    with pytest.raises(LoadFailed, match="CUDA out of memory"):
        await fe.actuator.apply(StartReplica("m", "n1", None, "sim", 64 * MB, "test"))
    assert await fe.registry.replicas.all() == []
    assert fe.view.replicas == {}
    await apoll_until(
        lambda: [e.kind for e in cluster.events.replicas] == ["updated", "failed"],
        timeout=5,
        what="the start and its failure announced",
    )
    assert [e["kind"] for e in await fe.registry.audit.recent(1)] == ["replica.failed"]


async def test_a_second_drop_of_one_replica_does_nothing(cluster: InProcessCluster) -> None:
    fe = await cluster.frontend()
    await cluster.worker(fe, "n1")
    await declare(fe, model("m"))
    replica = await fe.actuator.apply(StartReplica("m", "n1", None, "sim", 64 * MB, "test"))
    assert await fe.actuator.apply(DropReplica.of(replica, "first")) is True
    count = await fe.registry.audit.count()
    assert await fe.actuator.apply(DropReplica.of(replica, "second")) is False
    assert await fe.registry.audit.count() == count


@pytest.mark.parametrize(
    "action",
    [
        SetNodeLabels("ghost", {}),
        DrainNode("ghost"),
        UndrainNode("n1"),
        SetScheduling("x", Scheduling()),
    ],
    ids=["labels", "drain", "undrain-not-draining", "scheduling"],
)
async def test_changes_to_unknown_things_are_not_found(
    cluster: InProcessCluster, action: Action
) -> None:
    fe = await cluster.frontend()
    await cluster.worker(fe, "n1")
    count = await fe.registry.audit.count()
    with pytest.raises(NotFound):
        await fe.actuator.apply(action)
    assert await fe.registry.audit.count() == count


async def test_unchanged_model_is_not_announced_again(cluster: InProcessCluster) -> None:
    fe = await cluster.frontend()
    await declare(fe, model("m"))
    await apoll_until(lambda: len(cluster.events.models) == 1, timeout=5, what="the declaration")
    count = await fe.registry.audit.count()
    await declare(fe, model("m"))
    assert await fe.registry.audit.count() == count
    assert len(cluster.events.models) == 1

"""The in-process tier's cluster: real frontends (no background loops) on real PostgreSQL and NATS,
and fake workers that answer their node's NATS commands with in-process sim servers.

Nothing here starts a subprocess. A test drives time itself: it sends heartbeats when it wants
them (with the timestamps it wants), ticks the reconciler by hand, and may give the reconciler
a clock of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import httpx

from corral.backends.sim import SimConfig, SimServer
from corral.bus.client import Bus
from corral.bus.messages import (
    ListReplicasCommand,
    ListReplicasReply,
    Message,
    ModelEvent,
    NodeEvent,
    ProcessInfo,
    ReplicaEvent,
    StartReplicaCommand,
    StartReplicaReply,
    StopReplicaCommand,
    StopReplicaReply,
    resources_to_wire,
)
from corral.config import FrontendSettings
from corral.domain.actions import RecordHeartbeat, RegisterNode, UpsertModel
from corral.domain.entities import ModelSpec, Resources
from corral.frontend.service import Frontend
from factories import GB
from infra import apoll_until

#: Settings of in-process frontends: short budgets, so a failing test fails fast.
SETTINGS: dict[str, Any] = {
    "wait_budget": 10.0,
    "start_timeout": 10.0,
    "load_job_ttl": 5.0,
    "drain_timeout": 5.0,
    "capacity_cooldown": 5.0,
    "orphan_grace": 30.0,
    "heartbeat_interval": 5.0,
}

ReplicaId = tuple[str, int]


class FakeWorker:
    """A worker played in the test's event loop: one sim server per started replica."""

    def __init__(
        self, nats_url: str, prefix: str, node_id: str, sim: Mapping[str, Any] | None = None
    ) -> None:
        self.bus = Bus(nats_url, prefix=prefix, name=f"fake-{node_id}")
        self.node_id = node_id
        self.sim = dict(sim or {})  # SimConfig fields of every replica started here
        self.sims: dict[ReplicaId, SimServer] = {}
        self.starts: list[StartReplicaCommand] = []
        self.stops: list[StopReplicaCommand] = []
        self.log: list[tuple[str, int]] = []  # ("start" | "stop", index), in arrival order
        self.fail: str | None = None  # when set, every start answers this error
        self.gate: asyncio.Event | None = None  # when set, starts wait for it

    async def open(self) -> None:
        await self.bus.connect()
        s = self.bus.subjects
        await self.bus.serve(
            s.replica_start(self.node_id), StartReplicaCommand, self._start, error_reply=_failed
        )
        await self.bus.serve(
            s.replica_stop(self.node_id), StopReplicaCommand, self._stop, error_reply=_failed
        )
        await self.bus.serve(
            s.replicas_list(self.node_id), ListReplicasCommand, self._list, error_reply=_failed
        )
        await self.bus.flush()

    async def run(self, model: str, index: int, options: Mapping[str, Any] | None = None) -> str:
        """Run a sim for (model, index) as if a start had asked for it (with the start's
        options that are sim settings, e.g. `fingerprint`); return its address."""
        fields = {f.name for f in dataclasses.fields(SimConfig)}
        given = {k: v for k, v in (options or {}).items() if k in fields}
        sim = SimServer(SimConfig(model=model, **{**self.sim, **given}))
        port = await sim.start()
        self.sims[(model, index)] = sim
        return f"127.0.0.1:{port}"

    def address(self, key: ReplicaId) -> str:
        return f"127.0.0.1:{self.sims[key].port}"

    def processes(self) -> list[ProcessInfo]:
        """What this worker's heartbeat reports."""
        return [
            ProcessInfo(
                model=m, index=i, backend="sim", address=self.address((m, i)), pid=os.getpid()
            )
            for (m, i) in self.sims
        ]

    async def _start(self, cmd: StartReplicaCommand) -> Message:
        self.starts.append(cmd)
        self.log.append(("start", cmd.index))
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            return StartReplicaReply(ok=False, error=self.fail)
        address = await self.run(cmd.model, cmd.index, cmd.options)
        return StartReplicaReply(ok=True, address=address, pid=os.getpid())

    async def _stop(self, cmd: StopReplicaCommand) -> Message:
        self.stops.append(cmd)
        self.log.append(("stop", cmd.index))
        key = (cmd.model, cmd.index)
        sim = self.sims.get(key)
        if sim is None or (cmd.address is not None and cmd.address != self.address(key)):
            return StopReplicaReply(ok=True, stopped=False)
        del self.sims[key]
        await sim.stop()
        return StopReplicaReply(ok=True, stopped=True)

    async def _list(self, _: ListReplicasCommand) -> Message:
        return ListReplicasReply(processes=self.processes())

    async def close(self) -> None:
        for sim in list(self.sims.values()):
            await sim.stop()
        self.sims.clear()
        await self.bus.close()


def _failed(text: str) -> Message:
    return StartReplicaReply(ok=False, error=text)


class Events:
    """Every replica, node and model event on the bus, as a peer frontend would see them."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.replicas: list[ReplicaEvent] = []
        self.nodes: list[NodeEvent] = []
        self.models: list[ModelEvent] = []
        self.markers = 0

    async def open(self) -> None:
        await self.bus.connect()
        s = self.bus.subjects
        await self.bus.subscribe(s.replica_events, self._collect(ReplicaEvent, self.replicas))
        await self.bus.subscribe(s.node_events, self._collect(NodeEvent, self.nodes))
        await self.bus.subscribe(s.model_events, self._collect(ModelEvent, self.models))
        await self.bus.flush()

    async def barrier(self, bus: Bus) -> None:
        """Return once every event `bus` published so far has reached this listener: NATS keeps
        one publisher's order per subject, so a marker on each subject comes after them."""
        self.markers += 1
        name = f"marker-{self.markers}"
        s = bus.subjects
        await bus.publish(s.replica_events, ReplicaEvent(kind="updated", model=name, index=0))
        await bus.publish(s.node_events, NodeEvent(kind="updated", node_id=name))
        await bus.publish(s.model_events, ModelEvent(kind="updated", name=name))

        def arrived() -> bool:
            return (
                any(e.model == name for e in self.replicas)
                and any(e.node_id == name for e in self.nodes)
                and any(e.name == name for e in self.models)
            )

        await apoll_until(arrived, timeout=5, what="the event barrier")

    def _collect(self, kind: type[Any], into: list[Any]) -> Callable[[bytes], Any]:
        async def handler(payload: bytes) -> None:
            into.append(kind.model_validate_json(payload))

        return handler

    async def close(self) -> None:
        await self.bus.close()


class InProcessCluster:
    """Frontends, fake workers and an event listener sharing one database and NATS prefix."""

    def __init__(self, database_url: str, nats_url: str, prefix: str) -> None:
        self.database_url = database_url
        self.nats_url = nats_url
        self.prefix = prefix
        self.frontends: list[Frontend] = []
        self.workers: list[FakeWorker] = []
        self.events = Events(Bus(nats_url, prefix=prefix, name="events"))

    async def frontend(self, **settings: Any) -> Frontend:
        """A frontend, opened (migrated, connected, view filled) but running no loops."""
        fe = Frontend(
            FrontendSettings(
                database_url=self.database_url,
                nats_url=self.nats_url,
                nats_prefix=self.prefix,
                **{**SETTINGS, **settings},
            )
        )
        self.frontends.append(fe)
        await fe.open()
        return fe

    async def worker(
        self, fe: Frontend, node_id: str, *, ram: int = 16 * GB, **sim: Any
    ) -> FakeWorker:
        """A fake worker, registered through `fe` and healthy (one heartbeat)."""
        worker = FakeWorker(self.nats_url, self.prefix, node_id, sim)
        self.workers.append(worker)
        await worker.open()
        register = RegisterNode(node_id, node_id, "127.0.0.1", "digest", {}, "80%", 0, ["sim"])
        await fe.actuator.apply(register)
        await heartbeat(fe, worker, ram=ram)
        return worker

    async def close(self) -> None:
        for fe in self.frontends:
            await fe.stop()
        for worker in self.workers:
            await worker.close()
        await self.events.close()


async def heartbeat(
    fe: Frontend, worker: FakeWorker, *, at: float | None = None, ram: int = 16 * GB
) -> None:
    """The heartbeat `worker` would send now (or at `at`), through `fe`."""
    resources = resources_to_wire(Resources(cpu_count=4, ram_total=ram, ram_free=ram))
    await fe.actuator.apply(
        RecordHeartbeat(
            node_id=worker.node_id,
            resources=resources,
            processes=[p.model_dump() for p in worker.processes()],
            backends=["sim"],
            artifacts=[],
            installs={},
            at=time.time() if at is None else at,
        )
    )


async def declare(fe: Frontend, spec: ModelSpec) -> None:
    await fe.actuator.apply(UpsertModel(spec, "api"))


@contextlib.asynccontextmanager
async def client(fe: Frontend) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client whose requests go straight into `fe`'s OpenAI proxy (no sockets)."""
    transport = httpx.ASGITransport(app=fe.proxy)
    async with httpx.AsyncClient(transport=transport, base_url="http://corral", timeout=30) as c:
        yield c


async def chat(c: httpx.AsyncClient, model: str, text: str = "hello") -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 4}
    return await c.post("/v1/chat/completions", json=body)

"""The NATS wrapper (Bus) against a real NATS server: typed pub/sub, request/reply, failures."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from corral.bus.client import Bus, decode
from corral.bus.messages import (
    LoadReport,
    Message,
    ReplicaEvent,
    StartReplicaCommand,
    StartReplicaReply,
)
from corral.bus.subjects import Subjects
from corral.errors import NodeUnreachable

MakeBus = Callable[..., Awaitable[Bus]]


@pytest.fixture
async def make_bus(nats_url: str, nats_prefix: str) -> AsyncIterator[MakeBus]:
    buses: list[Bus] = []

    async def make(prefix: str | None = None, name: str = "test") -> Bus:
        bus = Bus(nats_url, prefix=prefix or nats_prefix, name=name)
        await bus.connect()
        buses.append(bus)
        return bus

    yield make
    for bus in buses:
        await bus.close()


def start(model: str = "m", index: int = 0) -> StartReplicaCommand:
    return StartReplicaCommand(model=model, index=index, backend="sim", options={"n_ctx": 1})


def failed(text: str) -> Message:
    return StartReplicaReply(ok=False, error=text)


async def sync(*buses: Bus) -> None:
    """Round trips on every connection, subscriber first, before anyone publishes.

    One flush of the subscriber is not always enough with nats-server 2.15: another connection
    may still miss a fresh subscription for a few milliseconds (seen as NoResponders).
    A round trip on the publishing connection too closes that window.
    """
    for bus in buses:
        await bus.flush()


async def collect(bus: Bus, subject: str, message_type: type[Message]) -> asyncio.Queue[object]:
    """Subscribe and put every decoded message (None for a malformed one) on a queue."""
    queue: asyncio.Queue[object] = asyncio.Queue()

    async def handler(payload: bytes) -> None:
        await queue.put(decode(payload, message_type))

    await bus.subscribe(subject, handler)
    await bus.flush()  # the server knows the subscription before anyone publishes
    return queue


# --- publish / subscribe -------------------------------------------------------------------------


async def test_a_server_without_authentication_is_known_as_such(make_bus: MakeBus) -> None:
    bus = await make_bus(name="plain")
    assert not bus.auth_required  # `corral serve` warns about such a server at start


async def test_publish_subscribe_typed_messages(make_bus: MakeBus) -> None:
    publisher = await make_bus(name="pub")
    subscriber = await make_bus(name="sub")
    queue = await collect(subscriber, subscriber.subjects.replica_events, ReplicaEvent)
    await sync(subscriber, publisher)
    sent = [
        ReplicaEvent(kind="loaded", model="m", index=i, node_id="n1", address=f"h:{i}")
        for i in range(30)
    ]
    for event in sent:
        await publisher.publish(publisher.subjects.replica_events, event)
    received = [await asyncio.wait_for(queue.get(), timeout=5) for _ in sent]
    assert received == sent, "every message arrives, typed and in order"


async def test_every_subscriber_gets_broadcasts(make_bus: MakeBus) -> None:
    publisher = await make_bus()
    queues = [
        await collect(await make_bus(), publisher.subjects.load_reports, LoadReport)
        for _ in range(3)
    ]
    await sync(publisher)
    report = LoadReport(frontend_id="fe-1", inflight=[("m", 0, 2)], at=5.0)
    await publisher.publish(publisher.subjects.load_reports, report)
    for queue in queues:
        assert await asyncio.wait_for(queue.get(), timeout=5) == report


async def test_subscriber_survives_malformed_and_failing_messages(make_bus: MakeBus) -> None:
    bus = await make_bus()
    subject = bus.subjects.replica_events
    seen: asyncio.Queue[ReplicaEvent] = asyncio.Queue()
    dropped = 0

    async def handler(payload: bytes) -> None:
        nonlocal dropped
        event = decode(payload, ReplicaEvent)
        if event is None:
            dropped += 1
            return
        if event.model == "explode":
            raise RuntimeError("handler bug")
        await seen.put(event)

    await bus.subscribe(subject, handler)
    await bus.flush()
    await bus.nc.publish(subject, b"not json")
    await bus.nc.publish(subject, b'{"kind": "exploded", "model": "m", "index": 0}')
    await bus.publish(subject, ReplicaEvent(kind="failed", model="explode", index=0))
    good = ReplicaEvent(kind="removed", model="m", index=3)
    await bus.publish(subject, good)
    assert await asyncio.wait_for(seen.get(), timeout=5) == good
    assert dropped == 2


async def test_prefixes_keep_clusters_apart(make_bus: MakeBus, nats_prefix: str) -> None:
    mine = await make_bus()
    theirs = await make_bus(prefix=nats_prefix + "_other")
    queue: asyncio.Queue[str] = asyncio.Queue()

    async def handler(payload: bytes) -> None:
        event = decode(payload, ReplicaEvent)
        assert event is not None
        await queue.put(event.model)

    await theirs.subscribe(f"{theirs.subjects.prefix}.>", handler)
    await sync(theirs, mine)
    await mine.publish(
        mine.subjects.replica_events, ReplicaEvent(kind="loaded", model="a", index=0)
    )
    await mine.publish(
        theirs.subjects.replica_events, ReplicaEvent(kind="loaded", model="sentinel", index=0)
    )
    assert await asyncio.wait_for(queue.get(), timeout=5) == "sentinel"
    assert queue.empty()


def test_subjects_are_prefixed_single_tokens() -> None:
    s = Subjects("corral_x")
    assert s.replica_start("n1") == "corral_x.node.n1.replica.start"
    assert s.replica_stop("n1") == "corral_x.node.n1.replica.stop"
    assert s.backend_upgrade("n1") != s.backend_install("n1")
    assert s.load_events("org/llama-3.1:8b q4") == "corral_x.events.load.org_llama-3_1_8b_q4"
    assert s.load_events("") == "corral_x.events.load._"
    assert s.all_load_events == "corral_x.events.load.>"


# --- request / reply -----------------------------------------------------------------------------


async def test_request_reply_via_serve(make_bus: MakeBus) -> None:
    worker = await make_bus(name="worker")
    frontend = await make_bus(name="frontend")
    received: list[StartReplicaCommand] = []

    async def handle(request: StartReplicaCommand) -> Message:
        received.append(request)
        return StartReplicaReply(ok=True, address=f"10.0.0.1:{20000 + request.index}", pid=42)

    subject = worker.subjects.replica_start("n1")
    await worker.serve(subject, StartReplicaCommand, handle, error_reply=failed)
    await sync(worker, frontend)
    reply = await frontend.request(subject, start(index=3), StartReplicaReply, timeout=5)
    assert reply == StartReplicaReply(ok=True, address="10.0.0.1:20003", pid=42)
    assert received == [start(index=3)]


async def test_no_responders_is_node_unreachable(make_bus: MakeBus) -> None:
    bus = await make_bus()
    subject = bus.subjects.replica_start("nobody")
    started = time.monotonic()
    with pytest.raises(NodeUnreachable) as info:
        await bus.request(subject, start(), StartReplicaReply, timeout=5)
    assert time.monotonic() - started < 4, "no responders is known at once, not after the timeout"
    assert info.value.extra.get("no_responders") is True
    assert not info.value.extra.get("timed_out")
    assert subject in info.value.message


async def test_slow_handler_is_timed_out(make_bus: MakeBus) -> None:
    worker = await make_bus()
    frontend = await make_bus()
    release = asyncio.Event()

    async def handle(request: StartReplicaCommand) -> Message:
        await release.wait()
        return StartReplicaReply(ok=True)

    subject = worker.subjects.replica_start("n1")
    await worker.serve(subject, StartReplicaCommand, handle, error_reply=failed)
    await sync(worker, frontend)
    try:
        with pytest.raises(NodeUnreachable) as info:
            await frontend.request(subject, start(), StartReplicaReply, timeout=0.3)
        assert info.value.extra.get("timed_out") is True
        assert not info.value.extra.get("no_responders")
    finally:
        release.set()  # let the handler finish so the bus closes


@pytest.mark.parametrize("concurrent", [True, False], ids=["concurrent", "serial"])
async def test_slow_request_does_not_delay_a_fast_one(make_bus: MakeBus, concurrent: bool) -> None:
    worker = await make_bus()
    frontend = await make_bus()
    slow_started = asyncio.Event()
    release = asyncio.Event()

    async def handle(request: StartReplicaCommand) -> Message:
        if request.model == "slow":
            slow_started.set()
            await release.wait()
        return StartReplicaReply(ok=True, address=request.model)

    subject = worker.subjects.replica_start("n1")
    await worker.serve(
        subject, StartReplicaCommand, handle, error_reply=failed, concurrent=concurrent
    )
    await sync(worker, frontend)
    slow = asyncio.create_task(
        frontend.request(subject, start("slow"), StartReplicaReply, timeout=10)
    )
    try:
        await asyncio.wait_for(slow_started.wait(), timeout=5)
        if concurrent:
            fast = await frontend.request(subject, start("fast"), StartReplicaReply, timeout=2)
            assert fast.address == "fast"
            assert not slow.done(), "the fast reply did not wait for the slow one"
        else:  # the contrast: one handler at a time queues the fast request behind the slow one
            with pytest.raises(NodeUnreachable):
                await frontend.request(subject, start("fast"), StartReplicaReply, timeout=0.5)
    finally:
        release.set()
    reply = await asyncio.wait_for(slow, timeout=10)
    assert reply.address == "slow"


async def test_handler_exception_becomes_error_reply(make_bus: MakeBus) -> None:
    worker = await make_bus()
    frontend = await make_bus()

    async def handle(request: StartReplicaCommand) -> Message:
        raise ValueError(f"cannot start {request.model}")

    subject = worker.subjects.replica_start("n1")
    await worker.serve(subject, StartReplicaCommand, handle, error_reply=failed)
    await sync(worker, frontend)
    reply = await frontend.request(subject, start("m"), StartReplicaReply, timeout=5)
    assert reply == StartReplicaReply(ok=False, error="ValueError: cannot start m")
    # the subscription keeps serving after a failure
    again = await frontend.request(subject, start("n"), StartReplicaReply, timeout=5)
    assert again.error == "ValueError: cannot start n"


@pytest.mark.parametrize(
    "payload",
    [b"not json", b"{}", b'{"model": "m", "index": "zero", "backend": "sim"}', b"[]"],
    ids=["not-json", "missing-fields", "bad-type", "array"],
)
async def test_malformed_request_gets_error_reply(make_bus: MakeBus, payload: bytes) -> None:
    worker = await make_bus()
    frontend = await make_bus()
    calls = 0

    async def handle(request: StartReplicaCommand) -> Message:
        nonlocal calls
        calls += 1
        return StartReplicaReply(ok=True)

    subject = worker.subjects.replica_start("n1")
    await worker.serve(subject, StartReplicaCommand, handle, error_reply=failed)
    await sync(worker, frontend)
    msg = await frontend.nc.request(subject, payload, timeout=5)
    reply = decode(msg.data, StartReplicaReply)
    assert reply is not None and not reply.ok
    assert reply.error is not None and "ValidationError" in reply.error
    assert calls == 0, "the handler never sees a malformed request"


# --- decode --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"not json",
        b"[1, 2]",
        b'{"model": "m", "index": 0}',
        b'{"kind": "exploded", "model": "m", "index": 0}',
        b'{"kind": "loaded", "model": "m", "index": "first"}',
    ],
    ids=["empty", "not-json", "array", "missing-kind", "unknown-kind", "bad-index"],
)
def test_decode_drops_malformed_payloads(payload: bytes) -> None:
    assert decode(payload, ReplicaEvent) is None


def test_decode_accepts_newer_senders() -> None:
    payload = b'{"v": 2, "kind": "loaded", "model": "m", "index": 1, "brand_new_field": [1]}'
    event = decode(payload, ReplicaEvent)
    assert event == ReplicaEvent(v=2, kind="loaded", model="m", index=1)


def test_messages_roundtrip() -> None:
    event = ReplicaEvent(kind="failed", model="m", index=2, error="oom", origin="fe-1")
    assert decode(event.model_dump_json().encode(), ReplicaEvent) == event

"""NATS credentials per role against a real nats-server with auth callout: what each identity
may do, forged events, revocation, rotation, two clusters on one server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import nats
import nats.errors
import pytest
from nats.aio.msg import Msg

from corral.bus.authservice import AuthCallout, WorkerSessions
from corral.bus.client import Bus, decode
from corral.bus.messages import ReplicaEvent, StartReplicaCommand, StartReplicaReply
from corral.bus.natsauth import NatsCredentials, worker_credentials, worker_inbox_prefix
from corral.bus.subjects import Subjects
from natsauth_infra import (
    AuthNats,
    Client,
    CredentialStore,
    auth_nats_server,
    collect,
    connect,
    publish_until_seen,
    until,
)

AUTH_TIMEOUT = 2.0  # the server waits this long for a callout answer
SWEEP_DELAY = AUTH_TIMEOUT + 0.5
PROMPT = 1.5  # "at once", with room for a loaded machine, yet below the auth timeout


@pytest.fixture(scope="module")
def server() -> Iterator[AuthNats]:
    with auth_nats_server(auth_timeout=AUTH_TIMEOUT) as s:
        yield s


@dataclass
class Cluster:
    """One Corral cluster (a prefix) on the shared server: a frontend with the auth callout,
    a system connection that kicks, and the credential store the frontend would keep."""

    server: AuthNats
    frontend: Bus
    callout: AuthCallout
    store: CredentialStore
    sessions: WorkerSessions
    clients: list[Client] = field(default_factory=list)

    @property
    def subjects(self) -> Subjects:
        return self.frontend.subjects

    @property
    def prefix(self) -> str:
        return self.subjects.prefix

    def creds(self, node_id: str, secret: str) -> NatsCredentials:
        return worker_credentials(self.prefix, node_id, secret)

    async def worker(self, node_id: str, secret: str, *, reconnect: bool = False) -> Client:
        client = await connect(self.server.url, self.creds(node_id, secret), reconnect=reconnect)
        self.clients.append(client)
        return client


@pytest.fixture
async def make_cluster(server: AuthNats) -> AsyncIterator[Callable[[str], Any]]:
    stack: list[tuple[Bus, Bus, Cluster]] = []

    async def make(prefix: str) -> Cluster:
        frontend = Bus(
            server.url,
            prefix=prefix,
            name="frontend",
            credentials=server.keys.frontend_credentials(),
        )
        await frontend.connect()
        store = CredentialStore()
        callout = AuthCallout(frontend, server.keys.issuer, store.verify)
        await callout.start()
        system = Bus(
            server.url, prefix=prefix, name="system", credentials=server.keys.system_credentials()
        )
        await system.connect()
        sessions = WorkerSessions(system, sweep_delay=SWEEP_DELAY)
        cluster = Cluster(server, frontend, callout, store, sessions)
        stack.append((frontend, system, cluster))
        return cluster

    yield make
    for frontend, system, cluster in reversed(stack):
        for client in cluster.clients:
            if not client.nc.is_closed:
                await client.nc.close()
        await cluster.sessions.close()
        await cluster.callout.stop()
        await system.close()
        await frontend.close()


@pytest.fixture
async def cluster(make_cluster: Callable[[str], Any], nats_prefix: str) -> Cluster:
    made: Cluster = await make_cluster(nats_prefix)
    return made


# --- the frontend identity --------------------------------------------------------------------


async def test_frontend_identity_uses_the_whole_prefix(cluster: Cluster, server: AuthNats) -> None:
    other = await connect(server.url, server.keys.frontend_credentials())
    cluster.clients.append(other)
    s = cluster.subjects
    got: list[Msg] = []

    async def cb(msg: Msg) -> None:
        got.append(msg)
        if msg.reply:
            await msg.respond(StartReplicaReply(ok=True, address="h:3").model_dump_json().encode())

    await other.nc.subscribe(f"{cluster.prefix}.>", cb=cb)
    await other.nc.flush()
    for subject in (
        s.replica_events,
        s.node_events,
        s.model_events,
        s.load_reports,
        s.install_progress("n1"),
        s.load_events("m"),
    ):
        await publish_until_seen(cluster.frontend.nc, subject, got)
    reply = await cluster.frontend.request(
        s.replica_start("n1"),
        StartReplicaCommand(model="m", index=3, backend="sim"),
        StartReplicaReply,
        timeout=5,
    )
    assert reply.ok and reply.address == "h:3"
    assert other.violations() == [] and other.errors == []


def failed(text: str) -> StartReplicaReply:
    return StartReplicaReply(ok=False, error=text)


# --- a worker identity ------------------------------------------------------------------------


async def test_worker_answers_its_commands_and_publishes_its_progress(cluster: Cluster) -> None:
    secret = cluster.store.issue("n1")
    worker = Bus(cluster.server.url, prefix=cluster.prefix, credentials=cluster.creds("n1", secret))
    await worker.connect()
    try:
        s = cluster.subjects

        async def answer(request: StartReplicaCommand) -> StartReplicaReply:
            return StartReplicaReply(ok=True, address=f"w:{request.index}")

        await worker.serve(s.replica_start("n1"), StartReplicaCommand, answer, error_reply=failed)
        await worker.flush()
        progress = await collect(cluster.frontend, s.all_install_progress)
        reply = await cluster.frontend.request(
            s.replica_start("n1"),
            StartReplicaCommand(model="m", index=7, backend="sim"),
            StartReplicaReply,
            timeout=5,
        )
        assert reply.ok and reply.address == "w:7"
        await worker.nc.publish(s.install_progress("n1"), b'{"step": 1}')
        await worker.nc.publish(s.load_progress("n1", "m"), b'{"step": 2}')
        await worker.flush()
        await until(lambda: len(progress) == 1, what="the install progress")
        assert progress[0].subject == s.install_progress("n1")

        # its own reply inboxes are its to subscribe to (requests of its own)
        inbox = worker_inbox_prefix(cluster.prefix, "n1") + ".x"
        replies = await collect(worker, inbox)
        await cluster.frontend.nc.publish(inbox, b"reply")
        await cluster.frontend.flush()
        await until(lambda: len(replies) == 1, what="the reply on the worker's inbox")
    finally:
        await worker.close()


@pytest.mark.parametrize(
    "subject",
    [
        "{p}.events.replica",
        "{p}.events.node",
        "{p}.events.model",
        "{p}.events.load.m",
        "{p}.events.install",
        "{p}.frontend.load",
        "{p}.frontend.prefixes",
        "{p}.progress.n2.install",
        "{p}.node.n2.replica.stop",
        "{p}.node.n1.replica.start",
        "_INBOX.abc",
    ],
)
async def test_worker_publish_outside_its_progress_is_a_violation(
    cluster: Cluster, subject: str
) -> None:
    subject = subject.format(p=cluster.prefix)
    worker = await cluster.worker("n1", cluster.store.issue("n1"))
    seen = await collect(cluster.frontend, subject)
    await publish_until_seen(cluster.frontend.nc, subject, seen, b"before")
    await worker.nc.publish(subject, b"forged")
    await worker.nc.flush()
    await until(lambda: bool(worker.violations()), what="the permission violation")
    assert worker.violations() == [
        f'nats: permissions violation for publish to "{subject.lower()}"'
    ]
    await publish_until_seen(cluster.frontend.nc, subject, seen, b"after")
    assert b"forged" not in {m.data for m in seen}


@pytest.mark.parametrize(
    "subject",
    [
        "{p}.node.n2.replica.stop",
        "{p}.node.n2.>",
        "{p}.node.*.replica.start",
        "{p}.node.>",
        "{p}.>",
        "{p}.events.replica",
        "{p}.progress.>",
        ">",
        "_INBOX.>",
        "$SYS.REQ.USER.AUTH",
    ],
)
async def test_worker_subscription_beyond_its_node_is_a_violation(
    cluster: Cluster, subject: str
) -> None:
    subject = subject.format(p=cluster.prefix)
    worker = await cluster.worker("n1", cluster.store.issue("n1"))
    got: list[Msg] = []

    async def cb(msg: Msg) -> None:
        got.append(msg)

    await worker.nc.subscribe(subject, cb=cb)
    await worker.nc.flush()
    await until(lambda: bool(worker.violations()), what="the permission violation")
    expected = f'nats: permissions violation for subscription to "{subject.lower()}"'
    assert worker.violations() == [expected]
    concrete = subject.replace("*", "n2").replace(">", "x") if subject != ">" else "x"
    await cluster.frontend.nc.publish(concrete, b"{}")
    await cluster.frontend.flush()
    await worker.nc.flush()
    assert got == []


async def test_forged_loaded_event_never_reaches_a_frontend(cluster: Cluster) -> None:
    s = cluster.subjects
    got = await collect(cluster.frontend, s.replica_events)
    await publish_until_seen(cluster.frontend.nc, s.replica_events, got, b"before")
    worker = await cluster.worker("n1", cluster.store.issue("n1"))
    forged = ReplicaEvent(kind="loaded", model="m", index=0, node_id="n1", address="evil:1")
    for _ in range(20):
        await worker.nc.publish(s.replica_events, forged.model_dump_json().encode())
    await worker.nc.flush()
    await until(lambda: len(worker.violations()) == 20, what="20 violations")
    await publish_until_seen(cluster.frontend.nc, s.replica_events, got, b"after")
    assert {m.data for m in got} == {b"before", b"after"}
    assert not [m for m in got if decode(m.data, ReplicaEvent) is not None]


# --- admission --------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["wrong secret", "unknown node", "no credentials"])
async def test_bad_worker_credentials_are_refused_at_once(cluster: Cluster, case: str) -> None:
    cluster.store.issue("n1")
    creds = {
        "wrong secret": cluster.creds("n1", "not-the-secret"),
        "unknown node": cluster.creds("n9", "whatever"),
        "no credentials": NatsCredentials(),
    }[case]
    began = time.monotonic()
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await connect(cluster.server.url, creds)
    took = time.monotonic() - began
    if case == "no credentials":  # no cluster owns an anonymous client: the auth timeout
        assert took >= AUTH_TIMEOUT - 0.1
    else:
        assert took < PROMPT, f"refused after {took:.2f}s, not by the callout's answer"


async def test_two_clusters_share_one_server(
    make_cluster: Callable[[str], Any], nats_prefix: str
) -> None:
    a: Cluster = await make_cluster(nats_prefix + "a")
    b: Cluster = await make_cluster(nats_prefix + "b")
    secret_a, secret_b = a.store.issue("n1"), b.store.issue("n1")
    wa = await a.worker("n1", secret_a)
    wb = await b.worker("n1", secret_b)
    assert wa.nc.is_connected and wb.nc.is_connected
    assert a.store.checks == 1 and b.store.checks == 1  # each cluster checked only its own
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await connect(a.server.url, a.creds("n1", secret_b))
    # a's worker cannot reach b's node subjects
    await wa.nc.subscribe(b.subjects.node_all("n1"))
    await wa.nc.flush()
    await until(lambda: bool(wa.violations()), what="the cross-cluster violation")


# --- revocation and rotation ------------------------------------------------------------------
# A kicked client that keeps reconnecting is refused each time, and nats-py (2.16) leaves the
# socket of every refused reconnect attempt unclosed (it reuses its transport object without
# closing the old stream): the ResourceWarnings that garbage collection then raises are that
# leak, not ours. Corral's worker must stop reconnecting once refused (it registers again).
leaky_reconnects = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@leaky_reconnects
async def test_revoked_credentials_stop_working(cluster: Cluster) -> None:
    secret = cluster.store.issue("n1")
    worker = await cluster.worker("n1", secret, reconnect=True)
    bystander = await cluster.worker("n2", cluster.store.issue("n2"), reconnect=True)
    revoked = cluster.store.revoke("n1")
    began = time.monotonic()
    assert await cluster.sessions.revoke("n1", revoked) == 1
    await until(lambda: worker.disconnects >= 1, timeout=5, what="the kick")
    cut = time.monotonic() - began
    assert cut < PROMPT, f"the existing connection was cut after {cut:.2f}s"
    # it keeps trying to reconnect, and every attempt is refused
    await until(
        lambda: any("Authorization Violation" in str(e) for e in worker.errors),
        what="a refused reconnect",
    )
    assert not worker.nc.is_connected
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await connect(cluster.server.url, cluster.creds("n1", secret))
    assert bystander.nc.is_connected and bystander.disconnects == 0


@leaky_reconnects
async def test_rotation_refuses_the_old_credentials(cluster: Cluster) -> None:
    old_secret = cluster.store.issue("n1")
    old = await cluster.worker("n1", old_secret, reconnect=True)
    old_digest = cluster.store.digests["n1"]
    new_secret = cluster.store.issue("n1")  # the node registers again
    new = await cluster.worker("n1", new_secret, reconnect=True)
    assert await cluster.sessions.revoke("n1", old_digest) == 1
    await until(lambda: old.disconnects >= 1, timeout=5, what="the kick of the old session")
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await connect(cluster.server.url, cluster.creds("n1", old_secret))
    # the second sweep runs and leaves the new credential's connection alone
    await until(lambda: not cluster.sessions._sweeps, timeout=10, what="the second sweep")
    assert new.nc.is_connected and new.disconnects == 0


@leaky_reconnects
async def test_second_sweep_kicks_a_connection_admitted_during_revocation(
    cluster: Cluster,
) -> None:
    secret = cluster.store.issue("n1")
    checking = asyncio.Event()
    release = asyncio.Event()
    plain_verify = cluster.store.verify

    async def slow_verify(node_id: str, given: str) -> str | None:
        verdict = await plain_verify(node_id, given)  # checked before the revocation
        checking.set()
        await release.wait()
        return verdict

    await cluster.callout.stop()  # a responder whose check is slow takes over
    callout = AuthCallout(cluster.frontend, cluster.server.keys.issuer, slow_verify)
    await callout.start()
    try:
        connecting = asyncio.create_task(cluster.worker("n1", secret, reconnect=True))
        await asyncio.wait_for(checking.wait(), 5)
        digest = cluster.store.revoke("n1")
        assert await cluster.sessions.revoke("n1", digest) == 0  # not connected yet
        release.set()
        late = await connecting
        assert late.nc.is_connected
        await until(lambda: late.disconnects >= 1, timeout=10, what="the second sweep's kick")
    finally:
        release.set()
        await callout.stop()

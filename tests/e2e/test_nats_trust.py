"""NATS credentials per role in a real cluster (frontend and worker processes, the auth callout
on a real nats-server): what a registering worker receives lets it act only as itself, and
stops working when its node is deleted.
"""

from __future__ import annotations

import httpx
import nats.errors
import pytest

from cluster import TOKEN, Cluster, wait_for
from corral.bus.client import Bus
from corral.bus.messages import ReplicaEvent
from corral.bus.natsauth import worker_credentials
from natsauth_infra import AuthNats, collect, connect, publish_until_seen, until

pytestmark = pytest.mark.timeout(180)


def register(cluster: Cluster, name: str) -> dict[str, str]:
    """What `POST /api/nodes/register` hands a worker holding the cluster token."""
    reply = httpx.post(
        cluster.url() + "/api/nodes/register",
        json={"name": name, "address": "127.0.0.1", "backends": ["sim"]},
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=10,
    )
    assert reply.status_code == 200, reply.text
    body: dict[str, str] = reply.json()
    return body


async def test_a_worker_credential_reaches_only_its_node_and_dies_with_it(
    cluster: Cluster, cluster_nats: AuthNats
) -> None:
    cluster.start_frontend()
    cluster.start_worker("w1")  # a real worker: it connected through the callout
    w1 = cluster.node("w1")
    assert w1 is not None
    s = Bus(cluster_nats.url, prefix=cluster.nats_prefix).subjects
    observer = Bus(
        cluster_nats.url,
        prefix=cluster.nats_prefix,
        credentials=cluster_nats.keys.frontend_credentials(),
    )
    await observer.connect()
    try:
        events = await collect(observer, s.replica_events)
        await publish_until_seen(observer.nc, s.replica_events, events, b"before")

        reply = register(cluster, "intruder")
        node_id, secret = reply["node_id"], reply["nats_credential"]
        assert secret and secret != reply["credential"]
        creds = worker_credentials(cluster.nats_prefix, node_id, secret)
        intruder = await connect(cluster_nats.url, creds, reconnect=True)

        # its own progress subject works: the frontends hear it
        progress = await collect(observer, s.all_install_progress)
        await intruder.nc.publish(s.install_progress(node_id), b"{}")
        await intruder.nc.flush()
        await until(lambda: len(progress) == 1, what="the intruder's own progress")

        # a forged "loaded" event and another node's command subject: permission violations
        forged = ReplicaEvent(kind="loaded", model="m", index=0, node_id=w1["id"], address="x:1")
        await intruder.nc.publish(s.replica_events, forged.model_dump_json().encode())
        await intruder.nc.subscribe(s.replica_stop(w1["id"]))
        await intruder.nc.flush()
        await until(lambda: len(intruder.violations()) == 2, what="two permission violations")
        await publish_until_seen(observer.nc, s.replica_events, events, b"after")
        assert {m.data for m in events} == {b"before", b"after"}, "the forged event went nowhere"

        # the operator deletes the node: its connection is cut and its credential refused
        deleted = cluster.api("DELETE", f"/api/nodes/{node_id}")
        assert deleted == {"deleted": node_id, "name": "intruder"}
        await until(lambda: intruder.disconnects >= 1, timeout=10, what="the connection cut")
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await connect(cluster_nats.url, creds)
        await intruder.nc.close()

        # the real worker was never disturbed and still serves
        node = cluster.node("w1", status="healthy")
        assert node is not None and node["id"] == w1["id"]
        cluster.write_model("m", scheduling={"min_replicas": 1})
        wait_for(
            lambda: any(r["state"] == "loaded" for r in cluster.replicas("m")),
            timeout=60,
            what="a replica of m loaded on w1",
        )
    finally:
        await observer.close()


async def test_a_worker_whose_node_was_deleted_joins_again_with_a_new_credential(
    cluster: Cluster,
) -> None:
    cluster.start_frontend()
    worker = cluster.start_worker("w1")
    first = cluster.node("w1")
    assert first is not None
    cluster.api("DELETE", f"/api/nodes/{first['id']}")
    # its next heartbeat finds the node gone: it registers again and reconnects to NATS
    wait_for(lambda: cluster.node("w1", status="healthy"), timeout=30, what="w1 back")
    cluster.write_model("m", scheduling={"min_replicas": 1})
    wait_for(
        lambda: any(r["state"] == "loaded" for r in cluster.replicas("m")),
        timeout=60,
        what="a replica of m loaded after the rejoin (commands reach the new connection)",
    )
    assert worker.alive()
    kinds = [e["kind"] for e in cluster.api("GET", "/api/events")["events"]]
    assert "node.removed" in kinds, "the deletion is in the audit log"


async def test_registering_again_rotates_the_nats_credential(
    cluster: Cluster, cluster_nats: AuthNats
) -> None:
    cluster.start_frontend()
    first = register(cluster, "n")
    old = worker_credentials(cluster.nats_prefix, first["node_id"], first["nats_credential"])
    before = await connect(cluster_nats.url, old, reconnect=True)
    again = httpx.post(
        cluster.url() + "/api/nodes/register",
        json={
            "name": "n",
            "address": "127.0.0.1",
            "node_id": first["node_id"],
            "credential": first["credential"],
        },
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=10,
    ).json()
    assert again["node_id"] == first["node_id"]
    assert again["nats_credential"] not in (None, first["nats_credential"])
    await until(lambda: before.disconnects >= 1, timeout=10, what="the old connection cut")
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await connect(cluster_nats.url, old)
    new = worker_credentials(cluster.nats_prefix, first["node_id"], again["nats_credential"])
    after = await connect(cluster_nats.url, new)
    assert after.nc.is_connected
    await after.nc.close()
    await before.nc.close()

"""A key stored or deleted through one frontend changes every frontend's /v1 mode within
moments: the storing frontend broadcasts a hint, the others read the keys from PostgreSQL."""

from __future__ import annotations

import httpx
from harness import InProcessCluster

from corral.bus.messages import KeysChanged
from corral.frontend.app import CorralApp, build_api
from infra import apoll_until


async def test_a_key_stored_on_one_frontend_closes_v1_on_the_others(
    cluster: InProcessCluster,
) -> None:
    first = await cluster.frontend()
    second = await cluster.frontend()  # no loops run in-process: no resync would tell it
    app = CorralApp(first, build_api(first, manage_lifecycle=False))
    transport = httpx.ASGITransport(app=app)  # a loopback client: no admin key is configured
    async with httpx.AsyncClient(transport=transport, base_url="http://corral") as c:
        made = (await c.post("/api/keys", json={"name": "app", "models": ["m"]})).json()
        assert made["role"] == "inference"
        await apoll_until(
            lambda: not second.authorizer.inference_open, timeout=5, what="the key on the other"
        )
        headers = [(b"authorization", f"Bearer {made['key']}".encode())]
        grant = second.authorizer.inference(headers)
        assert grant is not None and grant.models == frozenset({"m"})

        # the hint carries nothing to believe: a forged one only makes a frontend read again
        await cluster.events.bus.publish(
            cluster.events.bus.subjects.key_events, KeysChanged(origin="forger")
        )
        assert (await c.delete(f"/api/keys/{made['id']}")).status_code == 200
        await apoll_until(
            lambda: second.authorizer.inference_open, timeout=5, what="the deletion on the other"
        )
    assert first.authorizer.inference_open

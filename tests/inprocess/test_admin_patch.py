"""PATCH changes only what it names (scheduling fields, node labels), PUT still replaces, and
the admin API takes a node's name wherever it takes its id."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import httpx
from harness import InProcessCluster, declare

from corral.domain.actions import RegisterNode
from corral.frontend.app import create_app
from corral.frontend.service import Frontend
from factories import model


@contextlib.asynccontextmanager
async def client(fe: Frontend) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client of `fe`'s whole app (admin API included), without sockets."""
    transport = httpx.ASGITransport(app=create_app(fe))
    async with httpx.AsyncClient(transport=transport, base_url="http://corral", timeout=30) as c:
        yield c


async def _node(fe: Frontend, node_id: str, name: str, labels: dict[str, str]) -> None:
    await fe.actuator.apply(
        RegisterNode(node_id, name, "127.0.0.1", "digest", labels, "80%", 0, ["sim"])
    )


async def test_patch_scheduling_changes_only_the_fields_given(cluster: InProcessCluster) -> None:
    fe = await cluster.frontend()
    spec = model("m", min_replicas=1, max_replicas=4, selector={"gpu": "a100"})
    await declare(fe, spec)
    async with client(fe) as c:
        answer = await c.patch("/api/models/m/scheduling", json={"max_replicas": 2})
        assert answer.status_code == 200, answer.text
        assert answer.json()["max_replicas"] == 2
        assert answer.json()["node_selector"] == {"gpu": "a100"}, "the selector stays"
        assert answer.json()["min_replicas"] == 1
        stored = fe.view.models["m"].scheduling
        assert (stored.max_replicas, dict(stored.node_selector)) == (2, {"gpu": "a100"})

        answer = await c.patch("/api/models/m/scheduling", json={"node_selector": {}})
        assert answer.json()["node_selector"] == {}
        assert answer.json()["max_replicas"] == 2

        # PUT keeps replace semantics: what it leaves out takes its default
        answer = await c.put("/api/models/m/scheduling", json={"max_replicas": 3})
        assert answer.json()["min_replicas"] == 0
        assert answer.json()["max_replicas"] == 3


async def test_patch_scheduling_rejects_bad_input_and_keeps_the_model(
    cluster: InProcessCluster,
) -> None:
    fe = await cluster.frontend()
    await declare(fe, model("m", min_replicas=1, max_replicas=4))
    async with client(fe) as c:
        for body, field in (
            ({"max_replica": 2}, "max_replica"),
            ({"min_replicas": 5}, "min_replicas 5 is above max_replicas 4"),
            ({"min_replicas": -1}, "min_replicas"),
        ):
            answer = await c.patch("/api/models/m/scheduling", json=body)
            assert answer.status_code == 400, answer.text
            assert answer.json()["error"]["code"] == "invalid_config"
            assert field in answer.json()["error"]["message"]
        missing = await c.patch("/api/models/nope/scheduling", json={"max_replicas": 1})
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "not_found"
    scheduling = (await fe.registry.models.get("m")).scheduling  # type: ignore[union-attr]
    assert (scheduling.min_replicas, scheduling.max_replicas) == (1, 4)


async def test_concurrent_scheduling_patches_all_count(cluster: InProcessCluster) -> None:
    fe = await cluster.frontend()
    await declare(fe, model("m"))
    async with client(fe) as c:
        answers = await asyncio.gather(
            c.patch("/api/models/m/scheduling", json={"max_replicas": 5}),
            c.patch("/api/models/m/scheduling", json={"scale_down_delay": 7}),
            c.patch("/api/models/m/scheduling", json={"spread_all": True}),
        )
    assert [a.status_code for a in answers] == [200, 200, 200]
    s = (await fe.registry.models.get("m")).scheduling  # type: ignore[union-attr]
    assert (s.max_replicas, s.scale_down_delay, s.spread_all) == (5, 7, True)


async def test_patch_labels_merges_and_null_removes_by_name_or_id(
    cluster: InProcessCluster,
) -> None:
    fe = await cluster.frontend()
    node_id = "0123456789abcdef0123456789abcdef"
    await _node(fe, node_id, "gpu-box", {"zone": "a", "gpu": "a100", "rack": "7"})
    async with client(fe) as c:
        answer = await c.patch(
            "/api/nodes/gpu-box/labels", json={"labels": {"zone": "b", "gpu": None, "new": ""}}
        )
        assert answer.status_code == 200, answer.text
        assert answer.json() == {
            "node_id": node_id,
            "name": "gpu-box",
            "labels": {"zone": "b", "rack": "7", "new": ""},
        }
        assert fe.view.nodes[node_id].labels == {"zone": "b", "rack": "7", "new": ""}

        answer = await c.patch(f"/api/nodes/{node_id}/labels", json={"labels": {"rack": None}})
        assert answer.json()["labels"] == {"zone": "b", "new": ""}

        # PUT keeps replace semantics
        answer = await c.put("/api/nodes/gpu-box/labels", json={"labels": {"only": "1"}})
        assert answer.status_code == 200, answer.text
        assert (await fe.registry.nodes.get(node_id)).labels == {"only": "1"}  # type: ignore[union-attr]

        too_long = await c.patch("/api/nodes/gpu-box/labels", json={"labels": {"k" * 256: "v"}})
        assert too_long.status_code == 400, too_long.text
        assert too_long.json()["error"]["code"] == "invalid_request"

    events = await fe.registry.audit.recent(10, kind="node.labels")
    assert events, "each label change is audited"
    assert f"gpu-box ({node_id})" in events[0]["message"], "the audit names the node by name"


async def test_concurrent_label_patches_all_count(cluster: InProcessCluster) -> None:
    fe = await cluster.frontend()
    await _node(fe, "id-1", "box", {})
    async with client(fe) as c:
        answers = await asyncio.gather(
            *(c.patch("/api/nodes/box/labels", json={"labels": {f"k{i}": "v"}}) for i in range(8))
        )
    assert {a.status_code for a in answers} == {200}
    labels = (await fe.registry.nodes.get("id-1")).labels  # type: ignore[union-attr]
    assert labels == {f"k{i}": "v" for i in range(8)}


async def test_nodes_by_name_everywhere_with_clear_errors(cluster: InProcessCluster) -> None:
    fe = await cluster.frontend()
    await _node(fe, "id-a", "box", {})
    async with client(fe) as c:
        node = await c.get("/api/nodes/box")
        assert node.status_code == 200, node.text
        assert node.json()["id"] == "id-a"
        drained = await c.post("/api/nodes/box/drain")
        assert drained.status_code == 200, drained.text
        assert drained.json()["name"] == "box"
        assert fe.view.nodes["id-a"].status.value == "draining"
        undrained = await c.post("/api/nodes/box/undrain")
        assert undrained.json() == {"node_id": "id-a", "name": "box", "status": "healthy"}
        again = await c.post("/api/nodes/box/undrain")
        assert again.status_code == 404
        assert "box (id-a) is not draining" in again.json()["error"]["message"]

        unknown = await c.post("/api/nodes/ghost/drain")
        assert unknown.status_code == 404
        assert "'ghost' not found" in unknown.json()["error"]["message"]

        await _node(fe, "id-b", "box", {})  # a second node by the same name
        shared = await c.patch("/api/nodes/box/labels", json={"labels": {"a": "1"}})
        assert shared.status_code == 409, shared.text
        assert "id-a" in shared.json()["error"]["message"]
        assert "id-b" in shared.json()["error"]["message"]
    events = await fe.registry.audit.recent(10, kind="node.draining")
    assert events[0]["message"] == "box (id-a)"

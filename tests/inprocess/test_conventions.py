"""Conventions OpenAI clients and tools rely on: `/health`, API docs that work offline, and a
`/v1/models` with a real `created`, an `owned_by`, and models that cannot run said so."""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import AsyncIterator

import httpx
from harness import InProcessCluster, declare

from corral.frontend.app import CorralApp, build_api
from corral.frontend.service import Frontend
from factories import model
from infra import apoll_until

#: Every URL an HTML page makes the browser fetch (attributes, CSS url(), bare hosts).
REFERENCE = re.compile(r"""(?:src|href|spec-url)\s*=\s*["']([^"']*)["']|url\(\s*['"]?([^)'"]+)""")


@contextlib.asynccontextmanager
async def http(fe: Frontend) -> AsyncIterator[httpx.AsyncClient]:
    """A client of `fe`'s whole application (no sockets, no lifespan)."""
    app = CorralApp(fe, build_api(fe, manage_lifecycle=False))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://corral") as c:
        yield c


async def test_health_answers_like_healthz(cluster: InProcessCluster) -> None:
    fe = await cluster.frontend()
    async with http(fe) as c:
        health, healthz = await c.get("/health"), await c.get("/healthz")
    assert health.status_code == healthz.status_code == 200
    assert health.json() == healthz.json()
    assert health.json()["frontend_id"] == fe.id


async def test_docs_and_redoc_load_only_from_this_frontend(cluster: InProcessCluster) -> None:
    fe = await cluster.frontend()
    async with http(fe) as c:
        for page in ("/docs", "/redoc"):
            answer = await c.get(page)
            assert answer.status_code == 200
            html = answer.text
            assert "http://" not in html and "https://" not in html, f"{page} names a host"
            references = [a or b for a, b in REFERENCE.findall(html)]
            assert len(references) >= 2, references
            for url in references:
                assert url.startswith("/") and not url.startswith("//"), (page, url)
                asset = await c.get(url)
                assert asset.status_code == 200, (page, url)
                if url.endswith(".js"):
                    assert len(asset.content) > 100_000, f"{url} is the real bundle"
        schema = await c.get("/openapi.json")
        assert schema.status_code == 200 and "/api/models" in schema.json()["paths"]


async def test_models_list_their_declaration_time_and_whether_they_can_run(
    cluster: InProcessCluster,
) -> None:
    fe = await cluster.frontend()
    began = time.time()
    await declare(fe, model("sim-model"))
    await declare(fe, model("gpu-model", backend="vllm"))  # a GPU backend, on CPU nodes only
    async with http(fe) as c:
        (first, second) = (await c.get("/v1/models")).json()["data"]
        assert first["id"] == "gpu-model" and second["id"] == "sim-model"
        for card in (first, second):
            assert card["object"] == "model" and card["owned_by"] == "corral"
            assert began - 5 <= card["created"] <= time.time() + 5
            assert card["available"] is False
            assert card["reason"] == "no worker node has joined"

        await cluster.worker(fe, "n1")  # a CPU node: it runs sim, not vllm
        cards = {m["id"]: m for m in (await c.get("/v1/models")).json()["data"]}
        assert cards["sim-model"]["available"] is True and "reason" not in cards["sim-model"]
        assert cards["gpu-model"]["available"] is False, "listed, and said to be unable to run"
        assert "backend vllm is not available" in cards["gpu-model"]["reason"]

        one = await c.get("/v1/models/gpu-model")
        assert one.status_code == 200 and one.json() == cards["gpu-model"]
        created = cards["sim-model"]["created"]
        await declare(fe, model("sim-model", options={"tokens": 3}))  # a change, not a birth
        again = (await c.get("/v1/models/sim-model")).json()
        assert again["created"] == created


async def test_readyz_says_ready_only_once_requests_can_be_served(
    cluster: InProcessCluster,
) -> None:
    fe = await cluster.frontend()
    async with http(fe) as c:
        alive, ready = await c.get("/healthz"), await c.get("/readyz")
        assert alive.status_code == 200, "alive from the start"
        assert ready.status_code == 503
        assert ready.json() | {"frontend_id": ""} == {
            "status": "not_ready",
            "frontend_id": "",
            "started": False,
            "leader": False,
            "healthy_nodes": 0,
        }
        await cluster.worker(fe, "n1")
        fe.run_loops()  # the reconciler takes the lead

        async def ready_now() -> bool:
            return (await c.get("/readyz")).status_code == 200

        await apoll_until(ready_now, timeout=10, what="/readyz to say ready")
        body = (await c.get("/readyz")).json()
    assert (body["status"], body["leader"], body["healthy_nodes"]) == ("ready", True, 1)

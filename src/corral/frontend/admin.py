"""Operator API under /api: models, scheduling, nodes, labels, replicas, loads and the audit log.

Handlers are thin: validate, read the registry, and turn every change into an action for the
actuator (API keys and backend installs are not cluster state: their stores write them).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Request
from pydantic import BaseModel, Field, StringConstraints

from corral.domain.access import Role
from corral.domain.actions import (
    PatchNodeLabels,
    PatchScheduling,
    RemoveModel,
    RemoveNode,
    SetNodeLabels,
    SetScheduling,
    StopReplica,
    UndrainNode,
    UpsertModel,
)
from corral.domain.entities import ModelSpec, Node, NodeStatus
from corral.domain.sizes import INT32_MAX
from corral.errors import BadRequest, Conflict, NotFound
from corral.frontend.model_view import model_detail, model_json, models_json, replica_json
from corral.frontend.nodes_api import frontend_of
from corral.frontend.service import Frontend
from corral.frontend.storable import storable
from corral.modelfile import SchedulingDecl, parse_model
from corral.store.models import scheduling_to_row


def require_admin(request: Request) -> None:
    frontend_of(request).authorizer.admin(request.scope)


class KeyBody(BaseModel):
    name: str = Field(min_length=1, max_length=255)
    role: Role = Role.INFERENCE  # an admin key only when asked for
    models: list[Annotated[str, StringConstraints(min_length=1, max_length=255)]] | None = Field(
        default=None, max_length=1000
    )  # None: every model


Label = Annotated[str, StringConstraints(max_length=255)]


class LabelsBody(BaseModel):
    """PUT: the node's labels, all of them."""

    labels: dict[Annotated[Label, StringConstraints(min_length=1)], Label] = Field(
        default_factory=dict, max_length=1000
    )


class LabelsPatch(BaseModel):
    """PATCH: labels to set, and to remove (a null value); the others stay."""

    labels: dict[Annotated[Label, StringConstraints(min_length=1)], Label | None] = Field(
        default_factory=dict, max_length=1000
    )


def node_json(node: Node) -> dict[str, Any]:
    r = node.resources
    return {
        "id": node.id,
        "name": node.name,
        "status": node.status.value,
        "address": node.address,
        "labels": dict(node.labels),
        "memory_budget": str(node.memory_budget),
        "max_replicas_per_model": node.max_replicas_per_model,
        "backends": sorted(node.backends),
        "last_heartbeat": node.last_heartbeat,
        "resources": {
            "cpu_count": r.cpu_count,
            "ram_total": r.ram_total,
            "ram_free": r.ram_free,
            "disk_free": r.disk_free,
            "gpus": [
                {
                    "index": g.index,
                    "name": g.name,
                    "memory_total": g.memory_total,
                    "memory_free": g.memory_free,
                }
                for g in r.gpus
            ],
        },
    }


def scheduling_json(spec: ModelSpec) -> dict[str, Any]:
    return scheduling_to_row(spec.scheduling)


def admin_router() -> APIRouter:
    router = APIRouter(
        prefix="/api", tags=["admin"], dependencies=[Depends(require_admin), Depends(storable)]
    )

    # --- models -------------------------------------------------------------------------
    @router.get("/models")
    async def list_models(request: Request) -> dict[str, Any]:
        fe = frontend_of(request)
        errors = fe.models_dir.errors_json() if fe.models_dir is not None else []
        return {"models": await models_json(fe, await fe.registry.models.all()), "errors": errors}

    @router.get("/models/{name:path}/scheduling")
    async def get_scheduling(name: str, request: Request) -> dict[str, Any]:
        spec = await _model(frontend_of(request), name)
        return scheduling_json(spec)

    @router.put("/models/{name:path}/scheduling")
    async def put_scheduling(name: str, body: SchedulingDecl, request: Request) -> dict[str, Any]:
        fe = frontend_of(request)
        await fe.actuator.apply(SetScheduling(name, body.to_domain()))
        return scheduling_json(await _model(fe, name))

    @router.patch("/models/{name:path}/scheduling")
    async def patch_scheduling(name: str, body: dict[str, Any], request: Request) -> dict[str, Any]:
        """Change only the fields given; the others keep their values."""
        fe = frontend_of(request)
        await fe.actuator.apply(PatchScheduling(name, body))
        return scheduling_json(await _model(fe, name))

    @router.get("/models/{name:path}")
    async def get_model(name: str, request: Request) -> dict[str, Any]:
        fe = frontend_of(request)
        return await model_detail(fe, await _model(fe, name))

    @router.put("/models/{name:path}")
    async def put_model(name: str, body: dict[str, Any], request: Request) -> dict[str, Any]:
        fe = frontend_of(request)
        spec = parse_model({**body, "name": name}, path="PUT /api/models")
        narrowed = fe.catalog.check_capabilities(spec)
        if narrowed:
            raise BadRequest(narrowed, param="capabilities")
        problem = fe.catalog.check_model(spec)
        if problem and not any(spec.backend in n.backends for n in fe.view.nodes.values()):
            raise BadRequest(problem, param="backend")
        await fe.actuator.apply(UpsertModel(spec, "api"))
        return model_json(await _model(fe, name))

    @router.delete("/models/{name:path}")
    async def delete_model(name: str, request: Request) -> dict[str, Any]:
        fe = frontend_of(request)
        await _model(fe, name)
        await fe.actuator.apply(RemoveModel(name))
        return {"deleted": name}

    # --- admission ----------------------------------------------------------------------
    @router.get("/queues")
    async def list_queues(request: Request) -> dict[str, Any]:
        """Per model: its replica limit, in-flight counts, and the wait queues (this
        frontend's, and the depth and longest wait across every frontend)."""
        fe = frontend_of(request)
        local = fe.admission.queues()
        out = {}
        for name, spec in sorted(fe.view.models.items()):
            replicas = fe.view.candidates(name)
            out[name] = {
                "max_concurrency": fe.admission.limit(spec),
                "inflight": {str(r.index): fe.inflight.total(r.key) for r in replicas},
                "queued": fe.inflight.queued(name),
                "queue_wait": round(fe.inflight.queue_wait(name), 3),
                "local": local.get(name),
            }
        return {"queues": out}

    # --- nodes --------------------------------------------------------------------------
    @router.get("/nodes")
    async def list_nodes(request: Request) -> dict[str, Any]:
        fe = frontend_of(request)
        return {"nodes": [node_json(n) for n in await fe.registry.nodes.all()]}

    @router.get("/nodes/{ref}")
    async def get_node(ref: str, request: Request) -> dict[str, Any]:
        fe = frontend_of(request)
        node = await find_node(fe, ref)
        out = node_json(node)
        out["replicas"] = [
            replica_json(r, fe) for r in await fe.registry.replicas.all() if r.node_id == node.id
        ]
        out["processes"] = await fe.registry.nodes.processes(node.id)
        return out

    @router.put("/nodes/{ref}/labels")
    async def put_labels(ref: str, body: LabelsBody, request: Request) -> dict[str, Any]:
        """Replace all of the node's labels."""
        fe = frontend_of(request)
        node = await find_node(fe, ref)
        await fe.actuator.apply(SetNodeLabels(node.id, body.labels))
        return {"node_id": node.id, "name": node.name, "labels": body.labels}

    @router.patch("/nodes/{ref}/labels")
    async def patch_labels(ref: str, body: LabelsPatch, request: Request) -> dict[str, Any]:
        """Set the labels given a value, remove those given null; the others stay."""
        fe = frontend_of(request)
        node = await find_node(fe, ref)
        labels = await fe.actuator.apply(PatchNodeLabels(node.id, body.labels))
        return {"node_id": node.id, "name": node.name, "labels": labels}

    @router.delete("/nodes/{ref}")
    async def delete_node(ref: str, request: Request) -> dict[str, Any]:
        """Forget the node: its row and replica rows go, its HTTP and NATS credentials stop
        working at once (its NATS connections are cut). Drain it first to move its replicas;
        a worker still running there can join again only with the cluster token."""
        fe = frontend_of(request)
        node = await find_node(fe, ref)
        if not await fe.actuator.apply(RemoveNode(node.id)):
            raise NotFound(f"node {ref!r} not found")
        return {"deleted": node.id, "name": node.name}

    @router.post("/nodes/{ref}/drain")
    async def drain_node(ref: str, request: Request, wait: bool = True) -> dict[str, Any]:
        fe = frontend_of(request)
        node = await find_node(fe, ref)
        reply = await fe.drainer.request(node.id, wait=wait)
        return {**reply.model_dump(exclude_none=True), "name": node.name}

    @router.post("/nodes/{ref}/undrain")
    async def undrain_node(ref: str, request: Request) -> dict[str, Any]:
        fe = frontend_of(request)
        node = await find_node(fe, ref)
        await fe.actuator.apply(UndrainNode(node.id))
        return {"node_id": node.id, "name": node.name, "status": "healthy"}

    # --- backend installs ---------------------------------------------------------------
    @router.get("/nodes/{ref}/backends")
    async def node_backends(ref: str, request: Request) -> dict[str, Any]:
        fe = frontend_of(request)
        node = await find_node(fe, ref)
        return {
            "node_id": node.id,
            "name": node.name,
            "backends": await fe.installs.status(node.id, sorted(node.backends)),
        }

    @router.post("/nodes/{ref}/backends/{backend}/install")
    async def install_backend(
        ref: str, backend: str, request: Request, force: bool = False, upgrade: bool = False
    ) -> dict[str, Any]:
        fe = frontend_of(request)
        node = await find_node(fe, ref)
        started = fe.installs.request(node, backend, force=force, upgrade=upgrade)
        await fe.registry.audit.add(
            "backend.upgrade" if upgrade else "backend.install",
            f"{backend} on {node.name} ({node.id})",
            subject=node.id,
        )
        return started

    # --- replicas and loads -----------------------------------------------------------
    @router.get("/replicas")
    async def list_replicas(request: Request) -> dict[str, Any]:
        fe = frontend_of(request)
        return {"replicas": [replica_json(r, fe) for r in await fe.registry.replicas.all()]}

    @router.delete("/replicas/{model:path}/{index}")
    async def stop_replica(
        model: str, index: Annotated[int, Path(ge=0, le=INT32_MAX)], request: Request
    ) -> dict[str, Any]:
        fe = frontend_of(request)
        replica = await fe.registry.replicas.get(model, index)
        if replica is None:
            raise NotFound(f"replica {model}#{index} not found")
        stopped = await fe.actuator.apply(StopReplica.of(replica, "stopped by operator"))
        return {"model": model, "index": index, "stopped": stopped}

    @router.get("/loads")
    async def list_loads(request: Request) -> dict[str, Any]:
        fe = frontend_of(request)
        jobs = await fe.registry.jobs.all()
        return {
            "jobs": [{"model": j.model, "owner": j.owner, **j.as_progress()} for j in jobs],
            "progress": {m: p.model_dump() for m, p in fe.view.progress.items()},
        }

    # --- API keys -------------------------------------------------------------------------
    @router.get("/keys")
    async def list_keys(request: Request) -> dict[str, Any]:
        return {"keys": await frontend_of(request).registry.audit.list_api_keys()}

    @router.post("/keys")
    async def create_key(body: KeyBody, request: Request) -> dict[str, Any]:
        """Create an API key; the secret is shown once, only its digest is stored."""
        fe = frontend_of(request)
        if body.role is Role.ADMIN and body.models is not None:
            raise BadRequest("an admin key cannot be limited to models", param="models")
        key_id, secret = await fe.registry.audit.create_api_key(body.name, body.role, body.models)
        await fe.keys_changed()
        await fe.registry.audit.add(
            "apikey.created", f"{key_id} ({body.name}, {body.role.value})", subject=key_id
        )
        return {
            "id": key_id,
            "name": body.name,
            "role": body.role.value,
            "models": body.models,
            "key": secret,
        }

    @router.delete("/keys/{key_id}")
    async def delete_key(key_id: str, request: Request) -> dict[str, Any]:
        fe = frontend_of(request)
        if not await fe.registry.audit.delete_api_key(key_id):
            raise NotFound(f"API key {key_id} not found")
        await fe.keys_changed()
        await fe.registry.audit.add("apikey.deleted", key_id)
        return {"deleted": key_id}

    @router.get("/events")
    async def list_events(
        request: Request, limit: int = 100, after: int | None = None
    ) -> dict[str, Any]:
        """The newest events first; with `after` (an event id), those after it, oldest first."""
        fe = frontend_of(request)
        limit = min(max(limit, 1), 1000)
        if after is not None:
            return {"events": await fe.registry.audit.after(after, limit)}
        return {"events": await fe.registry.audit.recent(limit)}

    return router


async def _model(fe: Frontend, name: str) -> ModelSpec:
    spec = await fe.registry.models.get(name)
    if spec is None:
        raise NotFound(f"model {name!r} not found", param="name")
    return spec


async def find_node(fe: Frontend, ref: str) -> Node:
    """The node whose id, or else whose name, is `ref`. A name shared by several nodes picks
    the one not offline; if that is still more than one, Conflict lists their ids."""
    found = await fe.registry.nodes.find(ref)
    for node in found:
        if node.id == ref:
            return node
    if not found:
        raise NotFound(f"node {ref!r} not found (neither a node id nor a node name)")
    live = [n for n in found if n.status != NodeStatus.OFFLINE]
    if len(found) == 1 or len(live) == 1:
        return live[0] if live else found[0]
    ids = ", ".join(n.id for n in (live or found))
    raise Conflict(f"node name {ref!r} is shared by nodes {ids}: give a node id")

"""Worker-facing API: registration with the cluster token, heartbeats with a per-node credential.

A node's credential lets it act only as itself: a heartbeat for another node's id with a
valid credential is 403, an unknown or missing credential 401.
"""

from __future__ import annotations

import hmac
import secrets
import time
import uuid

from fastapi import APIRouter, Depends, Request

from corral.bus.contracts import (
    DeregisterReply,
    DrainReply,
    ExitReply,
    ExitReport,
    HeartbeatReply,
    HeartbeatRequest,
    RegisterReply,
    RegisterRequest,
)
from corral.domain.actions import DeregisterNode, RecordHeartbeat, RegisterNode, ReplicaExited
from corral.domain.sizes import MemoryBudget
from corral.errors import BadRequest, Forbidden, NotFound, Unauthorized
from corral.frontend.auth import bearer, digest
from corral.frontend.service import Frontend
from corral.frontend.storable import storable


def frontend_of(request: Request) -> Frontend:
    fe: Frontend = request.app.state.frontend
    return fe


def node_router() -> APIRouter:
    router = APIRouter(prefix="/api/nodes", tags=["nodes"], dependencies=[Depends(storable)])

    @router.post("/register")
    async def register(body: RegisterRequest, request: Request) -> RegisterReply:
        fe = frontend_of(request)
        expected = fe.settings.token
        token = bearer(request.scope)
        if expected is None:
            raise Forbidden("this frontend accepts no workers: start it with --token")
        if token is None or not hmac.compare_digest(
            token.encode(), expected.get_secret_value().encode()
        ):
            raise Unauthorized("invalid registration token")
        try:
            MemoryBudget.parse(body.memory_budget)
        except ValueError as exc:
            raise BadRequest(str(exc), param="memory_budget") from None
        issued: str | None = None
        node_id = body.node_id
        if node_id is not None:
            stored = await fe.registry.nodes.token_hash(node_id)
            if stored is not None:
                if body.credential is None or not hmac.compare_digest(
                    digest(body.credential).encode(), stored.encode()
                ):
                    raise Forbidden(f"node id {node_id} belongs to another node")
                token_hash = stored
            elif body.credential:
                token_hash = digest(body.credential)
            else:
                issued = secrets.token_urlsafe(32)
                token_hash = digest(issued)
        else:
            node_id = uuid.uuid4().hex
            issued = secrets.token_urlsafe(32)
            token_hash = digest(issued)
        nats = fe.nats.issue()  # a new NATS secret at every registration: the old one is revoked
        await fe.actuator.apply(
            RegisterNode(
                node_id=node_id,
                name=body.name,
                address=body.address,
                token_hash=token_hash,
                labels=body.labels,
                memory_budget=body.memory_budget,
                max_replicas_per_model=body.max_replicas_per_model,
                backends=body.backends,
                nats_credential_hash=nats[1] if nats else None,
            )
        )
        return RegisterReply(
            node_id=node_id,
            credential=issued,
            nats_credential=nats[0] if nats else None,
            nats_url=fe.settings.public_nats_url or fe.settings.nats_url,
            nats_prefix=fe.settings.nats_prefix,
            heartbeat_interval=fe.settings.heartbeat_interval,
        )

    @router.post("/{node_id}/heartbeat")
    async def heartbeat(node_id: str, body: HeartbeatRequest, request: Request) -> HeartbeatReply:
        fe = frontend_of(request)
        await authenticate_node(fe, request, node_id)
        status = await fe.actuator.apply(
            RecordHeartbeat(
                node_id=node_id,
                resources=body.resources,
                processes=[p.model_dump() for p in body.processes],
                backends=body.backends,
                artifacts=body.artifacts,
                installs=body.installs,
                at=time.time(),
            )
        )
        return HeartbeatReply(
            node_id=node_id, status=status.value, heartbeat_interval=fe.settings.heartbeat_interval
        )

    @router.post("/{node_id}/replica-exited")
    async def replica_exited(node_id: str, body: ExitReport, request: Request) -> ExitReply:
        """A node reports that one of its own backends died; only that exact row goes."""
        fe = frontend_of(request)
        await authenticate_node(fe, request, node_id)
        exited = ReplicaExited(
            body.model, body.index, node_id, body.address, body.returncode, body.log_tail
        )
        removed = await fe.actuator.apply(exited)
        return ExitReply(removed=removed)

    @router.post("/{node_id}/self-drain", response_model_exclude_none=True)
    async def self_drain(node_id: str, request: Request) -> DrainReply:
        """A worker about to stop asks to have its replicas moved away first."""
        fe = frontend_of(request)
        await authenticate_node(fe, request, node_id)
        return await fe.drainer.request(node_id, wait=False)

    @router.post("/{node_id}/deregister")
    async def deregister(node_id: str, request: Request) -> DeregisterReply:
        """A worker leaving cleanly: offline now, its replica rows removed."""
        fe = frontend_of(request)
        await authenticate_node(fe, request, node_id)
        removed = await fe.actuator.apply(DeregisterNode(node_id))
        return DeregisterReply(node_id=node_id, removed_replicas=removed)

    return router


async def require_node(request: Request) -> str:
    """A FastAPI dependency: the caller is a registered node (its own credential)."""
    fe = frontend_of(request)
    credential = bearer(request.scope)
    if credential is None:
        raise Unauthorized("missing node credential")
    node_id = await fe.registry.nodes.id_by_token_hash(digest(credential))
    if node_id is None:
        raise Unauthorized("invalid node credential")
    return node_id


async def authenticate_node(fe: Frontend, request: Request, node_id: str) -> None:
    """Allow only the node's own credential; another node's credential is 403."""
    credential = bearer(request.scope)
    if credential is None:
        raise Unauthorized("missing node credential")
    stored = await fe.registry.nodes.token_hash(node_id)
    given = digest(credential)
    if stored is not None and hmac.compare_digest(given.encode(), stored.encode()):
        return
    owner = await fe.registry.nodes.id_by_token_hash(given)
    if owner is not None and owner != node_id:
        raise Forbidden("this credential belongs to another node")
    if stored is None:
        raise NotFound(f"node {node_id} is not registered")
    raise Unauthorized("invalid node credential")

"""The worker<->frontend HTTP contract: bodies of the `/api/nodes/...` calls, shared by both sides.

The frontend's node API (`corral.frontend.nodes_api`) validates requests and answers with these
models; the worker's client (`corral.worker.control`) sends and parses the same models. New
fields get defaults, so a newer frontend and an older worker still understand each other.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, Field, StringConstraints

from corral.bus.messages import ProcessInfo
from corral.domain.sizes import INT32_MAX

Label = Annotated[str, StringConstraints(max_length=255)]  # a label key or value as stored


class RegisterRequest(BaseModel):
    """POST /api/nodes/register (bearer: the cluster token)."""

    name: str = Field(min_length=1, max_length=255)
    address: str = Field(min_length=1, max_length=255)  # host the node's backends listen on
    labels: dict[Label, Label] = Field(default_factory=dict, max_length=1000)
    memory_budget: str = Field(default="80%", max_length=32)
    max_replicas_per_model: int = Field(default=0, ge=0, le=INT32_MAX)
    backends: list[str] = Field(default_factory=list)
    node_id: str | None = Field(default=None, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    credential: str | None = None  # the saved credential of `node_id`, when re-registering


class RegisterReply(BaseModel):
    node_id: str
    credential: str | None = None  # only when a new credential was issued
    # the node's NATS password (user `<prefix>.node.<node id>`), new at every registration;
    # None when the cluster's NATS checks no credentials
    nats_credential: str | None = None
    nats_url: str
    nats_prefix: str
    heartbeat_interval: float


class HeartbeatRequest(BaseModel):
    """POST /api/nodes/{id}/heartbeat (bearer: the node's credential)."""

    resources: dict[str, Any] = Field(default_factory=dict)  # `messages.resources_to_wire`
    processes: list[ProcessInfo] = Field(default_factory=list)  # starts under way included
    backends: list[str] = Field(default_factory=list)  # backends this node can run
    artifacts: list[str] = Field(default_factory=list)  # artifacts it holds
    installs: dict[str, dict[str, Any]] = Field(default_factory=dict)  # backend -> install state


class HeartbeatReply(BaseModel):
    node_id: str
    status: str
    heartbeat_interval: float


class ExitReport(BaseModel):
    """POST /api/nodes/{id}/replica-exited: one of the node's backends died on its own."""

    model: str
    index: int
    address: str | None = None
    returncode: int = 0
    log_tail: str = ""


class ExitReply(BaseModel):
    removed: bool  # whether a replica row matched (and is gone now)


class DrainReply(BaseModel):
    """The answer to POST /api/nodes/{id}/self-drain (and the operator's drain)."""

    node_id: str
    status: str  # "draining" (moving in the background) or "drained"
    stopped_replicas: int | None = None  # once drained


class DeregisterReply(BaseModel):
    """The answer to POST /api/nodes/{id}/deregister."""

    node_id: str
    removed_replicas: int

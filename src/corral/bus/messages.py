"""Wire messages carried over NATS; each has a schema version, and new fields get defaults."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from corral.domain.entities import Gpu, Resources

SCHEMA_VERSION = 1


class Message(BaseModel):
    """Base of every NATS payload; `v` lets a newer frontend and an older worker tell apart."""

    model_config = ConfigDict(extra="ignore")

    v: int = SCHEMA_VERSION


# --- node commands ------------------------------------------------------------------------


class StartReplicaCommand(Message):
    """Ask a node to start one backend process for (model, index)."""

    model: str
    index: int
    backend: str = Field(min_length=1)
    options: dict[str, Any] = Field(default_factory=dict)
    artifact: str | None = None
    artifact_url: str | None = None  # where to fetch a frontend-store artifact from
    artifact_digest: str | None = None
    artifact_size: int | None = None
    memory: int = 0
    ready_timeout: float = 900.0


class StartReplicaReply(Message):
    ok: bool
    address: str | None = None
    pid: int | None = None
    error: str | None = None


class StopReplicaCommand(Message):
    """Stop exactly one replica: its model, index and (when known) the address it serves on."""

    model: str
    index: int
    address: str | None = None


class StopReplicaReply(Message):
    ok: bool
    stopped: bool = False
    error: str | None = None


class ProcessInfo(BaseModel):
    """One backend process a worker runs, as it reports it."""

    model_config = ConfigDict(extra="ignore")

    model: str
    index: int
    backend: str
    address: str | None = None
    pid: int | None = None
    state: str = "ready"  # "starting" or "ready"
    started_at: float = 0.0


class ListReplicasCommand(Message):
    pass


class ListReplicasReply(Message):
    ok: bool = True
    processes: list[ProcessInfo] = Field(default_factory=list)


class InstallBackendCommand(Message):
    backend: str
    force: bool = False


class InstallBackendReply(Message):
    ok: bool
    state: str = "installed"
    error: str | None = None


# --- events -------------------------------------------------------------------------------


class ReplicaEvent(Message):
    """A replica changed: loaded, removed, failed or updated."""

    kind: Literal["loaded", "removed", "failed", "updated"]
    model: str
    index: int
    node_id: str | None = None
    address: str | None = None
    state: str | None = None
    memory: int = 0
    error: str | None = None
    origin: str | None = None  # id of the frontend that announced it
    revision: str = ""  # the spec revision the replica runs ("" = unknown)
    replaces: int | None = None  # the index of the older-revision replica it replaces


class NodeEvent(Message):
    """A node joined, changed status or labels, or left."""

    kind: Literal["joined", "updated", "status", "labels", "removed"]
    node_id: str
    origin: str | None = None


class ModelEvent(Message):
    """A model was declared, changed or removed."""

    kind: Literal["updated", "removed", "scheduling"]
    name: str
    origin: str | None = None


class LoadProgress(Message):
    """Progress of one model load, published while it runs and when it ends."""

    model: str
    state: Literal["placing", "evicting", "staging", "installing", "loading", "loaded", "failed"]
    phase: str | None = None
    percent: float | None = None
    node_id: str | None = None
    index: int | None = None
    error: str | None = None
    origin: str | None = None


class InstallProgress(Message):
    """Progress of a backend install on a node."""

    node_id: str
    backend: str
    state: Literal["resolving", "downloading", "installing", "installed", "failed"]
    percent: float | None = None
    error: str | None = None


class ModelLoad(BaseModel):
    """One frontend's load signals for one model (the autoscaler's inputs besides in-flight)."""

    model_config = ConfigDict(extra="ignore")

    model: str
    queued: int = 0  # requests waiting in this frontend's admission queue
    queue_wait: float = 0.0  # seconds the longest-waiting of them has waited
    ttft_p90: float | None = None  # 90th percentile of recent times to first byte, seconds


class LoadReport(Message):
    """One frontend's in-flight counts per replica, broadcast a few times a second."""

    frontend_id: str
    inflight: list[tuple[str, int, int]] = Field(default_factory=list)  # (model, index, count)
    at: float = 0.0
    models: list[ModelLoad] = Field(default_factory=list)  # per-model signals, when it has any


class PrefixReport(Message):
    """Prompt-prefix block hashes one frontend routed since its last report, per replica
    (`domain.prefix.PrefixBatch` on the wire), a few times a second while it routes."""

    origin: str = ""  # the frontend that routed them (its own echo is ignored)
    at: float = 0.0  # when the newest was routed (the sender's clock, seconds since the epoch)
    items: list[tuple[str, int, list[int]]] = Field(default_factory=list)  # (model, index, hashes)


class ResponseHomeEvent(Message):
    """A stored response (Responses API) and the replica that holds it; shared by frontends so
    a follow-up reaches that replica through any of them. Also the reply to a lookup."""

    origin: str = ""  # the frontend that recorded it
    id: str
    model: str
    index: int
    address: str
    at: float = 0.0  # when it was recorded (seconds since the epoch)


class ResponseLookup(Message):
    """Asks the frontends where the response `id` lives; only one that knows replies."""

    id: str


# --- resources as JSON (heartbeats and the registry) ----------------------------------


def resources_from_wire(data: Mapping[str, Any]) -> Resources:
    gpus = tuple(
        Gpu(
            index=int(g.get("index", i)),
            name=str(g.get("name", "")),
            memory_total=int(g.get("memory_total", 0)),
            memory_free=int(g.get("memory_free", 0)),
        )
        for i, g in enumerate(data.get("gpus") or [])
    )
    return Resources(
        cpu_count=int(data.get("cpu_count", 0)),
        ram_total=int(data.get("ram_total", 0)),
        ram_free=int(data.get("ram_free", 0)),
        disk_free=int(data.get("disk_free", 0)),
        gpus=gpus,
    )


def resources_to_wire(resources: Resources) -> dict[str, Any]:
    return {
        "cpu_count": resources.cpu_count,
        "ram_total": resources.ram_total,
        "ram_free": resources.ram_free,
        "disk_free": resources.disk_free,
        "gpus": [
            {
                "index": g.index,
                "name": g.name,
                "memory_total": g.memory_total,
                "memory_free": g.memory_free,
            }
            for g in resources.gpus
        ],
    }

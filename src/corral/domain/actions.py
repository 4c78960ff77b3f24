"""Every change to cluster state, as data: the actions deciders build and the actuator applies.

The reconcile plan, the cold path, the drainer, the health probes and the admin and node APIs
decide; `corral.frontend.actuator.Actuator.apply` is the only code that writes: the registry
row, this frontend's view, the event the other frontends follow and the audit entry of each
action happen there, in one place per action. Reports (`Report*`, `SetCooldown`,
`RecordUse`) write only the audit log, load progress or usage times.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from corral.domain.entities import ModelSpec, NodeStatus, Replica, ReplicaKey, Scheduling

#: The stages of one model load, as its progress events name them.
LoadState = Literal["placing", "evicting", "staging", "installing", "loading", "loaded", "failed"]

# --- replicas ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StartReplica:
    """Insert a row for (model, index) on the node, start it there and wait until it is loaded.

    `index` None takes the lowest free index. The replica runs the model's spec as it is when
    the start begins, and its row records that spec's revision; `replaces` names the index of
    an older-revision replica a rollout retires once this one is loaded.
    """

    model: str
    node_id: str
    index: int | None
    backend: str
    memory: int  # bytes the placement reserved
    reason: str
    replaces: int | None = None


@dataclass(frozen=True, slots=True)
class StopReplica:
    """Stop exactly this replica through its node, then delete its row."""

    model: str
    index: int
    node_id: str
    address: str | None
    reason: str

    @classmethod
    def of(cls, replica: Replica, reason: str) -> StopReplica:
        return cls(replica.model, replica.index, replica.node_id, replica.address, reason)


@dataclass(frozen=True, slots=True)
class DropReplica:
    """The replica turned out gone (self-heal, failed probes): delete its row now and stop its
    process in the background. Nothing happens when this frontend no longer routes to it."""

    model: str
    index: int
    node_id: str
    address: str | None
    reason: str

    @classmethod
    def of(cls, replica: Replica, reason: str) -> DropReplica:
        return cls(replica.model, replica.index, replica.node_id, replica.address, reason)


@dataclass(frozen=True, slots=True)
class MarkUnloading:
    """Take the replica out of routing on every frontend before it stops (a drain, a rollout
    or a scale-down of a busy replica); its in-flight requests finish."""

    model: str
    index: int
    node_id: str
    reason: str = ""

    @classmethod
    def of(cls, replica: Replica, reason: str) -> MarkUnloading:
        return cls(replica.model, replica.index, replica.node_id, reason)


@dataclass(frozen=True, slots=True)
class AdoptReplica:
    """Mark the starting row (model, index) LOADED at `address`: its process is ready, but the
    frontend that started it is gone and will never say so."""

    model: str
    index: int
    node_id: str
    address: str


@dataclass(frozen=True, slots=True)
class RemoveReplicaRow:
    """Delete the row (model, index) on the node: its process is gone."""

    model: str
    index: int
    node_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class ReplicaExited:
    """A node reports that its backend for (model, index) at `address` exited on its own;
    only that exact row goes."""

    model: str
    index: int
    node_id: str
    address: str | None
    returncode: int
    log_tail: str


@dataclass(frozen=True, slots=True)
class StopOrphan:
    """Stop exactly this process on the node: no row claims it."""

    node_id: str
    model: str
    index: int
    address: str | None


@dataclass(frozen=True, slots=True)
class RemoveNodeReplicas:
    """Delete every replica row of the node (it went offline)."""

    node_id: str
    reason: str = "node offline"


# --- nodes ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RegisterNode:
    """Create the node or update what its worker declares; it is pending until a heartbeat."""

    node_id: str
    name: str
    address: str
    token_hash: str
    labels: Mapping[str, str]
    memory_budget: str
    max_replicas_per_model: int
    backends: Sequence[str]
    # the digest of the worker's new NATS secret (None: NATS authentication is off); the one
    # it replaces is revoked
    nats_credential_hash: str | None = None


@dataclass(frozen=True, slots=True)
class RecordHeartbeat:
    """Record what a node's worker reports; a pending, unhealthy or offline node is healthy."""

    node_id: str
    resources: Mapping[str, Any]  # `bus.messages.resources_to_wire` form
    processes: Sequence[Mapping[str, Any]]  # `bus.messages.ProcessInfo` dumps
    backends: Sequence[str]
    artifacts: Sequence[str]
    installs: Mapping[str, Mapping[str, Any]]  # backend -> install state
    at: float  # when it arrived (seconds since the epoch)


@dataclass(frozen=True, slots=True)
class MarkNode:
    """Set a node's status, only if it is still `previous` (a heartbeat, drain or
    deregistration that landed since the decision wins)."""

    node_id: str
    status: NodeStatus
    previous: NodeStatus


@dataclass(frozen=True, slots=True)
class SetNodeLabels:
    """Replace a node's labels."""

    node_id: str
    labels: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class PatchNodeLabels:
    """Set the labels given a value and remove those given None; the others stay."""

    node_id: str
    changes: Mapping[str, str | None]


@dataclass(frozen=True, slots=True)
class DrainNode:
    """Mark a node draining: it takes no new replicas (the drainer moves its replicas away)."""

    node_id: str


@dataclass(frozen=True, slots=True)
class UndrainNode:
    """End a drain: the draining node is healthy again."""

    node_id: str


@dataclass(frozen=True, slots=True)
class DeregisterNode:
    """A worker leaves cleanly: its node is offline now and its replica rows are gone."""

    node_id: str


@dataclass(frozen=True, slots=True)
class RemoveNode:
    """An operator deletes a node: its row, labels and replica rows go, and its credentials
    (HTTP and NATS) stop working; its worker may join again only with the cluster token."""

    node_id: str


# --- models --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UpsertModel:
    """Declare or change a model; `source` is "api" or "file:<path>"."""

    spec: ModelSpec
    source: str


@dataclass(frozen=True, slots=True)
class SetScheduling:
    """Change how many replicas of a model to keep, and where."""

    model: str
    scheduling: Scheduling


@dataclass(frozen=True, slots=True)
class PatchScheduling:
    """Change only the named scheduling fields of a model; the result is validated whole."""

    model: str
    changes: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class RemoveModel:
    """Stop every replica of a model, then forget the model."""

    model: str


# --- reports -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReportLoad:
    """Tell every frontend how a model load goes (waiting requests show it)."""

    model: str
    state: LoadState
    node_id: str | None = None
    index: int | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class SetCooldown:
    """Plan no starts of the model before `until` (the caller clears it when capacity changes);
    applying it reports the shortage."""

    model: str
    until: float
    reason: str


@dataclass(frozen=True, slots=True)
class ReportWaiting:
    """Tell the operator once that the model cannot be started yet, and why."""

    model: str
    reason: str


RolloutState = Literal["rolling", "halted", "finished"]


@dataclass(frozen=True, slots=True)
class ReportRollout:
    """A model's replicas move to a new revision, stopped moving (its load failed), or all run
    it now."""

    model: str
    state: RolloutState
    revision: str
    detail: str


@dataclass(frozen=True, slots=True)
class ReportScaling:
    """The autoscaler changed a model's replica count, and why."""

    model: str
    before: int
    after: int
    reason: str


@dataclass(frozen=True, slots=True)
class ReportDrained:
    """A drain of the node is over."""

    node_id: str
    moved: int  # replicas it had when the drain began


@dataclass(frozen=True, slots=True)
class ReportLeader:
    """This frontend now runs the reconciler."""

    frontend_id: str


@dataclass(frozen=True, slots=True)
class RecordUse:
    """Last-used times of replicas (a batch; a time never moves backwards)."""

    last_used: Mapping[ReplicaKey, float]


#: Replica actions whose outcome is whether the replica (or process) was there.
ReplicaChange = (
    StopReplica
    | DropReplica
    | MarkUnloading
    | AdoptReplica
    | RemoveReplicaRow
    | ReplicaExited
    | StopOrphan
)
ReplicaAction = StartReplica | ReplicaChange | RemoveNodeReplicas
NodeAction = (
    RegisterNode
    | RecordHeartbeat
    | MarkNode
    | SetNodeLabels
    | PatchNodeLabels
    | DrainNode
    | UndrainNode
    | DeregisterNode
    | RemoveNode
)
ModelAction = UpsertModel | SetScheduling | PatchScheduling | RemoveModel
Report = (
    ReportLoad
    | SetCooldown
    | ReportWaiting
    | ReportRollout
    | ReportScaling
    | ReportDrained
    | ReportLeader
    | RecordUse
)
Action = ReplicaAction | NodeAction | ModelAction | Report

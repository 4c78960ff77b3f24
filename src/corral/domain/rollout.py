"""Where a model's move to a new spec revision stands: rolling, halted by a failed load, or done.

Pure; the reconcile rules (`corral.domain.model_rules`) act on it and the admin API shows it.
A replica is current when its `revision` is the spec's `config_revision`; a model rolls while
an active replica (scheduled..loaded) is not current. A rollout is halted while the current
revision's last load failed less than `retry` seconds ago.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from corral.domain.entities import ACTIVE_REPLICA_STATES, ModelSpec, Replica

RolloutPhase = Literal["idle", "rolling", "halted"]


@dataclass(frozen=True, slots=True)
class LoadFailure:
    """The last load of a model's revision failed."""

    revision: str
    error: str
    at: float  # seconds since the epoch


def halted_by(failure: LoadFailure | None, revision: str, now: float, retry: float) -> str | None:
    """The error that halts a rollout to `revision`, or None when it may go on."""
    if failure is None or failure.revision != revision or now - failure.at >= retry:
        return None
    return failure.error


@dataclass(frozen=True, slots=True)
class RolloutStatus:
    """A model's rollout as an operator sees it."""

    phase: RolloutPhase
    revision: str  # the spec's current revision
    current: int  # active replicas at it
    old: int  # active replicas at older revisions
    revisions: dict[str, int] = field(default_factory=dict)  # revision -> active replicas
    error: str | None = None  # the last failed load of the current revision, if any


def rollout_status(
    spec: ModelSpec,
    replicas: Iterable[Replica],
    failure: LoadFailure | None,
    now: float,
    retry: float,
) -> RolloutStatus:
    """Where the rollout of `spec` stands given its replicas and its last failed load."""
    revision = spec.config_revision
    counts: dict[str, int] = {}
    for r in replicas:
        if r.model == spec.name and r.state in ACTIVE_REPLICA_STATES:
            counts[r.revision] = counts.get(r.revision, 0) + 1
    current = counts.get(revision, 0)
    old = sum(counts.values()) - current
    error = failure.error if failure is not None and failure.revision == revision else None
    phase: RolloutPhase = "idle"
    if old:
        phase = "halted" if halted_by(failure, revision, now, retry) else "rolling"
    return RolloutStatus(phase, revision, current, old, counts, error)

"""The admin API's view of models: spec, revision, rollout and scaling state, replicas.

Read-only: built from the registry (rows, load records, the audit log) and this frontend's
load signals, for `GET /api/models` and `GET /api/models/{name}` (and `corral models`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

from corral.domain.entities import ModelSpec, Replica
from corral.domain.rollout import rollout_status
from corral.domain.routing_weights import weights_to_row
from corral.frontend.service import Frontend
from corral.store.models import rollout_to_row, scaling_to_row, scheduling_to_row
from corral.store.replicas import revision_failures


def model_json(spec: ModelSpec) -> dict[str, Any]:
    """The declared model: what it runs (`revision`: the spec's hash replicas are compared
    with; `generation`: how often the row changed) and how it is scheduled and rolled out."""
    return {
        "name": spec.name,
        "backend": spec.backend,
        "artifact": spec.artifact,
        "options": dict(spec.options),
        "memory": spec.memory,
        "revision": spec.config_revision,
        "generation": spec.revision,
        "scheduling": scheduling_to_row(spec.scheduling),
        "node_selector": dict(spec.scheduling.node_selector),
        "rollout": rollout_to_row(spec.rollout),
        "capabilities": None if spec.capabilities is None else list(spec.capabilities),
        "routing": weights_to_row(spec.routing),
    }


def replica_json(r: Replica, fe: Frontend | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "model": r.model,
        "index": r.index,
        "node_id": r.node_id,
        "state": r.state.value,
        "address": r.address,
        "memory": r.memory,
        "last_used": r.last_used,
        "load_error": r.load_error,
        "revision": r.revision,
        "replaces": r.replaces,
    }
    if fe is not None:
        out["inflight"] = fe.inflight.total(r.key)
    return out


async def models_json(fe: Frontend, specs: Iterable[ModelSpec]) -> list[dict[str, Any]]:
    """Each model with its rollout state (one read of the replicas and load records)."""
    specs = list(specs)
    replicas = await fe.registry.replicas.all()
    failed = revision_failures(specs, await fe.registry.replicas.load_info())
    out = []
    for spec in specs:
        item = model_json(spec)
        item["rollout"] |= _rollout(fe, spec, replicas, failed)
        out.append(item)
    return out


async def model_detail(fe: Frontend, spec: ModelSpec) -> dict[str, Any]:
    """One model: its spec, rollout (phase, revision, replicas per revision, last error),
    scaling (signal, target, value now, last decision) and replicas with their revisions."""
    replicas = await fe.registry.replicas.all(spec.name)
    failed = revision_failures([spec], await fe.registry.replicas.load_info([spec.name]))
    out = model_json(spec)
    out["rollout"] |= _rollout(fe, spec, replicas, failed)
    out["replicas"] = [replica_json(r, fe) for r in replicas]
    scaling = scaling_to_row(spec.scheduling.scaling)
    if scaling is not None:
        last = await fe.registry.audit.recent(1, kind="model.scaled", subject=spec.name)
        scaling["value"] = fe.signals.value(spec)
        scaling["last_decision"] = (
            {"at": last[0]["at"], "message": last[0]["message"]} if last else None
        )
    out["scaling"] = scaling
    return out


def _rollout(
    fe: Frontend, spec: ModelSpec, replicas: Iterable[Replica], failed: Mapping[str, Any]
) -> dict[str, Any]:
    status = rollout_status(
        spec, replicas, failed.get(spec.name), time.time(), fe.settings.revision_retry
    )
    return {
        "phase": status.phase,
        "revision": status.revision,
        "current": status.current,
        "old": status.old,
        "revisions": status.revisions,
        "last_error": status.error,
    }

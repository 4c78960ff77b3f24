"""The model objects of the OpenAI API (`GET /v1/models`): what clients know a model by.

Besides OpenAI's fields (`id`, `object`, `created`: when the model was declared, `owned_by`),
each card says whether the model can serve now: `available` is true while it has a loaded
replica or some node could start one (status, node selector and backend allow it); otherwise
`available: false` and `reason` (e.g. no node runs its backend). Such a model stays listed.
"""

from __future__ import annotations

from typing import Any

from corral.domain.entities import ModelSpec
from corral.domain.placement import unplaceable
from corral.frontend.view import ClusterView

OWNER = "corral"


def model_card(view: ClusterView, spec: ModelSpec) -> dict[str, Any]:
    """One model as `GET /v1/models` lists it, from this frontend's view."""
    card: dict[str, Any] = {
        "id": spec.name,
        "object": "model",
        "created": int(spec.created_at),
        "owned_by": OWNER,
    }
    reason = None if view.candidates(spec.name) else unplaceable(spec, list(view.nodes.values()))
    card["available"] = reason is None
    if reason is not None:
        card["reason"] = reason
    return card


def model_list(view: ClusterView) -> dict[str, Any]:
    """The body of `GET /v1/models`: every declared model, by name."""
    return {
        "object": "list",
        "data": [model_card(view, view.models[name]) for name in sorted(view.models)],
    }

"""The model objects of the OpenAI API (`GET /v1/models`): what clients know a model by.

Besides OpenAI's fields (`id`, `object`, `created`: when the model was declared, `owned_by`),
each card says whether the model can serve now: `available` is true while it has a loaded
replica or some node could start one (status, node selector and backend allow it); otherwise
`available: false` and `reason` (e.g. no node runs its backend). Such a model stays listed.
`capabilities` lists the endpoints it serves (`corral.backends.capabilities` names; null when
its backend is unknown to this frontend, which then lets every endpoint through).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

from corral.domain.entities import ModelSpec
from corral.domain.placement import unplaceable
from corral.frontend.view import ClusterView

OWNER = "corral"


#: The endpoints a model serves (the catalog's `capabilities_of`).
Capabilities = Callable[[ModelSpec], Collection[str] | None]


def model_card(
    view: ClusterView, spec: ModelSpec, capabilities: Capabilities | None = None
) -> dict[str, Any]:
    """One model as `GET /v1/models` lists it, from this frontend's view."""
    card: dict[str, Any] = {
        "id": spec.name,
        "object": "model",
        "created": int(spec.created_at),
        "owned_by": OWNER,
    }
    if capabilities is not None:
        served = capabilities(spec)
        card["capabilities"] = None if served is None else list(served)
    reason = None if view.candidates(spec.name) else unplaceable(spec, list(view.nodes.values()))
    card["available"] = reason is None
    if reason is not None:
        card["reason"] = reason
    return card


def model_list(view: ClusterView, capabilities: Capabilities | None = None) -> dict[str, Any]:
    """The body of `GET /v1/models`: every declared model, by name."""
    models = view.models
    return {
        "object": "list",
        "data": [model_card(view, models[name], capabilities) for name in sorted(models)],
    }

"""Per-model routing weights (a model file's `routing:` section): how much each scorer counts.

Kept apart from `domain.routing.scorers` (which re-exports them) so `ModelSpec` can carry them
without importing the routing pipeline. Every field is documented in that module.
"""

from __future__ import annotations

from dataclasses import dataclass

from corral.errors import ConfigError

#: The names a model file may set under `routing:`, in order.
FIELDS = ("load", "prefix", "session", "speed", "affinity_slack", "concurrency")


@dataclass(frozen=True, slots=True)
class RoutingWeights:
    """How much each scorer counts for one model (the model file's `routing:` section)."""

    load: float = 1.0
    prefix: float = 1.0
    session: float = 1.0
    speed: float = 0.0
    affinity_slack: float = 0.5  # x concurrency: extra load an affinity may add to a replica
    concurrency: int = 8  # the load scale when the model declares no max_concurrency

    def __post_init__(self) -> None:
        for name in ("load", "prefix", "session", "speed", "affinity_slack"):
            value = getattr(self, name)
            if not value >= 0:  # also rejects NaN
                raise ConfigError(f"must be >= 0, got {value}", field=f"routing.{name}")
        if self.concurrency < 1:
            raise ConfigError(f"must be >= 1, got {self.concurrency}", field="routing.concurrency")


DEFAULT_WEIGHTS = RoutingWeights()


def weights_to_row(w: RoutingWeights) -> dict[str, float | int]:
    """The weights as JSON (the admin API's and the models row's `routing`)."""
    return {name: getattr(w, name) for name in FIELDS}


def weights_from_row(row: dict[str, float | int] | None) -> RoutingWeights:
    """Weights from `weights_to_row`'s JSON (missing fields: defaults; None: all defaults)."""
    if not row:
        return DEFAULT_WEIGHTS
    known = {k: v for k, v in row.items() if k in FIELDS}
    if "concurrency" in known:
        known["concurrency"] = int(known["concurrency"])
    return RoutingWeights(**known)  # type: ignore[arg-type]

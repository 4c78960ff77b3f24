"""What the deciders of one frontend share: the registry they read, the view, the in-flight
counts, and the actuator they write through."""

from __future__ import annotations

from dataclasses import dataclass

from corral.frontend.actuator import Actuator
from corral.frontend.inflight import InflightTracker
from corral.frontend.view import ClusterView
from corral.store.registry import Registry


@dataclass(frozen=True, slots=True)
class Parts:
    """The cold path, the drainer and the reconciler each take one of these."""

    registry: Registry  # reads only: every write is an action for `actuator`
    view: ClusterView
    inflight: InflightTracker
    actuator: Actuator

"""Node status from heartbeat age."""

from __future__ import annotations

import pytest

from corral.domain.entities import NodeStatus
from corral.domain.health import node_status

H, U, OFF, D, P = (
    NodeStatus.HEALTHY,
    NodeStatus.UNHEALTHY,
    NodeStatus.OFFLINE,
    NodeStatus.DRAINING,
    NodeStatus.PENDING,
)
NOW = 1000.0

# interval 5 s x 3 = stale after 15 s; offline after 60 s.
CASES = [
    ("pending-no-heartbeat-stays", P, 0.0, P),
    ("pending-first-heartbeat-healthy", P, NOW - 1, H),
    ("pending-heartbeat-then-silent-unhealthy", P, NOW - 20, U),
    ("healthy-fresh-stays", H, NOW - 15, H),
    ("healthy-late-unhealthy", H, NOW - 16, U),
    ("healthy-gone-offline", H, NOW - 61, OFF),
    ("unhealthy-still-late-stays", U, NOW - 30, U),
    ("unhealthy-fresh-healthy", U, NOW - 2, H),
    ("unhealthy-gone-offline", U, NOW - 61, OFF),
    ("offline-fresh-stays-offline", OFF, NOW - 2, OFF),  # only the node API revives it
    ("offline-late-stays-offline", OFF, NOW - 30, OFF),
    ("offline-never-heartbeat-stays", OFF, 0.0, OFF),
    ("draining-fresh-stays-draining", D, NOW - 10, D),
    ("draining-stale-offline", D, NOW - 16, OFF),
    ("draining-gone-offline", D, NOW - 100, OFF),
]


@pytest.mark.parametrize(
    ("current", "last", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_node_status(current: NodeStatus, last: float, expected: NodeStatus) -> None:
    got = node_status(
        current, last, NOW, heartbeat_interval=5.0, unhealthy_after=3, offline_after=60.0
    )
    assert got == expected

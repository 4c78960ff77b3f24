"""Node health from heartbeat age: the status a node should have at a given moment.

With `age = now - last_heartbeat`, `stale = age > unhealthy_after * heartbeat_interval` and
`gone = age > offline_after`:

- pending with no heartbeat yet (`last_heartbeat <= 0`) stays pending;
- gone: offline, whatever the status (draining too);
- draining: stays draining while fresh, goes offline as soon as it is stale (it takes no work
  and serves nothing once late, so there is no unhealthy stage to come back from);
- offline stays offline until a fresh heartbeat;
- stale: unhealthy (from healthy, unhealthy or a pending node that had sent a heartbeat);
- fresh: healthy (from pending, unhealthy or offline).
"""

from __future__ import annotations

from corral.domain.entities import NodeStatus


def node_status(
    current: NodeStatus,
    last_heartbeat: float,
    now: float,
    *,
    heartbeat_interval: float,
    unhealthy_after: int,
    offline_after: float,
) -> NodeStatus:
    """Return the status a node in `current` should have at `now` (rules in the module doc)."""
    if current == NodeStatus.PENDING and last_heartbeat <= 0:
        return NodeStatus.PENDING
    age = now - last_heartbeat
    if age > offline_after:
        return NodeStatus.OFFLINE
    stale = age > unhealthy_after * heartbeat_interval
    if current == NodeStatus.DRAINING:
        return NodeStatus.OFFLINE if stale else NodeStatus.DRAINING
    if not stale:
        return NodeStatus.HEALTHY
    if current == NodeStatus.OFFLINE:
        return NodeStatus.OFFLINE
    return NodeStatus.UNHEALTHY

"""Node health from heartbeat age: the status a node should have at a given moment.

With `age = now - last_heartbeat`, `stale = age > unhealthy_after * heartbeat_interval` and
`gone = age > offline_after`:

- pending with no heartbeat yet (`last_heartbeat <= 0`) stays pending;
- gone: offline, whatever the status (draining too);
- draining: stays draining while fresh, goes offline as soon as it is stale (it takes no work
  and serves nothing once late, so there is no unhealthy stage to come back from);
- offline stays offline, whatever the heartbeat age: only a heartbeat that arrives after it went
  offline brings it back (the node API records it and sets healthy). A recent heartbeat from
  before is no proof of life: a worker that deregistered, or was judged offline from a stale
  view while its last heartbeat landed, must not be revived by the monitor;
- stale: unhealthy (from healthy, unhealthy or a pending node that had sent a heartbeat);
- fresh: healthy (from pending or unhealthy).
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
    if current == NodeStatus.OFFLINE or (current == NodeStatus.PENDING and last_heartbeat <= 0):
        return current
    age = now - last_heartbeat
    if age > offline_after:
        return NodeStatus.OFFLINE
    stale = age > unhealthy_after * heartbeat_interval
    if current == NodeStatus.DRAINING:
        return NodeStatus.OFFLINE if stale else NodeStatus.DRAINING
    return NodeStatus.UNHEALTHY if stale else NodeStatus.HEALTHY

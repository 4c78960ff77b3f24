"""Operator actions reach every frontend at once: an undrain, drain, label or scheduling change
is in the acting frontend's view when its call returns and in the others' within 100 ms, and
no verdict judged on the old state (a failed load) outlives it."""

from __future__ import annotations

from collections.abc import Callable

from harness import InProcessCluster, chat, client, declare

from corral.domain.actions import SetNodeLabels, SetScheduling, UndrainNode
from corral.domain.entities import NodeStatus, Scheduling
from corral.frontend.service import Frontend
from factories import model
from infra import apoll_until

FRESH = 0.1  # seconds within which another frontend's view follows an operator action


async def _within(check: Callable[[], bool], what: str) -> None:
    """Fail unless `check` holds within FRESH seconds."""
    await apoll_until(check, timeout=FRESH, interval=0.002, what=what)


def _status(fe: Frontend, node_id: str) -> NodeStatus | None:
    node = fe.view.nodes.get(node_id)
    return node.status if node else None


async def test_after_an_undrain_the_next_request_on_every_frontend_is_served(
    cluster: InProcessCluster,
) -> None:
    one = await cluster.frontend()
    two = await cluster.frontend()
    await cluster.worker(one, "n1")
    await declare(one, model("m"))
    await apoll_until(lambda: "m" in two.view.models, timeout=5, what="the model on frontend 2")
    await one.drainer.request("n1", wait=True)
    async with client(one) as c1, client(two) as c2:
        # while n1 drains nothing can load m: both frontends say so (and one remembers it)
        for c in (c1, c2):
            refused = await chat(c, "m")
            assert refused.status_code == 503, refused.text
            assert "draining" in refused.json()["error"]["message"]
        await one.actuator.apply(UndrainNode("n1"))
        assert _status(one, "n1") == NodeStatus.HEALTHY, "the acting frontend's view at once"
        # no wait for the event: the next request on either frontend is served
        for c in (c2, c1):
            answer = await chat(c, "m")
            assert answer.status_code == 200, answer.text
    await _within(lambda: _status(two, "n1") == NodeStatus.HEALTHY, "n1 healthy on frontend 2")


async def test_drain_labels_and_scheduling_reach_the_other_frontend_within_100ms(
    cluster: InProcessCluster,
) -> None:
    one = await cluster.frontend()
    two = await cluster.frontend()
    await cluster.worker(one, "n1")
    await declare(one, model("m"))
    await apoll_until(lambda: "n1" in two.view.nodes, timeout=5, what="n1 on frontend 2")

    await one.drainer.request("n1", wait=False)
    assert _status(one, "n1") == NodeStatus.DRAINING
    await _within(lambda: _status(two, "n1") == NodeStatus.DRAINING, "the drain on frontend 2")

    await one.actuator.apply(UndrainNode("n1"))
    await _within(lambda: _status(two, "n1") == NodeStatus.HEALTHY, "the undrain on frontend 2")

    await one.actuator.apply(SetNodeLabels("n1", {"zone": "b"}))
    assert one.view.nodes["n1"].labels == {"zone": "b"}
    await _within(lambda: two.view.nodes["n1"].labels == {"zone": "b"}, "labels on frontend 2")

    await one.actuator.apply(SetScheduling("m", Scheduling(min_replicas=0, max_replicas=3)))
    assert one.view.models["m"].scheduling.max_replicas == 3
    await _within(
        lambda: two.view.models["m"].scheduling.max_replicas == 3, "scheduling on frontend 2"
    )

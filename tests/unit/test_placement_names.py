"""Why a model cannot be placed names each node the way operators know it: "name (id)"."""

from __future__ import annotations

import dataclasses

from corral.domain.entities import NodeStatus
from corral.domain.placement import unplaceable
from factories import model, node


def test_rejections_name_nodes_by_name_and_id() -> None:
    box = dataclasses.replace(node("0123abcd", status=NodeStatus.UNHEALTHY), name="gpu-box")
    assert (
        unplaceable(model("m"), [box]) == "no healthy node: gpu-box (0123abcd): node is unhealthy"
    )


def test_a_node_named_as_its_id_is_named_once() -> None:
    same = node("a", status=NodeStatus.UNHEALTHY)
    assert unplaceable(model("m"), [same]) == "no healthy node: a: node is unhealthy"

"""A scheduling PATCH replaces only the fields it names and is validated whole."""

from __future__ import annotations

import pytest

from corral.domain.autoscale import ScalingTarget, Signal
from corral.domain.entities import Scheduling
from corral.errors import ConfigError
from corral.modelfile import patch_scheduling
from corral.store.models import scheduling_to_row

CURRENT = Scheduling(
    min_replicas=1,
    max_replicas=4,
    node_selector={"gpu": "a100"},
    scale_down_delay=60.0,
    scaling=ScalingTarget(metric=Signal.INFLIGHT, target=2.0),
)


def test_only_the_named_fields_change() -> None:
    after = patch_scheduling(scheduling_to_row(CURRENT), {"max_replicas": 2})
    assert after.max_replicas == 2
    assert after.node_selector == {"gpu": "a100"}
    assert (after.min_replicas, after.scale_down_delay) == (1, 60.0)
    assert after.scaling == CURRENT.scaling


def test_null_scaling_removes_the_target() -> None:
    assert patch_scheduling(scheduling_to_row(CURRENT), {"scaling": None}).scaling is None


@pytest.mark.parametrize(
    ("changes", "names"),
    [
        ({"max_replica": 1}, "max_replica"),
        ({"min_replicas": 9}, "above max_replicas 4"),
        ({"max_replicas": None}, "max_replicas"),
        ({"scale_down_delay": -1}, "scale_down_delay"),
    ],
)
def test_a_bad_result_names_the_field(changes: dict[str, object], names: str) -> None:
    with pytest.raises(ConfigError) as caught:
        patch_scheduling(scheduling_to_row(CURRENT), changes)
    assert names in caught.value.message

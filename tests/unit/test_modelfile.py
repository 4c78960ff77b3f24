"""Model files: one or several models per YAML file, errors naming the file and field."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from corral.domain.autoscale import ScalingTarget, Signal
from corral.domain.entities import (
    ModelSpec,
    Rollout,
    RolloutStrategy,
    Scheduling,
)
from corral.domain.routing_weights import RoutingWeights, weights_from_row, weights_to_row
from corral.errors import (
    ConfigError,
)
from corral.modelfile import load_models_dir, parse_model, parse_model_file
from factories import write_file


def test_model_file_single_model(tmp_path: Path) -> None:
    path = write_file(
        tmp_path,
        "m.yaml",
        """
name: org/llama-3:8b
backend: sim
artifact: hf://org/llama
memory: 8GiB
options: {n_ctx: 4096, fast: true}
scheduling:
  min_replicas: 1
  max_replicas: 3
  spread_all: false
  node_selector: {zone: eu}
  scale_down_delay: 60
  max_concurrency: 4
  deadline: 30
""",
    )
    (spec,) = parse_model_file(path)
    assert spec == ModelSpec(
        name="org/llama-3:8b",
        backend="sim",
        artifact="hf://org/llama",
        options={"n_ctx": 4096, "fast": True},
        memory=8 * 1024**3,
        scheduling=Scheduling(
            min_replicas=1,
            max_replicas=3,
            node_selector={"zone": "eu"},
            scale_down_delay=60.0,
            max_concurrency=4,
            deadline=30.0,
        ),
    )


@pytest.mark.parametrize(
    "text",
    [
        "- {name: a, backend: sim}\n- {name: b, backend: sim, memory: 1GB}\n",
        "models:\n  - {name: a, backend: sim}\n  - {name: b, backend: sim, memory: 1GB}\n",
    ],
    ids=["list", "models-key"],
)
def test_model_file_several_models(tmp_path: Path, text: str) -> None:
    specs = parse_model_file(write_file(tmp_path, "m.yaml", text))
    assert [s.name for s in specs] == ["a", "b"]
    assert specs[1].memory == 1_000_000_000
    assert specs[0].scheduling == Scheduling()


def test_model_file_empty_is_no_models(tmp_path: Path) -> None:
    assert parse_model_file(write_file(tmp_path, "m.yaml", "# nothing yet\n")) == []


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("name: a\nbackend: sim\n  bad: indent\n", 3),
        ("name: a\n\tbackend: sim\n", 2),
    ],
    ids=["bad-indent", "tab"],
)
def test_model_file_broken_yaml_names_path_and_line(tmp_path: Path, text: str, line: int) -> None:
    path = write_file(tmp_path, "broken.yaml", text)
    with pytest.raises(ConfigError) as info:
        parse_model_file(path)
    assert info.value.path == str(path)
    assert info.value.field == f"line {line}"
    assert str(path) in info.value.message and f"line {line}" in info.value.message
    assert "invalid YAML" in info.value.message


def test_model_file_unreadable_names_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        parse_model_file(tmp_path / "missing.yaml")
    assert info.value.path == str(tmp_path / "missing.yaml")


BAD_FIELDS: list[tuple[str, dict[str, Any], str | None]] = [
    ("min-replicas-negative", {"scheduling": {"min_replicas": -1}}, "scheduling.min_replicas"),
    ("max-replicas-text", {"scheduling": {"max_replicas": "many"}}, "scheduling.max_replicas"),
    ("concurrency-negative", {"scheduling": {"max_concurrency": -1}}, "scheduling.max_concurrency"),
    ("deadline-zero", {"scheduling": {"deadline": 0}}, "scheduling.deadline"),
    ("scheduling-unknown-key", {"scheduling": {"replicas": 2}}, "scheduling.replicas"),
    ("selector-not-mapping", {"scheduling": {"node_selector": ["a"]}}, "scheduling.node_selector"),
    ("unknown-field", {"bogus": 1}, "bogus"),
    ("bad-memory", {"memory": "12XB"}, "memory"),
    ("memory-list", {"memory": [1]}, "memory"),
    ("bad-backend", {"backend": "Sim!"}, "backend"),
    ("bad-name", {"name": "-leading-dash"}, "name"),
    ("missing-backend", {"backend": None}, "backend"),
    ("unknown-capability", {"capabilities": ["chat", "telepathy"]}, "capabilities.1"),
    ("no-capabilities", {"capabilities": []}, "capabilities"),
    ("capabilities-text", {"capabilities": "chat"}, "capabilities"),
    ("rollout-unknown", {"rollout": "blue-green"}, "rollout.strategy"),
    ("rollout-unknown-key", {"rollout": {"surge": 2}}, "rollout.surge"),
    (
        "scaling-unknown-metric",
        {"scheduling": {"scaling": {"metric": "gpu", "target": 1}}},
        "scheduling.scaling.metric",
    ),
    (
        "scaling-zero-target",
        {"scheduling": {"scaling": {"metric": "inflight", "target": 0}}},
        "scheduling.scaling.target",
    ),
    (
        "scaling-without-target",
        {"scheduling": {"scaling": {"metric": "inflight"}}},
        "scheduling.scaling.target",
    ),
    (
        "idle-timeout-with-a-minimum",
        {
            "scheduling": {
                "min_replicas": 1,
                "scaling": {"metric": "queue_wait", "target": 1, "idle_timeout": 60},
            }
        },
        "scheduling",
    ),
    ("min-above-max", {"scheduling": {"min_replicas": 3, "max_replicas": 2}}, "scheduling"),
    ("routing-negative-weight", {"routing": {"prefix": -1}}, "routing.prefix"),
    ("routing-nan-weight", {"routing": {"load": float("nan")}}, "routing.load"),
    ("routing-zero-concurrency", {"routing": {"concurrency": 0}}, "routing.concurrency"),
    ("routing-unknown-scorer", {"routing": {"latency": 1}}, "routing.latency"),
]


@pytest.mark.parametrize(
    ("override", "field"), [b[1:] for b in BAD_FIELDS], ids=[b[0] for b in BAD_FIELDS]
)
def test_model_bad_field_names_path_and_field(override: dict[str, Any], field: str | None) -> None:
    data: dict[str, Any] = {"name": "m", "backend": "sim", **override}
    data = {k: v for k, v in data.items() if v is not None}
    with pytest.raises(ConfigError) as info:
        parse_model(data, path="models/m.yaml")
    assert info.value.path == "models/m.yaml"
    assert info.value.field == field
    assert info.value.message.startswith(f"models/m.yaml: {field}: ")


def test_model_not_a_mapping() -> None:
    with pytest.raises(ConfigError) as info:
        parse_model(["name", "m"], path="x.yaml")
    assert info.value.path == "x.yaml"


def test_model_file_list_error_names_the_item(tmp_path: Path) -> None:
    path = write_file(
        tmp_path,
        "m.yaml",
        "- {name: a, backend: sim}\n- {name: b, backend: sim, scheduling: {min_replicas: -2}}\n",
    )
    with pytest.raises(ConfigError) as info:
        parse_model_file(path)
    assert info.value.path == f"{path}[1]"
    assert info.value.field == "scheduling.min_replicas"


def test_model_infinite_memory_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        parse_model({"name": "m", "backend": "sim", "memory": math.inf}, path="m.yaml")
    assert info.value.field == "memory"


def test_models_dir_loads_good_files_and_reports_bad_ones(tmp_path: Path) -> None:
    write_file(tmp_path, "a.yaml", "name: alpha\nbackend: sim\n")
    write_file(tmp_path, "b.yml", "- {name: beta, backend: sim}\n- {name: alpha, backend: other}\n")
    broken = write_file(tmp_path, "c.yaml", "name: gamma\nbackend: sim\n  oops: 1\n")
    bad_field = write_file(
        tmp_path, "d.yaml", "name: delta\nbackend: sim\nscheduling: {min_replicas: x}\n"
    )
    write_file(tmp_path, "e.yaml", "name: epsilon\nbackend: sim\n")
    write_file(tmp_path, "notes.txt", "name: ignored\nbackend: sim\n")
    write_file(tmp_path, ".#e.yaml", "an editor's lock file, not a model")
    specs, errors = load_models_dir(tmp_path)
    by_name = {s.name: s for s in specs}
    assert sorted(by_name) == ["alpha", "beta", "epsilon"]
    assert by_name["alpha"].backend == "sim", "the first declaration wins"
    assert len(errors) == 3
    dup = [e for e in errors if e.field == "alpha"]
    assert len(dup) == 1 and dup[0].path == str(tmp_path / "b.yml")
    assert "declared twice" in dup[0].message
    assert any(e.path == str(broken) and e.field == "line 3" for e in errors)
    assert any(e.path == str(bad_field) and e.field == "scheduling.min_replicas" for e in errors)


def test_models_dir_missing() -> None:
    specs, errors = load_models_dir(Path("/nonexistent/corral-models"))
    assert specs == []
    assert len(errors) == 1 and "does not exist" in errors[0].message


@pytest.mark.parametrize(
    ("declared", "expected"),
    [
        (None, None),
        (["chat"], ("chat",)),
        (["audio", "chat"], ("transcription", "chat", "speech")),  # the old alias expands
        (["chat", "chat"], ("chat",)),
    ],
)
def test_model_capabilities_narrow_the_backend(
    declared: list[str] | None, expected: tuple[str, ...] | None
) -> None:
    data: dict[str, Any] = {"name": "m", "backend": "sim"}
    if declared is not None:
        data["capabilities"] = declared
    assert parse_model(data).capabilities == expected


def test_model_rollout_and_scaling() -> None:
    text = {
        "name": "m",
        "backend": "sim",
        "rollout": "recreate",
        "scheduling": {
            "max_replicas": 4,
            "scale_down_delay": 60,
            "scaling": {"metric": "inflight", "target": 4, "window": 10, "max_step": 2},
        },
    }
    spec = parse_model(text)
    assert spec.rollout == Rollout(RolloutStrategy.RECREATE, newest_only=True)
    assert spec.scheduling.scaling == ScalingTarget(Signal.INFLIGHT, 4.0, 10.0, None, 2)
    routed = parse_model({"name": "m", "backend": "sim", "rollout": {"newest_only": False}})
    assert routed.rollout == Rollout(RolloutStrategy.ROLLING, newest_only=False)
    zero = parse_model(
        {
            "name": "m",
            "backend": "sim",
            "scheduling": {"scaling": {"metric": "queue_wait", "target": 1, "idle_timeout": 600}},
        }
    )
    assert zero.scheduling.scaling is not None
    assert (zero.scheduling.scaling.metric, zero.scheduling.scaling.idle_timeout) == (
        Signal.QUEUE_WAIT,
        600.0,
    )
    assert parse_model({"name": "m", "backend": "sim"}).scheduling.scaling is None


def test_model_routing_weights_default_and_declared() -> None:
    assert parse_model({"name": "m", "backend": "sim"}).routing == RoutingWeights()
    spec = parse_model(
        {"name": "m", "backend": "sim", "routing": {"prefix": 2, "session": 0, "concurrency": 4}}
    )
    assert spec.routing == RoutingWeights(prefix=2.0, session=0.0, concurrency=4)
    # routing is not part of the revision: changing it moves no replica
    plain = parse_model({"name": "m", "backend": "sim"})
    assert spec.config_revision == plain.config_revision
    assert weights_from_row(weights_to_row(spec.routing)) == spec.routing
    assert weights_from_row(None) == RoutingWeights()

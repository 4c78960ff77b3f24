"""The backend catalog: built-in entries, user directories, launch argv and option flags."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import corral.backends.catalog as catalog_module
from corral.backends.catalog import RESERVED_OPTIONS, BackendEntry, Catalog, option_flags
from corral.domain.entities import (
    ModelSpec,
    Scheduling,
)
from corral.errors import (
    ConfigError,
)
from factories import write_file


def test_builtin_catalog_parses() -> None:
    catalog = Catalog.builtin()
    assert "sim" in catalog.names()
    sim = catalog.get("sim")
    assert sim is not None
    assert not sim.needs_install
    assert not sim.gpu
    assert sim.default_memory == 64_000_000
    assert "chat" in sim.capabilities
    assert "{python}" in sim.command
    for name in catalog.names():
        entry = catalog.get(name)
        assert entry is not None and entry.name == name and entry.command
    assert catalog.names() == sorted(catalog.names())


def test_catalog_gpu_and_runnable() -> None:
    catalog = Catalog(
        {
            "cpu": BackendEntry(name="cpu", command=("x",)),
            "gpu": BackendEntry(name="gpu", command=("x",), gpu=True),
        }
    )
    assert catalog.gpu_backends() == frozenset({"gpu"})
    assert catalog.runnable(has_gpu=False) == ["cpu"]
    assert catalog.runnable(has_gpu=True) == ["cpu", "gpu"]
    assert catalog.check_model(ModelSpec(name="m", backend="cpu")) is None
    reason = catalog.check_model(ModelSpec(name="m", backend="nope"))
    assert reason is not None and "nope" in reason and "cpu" in reason


OPTION_FLAGS: list[tuple[str, dict[str, Any], dict[str, bool], list[str]]] = [
    ("value", {"foo_bar": 1}, {}, ["--foo-bar", "1"]),
    ("string", {"chat_format": "chatml"}, {}, ["--chat-format", "chatml"]),
    ("float", {"gpu_memory_utilization": 0.45}, {}, ["--gpu-memory-utilization", "0.45"]),
    ("true-is-switch", {"fast": True}, {}, ["--fast"]),
    ("false-omitted", {"off": False}, {}, []),
    ("none-omitted", {"x": None}, {}, []),
    ("zero-kept", {"n": 0}, {}, ["--n", "0"]),
    ("list-repeats", {"lora": ["a", "b"]}, {}, ["--lora", "a", "--lora", "b"]),
    ("tuple-repeats", {"lora": ("a",)}, {}, ["--lora", "a"]),
    ("order-kept", {"b": 1, "a": 2}, {}, ["--b", "1", "--a", "2"]),
    ("underscores", {"n_gpu_layers": -1}, {"underscores": True}, ["--n_gpu_layers", "-1"]),
    ("bool-values-true", {"fast": True}, {"bool_values": True}, ["--fast", "true"]),
    ("bool-values-false", {"off": False}, {"bool_values": True}, ["--off", "false"]),
    ("bool-values-none-omitted", {"x": None}, {"bool_values": True}, []),
]


@pytest.mark.parametrize(
    ("options", "kw", "expected"),
    [o[1:] for o in OPTION_FLAGS],
    ids=[o[0] for o in OPTION_FLAGS],
)
def test_option_flags(options: dict[str, Any], kw: dict[str, bool], expected: list[str]) -> None:
    assert option_flags(options, **kw) == expected


@pytest.mark.parametrize("key", sorted(RESERVED_OPTIONS))
def test_option_flags_skip_reserved(key: str) -> None:
    assert option_flags({key: "x", "keep": 1}) == ["--keep", "1"]
    assert option_flags({key: True}, bool_values=True) == []


def test_argv_fills_placeholders_and_appends_flags() -> None:
    entry = BackendEntry(
        name="t",
        command=(
            "{python}",
            "{corral_backends}/server.py",
            "--host",
            "{host}",
            "--port",
            "{port}",
            "--model",
            "{model}",
            "--path={model_path}",
        ),
    )
    argv = entry.argv(
        python="/py",
        host="0.0.0.0",
        port=8123,
        model="org/m",
        model_path="/data/m",
        options={"n_ctx": 4096, "gpu": True, "warm": True},
    )
    backends_dir = str(Path(catalog_module.__file__).resolve().parent)
    assert argv == [
        "/py",
        f"{backends_dir}/server.py",
        "--host",
        "0.0.0.0",
        "--port",
        "8123",
        "--model",
        "org/m",
        "--path=/data/m",
        "--n-ctx",
        "4096",
        "--warm",
    ]


def test_argv_without_model_path_and_without_flags() -> None:
    entry = BackendEntry(name="t", command=("{python}", "--p={model_path}"), options="none")
    argv = entry.argv(
        python="py", host="h", port="{port}", model="m", model_path=None, options={"a": 1}
    )
    assert argv == ["py", "--p="]


def test_argv_option_styles_from_entry() -> None:
    entry = BackendEntry(name="t", command=("x",), option_names="underscores", option_bools="value")
    argv = entry.argv(
        python="p", host="h", port=1, model="m", model_path=None, options={"a_b": False}
    )
    assert argv == ["x", "--a_b", "false"]


def test_catalog_user_dir_overrides_and_adds(tmp_path: Path) -> None:
    write_file(
        tmp_path,
        "10-override.yaml",
        "backends:\n  - name: sim\n    version: custom\n    command: [my-sim, '{port}']\n",
    )
    write_file(tmp_path, "20-new.yml", "- name: mine\n  command: [mine]\n  gpu: true\n")
    write_file(tmp_path, "notes.txt", "not: yaml: at: all")
    builtin = Catalog.builtin()
    merged = builtin.with_dir(tmp_path)
    sim = merged.get("sim")
    assert sim is not None and sim.version == "custom" and sim.command == ("my-sim", "{port}")
    mine = merged.get("mine")
    assert mine is not None and mine.gpu
    assert set(builtin.names()) | {"mine"} == set(merged.names())
    assert builtin.get("sim") != sim, "the builtin catalog itself is unchanged"
    assert builtin.with_dir(None) is builtin


def test_catalog_user_dir_later_file_wins(tmp_path: Path) -> None:
    write_file(tmp_path, "a.yaml", "- {name: x, version: '1', command: [a]}\n")
    write_file(tmp_path, "b.yaml", "- {name: x, version: '2', command: [b]}\n")
    entry = Catalog().with_dir(tmp_path).get("x")
    assert entry is not None and entry.version == "2"


BAD_ENTRIES: list[tuple[str, str, str]] = [
    ("bad-options", "- {name: x, command: [a], options: weird}\n", "backends[0].options"),
    ("missing-command", "- {name: x}\n", "backends[0].command"),
    ("bad-name", "- {name: X!, command: [a]}\n", "backends[0].name"),
    ("unknown-field", "- {name: x, command: [a], bogus: 1}\n", "backends[0].bogus"),
    (
        "bad-capability",
        "backends:\n  - {name: x, command: [a]}\n"
        "  - {name: y, command: [a], capabilities: [fly]}\n",
        "backends[1].capabilities.0",
    ),
]


@pytest.mark.parametrize(
    ("text", "field"), [b[1:] for b in BAD_ENTRIES], ids=[b[0] for b in BAD_ENTRIES]
)
def test_catalog_invalid_entry_names_file_and_field(tmp_path: Path, text: str, field: str) -> None:
    path = write_file(tmp_path, "bad.yaml", text)
    with pytest.raises(ConfigError) as info:
        Catalog.builtin().with_dir(tmp_path)
    assert info.value.path == str(path)
    assert info.value.field == field
    assert str(path) in info.value.message and field in info.value.message


def test_catalog_broken_yaml_names_file(tmp_path: Path) -> None:
    path = write_file(tmp_path, "bad.yaml", "backends: [\n")
    with pytest.raises(ConfigError) as info:
        Catalog().with_dir(tmp_path)
    assert info.value.path == str(path)
    assert "invalid YAML" in info.value.message


@pytest.mark.parametrize(
    "text", ["backends:\n", "backends: 5\n", "42\n"], ids=["null", "int", "scalar"]
)
def test_catalog_non_list_backends_is_config_error_or_empty(tmp_path: Path, text: str) -> None:
    write_file(tmp_path, "odd.yaml", text)
    try:
        catalog = Catalog().with_dir(tmp_path)
    except ConfigError as exc:
        assert exc.path == str(tmp_path / "odd.yaml")
    else:
        assert catalog.names() == []


def test_catalog_unknown_placeholder_is_config_error(tmp_path: Path) -> None:
    write_file(tmp_path, "typo.yaml", "- {name: x, command: ['{python}', '--model', '{modle}']}\n")
    with pytest.raises(ConfigError):
        Catalog().with_dir(tmp_path)


@pytest.mark.parametrize(
    ("backend", "declared", "effective", "problem"),
    [
        ("sim", None, "all of sim's", None),
        ("sim", ("chat", "speech"), ("chat", "speech"), None),
        ("embeddings", None, ("embeddings", "rerank", "score"), None),
        ("embeddings", ("rerank",), ("rerank",), None),
        ("embeddings", ("chat", "rerank"), ("rerank",), "does not serve chat"),
        ("elsewhere", None, None, "unknown backend"),  # a node's own catalog: allow everything
        ("elsewhere", ("chat",), ("chat",), "unknown backend"),
    ],
)
def test_model_capabilities_of(
    backend: str,
    declared: tuple[str, ...] | None,
    effective: tuple[str, ...] | str | None,
    problem: str | None,
) -> None:
    catalog = Catalog.builtin()
    spec = ModelSpec(name="m", backend=backend, capabilities=declared)
    if effective == "all of sim's":
        entry = catalog.get("sim")
        assert entry is not None
        effective = entry.capabilities
    assert catalog.capabilities_of(spec) == effective
    found = catalog.check_model(spec)
    assert (found is None) if problem is None else (found is not None and problem in found)


@pytest.mark.parametrize(
    ("backend", "options", "own", "expected"),
    [
        ("sim", {}, None, 0),  # no slots given: unlimited
        ("sim", {"slots": 4}, None, 4),  # the engine's batch slots
        ("sim", {"slots": 4}, 2, 2),  # the model's own setting wins
        ("sim", {"slots": 4}, 0, 0),  # explicitly unlimited
        ("vllm", {"max_num_seqs": 64}, None, 64),
        ("sim", {"slots": True}, None, 0),  # not a number of slots
        ("nope", {}, None, 0),  # unknown backend: unlimited
    ],
)
def test_max_concurrency_of(
    backend: str, options: dict[str, Any], own: int | None, expected: int
) -> None:
    spec = ModelSpec("m", backend, options=options, scheduling=Scheduling(max_concurrency=own))
    assert Catalog.builtin().max_concurrency_of(spec) == expected


def test_catalog_entry_default_max_concurrency() -> None:
    entry = BackendEntry(name="x", command=("x",), max_concurrency=8)
    spec = ModelSpec("m", "x")
    assert Catalog({"x": entry}).max_concurrency_of(spec) == 8

"""Settings: labels, database URLs, API keys and worker options from the environment."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from corral.config import FrontendSettings, WorkerSettings, parse_labels, to_async_url

LABELS: list[tuple[str, str, dict[str, str]]] = [
    ("empty", "", {}),
    ("one", "zone=eu", {"zone": "eu"}),
    ("several", "zone=eu,gpu=a100", {"zone": "eu", "gpu": "a100"}),
    ("spaces", " zone = eu , gpu= a100 ", {"zone": "eu", "gpu": "a100"}),
    ("empty-value", "flag=", {"flag": ""}),
    ("equals-in-value", "expr=a=b", {"expr": "a=b"}),
    ("trailing-comma", "a=1,,b=2,", {"a": "1", "b": "2"}),
    ("last-wins", "a=1,a=2", {"a": "2"}),
]


@pytest.mark.parametrize(("text", "expected"), [x[1:] for x in LABELS], ids=[x[0] for x in LABELS])
def test_parse_labels(text: str, expected: dict[str, str]) -> None:
    assert parse_labels(text) == expected


@pytest.mark.parametrize(
    ("text", "bad"),
    [("zone", "zone"), ("=eu", "=eu"), ("a=1,gpu", "gpu"), (" = x", "= x")],
    ids=["no-equals", "no-key", "second-bad", "blank-key"],
)
def test_parse_labels_errors_name_the_pair(text: str, bad: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_labels(text)
    assert repr(bad) in str(info.value)


ASYNC_URLS = [
    ("postgresql://u@h:5432/db", "postgresql+asyncpg://u@h:5432/db"),
    ("postgres://u:p@h/db?sslmode=require", "postgresql+asyncpg://u:p@h/db?sslmode=require"),
    ("postgresql+asyncpg://h/db", "postgresql+asyncpg://h/db"),
]


@pytest.mark.parametrize(("url", "expected"), ASYNC_URLS, ids=["postgresql", "postgres", "already"])
def test_to_async_url(url: str, expected: str) -> None:
    assert to_async_url(url) == expected


def test_to_async_url_rejects_other_schemes_without_leaking_credentials() -> None:
    with pytest.raises(ValueError) as info:
        to_async_url("mysql://admin:hunter2@db.example:3306/x")
    assert "hunter2" not in str(info.value)
    assert "db.example" in str(info.value)


def test_frontend_settings_async_url_and_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORRAL_DATABASE_URL", "postgres://u@h/db")
    monkeypatch.setenv("CORRAL_API_KEYS", " k1, k2 ,,")
    settings = FrontendSettings()
    assert settings.async_database_url == "postgresql+asyncpg://u@h/db"
    assert [k.get_secret_value() for k in settings.api_keys] == ["k1", "k2"]
    assert "k1" not in repr(settings), "secrets are not printed"


def test_frontend_settings_ids_are_unique() -> None:
    assert FrontendSettings().frontend_id != FrontendSettings().frontend_id


@pytest.mark.parametrize(
    ("value", "expected"),
    [("zone=eu,gpu=a100", {"zone": "eu", "gpu": "a100"}), ({"a": "b"}, {"a": "b"})],
    ids=["string", "dict"],
)
def test_worker_settings_labels(value: Any, expected: dict[str, str]) -> None:
    assert WorkerSettings(labels=value).labels == expected


def test_worker_settings_labels_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORRAL_WORKER_LABELS", "zone=eu,tier=gold")
    assert WorkerSettings().labels == {"zone": "eu", "tier": "gold"}


def test_worker_settings_bad_labels() -> None:
    with pytest.raises(ValidationError) as info:
        WorkerSettings(labels="zone")
    assert "key=value" in str(info.value)


@pytest.mark.parametrize("budget", ["80%", "100%", "12GB", "512MiB"])
def test_worker_settings_memory_budget_ok(budget: str) -> None:
    assert WorkerSettings(memory_budget=budget).memory_budget == budget


@pytest.mark.parametrize("budget", ["0%", "150%", "lots", "12XB"])
def test_worker_settings_memory_budget_rejected(budget: str) -> None:
    with pytest.raises(ValidationError) as info:
        WorkerSettings(memory_budget=budget)
    assert "memory_budget" in str(info.value)

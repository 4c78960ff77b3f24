"""Unexpected errors answer JSON 500 with a request id (logged with the traceback); database
errors caused by the input answer 400; input PostgreSQL cannot store is found by field."""

from __future__ import annotations

import logging

import asyncpg.exceptions
import httpx
import pytest
from sqlalchemy.exc import DataError

from corral.config import FrontendSettings
from corral.frontend.app import CorralApp, build_api
from corral.frontend.service import Frontend
from corral.frontend.storable import find_unstorable, unstorable
from corral.store.db import input_error


def _app() -> CorralApp:
    fe = Frontend(FrontendSettings(api_keys="adm"))  # builds parts only: no connection
    api = build_api(fe, manage_lifecycle=False)

    @api.get("/api/boom")
    async def boom() -> None:
        raise RuntimeError("a bug")

    @api.get("/api/too-big")
    async def too_big() -> None:
        cause = asyncpg.exceptions.NumericValueOutOfRangeError("integer out of range")
        raise DataError("UPDATE models ...", {}, cause)

    return CorralApp(fe, api)


async def test_an_unexpected_error_is_a_json_500_with_a_request_id(
    caplog: pytest.LogCaptureFixture,
) -> None:
    transport = httpx.ASGITransport(app=_app(), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://corral") as c:
        with caplog.at_level(logging.ERROR, logger="corral.frontend.app"):
            r = await c.get("/api/boom")
            given = await c.get("/api/boom", headers={"x-request-id": "trace-7"})
    assert r.status_code == 500
    error = r.json()["error"]
    rid = error["request_id"]
    assert rid.startswith("req-") and r.headers["x-request-id"] == rid
    assert error["type"] == "server_error" and rid in error["message"]
    assert "a bug" not in r.text  # the cause stays in the log
    assert given.json()["error"]["request_id"] == "trace-7"
    logged = [rec for rec in caplog.records if rid in rec.getMessage()]
    assert logged and logged[0].exc_info is not None  # with its traceback
    assert "RuntimeError: a bug" in caplog.text


async def test_a_value_the_database_cannot_store_is_a_400() -> None:
    transport = httpx.ASGITransport(app=_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://corral") as c:
        r = await c.get("/api/too-big")
    assert r.status_code == 400
    assert "integer out of range" in r.json()["error"]["message"]


def test_input_error_finds_the_data_error_behind_the_wrappers() -> None:
    client_side = asyncpg.exceptions._base.DataError(
        "invalid input for query argument $1: 2147483648 (value out of int32 range)"
    )
    wrapped = DataError("DELETE ...", {}, client_side)
    bad = input_error(wrapped)
    assert bad is not None and "int32" in bad.message
    assert input_error(RuntimeError("x")) is None
    assert input_error(DataError("x", {}, ConnectionError("gone"))) is None


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("plain", None),
        ("ünïcødé ✓", None),
        ("a\x00b", "NUL"),
        ("a\ud800b", "surrogate (U+D800)"),
        ("\udfff", "surrogate (U+DFFF)"),
    ],
)
def test_unstorable(text: str, reason: str | None) -> None:
    found = unstorable(text)
    assert (found is None) if reason is None else (found is not None and reason in found)


def test_find_unstorable_names_the_field() -> None:
    assert find_unstorable({"a": [1, "ok", {"b": "x"}]}) is None
    assert find_unstorable({"a": [1, "ok", {"b": "x\x00"}]}) == (
        "a[2].b",
        "contains a NUL character (U+0000)",
    )
    field, reason = find_unstorable({"labels": {"k\x00": "v"}}) or ("", "")
    assert field == "labels.k\x00" and "key" in reason
    assert find_unstorable("\x00") == ("body", "contains a NUL character (U+0000)")

"""Request ids: a client's x-request-id is kept when short and safe, replaced otherwise; the
JSON log format puts the current request's id on each line."""

from __future__ import annotations

import json
import logging
import sys

import pytest

from corral.frontend.http.request_id import MAX_LENGTH, Origin, RequestIds
from corral.logs import REQUEST_ID, JsonFormatter, RequestIdFilter


def test_a_valid_client_id_is_kept() -> None:
    ids = RequestIds("p")
    for value in (b"abc-123", b"req_9.Z:x/y+z=@", b"a" * MAX_LENGTH):
        assert ids([(b"accept", b"*/*"), (b"x-request-id", value)]) == (value, Origin.CLIENT)


@pytest.mark.parametrize(
    "value", [b"", b"a" * (MAX_LENGTH + 1), b"has space", b"new\nline", b'quote"', b"\xff"]
)
def test_an_unsafe_client_id_is_replaced(value: bytes) -> None:
    assert RequestIds("p")([(b"x-request-id", value)]) == (b"p-1", Origin.REPLACED)


def test_generated_ids_are_unique_and_per_process_prefixed() -> None:
    ids = RequestIds()
    made = {ids([])[0] for _ in range(1000)}
    assert ids([(b"accept", b"*/*")])[1] == Origin.GENERATED
    assert len(made) == 1000
    assert len({m.split(b"-")[0] for m in made}) == 1
    assert RequestIds().prefix != ids.prefix


def _record(message: str, exc: bool = False) -> logging.LogRecord:
    record = logging.LogRecord("corral.x", logging.INFO, __file__, 1, message, None, None)
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            record.exc_info = sys.exc_info()
    RequestIdFilter().filter(record)
    return record


def test_json_lines_carry_the_request_id_of_their_context() -> None:
    fmt = JsonFormatter()
    outside = json.loads(fmt.format(_record("idle")))
    assert outside["message"] == "idle" and "request_id" not in outside
    token = REQUEST_ID.set(b"abc-1")
    try:
        line = fmt.format(_record("served", exc=True))
    finally:
        REQUEST_ID.reset(token)
    inside = json.loads(line)
    assert inside["request_id"] == "abc-1"
    assert (inside["level"], inside["logger"]) == ("INFO", "corral.x")
    assert inside["time"].endswith("Z")
    assert "ValueError: boom" in inside["exception"]
    assert "\n" not in line, "one line per record"

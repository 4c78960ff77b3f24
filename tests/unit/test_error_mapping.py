"""The error tree by cause and its mapping to HTTP status, OpenAI type and code at the edge."""

from __future__ import annotations

import pytest

from corral.errors import (
    BadRequest,
    CorralError,
    LoadTimeout,
    NodeUnreachable,
    RateLimited,
    Unavailable,
)
from corral.frontend.asgi import error_headers, error_payload

RETRY_AFTER: list[tuple[str, float | None, bytes | None]] = [
    ("none", None, None),
    ("whole", 3, b"3"),
    ("rounds-up", 1.2, b"2"),
    ("rounds-up-tiny", 2.0001, b"3"),
    ("at-least-one", 0.1, b"1"),
    ("zero-becomes-one", 0, b"1"),
]


@pytest.mark.parametrize(
    ("retry_after", "header"), [r[1:] for r in RETRY_AFTER], ids=[r[0] for r in RETRY_AFTER]
)
def test_error_headers_retry_after(retry_after: float | None, header: bytes | None) -> None:
    headers = dict(error_headers(Unavailable("busy", retry_after=retry_after)))
    assert headers[b"content-type"] == b"application/json"
    assert headers.get(b"retry-after") == header


def test_error_payload_openai_shape() -> None:
    payload = error_payload(BadRequest("'model' is required", param="model"))
    assert payload == {
        "error": {
            "message": "'model' is required",
            "type": "invalid_request_error",
            "param": "model",
            "code": "invalid_request",
        }
    }
    assert error_payload(RateLimited("slow down"))["error"] == {
        "message": "slow down",
        "type": "rate_limit_error",
        "param": None,
        "code": "rate_limited",
    }


def test_error_payload_includes_extra_fields() -> None:
    load = {"state": "loading", "percent": 40.0, "node_id": "n1"}
    payload = error_payload(LoadTimeout("still loading", retry_after=5, load=load, model="m"))
    error = payload["error"]
    assert error["load"] == load
    assert error["model"] == "m"
    assert error["code"] == "model_loading"
    assert error["type"] == "server_error"


@pytest.mark.parametrize("flag", ["no_responders", "timed_out"])
def test_error_payload_hides_internal_flags(flag: str) -> None:
    error = error_payload(NodeUnreachable("node n1 did not answer", **{flag: True}))["error"]
    assert flag not in error
    assert error["message"] == "node n1 did not answer"


def test_error_payload_extra_cannot_override_standard_fields() -> None:
    error = error_payload(CorralError("boom", code="spoofed", type="spoofed"))["error"]
    assert (error["message"], error["type"], error["code"]) == ("boom", "server_error", None)

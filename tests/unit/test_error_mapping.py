"""The error tree by cause and its mapping to HTTP status, OpenAI type and code at the edge."""

from __future__ import annotations

import pytest

from corral import errors
from corral.errors import (
    BadRequest,
    CorralError,
    LoadTimeout,
    NodeUnreachable,
    RateLimited,
    Unavailable,
)
from corral.frontend.asgi import error_headers, error_payload
from corral.frontend.errors_http import WIRE, describe

#: What clients saw before the tree was organised by cause; the wire must not change.
WIRE_CODES: list[tuple[type[CorralError], int, str, str | None]] = [
    (errors.CorralError, 500, "server_error", None),
    (errors.BadRequest, 400, "invalid_request_error", "invalid_request"),
    (errors.PayloadTooLarge, 413, "invalid_request_error", "payload_too_large"),
    (errors.MethodNotAllowed, 405, "invalid_request_error", "method_not_allowed"),
    (errors.ConfigError, 400, "invalid_request_error", "invalid_config"),
    (errors.Unauthorized, 401, "authentication_error", "invalid_api_key"),
    (errors.Forbidden, 403, "permission_error", "forbidden"),
    (errors.NotFound, 404, "invalid_request_error", "not_found"),
    (errors.ModelNotFound, 404, "invalid_request_error", "model_not_found"),
    (errors.ResponseNotFound, 404, "invalid_request_error", "response_not_found"),
    (errors.UnsupportedEndpoint, 400, "invalid_request_error", "unsupported_endpoint"),
    (errors.Conflict, 409, "invalid_request_error", "conflict"),
    (errors.RateLimited, 429, "rate_limit_error", "rate_limited"),
    (errors.Unavailable, 503, "server_error", "unavailable"),
    (errors.NoCapacity, 503, "server_error", "no_capacity"),
    (errors.LoadTimeout, 503, "server_error", "model_loading"),
    (errors.LoadFailed, 503, "server_error", "model_load_failed"),
    (errors.QueueFull, 429, "rate_limit_error", "queue_full"),
    (errors.NoEligibleNode, 503, "server_error", "no_eligible_node"),
    (errors.DeadlineExceeded, 504, "server_error", "deadline_exceeded"),
    (errors.UpstreamError, 502, "server_error", "upstream_error"),
    (errors.UpstreamTimeout, 504, "server_error", "upstream_timeout"),
    (errors.ReplicaGone, 502, "server_error", "replica_gone"),
    (errors.NodeUnreachable, 503, "server_error", "node_unreachable"),
    (errors.FrontendUnreachable, 503, "server_error", "frontend_unreachable"),
    (errors.CommandFailed, 502, "server_error", "command_failed"),
    (errors.ProcessStartError, 502, "server_error", "backend_start_failed"),
    (errors.InstallError, 502, "server_error", "backend_install_failed"),
    (errors.ArtifactError, 502, "server_error", "artifact_error"),
    (errors.EmbeddedError, 500, "server_error", "embedded_server_error"),
]


@pytest.mark.parametrize(
    ("cls", "status", "kind", "code"), WIRE_CODES, ids=[w[0].__name__ for w in WIRE_CODES]
)
def test_wire_codes_stay_what_clients_know(
    cls: type[CorralError], status: int, kind: str, code: str | None
) -> None:
    exc = cls("x")
    wire = describe(exc)
    assert (wire.status, wire.type, wire.code) == (status, kind, code)
    assert (exc.status, exc.type, exc.code) == (status, kind, code), "servers outside the edge"


CAUSES: list[tuple[type[CorralError], type[CorralError], bool]] = [
    (errors.BadRequest, errors.InvalidInput, False),
    (errors.PayloadTooLarge, errors.InvalidInput, False),
    (errors.Unauthorized, errors.AccessDenied, False),
    (errors.Forbidden, errors.AccessDenied, False),
    (errors.ModelNotFound, errors.NotFound, False),
    (errors.NoCapacity, errors.CapacityError, True),
    (errors.RateLimited, errors.CapacityError, True),
    (errors.QueueFull, errors.RateLimited, True),
    (errors.NoEligibleNode, errors.Unavailable, False),
    (errors.DeadlineExceeded, errors.TimedOut, True),
    (errors.LoadTimeout, errors.TimedOut, True),
    (errors.LoadTimeout, errors.CapacityError, True),
    (errors.UpstreamTimeout, errors.TimedOut, True),
    (errors.UpstreamTimeout, errors.TransportError, True),
    (errors.ReplicaGone, errors.TransportError, True),
    (errors.NodeUnreachable, errors.TransportError, True),
    (errors.FrontendUnreachable, errors.TransportError, True),
    (errors.LoadFailed, errors.OperationFailed, True),
    (errors.InstallError, errors.OperationFailed, False),
    (errors.EmbeddedError, errors.OperationFailed, False),
    (errors.ConfigError, errors.CorralError, False),
]


@pytest.mark.parametrize(
    ("cls", "cause", "retryable"),
    CAUSES,
    ids=[f"{c[0].__name__}-{c[1].__name__}" for c in CAUSES],
)
def test_errors_are_organised_by_cause_and_say_whether_retrying_helps(
    cls: type[CorralError], cause: type[CorralError], retryable: bool
) -> None:
    assert issubclass(cls, cause)
    assert cls("x").retryable is retryable


def test_every_error_class_has_a_wire_form() -> None:
    classes = [
        c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, CorralError)
    ]
    categories = {errors.InvalidInput, errors.AccessDenied, errors.CapacityError}
    categories |= {errors.TransportError, errors.TimedOut, errors.OperationFailed}
    assert categories <= set(WIRE), "every cause has a row of its own"
    for cls in classes:
        assert describe(cls("x")).status >= 400


def test_an_error_without_its_own_row_answers_like_its_cause() -> None:
    class Overloaded(Unavailable):
        """Not in the table."""

    assert describe(Overloaded("busy")) == describe(Unavailable("busy"))


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

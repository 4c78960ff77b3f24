"""The API edge's view of errors: each error class maps to an HTTP status, OpenAI type and code.

The mapping follows the class hierarchy (`describe` walks the MRO), so an error class without
its own row answers like its cause category. The codes are the stable wire codes clients see.
"""

from __future__ import annotations

from dataclasses import dataclass

from corral.errors import (
    AccessDenied,
    ArtifactError,
    CapacityError,
    CommandFailed,
    ConfigError,
    Conflict,
    CorralError,
    DeadlineExceeded,
    EmbeddedError,
    Forbidden,
    FrontendUnreachable,
    HeadersTooLarge,
    InstallError,
    InvalidInput,
    LoadFailed,
    LoadTimeout,
    MethodNotAllowed,
    ModelNotAllowed,
    ModelNotFound,
    NoCapacity,
    NodeUnreachable,
    NoEligibleNode,
    NotFound,
    OperationFailed,
    PayloadTooLarge,
    ProcessStartError,
    QueueFull,
    RateLimited,
    ReplicaGone,
    RequestTimeout,
    ResponseNotFound,
    TimedOut,
    TransportError,
    Unauthorized,
    Unavailable,
    UnsupportedEndpoint,
    UpstreamError,
    UpstreamTimeout,
)


@dataclass(frozen=True, slots=True)
class HttpError:
    """How one error class shows on the wire."""

    status: int
    type: str  # the OpenAI error type
    code: str | None  # the stable machine-readable code


_INVALID = "invalid_request_error"
_SERVER = "server_error"

WIRE: dict[type[CorralError], HttpError] = {
    CorralError: HttpError(500, _SERVER, None),
    # the caller's fault
    InvalidInput: HttpError(400, _INVALID, "invalid_request"),
    UnsupportedEndpoint: HttpError(400, _INVALID, "unsupported_endpoint"),
    PayloadTooLarge: HttpError(413, _INVALID, "payload_too_large"),
    MethodNotAllowed: HttpError(405, _INVALID, "method_not_allowed"),
    RequestTimeout: HttpError(408, _INVALID, "request_timeout"),
    HeadersTooLarge: HttpError(431, _INVALID, "headers_too_large"),
    ConfigError: HttpError(400, _INVALID, "invalid_config"),
    AccessDenied: HttpError(403, "permission_error", "forbidden"),
    Unauthorized: HttpError(401, "authentication_error", "invalid_api_key"),
    Forbidden: HttpError(403, "permission_error", "forbidden"),
    ModelNotAllowed: HttpError(403, "permission_error", "model_not_allowed"),
    NotFound: HttpError(404, _INVALID, "not_found"),
    ModelNotFound: HttpError(404, _INVALID, "model_not_found"),
    ResponseNotFound: HttpError(404, _INVALID, "response_not_found"),
    Conflict: HttpError(409, _INVALID, "conflict"),
    # not enough room
    CapacityError: HttpError(503, _SERVER, "unavailable"),
    RateLimited: HttpError(429, "rate_limit_error", "rate_limited"),
    Unavailable: HttpError(503, _SERVER, "unavailable"),
    QueueFull: HttpError(429, "rate_limit_error", "queue_full"),
    NoCapacity: HttpError(503, _SERVER, "no_capacity"),
    NoEligibleNode: HttpError(503, _SERVER, "no_eligible_node"),
    LoadTimeout: HttpError(503, _SERVER, "model_loading"),
    # unreachable or late
    TransportError: HttpError(502, _SERVER, "transport_error"),
    TimedOut: HttpError(504, _SERVER, "timeout"),
    DeadlineExceeded: HttpError(504, _SERVER, "deadline_exceeded"),
    NodeUnreachable: HttpError(503, _SERVER, "node_unreachable"),
    FrontendUnreachable: HttpError(503, _SERVER, "frontend_unreachable"),
    UpstreamError: HttpError(502, _SERVER, "upstream_error"),
    ReplicaGone: HttpError(502, _SERVER, "replica_gone"),
    UpstreamTimeout: HttpError(504, _SERVER, "upstream_timeout"),
    # real work failed
    OperationFailed: HttpError(500, _SERVER, "operation_failed"),
    LoadFailed: HttpError(503, _SERVER, "model_load_failed"),
    CommandFailed: HttpError(502, _SERVER, "command_failed"),
    ProcessStartError: HttpError(502, _SERVER, "backend_start_failed"),
    InstallError: HttpError(502, _SERVER, "backend_install_failed"),
    ArtifactError: HttpError(502, _SERVER, "artifact_error"),
    EmbeddedError: HttpError(500, _SERVER, "embedded_server_error"),
}


def describe(exc: CorralError) -> HttpError:
    """The wire form of `exc`: its own class's row, else its nearest ancestor's."""
    for cls in type(exc).__mro__:
        found = WIRE.get(cls)
        if found is not None:
            return found
    return WIRE[CorralError]

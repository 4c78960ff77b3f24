"""The one exception tree of Corral; every error a caller may handle is a subclass of CorralError.

HTTP-facing errors carry the status, OpenAI error type and code they map to, so a handler
turns any of them into the same OpenAI-style JSON without a lookup table.
"""

from __future__ import annotations

from typing import Any


class CorralError(Exception):
    """Base of every error Corral raises on purpose."""

    status: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, retry_after: float | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        self.extra = extra


# --- configuration -----------------------------------------------------------------------


class ConfigError(CorralError):
    """A configuration file or setting is invalid; the message names the file and the field."""

    status = 400
    type = "invalid_request_error"
    code = "invalid_config"

    def __init__(self, message: str, *, path: str | None = None, field: str | None = None) -> None:
        where = ": ".join(p for p in (path, field) if p)
        super().__init__(f"{where}: {message}" if where else message)
        self.path = path
        self.field = field


# --- API (client-facing) -----------------------------------------------------------------


class BadRequest(CorralError):
    """The request body or parameters are malformed (HTTP 400)."""

    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class Unauthorized(CorralError):
    """Missing or wrong credentials (HTTP 401)."""

    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class Forbidden(CorralError):
    """Valid credentials acting outside what they allow (HTTP 403)."""

    status = 403
    type = "permission_error"
    code = "forbidden"


class ModelNotFound(CorralError):
    """The requested model is not declared (HTTP 404)."""

    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class NotFound(CorralError):
    """A resource other than a model does not exist (HTTP 404)."""

    status = 404
    type = "invalid_request_error"
    code = "not_found"


class MethodNotAllowed(CorralError):
    """The endpoint exists but not for this HTTP method (HTTP 405)."""

    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class Conflict(CorralError):
    """The request conflicts with the current state (HTTP 409)."""

    status = 409
    type = "invalid_request_error"
    code = "conflict"


class RequestTimeout(CorralError):
    """The client sent its request headers or body too slowly (HTTP 408); the connection closes."""

    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class HeadersTooLarge(CorralError):
    """The request line and headers exceed the server's limit (HTTP 431)."""

    status = 431
    type = "invalid_request_error"
    code = "headers_too_large"


class PayloadTooLarge(CorralError):
    """The request body exceeds the configured limit (HTTP 413)."""

    status = 413
    type = "invalid_request_error"
    code = "payload_too_large"


class RateLimited(CorralError):
    """Too many requests in flight (HTTP 429)."""

    status = 429
    type = "rate_limit_error"
    code = "rate_limited"


class Unavailable(CorralError):
    """No replica can serve now; the client should retry after `retry_after` (HTTP 503)."""

    status = 503
    type = "server_error"
    code = "unavailable"


class NoCapacity(Unavailable):
    """No healthy node can host the model (no worker, selector matches nothing, no memory)."""

    code = "no_capacity"


class LoadTimeout(Unavailable):
    """A model load is still running past the wait budget; the body carries its progress."""

    code = "model_loading"


class LoadFailed(CorralError):
    """A model load failed on its node; the message carries the backend's own error."""

    status = 503
    type = "server_error"
    code = "model_load_failed"


class UpstreamError(CorralError):
    """A backend failed in a way that is not the client's fault (HTTP 502)."""

    status = 502
    type = "server_error"
    code = "upstream_error"


class UpstreamTimeout(UpstreamError):
    """A backend did not answer in time (HTTP 504)."""

    status = 504
    code = "upstream_timeout"


# --- internal (not client-facing) --------------------------------------------------------


class ReplicaGone(CorralError):
    """A backend no longer serves the model (unloaded, other model, connection refused).

    Raised before any byte reached the client, so the router may drop the replica and retry.
    """

    status = 502
    code = "replica_gone"


class NodeUnreachable(CorralError):
    """A node did not answer a command (no responders or timeout)."""

    status = 503
    code = "node_unreachable"


class CommandFailed(CorralError):
    """A node answered a command with an error."""

    status = 502
    code = "command_failed"


class ProcessStartError(CorralError):
    """A backend process exited or never became healthy; the message holds its stderr tail."""

    status = 502
    code = "backend_start_failed"


class InstallError(CorralError):
    """Installing a backend failed; the message holds the installer's output tail."""

    status = 502
    code = "backend_install_failed"


class ArtifactError(CorralError):
    """A model artifact could not be staged (digest mismatch, no disk space, not found)."""

    status = 502
    code = "artifact_error"

"""The one exception tree of Corral, organised by cause (the way httpx organises its exceptions).

A class says *why* something failed, not how an API shows it: the HTTP status, OpenAI error
type and error code of each class are mapped at the API edge (`corral.frontend.errors_http`).
Every class says whether trying again can help (`retryable`); an instance may say when
(`retry_after`, seconds).

    CorralError
    ├── InvalidInput            the caller sent something malformed
    │   ├── BadRequest
    │   │   └── UnsupportedEndpoint  the model's backend does not serve this endpoint
    │   ├── PayloadTooLarge
    │   ├── MethodNotAllowed
    │   ├── RequestTimeout      headers or body arrived too slowly
    │   └── HeadersTooLarge
    ├── ConfigError             a configuration file or setting is invalid
    ├── AccessDenied
    │   ├── Unauthorized        missing or wrong credentials
    │   └── Forbidden           valid credentials acting outside what they allow
    │       └── ModelNotAllowed an inference key used for a model it is not limited to
    ├── NotFound
    │   ├── ModelNotFound
    │   └── ResponseNotFound    no replica holds a stored response with this id
    ├── Conflict                the request conflicts with the current state
    ├── CapacityError           not enough room right now                       (retryable)
    │   ├── RateLimited
    │   │   └── QueueFull       the model's wait queue is full
    │   └── Unavailable
    │       ├── NoCapacity
    │       ├── NoEligibleNode  no node matches the selector or runs the backend (not retryable)
    │       └── LoadTimeout     (also TimedOut)
    ├── TransportError          another part of the cluster could not be reached (retryable)
    │   ├── NodeUnreachable     a node did not answer a NATS command
    │   ├── FrontendUnreachable a worker could not reach a frontend over HTTP
    │   └── UpstreamError       a backend failed over HTTP
    │       ├── ReplicaGone
    │       └── UpstreamTimeout (also TimedOut)
    ├── TimedOut                something did not answer or finish in time      (retryable)
    │   └── DeadlineExceeded    a request waited in the queue past its deadline
    └── OperationFailed         a step of real work failed; the message says why
        ├── LoadFailed          (retryable: another node or a later try may work)
        ├── CommandFailed
        ├── ProcessStartError
        ├── InstallError
        ├── ArtifactError
        └── EmbeddedError
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from corral.frontend.errors_http import HttpError


class CorralError(Exception):
    """Base of every error Corral raises on purpose."""

    retryable: bool = False  # whether the same request may succeed later

    def __init__(self, message: str, *, retry_after: float | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after  # seconds to wait before retrying, when known
        self.extra = extra  # fields an API may show (param, load progress, ...)

    # HTTP servers outside the frontend (the sim backend) read these; new code asks the edge
    # mapping (`corral.frontend.errors_http.describe`) directly.
    @property
    def status(self) -> int:
        return _describe(self).status

    @property
    def type(self) -> str:
        return _describe(self).type

    @property
    def code(self) -> str | None:
        return _describe(self).code


def _describe(exc: CorralError) -> HttpError:
    from corral.frontend.errors_http import describe  # the edge owns the mapping

    return describe(exc)


# --- the caller's fault --------------------------------------------------------------------


class InvalidInput(CorralError):
    """The caller sent something malformed."""


class BadRequest(InvalidInput):
    """The request body or parameters are malformed."""


class UnsupportedEndpoint(BadRequest):
    """The model's backend does not serve the requested endpoint (never a load)."""


class PayloadTooLarge(InvalidInput):
    """The request body exceeds the configured limit."""


class MethodNotAllowed(InvalidInput):
    """The endpoint exists, but not for this method."""


class ConfigError(CorralError):
    """A configuration file or setting is invalid; the message names the file and the field."""

    def __init__(self, message: str, *, path: str | None = None, field: str | None = None) -> None:
        where = ": ".join(p for p in (path, field) if p)
        super().__init__(f"{where}: {message}" if where else message)
        self.path = path
        self.field = field


class AccessDenied(CorralError):
    """The caller may not do this."""


class Unauthorized(AccessDenied):
    """Missing or wrong credentials."""


class Forbidden(AccessDenied):
    """Valid credentials acting outside what they allow."""


class ModelNotAllowed(Forbidden):
    """An inference key limited to some models was used for another one."""


class NotFound(CorralError):
    """A resource does not exist."""


class ModelNotFound(NotFound):
    """The requested model is not declared."""


class ResponseNotFound(NotFound):
    """No replica holds a stored response with this id: never stored, deleted, or its replica
    is gone (engines keep response state in process)."""


class Conflict(CorralError):
    """The request conflicts with the current state."""


class RequestTimeout(InvalidInput):
    """The client sent its request headers or body too slowly; the connection closes."""


class HeadersTooLarge(InvalidInput):
    """The request line and headers exceed the server's limit."""


# --- not enough room ------------------------------------------------------------------------


class CapacityError(CorralError):
    """Not enough room right now; retrying later can help."""

    retryable = True


class RateLimited(CapacityError):
    """Too many requests in flight."""


class QueueFull(RateLimited):
    """The model's wait queue holds as many requests (or bytes) as it may."""


class Unavailable(CapacityError):
    """No replica can serve now; the client should retry after `retry_after`."""


class NoCapacity(Unavailable):
    """No healthy node can host the model now (no worker, no memory, every replica that could
    make room busy or held at its minimum); the message says which."""


class NoEligibleNode(Unavailable):
    """No healthy node matches the model's selector or runs its backend: retrying the same
    request cannot help until an operator changes the cluster (no Retry-After)."""

    retryable = False


# --- another part could not be reached, or did not answer in time ----------------------------


class TransportError(CorralError):
    """Another part of the cluster could not be reached; retrying can help."""

    retryable = True


class TimedOut(CorralError):
    """Something did not answer or finish in time; retrying can help."""

    retryable = True


class DeadlineExceeded(TimedOut):
    """A request waited for a replica slot past its deadline (it never reached a backend)."""


class LoadTimeout(Unavailable, TimedOut):
    """A model load is still running past the wait budget; the error carries its progress."""


class NodeUnreachable(TransportError):
    """A node did not answer a command (`no_responders` or `timed_out` in `extra`)."""


class FrontendUnreachable(TransportError):
    """A worker could not reach a frontend, or the frontend answered with a server error."""


class UpstreamError(TransportError):
    """A backend failed in a way that is not the client's fault."""


class ReplicaGone(UpstreamError):
    """A backend no longer serves the model (unloaded, other model, connection refused).

    Raised before any byte reached the client, so the router may drop the replica and retry.
    """


class UpstreamTimeout(UpstreamError, TimedOut):
    """A backend did not answer in time."""


# --- real work failed ----------------------------------------------------------------------


class OperationFailed(CorralError):
    """A step of real work (a load, a start, an install) failed; the message says why."""


class LoadFailed(OperationFailed):
    """A model load failed on its node; the message carries the backend's own error."""

    retryable = True  # on another node, or once the cause is fixed


class CommandFailed(OperationFailed):
    """A node answered a command with an error."""


class ProcessStartError(OperationFailed):
    """A backend process exited or never became healthy; the message holds its stderr tail."""


class InstallError(OperationFailed):
    """Installing a backend failed; the message holds the installer's output tail."""


class ArtifactError(OperationFailed):
    """A model artifact could not be staged (digest mismatch, no disk space, not found)."""


class EmbeddedError(OperationFailed):
    """An embedded server could not be prepared, started or stopped; the message says why."""


class ListenError(OperationFailed):
    """The frontend cannot listen on its address (the port is in use, or not permitted)."""

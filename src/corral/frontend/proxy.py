"""The OpenAI data plane: route each request to the best loaded replica and relay its bytes.

The warm path reads only the in-memory view: parse the body once for `model` and `stream`,
pick a replica, reserve an in-flight slot, forward the request bytes, and stream the
response bytes back unchanged. The slot is released exactly once on every path.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from corral.domain.actions import DropReplica
from corral.domain.entities import ModelSpec, Replica
from corral.domain.pick import pick_replica
from corral.errors import (
    BadRequest,
    CorralError,
    MethodNotAllowed,
    ModelNotFound,
    RateLimited,
    ReplicaGone,
    Unavailable,
    UpstreamError,
    UpstreamTimeout,
)
from corral.frontend.asgi import AsgiExchange, ClientGone, Receive, Scope, Send, sse_error
from corral.frontend.auth import Authorizer
from corral.frontend.http.exchange import Exchange, Headers, respond_error
from corral.frontend.inflight import InflightTracker
from corral.frontend.probe import ProbeCache
from corral.frontend.upstream import UpstreamPool, UpstreamResponse
from corral.frontend.view import ClusterView

log = logging.getLogger(__name__)

#: Required body fields per endpoint.
REQUIRED = {
    b"/v1/chat/completions": "messages",
    b"/v1/completions": "prompt",
    b"/v1/embeddings": "input",
}
MAX_ATTEMPTS = 3  # the first try and at most two retries after a replica turned out gone
NOT_LOADED_MARKERS = (b"model_not_found", b"not loaded", b"does not exist", b"not found")
_FORWARD_REQUEST_HEADERS = (b"accept", b"user-agent", b"x-request-id")


Tried = tuple[str, int, str | None]


def _tried(replica: Replica) -> Tried:
    """A tried replica's identity: a fresh load under the same index is another replica."""
    return (replica.model, replica.index, replica.address)


class ParsedRequest:
    """What routing needs from a request body."""

    __slots__ = ("body", "model", "path", "stream")

    def __init__(self, path: bytes, body: bytes, model: str, stream: bool) -> None:
        self.path = path
        self.body = body
        self.model = model
        self.stream = stream


def parse_request(path: bytes, body: bytes) -> ParsedRequest:
    """Validate the JSON body just enough to route it (model, stream, the required field)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object")
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' is required and must be a string", param="model")
    required = REQUIRED.get(path)
    if required is not None and required not in data:
        raise BadRequest(f"'{required}' is required", param=required)
    stream = data.get("stream") or False  # null means false, as in the OpenAI API
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be a boolean", param="stream")
    return ParsedRequest(path, body, model, stream)


class OpenAIProxy:
    """Serves POST /v1/chat/completions, /v1/completions and /v1/embeddings."""

    def __init__(
        self,
        *,
        view: ClusterView,
        inflight: InflightTracker,
        pool: UpstreamPool,
        probes: ProbeCache,
        ensure_replica: Callable[[ModelSpec], Awaitable[None]],
        drop_replica: Callable[[DropReplica], Awaitable[object]],  # the actuator's apply
        authorizer: Authorizer,
        max_body_bytes: int,
        request_timeout: float,
        max_inflight: int = 0,
    ) -> None:
        self.view = view
        self.inflight = inflight
        self.pool = pool
        self.probes = probes
        self.ensure_replica = ensure_replica
        self.drop_replica = drop_replica
        self.authorizer = authorizer
        self.max_body_bytes = max_body_bytes
        self.request_timeout = request_timeout
        self.max_inflight = max_inflight
        self._turn = 0
        self.used: dict[tuple[str, int], float] = {}  # last-used times not yet flushed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The proxy as an ASGI app (under uvicorn, granian, or in tests)."""
        await self.handle(AsgiExchange(scope, receive, send))

    async def handle(self, exchange: Exchange) -> None:
        """Answer one POST to an inference path."""
        try:
            if exchange.method != b"POST":
                method = exchange.method.decode("latin-1")
                raise MethodNotAllowed(f"{method} is not allowed here; use POST")
            self.authorizer.check_headers(exchange.headers)
            if self.max_inflight and self.inflight.local_total() >= self.max_inflight:
                raise RateLimited("too many requests in flight on this frontend", retry_after=1)
            body = await exchange.body(self.max_body_bytes)
            request = parse_request(exchange.path, body)
            spec = self.view.models.get(request.model)
            if spec is None:
                raise ModelNotFound(f"The model '{request.model}' does not exist", param="model")
        except ClientGone:
            return
        except CorralError as exc:
            await respond_error(exchange, exc)
            return
        headers = [(k, v) for k, v in exchange.headers if k in _FORWARD_REQUEST_HEADERS]
        headers.append((b"content-type", b"application/json"))
        await self._route(spec, request, headers, exchange)

    async def _route(
        self, spec: ModelSpec, request: ParsedRequest, headers: Headers, exchange: Exchange
    ) -> None:
        tried: set[Tried] = set()  # (model, index, address): a reload may reuse the index
        last_error: CorralError | None = None
        for _ in range(MAX_ATTEMPTS):
            try:
                replica = await self._choose(spec, tried, request.stream)
            except CorralError as exc:
                await respond_error(exchange, exc)
                return
            idle = self.inflight.total(replica.key) == 0
            slot = self.inflight.acquire(replica.key)
            try:
                response = await self._forward(replica, spec, request, headers, idle)
                if response is None:
                    tried.add(_tried(replica))
                    continue
                await self._relay(replica, response, request.stream, exchange)
                return
            except ReplicaGone as exc:
                tried.add(_tried(replica))
                last_error = exc
                await self.drop_replica(DropReplica.of(replica, exc.message))
            except CorralError as exc:
                await respond_error(exchange, exc)
                return
            finally:
                slot.release()
        await respond_error(
            exchange,
            Unavailable(
                f"model '{spec.name}' lost {len(tried)} replicas while serving this request"
                + (f" (last: {last_error.message})" if last_error else ""),
                retry_after=1,
            ),
        )

    async def _choose(self, spec: ModelSpec, tried: set[Tried], stream: bool = False) -> Replica:
        """The best replica not tried yet; waits for a cold load when there is none."""
        for _ in range(2):
            candidates = self.view.candidates(spec.name)
            if tried:
                candidates = [r for r in candidates if _tried(r) not in tried]
            if candidates:
                self._turn += 1
                chosen = pick_replica(
                    candidates,
                    self.inflight.view(),
                    self.view.free_memory(),
                    self._turn,
                    last_used=self.view.last_used,
                    latency=self.view.latency[stream],
                )
                assert chosen is not None
                now = time.time()
                self.view.last_used[chosen.key] = now
                self.used[chosen.key] = now
                return chosen
            await self.ensure_replica(spec)
        raise Unavailable(f"model '{spec.name}' has no replica ready", retry_after=2)

    async def _forward(
        self,
        replica: Replica,
        spec: ModelSpec,
        request: ParsedRequest,
        headers: list[tuple[bytes, bytes]],
        idle: bool = False,
    ) -> UpstreamResponse | _Buffered | None:
        """Send the request; None when the replica turned out gone (already dropped).

        When the replica had nothing else in flight, its time to first byte is its own speed
        (no queueing behind other requests) and feeds the speed weights of `pick_replica`.
        """
        assert replica.address is not None
        reason = await self.probes.check(replica.node_id, replica.address, spec.name)
        if reason is not None:
            await self.drop_replica(DropReplica.of(replica, reason))
            return None
        started = time.monotonic()
        response = await self.pool.request(
            replica.address,
            b"POST",
            request.path,
            request.body,
            headers=headers,
            timeout=self.request_timeout,
        )
        if idle:
            self.view.observe_latency(replica.key, request.stream, time.monotonic() - started)
        if response.status in (404, 409, 400):
            body = await response.read()
            if response.status != 400 or b"not loaded" in body:
                lowered = body.lower()
                if any(m in lowered for m in NOT_LOADED_MARKERS):
                    await self.drop_replica(DropReplica.of(replica, _reason(body, response.status)))
                    return None
            return _Buffered(response, body)
        return response

    async def _relay(
        self,
        replica: Replica,
        response: UpstreamResponse | _Buffered,
        stream: bool,
        exchange: Exchange,
    ) -> None:
        assert replica.address is not None
        if isinstance(response, _Buffered) or not stream or response.status != 200:
            body = response.body if isinstance(response, _Buffered) else await response.read()
            out_headers = [(k, v) for k, v in response.forward_headers() if k != b"content-length"]
            await exchange.respond(response.status, out_headers, body)
            if response.status < 500:
                self.probes.mark_ok(replica.node_id, replica.address)
            return
        # head and whatever body already arrived go out together
        await exchange.start(response.status, response.forward_headers(), response.ready())
        exchange.on_disconnect = response.abort
        try:
            if exchange.gone:
                response.abort()
            async for chunk in response.iter_body():
                await exchange.write(chunk)
        except CorralError as exc:
            if exchange.gone:
                return  # the client left; nothing to tell it
            await exchange.write(sse_error(exc))
            if not isinstance(exc, UpstreamTimeout):  # slow is not dead
                await self.drop_replica(DropReplica.of(replica, f"stream broke: {exc.message}"))
        finally:
            exchange.on_disconnect = None
        await exchange.end()
        self.probes.mark_ok(replica.node_id, replica.address)


class _Buffered:
    """A response whose (small) body was already read while checking for self-heal cases."""

    __slots__ = ("body", "forward_headers", "status")

    def __init__(self, response: UpstreamResponse, body: bytes) -> None:
        self.status = response.status
        self.forward_headers = response.forward_headers
        self.body = body


def _reason(body: bytes, status: int) -> str:
    try:
        data: Any = orjson.loads(body)
        message = data.get("error", {}).get("message") or data.get("detail")
        if message:
            return f"backend answered {status}: {message}"
    except (orjson.JSONDecodeError, AttributeError):
        pass
    return f"backend answered {status}: model not loaded"


__all__ = ["OpenAIProxy", "ParsedRequest", "UpstreamError", "parse_request"]

"""The OpenAI data plane: route each request to the best loaded replica and relay its bytes.

The warm path reads only the in-memory view: read the request once for what routing needs
(`corral.frontend.request`: the model, `stream`, a multipart upload spooled), check that the
model's backend serves the endpoint, pick a replica (or the replica holding a stored response:
`corral.frontend.responses_map`), reserve an in-flight slot, forward the request bytes, and
stream the response bytes back unchanged. The slot is released exactly once on every path.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Collection
from typing import Any

import orjson

from corral.domain.actions import DropReplica
from corral.domain.entities import ModelSpec, Replica, ReplicaState
from corral.domain.routing.candidates import supports
from corral.domain.usage import StreamTail, usage_of
from corral.errors import (
    CorralError,
    MethodNotAllowed,
    ModelNotAllowed,
    ModelNotFound,
    NotFound,
    RateLimited,
    ReplicaGone,
    ResponseNotFound,
    Unavailable,
    UnsupportedEndpoint,
    UpstreamError,
    UpstreamTimeout,
)
from corral.frontend.abort import AbortOnDisconnect
from corral.frontend.admission import AdmissionGate
from corral.frontend.asgi import AsgiExchange, ClientGone, Receive, Scope, Send, sse_error
from corral.frontend.auth import Authorizer
from corral.frontend.headers import HeaderFilter
from corral.frontend.http.exchange import Exchange, Headers, respond_error
from corral.frontend.http.request_id import HEADER as REQUEST_ID_HEADER
from corral.frontend.http.request_id import Origin
from corral.frontend.inflight import InflightTracker
from corral.frontend.metering import Metering
from corral.frontend.metrics import FrontendMetrics
from corral.frontend.probe import ProbeCache
from corral.frontend.request import (
    ENDPOINTS,
    JSON_TYPE,
    ParsedRequest,
    endpoint_for,
    parse_request,
    read_request,
)
from corral.frontend.responses_map import (
    Home,
    ResponseHomes,
    SharedHomes,
    StreamIdScanner,
    id_of_body,
)
from corral.frontend.router import SCORES_HEADER, Router, replica_headers
from corral.frontend.tally import Tally
from corral.frontend.upstream import UpstreamPool, UpstreamResponse
from corral.frontend.view import ClusterView

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3  # the first try and at most two retries after a replica turned out gone
NOT_LOADED_MARKERS = (b"model_not_found", b"not loaded", b"does not exist", b"not found")
#: A 404 about a stored response is the backend's answer, not a sign it lost its model.
STORED_MARKERS = (b"response_not_found", b"response with id")
#: Whole answers up to this size go out in one write; larger or unsized ones stream.
WHOLE_LIMIT = 1024 * 1024
SPOOL_MEMORY = 1024 * 1024
#: Endpoints whose answers carry the backend's token `usage`.
TOKEN_CAPABILITIES = frozenset({"chat", "completions", "embeddings", "responses"})


Tried = tuple[str, int, str | None]


def _tried(replica: Replica) -> Tried:
    """A tried replica's identity: a fresh load under the same index is another replica."""
    return (replica.model, replica.index, replica.address)


class OpenAIProxy:
    """Serves every inference endpoint of `corral.frontend.request` (POST, and GET/DELETE of a
    stored response)."""

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
        forward_headers: HeaderFilter | None = None,
        capabilities: Callable[[ModelSpec], Collection[str] | None] | None = None,
        homes: SharedHomes | None = None,
        spool_memory_bytes: int = SPOOL_MEMORY,
        admission: AdmissionGate | None = None,
        router: Router | None = None,
        metering: Metering | None = None,
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
        self.forward_headers = forward_headers or HeaderFilter()
        self.capabilities = capabilities or _undeclared
        self.homes = homes or SharedHomes(ResponseHomes(10_000, 3600.0), None, "")
        self.spool_memory_bytes = spool_memory_bytes
        #: whether and when a request may go (WHICH replica is `_choose`'s)
        self.admission = admission or AdmissionGate(
            view, inflight, limit_of=_unlimited, ensure_replica=_within(ensure_replica)
        )
        self.router = router or Router(inflight.view())
        self.metering = metering or Metering(FrontendMetrics(), inflight)
        #: per model: the spec its capabilities were read for, and them
        self._served: dict[str, tuple[ModelSpec, Collection[str] | None]] = {}
        #: per replica: its node and the x-corral-replica / x-corral-node response headers
        self._decided: dict[tuple[str, int], tuple[str, list[tuple[bytes, bytes]]]] = {}
        self.used: dict[tuple[str, int], float] = {}  # last-used times not yet flushed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The proxy as an ASGI app (under uvicorn, granian, or in tests)."""
        await self.handle(AsgiExchange(scope, receive, send))

    async def handle(self, exchange: Exchange) -> None:
        """Answer one request to an inference path; the metering learns how it went."""
        tally = Tally(exchange, time.perf_counter())
        try:
            await self._handle(tally)
        finally:
            tally.close()
            self.metering.done(tally)

    async def _handle(self, exchange: Tally) -> None:
        request: ParsedRequest | None = None
        try:
            endpoint = ENDPOINTS.get(exchange.path) or endpoint_for(exchange.path)
            if endpoint is None:
                raise NotFound("no such endpoint")
            exchange.endpoint = endpoint.path
            if exchange.method not in endpoint.methods:
                method = exchange.method.decode("latin-1")
                allowed = "/".join(m.decode() for m in sorted(endpoint.methods))
                raise MethodNotAllowed(f"{method} is not allowed here; use {allowed}")
            grant = exchange.grant = self.authorizer.inference(exchange.headers)
            if self.max_inflight and self.inflight.local_total() >= self.max_inflight:
                raise RateLimited("too many requests in flight on this frontend", retry_after=1)
            if endpoint.body == "json":  # the usual case, without a coroutine more
                body = await exchange.body(self.max_body_bytes)
                request = parse_request(exchange.path, body, endpoint, exchange.query)
            else:
                request = await read_request(
                    exchange, endpoint, self.max_body_bytes, self.spool_memory_bytes
                )
            if request.response_id is None and request.previous_id is None:
                spec, home = self._spec(request), None
            else:
                spec, home = await self._stateful(request)
            if grant is not None and grant.models is not None and spec.name not in grant.models:
                raise ModelNotAllowed(
                    f"this API key may not use the model '{spec.name}'", param="model"
                )
            exchange.model = spec.name
            self.metering.admit(exchange)
        except (ClientGone, CorralError) as exc:
            if request is not None:
                request.close()
            if isinstance(exc, CorralError):
                await respond_error(exchange, exc)
            return
        headers = self.forward_headers(exchange.headers)
        origin = getattr(exchange, "request_id_origin", Origin.CLIENT)  # native server only
        if origin:  # the backend logs the id the client is told (a client's own passes as is)
            if origin == Origin.REPLACED:
                headers = [h for h in headers if h[0] != REQUEST_ID_HEADER]
            headers.append((REQUEST_ID_HEADER, exchange.request_id))  # type: ignore[attr-defined]
        if endpoint.body == "json":  # the usual case: nothing spooled to free
            headers.append(JSON_TYPE)
            await self._route(spec, request, headers, exchange, home)
            return
        request.headers(headers)
        try:
            await self._route(spec, request, headers, exchange, home)
        finally:
            request.close()

    def _spec(self, request: ParsedRequest) -> ModelSpec:
        """The model a request is for, checked against the endpoints it serves."""
        spec = self.view.models.get(request.model)
        if spec is None:
            if request.response_id is not None:
                raise _not_stored(request.response_id, "response_id")
            raise ModelNotFound(f"The model '{request.model}' does not exist", param="model")
        served = self._served.get(spec.name)
        if served is None or served[0] is not spec:  # a new or changed spec
            if len(self._served) > 4 * len(self.view.models) + 64:
                self._served.clear()  # names of removed models
            served = self._served[spec.name] = (spec, self.capabilities(spec))
        endpoint = request.endpoint
        assert endpoint is not None
        if not supports(served[1], endpoint.capability):
            names = ", ".join(served[1] or ())
            raise UnsupportedEndpoint(
                f"model '{spec.name}' does not serve {request.path.decode('latin-1')}"
                f" (its endpoints: {names or 'none'})",
                param="model",
            )
        return spec

    async def _stateful(self, request: ParsedRequest) -> tuple[ModelSpec, Home | None]:
        """The model of a request about a stored response, and the replica holding that
        response (None: unknown here and to the other frontends; any replica may answer)."""
        if request.response_id is not None:  # GET/DELETE /v1/responses/{id}: no model named
            home = await self.homes.find(request.response_id)
            if home is None:
                raise _not_stored(request.response_id, "response_id")
            request.model = home.model
            return self._spec(request), home
        spec = self._spec(request)  # an unsupported endpoint is refused before any lookup
        assert request.previous_id is not None
        found = await self.homes.find(request.previous_id)
        return spec, found if found is not None and found.model == spec.name else None

    async def _route(
        self,
        spec: ModelSpec,
        request: ParsedRequest,
        headers: Headers,
        exchange: Tally,
        home: Home | None = None,
    ) -> None:
        with AbortOnDisconnect(exchange):  # a client that leaves frees its slot at once
            if await self._attempts(spec, request, headers, exchange, home):
                return
        if exchange.gone:
            return
        if home is not None:  # the replica holding the response is gone, and its state with it
            await respond_error(exchange, _home_gone(request))
            return
        await respond_error(
            exchange,
            Unavailable(
                f"model '{spec.name}' lost its replicas while serving this request",
                retry_after=1,
            ),
        )

    async def _attempts(
        self,
        spec: ModelSpec,
        request: ParsedRequest,
        headers: Headers,
        exchange: Tally,
        home: Home | None,
    ) -> bool:
        """Send the request until a replica answers; False when every try found its replica
        gone (the caller answers that)."""
        tried: set[Tried] = set()  # (model, index, address): a reload may reuse the index
        admission = self.admission
        for _ in range(MAX_ATTEMPTS if home is None else 1):
            try:
                if home is None:
                    await admission.enter(spec, exchange.headers, _size(request))  # admission
                    excluded = admission.exclude(spec, tried)
                    replica = await self._choose(spec, excluded, request, exchange)
                else:
                    replica = self._at_home(request, home)
            except CorralError as exc:
                await respond_error(exchange, exc)
                return True
            idle = self.inflight.total(replica.key) == 0
            slot = self.inflight.acquire(replica.key)
            try:
                response = await self._forward(replica, spec, request, headers, idle)
                if response is None:
                    tried.add(_tried(replica))
                    continue
                await self._relay(replica, response, request, exchange)
                return True
            except ReplicaGone as exc:
                tried.add(_tried(replica))
                await asyncio.shield(self.drop_replica(DropReplica.of(replica, exc.message)))
            except CorralError as exc:
                await respond_error(exchange, exc)
                return True
            finally:
                slot.release()
                admission.released(spec.name)
        return False

    def _at_home(self, request: ParsedRequest, home: Home) -> Replica:
        """The replica holding a stored response, if it still serves; else the backend-style
        404 (another replica would not know the response: a wrong answer)."""
        for replica in self.view.candidates(home.model):
            if replica.index == home.index:
                if replica.address != home.address or replica.state != ReplicaState.LOADED:
                    break  # the same index, but a new process: the state is gone
                self._used(replica)
                return replica
        raise _home_gone(request)

    def _used(self, replica: Replica) -> None:
        now = time.time()
        self.view.last_used[replica.key] = now
        self.used[replica.key] = now

    async def _choose(
        self, spec: ModelSpec, tried: set[Tried], request: ParsedRequest, exchange: Exchange
    ) -> Replica:
        """The best replica not tried yet (`Router`: load, prefix and session affinity,
        speed); waits for a cold load when there is none."""
        for _ in range(2):
            candidates = self.view.candidates(spec.name)
            chosen, scores = self.router.choose(spec, candidates, request, exchange.headers, tried)
            if chosen is not None:
                if scores is not None:
                    request.reply_headers = [(SCORES_HEADER, scores)]
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
        (no queueing behind other requests) and feeds the speed estimates of the `Router`
        (not for uploads, whose first byte waits for the upload, nor a stored response read
        back by id).
        """
        assert replica.address is not None
        reason = await self.probes.check(replica.node_id, replica.address, spec.name)
        if reason is not None:
            await self.drop_replica(DropReplica.of(replica, reason))
            return None
        started = time.monotonic()
        response = await self.pool.request(
            replica.address,
            request.method,
            request.target,
            request.body,
            headers=headers,
            timeout=self.request_timeout,
        )
        if idle and isinstance(request.body, bytes) and request.response_id is None:
            took = time.monotonic() - started
            self.view.observe_latency(replica.key, request.stream, took)
            self.router.observe(replica.key, request.stream, took)
        if response.status in (404, 409, 400):
            body = await response.read()
            if _lost_model(response.status, body):
                await self.drop_replica(DropReplica.of(replica, _reason(body, response.status)))
                return None
            return _Buffered(response, body)
        return response

    async def _relay(
        self,
        replica: Replica,
        response: UpstreamResponse | _Buffered,
        request: ParsedRequest,
        exchange: Tally,
    ) -> None:
        assert replica.address is not None
        if (
            isinstance(response, _Buffered)
            or response.status != 200
            or (not request.stream and response.small(WHOLE_LIMIT))
        ):
            body = response.body if isinstance(response, _Buffered) else await response.read()
            out_headers = [(k, v) for k, v in response.forward_headers() if k != b"content-length"]
            out_headers += self._decision(replica, request)
            await exchange.respond(response.status, out_headers, body)
            if response.status < 500:
                self.probes.mark_ok(replica.node_id, replica.address)
            if response.status == 200 and _counts_tokens(request):
                exchange.usage = usage_of(body)
            endpoint = request.endpoint
            if response.status == 200 and endpoint is not None and endpoint.stateful:
                await self._stored(request, replica, body)
            return
        # head and whatever body already arrived go out together
        first = response.ready()
        out = response.forward_headers()
        out += self._decision(replica, request)
        await exchange.start(response.status, out, first)
        exchange.on_disconnect = response.abort
        scanner = StreamIdScanner() if _records_ids(request) else None
        tail = StreamTail() if response.status == 200 and _counts_tokens(request) else None
        try:
            if exchange.gone:
                response.abort()
            if scanner is not None:
                await self._scan(scanner, first, replica)
            if tail is not None:
                tail.feed(first)
            async for chunk in response.iter_body():
                await exchange.write(chunk)
                if tail is not None:
                    tail.feed(chunk)
                if scanner is not None and not scanner.done:
                    await self._scan(scanner, chunk, replica)
        except CorralError as exc:
            if exchange.gone:
                return  # the client left; nothing to tell it
            await exchange.write(sse_error(exc))
            if not isinstance(exc, UpstreamTimeout):  # slow is not dead
                await self.drop_replica(DropReplica.of(replica, f"stream broke: {exc.message}"))
        finally:
            exchange.on_disconnect = None
        await exchange.end()
        if tail is not None:  # after the last bytes went out: they wait for nothing
            exchange.usage = tail.usage()
        self.probes.mark_ok(replica.node_id, replica.address)

    def _decision(self, replica: Replica, request: ParsedRequest) -> list[tuple[bytes, bytes]]:
        """The response headers naming the replica and node that served (and, when the client
        asked with `x-corral-debug: scores`, every candidate's scores)."""
        cached = self._decided.get(replica.key)
        if cached is None or cached[0] != replica.node_id:
            if len(self._decided) > 4 * len(self.view.replicas) + 64:
                self._decided.clear()  # replicas that went
            node = self.view.nodes.get(replica.node_id)
            name = node.name if node is not None else replica.node_id
            cached = self._decided[replica.key] = (replica.node_id, replica_headers(replica, name))
        if request.reply_headers:
            return cached[1] + request.reply_headers
        return cached[1]

    async def _stored(self, request: ParsedRequest, replica: Replica, body: bytes) -> None:
        """After a whole 200 answer went out: remember where a new stored response lives, or
        forget a deleted one."""
        if _records_ids(request):
            response_id = id_of_body(body)
            if response_id is not None:
                await self.homes.record(response_id, replica)
        elif request.response_id is not None and request.method == b"DELETE":
            self.homes.forget(request.response_id)

    async def _scan(self, scanner: StreamIdScanner, chunk: bytes, replica: Replica) -> None:
        response_id = scanner.feed(chunk)
        if response_id is not None:
            await self.homes.record(response_id, replica)


class _Buffered:
    """A response whose (small) body was already read while checking for self-heal cases."""

    __slots__ = ("body", "forward_headers", "status")

    def __init__(self, response: UpstreamResponse, body: bytes) -> None:
        self.status = response.status
        self.forward_headers = response.forward_headers
        self.body = body


def _unlimited(_: ModelSpec) -> int:
    return 0  # no catalog here: every replica takes any number of requests


def _within(
    ensure: Callable[[ModelSpec], Awaitable[None]],
) -> Callable[[ModelSpec, float], Awaitable[None]]:
    async def within(spec: ModelSpec, budget: float) -> None:
        await ensure(spec)  # a cold loader without deadlines: its own budget

    return within


def _size(request: ParsedRequest) -> int:
    body = request.body
    return len(body) if isinstance(body, bytes) else body.size


def _undeclared(_: ModelSpec) -> None:
    return None  # capabilities unknown: every endpoint may be tried


def _counts_tokens(request: ParsedRequest) -> bool:
    return request.endpoint is not None and request.endpoint.capability in TOKEN_CAPABILITIES


def _records_ids(request: ParsedRequest) -> bool:
    return request.endpoint is not None and request.endpoint.records_ids


def _lost_model(status: int, body: bytes) -> bool:
    """Whether a 400/404/409 answer says the backend no longer serves the model (self-heal)."""
    if status == 400 and b"not loaded" not in body:
        return False
    lowered = body.lower()
    if any(m in lowered for m in STORED_MARKERS):
        return False
    return any(m in lowered for m in NOT_LOADED_MARKERS)


def _not_stored(response_id: str, param: str) -> ResponseNotFound:
    return ResponseNotFound(f"Response with id '{response_id}' not found.", param=param)


def _home_gone(request: ParsedRequest) -> ResponseNotFound:
    if request.response_id is not None:
        response_id, param = request.response_id, "response_id"
    else:
        response_id, param = request.previous_id or "", "previous_response_id"
    return ResponseNotFound(
        f"Response with id '{response_id}' not found: the replica that stored it is gone.",
        param=param,
    )


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

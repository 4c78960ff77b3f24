"""The inference endpoints Corral forwards (one table: path → capability, body kind, required
field) and reading a request just enough to route it: JSON bodies whole, multipart uploads
spooled (memory, then disk) while their `model` field is found, by-id paths from the path.

The capability of each path comes from `corral.backends.capabilities.PATHS`; this module adds
how the frontend reads the request. The body is forwarded exactly as received.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

import orjson

from corral.backends.capabilities import PATHS, PREFIXES, Capability
from corral.backends.multipart_model import ModelFieldRewriter, MultipartError, boundary_of
from corral.errors import BadRequest
from corral.frontend.http.exchange import Exchange, Headers
from corral.frontend.spool import Spool

BodyKind = Literal["json", "multipart", "none"]

POST: Final = frozenset({b"POST"})
BY_ID_METHODS: Final = frozenset({b"GET", b"DELETE", b"POST"})

#: JSON fields a request to the path must carry (besides `model`).
REQUIRED: Final[dict[str, str]] = {
    "/v1/chat/completions": "messages",
    "/v1/completions": "prompt",
    "/v1/embeddings": "input",
    "/v1/responses": "input",
    "/v1/rerank": "query",
    "/rerank": "query",
    "/v2/rerank": "query",
    "/v1/audio/speech": "input",
    "/v1/images/generations": "prompt",
    "/v1/moderations": "input",
}

#: Paths whose body is a multipart/form-data upload naming the model in a form field.
FORMS: Final = frozenset(
    {
        "/v1/audio/transcriptions",
        "/v1/audio/translations",
        "/v1/images/edits",
        "/v1/images/variations",
    }
)

JSON_TYPE: Final = (b"content-type", b"application/json")


@dataclass(frozen=True, slots=True)
class Endpoint:
    """How the frontend reads requests to one path (or to every path under a prefix)."""

    path: str
    capability: Capability
    body: BodyKind = "json"
    required: str | None = None  # a JSON field the body must have
    methods: frozenset[bytes] = POST
    by_id: bool = False  # the path names a stored response: it goes where that response lives
    #: answers create stored responses whose replica must be remembered (POST /v1/responses)
    records_ids: bool = False
    #: a 200 answer may create or delete a stored response (records_ids or by_id)
    stateful: bool = False


ENDPOINTS: Final[dict[bytes, Endpoint]] = {
    path.encode(): Endpoint(
        path,
        capability,
        body="multipart" if path in FORMS else "json",
        required=REQUIRED.get(path),
        records_ids=capability == "responses",
        stateful=capability == "responses",
    )
    for path, capability in PATHS.items()
}

#: Prefixes whose sub-paths name a stored response: GET/DELETE /v1/responses/{id}, and
#: /v1/responses/{id}/cancel, /v1/responses/{id}/input_items.
BY_ID: Final[tuple[tuple[bytes, Endpoint], ...]] = tuple(
    (
        prefix.encode(),
        Endpoint(prefix, capability, "none", None, BY_ID_METHODS, by_id=True, stateful=True),
    )
    for prefix, capability in PREFIXES
)


def endpoint_for(path: bytes) -> Endpoint | None:
    """The endpoint serving `path` (without query), or None when Corral does not forward it."""
    found = ENDPOINTS.get(path)
    if found is not None:
        return found
    for prefix, endpoint in BY_ID:
        if path.startswith(prefix) and len(path) > len(prefix):
            return endpoint
    return None


class ParsedRequest:
    """What routing needs from a request, and the body to forward (bytes or a spool)."""

    __slots__ = (
        "body",
        "content_type",
        "endpoint",
        "method",
        "model",
        "path",
        "previous_id",
        "reply_headers",
        "response_id",
        "stream",
        "target",
        "user",
    )

    def __init__(
        self,
        path: bytes,
        body: bytes | Spool,
        model: str,
        stream: bool,
        endpoint: Endpoint | None = None,
        target: bytes | None = None,
        previous_id: str | None = None,
    ) -> None:
        self.path = path
        self.body = body
        self.model = model  # "" for a by-id request until its home is known
        self.stream = stream
        self.endpoint = endpoint
        self.target = path if target is None else target  # path and query, sent upstream
        self.previous_id = previous_id  # a Responses follow-up's previous_response_id
        self.method = b"POST"
        self.content_type = JSON_TYPE[1]  # an upload's own multipart/form-data type
        self.response_id: str | None = None  # the stored response a by-id path names
        self.user: str | None = None  # the body's `user` field (a session, for routing)
        #: headers routing adds to the response (the debug scores), None: none
        self.reply_headers: list[tuple[bytes, bytes]] | None = None

    def headers(self, forwarded: Headers) -> Headers:
        """The headers to send upstream: the client's that are forwarded (a list this adds
        to), and the body's content type."""
        out = forwarded
        if self.endpoint is None or self.endpoint.body == "json":
            out.append(JSON_TYPE)
        elif self.endpoint.body == "multipart":
            out.append((b"content-type", self.content_type))
        return out

    def close(self) -> None:
        """Free the spooled body, if any."""
        if isinstance(self.body, Spool):
            self.body.close()


def parse_request(
    path: bytes, body: bytes, endpoint: Endpoint | None = None, query: bytes = b""
) -> ParsedRequest:
    """Validate a JSON body just enough to route it (model, stream, the required field);
    `query` (without "?") is sent upstream with the path."""
    if endpoint is None:
        endpoint = ENDPOINTS.get(path)
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object")
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' is required and must be a string", param="model")
    required = endpoint.required if endpoint is not None else None
    if required is not None and required not in data:
        raise BadRequest(f"'{required}' is required", param=required)
    stream = data.get("stream") or False  # null means false, as in the OpenAI API
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be a boolean", param="stream")
    previous = None
    if endpoint is not None and endpoint.records_ids:
        previous = data.get("previous_response_id")
        if previous is not None and (not isinstance(previous, str) or not previous):
            raise BadRequest(
                "'previous_response_id' must be a string", param="previous_response_id"
            )
    request = ParsedRequest(
        path, body, model, stream, endpoint, path + b"?" + query if query else path, previous
    )
    user = data.get("user")
    if user is not None and isinstance(user, str):
        request.user = user
    return request


async def read_request(
    exchange: Exchange, endpoint: Endpoint, limit: int, spool_threshold: int
) -> ParsedRequest:
    """Read what routing needs from `exchange` (the body counts against `limit` bytes)."""
    target = exchange.path + b"?" + exchange.query if exchange.query else exchange.path
    if endpoint.by_id:
        response_id = response_id_of(exchange.path, endpoint)
        body = await exchange.body(limit)  # e.g. a cancel's empty body: sent on as it came
        request = ParsedRequest(exchange.path, body, "", False, endpoint, target)
        request.method = exchange.method
        request.response_id = response_id
        return request
    if endpoint.body == "multipart":
        request = await read_form(exchange, endpoint, limit, spool_threshold)
        request.target = target
        return request
    return parse_request(exchange.path, await exchange.body(limit), endpoint, exchange.query)


def response_id_of(path: bytes, endpoint: Endpoint) -> str:
    """The response id a by-id path names: `/v1/responses/{id}[/...]`."""
    rest = path[len(endpoint.path) :]
    response_id = rest.split(b"/", 1)[0].decode("utf-8", "replace")
    if not response_id:
        raise BadRequest("the path names no response id", param="response_id")
    return response_id


async def read_form(
    exchange: Exchange, endpoint: Endpoint, limit: int, spool_threshold: int
) -> ParsedRequest:
    """Spool a multipart upload as it arrives (memory up to `spool_threshold`, a temporary
    file beyond), finding its `model` field on the way; the spool is what goes upstream,
    byte for byte, as often as a retry needs it."""
    content_type = _header(exchange.headers, b"content-type")
    boundary = boundary_of(content_type.decode("latin-1"))
    if boundary is None:
        raise BadRequest(f"{endpoint.path} takes a multipart/form-data body with a boundary")
    finder = ModelFieldRewriter(boundary, _same)
    spool = Spool(spool_threshold)
    try:
        async for chunk in exchange.chunks(limit):
            if finder.model is None:
                finder.feed(chunk)  # only looking: the spool keeps the bytes as they came
            await spool.write(chunk)
        if finder.model is None:
            finder.close()
        model = finder.model
    except MultipartError as exc:
        spool.close()
        raise BadRequest(f"cannot read the form's 'model' field: {exc}", param="model") from None
    except BaseException:
        spool.close()
        raise
    if not model:
        spool.close()
        raise BadRequest("'model' is required: a form field naming the model", param="model")
    request = ParsedRequest(exchange.path, spool, model, False, endpoint)
    request.content_type = content_type
    return request


def _header(headers: Headers, name: bytes) -> bytes:
    for key, value in headers:
        if key == name:
            return value
    return b""


def _same(model: str) -> str:
    return model

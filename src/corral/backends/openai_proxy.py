"""A backend that forwards every OpenAI endpoint to an existing server, with its own API key.

`python -m corral.backends.openai_proxy --port 8001 --model NAME --upstream URL
[--upstream-model NAME] [--api-key-env VAR]`. Forwards /v1/* and the other inference paths
(/rerank, /v2/rerank, /score, /tokenize, /detokenize; see corral.backends.capabilities), any
method. Requests naming NAME go upstream naming the upstream model: JSON bodies are read and
rewritten, multipart uploads stream through with their `model` field rewritten on the way
(multipart_model.py), other bodies stream through unchanged. Responses — JSON, server-sent
events, binary audio — pass through unchanged, byte for byte, as they arrive. The key is read
from the environment variable VAR, sent only upstream, and never logged. GET /health asks the
upstream's /v1/models; GET /v1/models lists NAME.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from corral.backends.capabilities import capability_for_path
from corral.backends.multipart_model import ModelFieldRewriter, MultipartError, boundary_of

log = logging.getLogger(__name__)

#: The largest JSON body the proxy reads to rewrite its model (uploads stream instead).
MAX_JSON_BODY = 64 * 1024 * 1024

#: Headers that describe one connection, not the message: never forwarded either way.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)


@dataclass(frozen=True)
class ProxyConfig:
    """What the proxy serves and where it forwards to."""

    model: str  # the name clients use
    upstream: str  # base URL of the upstream server (without /v1)
    upstream_model: str | None = None  # the name the upstream knows the model by
    api_key: str | None = field(default=None, repr=False)  # sent upstream as a bearer token
    timeout: float = 600.0  # seconds an upstream answer may take between bytes

    @staticmethod
    def base_url(url: str) -> str:
        """`https://host/v1/` → `https://host` (the proxy adds the /v1 of each request)."""
        url = url.rstrip("/")
        return url.removesuffix("/v1")


def _error(status: int, message: str, code: str, param: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


class OpenAIProxy:
    """The proxy's ASGI application and its one HTTP client to the upstream."""

    def __init__(self, config: ProxyConfig) -> None:
        self.config = config
        self._client: httpx.AsyncClient | None = None

    def app(self) -> Starlette:
        @asynccontextmanager
        async def lifespan(_: Starlette) -> AsyncIterator[None]:
            timeout = httpx.Timeout(self.config.timeout, connect=10.0)
            limits = httpx.Limits(max_connections=None, max_keepalive_connections=100)
            async with httpx.AsyncClient(
                base_url=self.config.upstream, timeout=timeout, limits=limits
            ) as client:
                self._client = client
                yield
                self._client = None

        methods = ["GET", "POST", "DELETE", "PUT", "PATCH"]
        routes = [
            Route("/health", self.health, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/{rest:path}", self.forward, methods=methods),
        ]
        return Starlette(routes=routes, lifespan=lifespan)

    def _auth(self) -> dict[str, str]:
        key = self.config.api_key
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _require_client(self) -> httpx.AsyncClient:
        if self._client is None:
            raise RuntimeError("the proxy's lifespan has not started")
        return self._client

    async def health(self, request: Request) -> Response:
        try:
            resp = await self._require_client().get("/v1/models", headers=self._auth(), timeout=10)
        except httpx.HTTPError as e:
            return JSONResponse({"status": "unreachable", "error": type(e).__name__}, 503)
        if resp.status_code != 200:
            return JSONResponse(
                {"status": "upstream_error", "upstream_status": resp.status_code}, 503
            )
        return JSONResponse({"status": "ok"})

    async def models(self, request: Request) -> Response:
        model = {"id": self.config.model, "object": "model", "created": 0, "owned_by": "corral"}
        return JSONResponse({"object": "list", "data": [model]})

    async def forward(self, request: Request) -> Response:
        path = request.url.path
        if not path.startswith("/v1/") and capability_for_path(path) is None:
            return _error(404, f"no route for {path}", "not_found")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        headers.pop("authorization", None)  # the client's credentials are for Corral only
        headers.update(self._auth())
        try:
            content = await self._content(request, headers)
        except _WrongModel as e:
            return _error(404, str(e), "model_not_found", "model")
        except _BodyTooLarge as e:
            return _error(413, str(e), "request_too_large")
        client = self._require_client()
        upstream_request = client.build_request(
            request.method,
            path,
            params=request.query_params,
            headers=headers,
            content=content,
        )
        try:
            resp = await client.send(upstream_request, stream=True)
        except _WrongModel as e:  # found in an upload already on its way: the upstream is cut off
            return _error(404, str(e), "model_not_found", "model")
        except MultipartError as e:
            return _error(400, str(e), "invalid_request", "model")
        except httpx.TimeoutException as e:
            return _error(504, f"upstream timed out: {type(e).__name__}", "upstream_timeout")
        except httpx.HTTPError as e:
            return _error(502, f"upstream unreachable: {type(e).__name__}", "upstream_error")
        # the raw bytes go on unchanged, so their length (when given) stays true
        out_headers = {k: v for k, v in resp.headers.items() if k.lower() not in HOP_BY_HOP}
        if "content-length" in resp.headers:
            out_headers["content-length"] = resp.headers["content-length"]
        return StreamingResponse(
            _relay(resp),
            status_code=resp.status_code,
            headers=out_headers,
            background=BackgroundTask(resp.aclose),
        )

    async def _content(
        self, request: Request, headers: dict[str, str]
    ) -> bytes | AsyncIterator[bytes]:
        """The body to send upstream. JSON is read and its model rewritten; a multipart upload
        streams through its model rewriter; anything else streams through unchanged. Sets the
        Content-Length of `headers` when the length is known."""
        content_type = request.headers.get("content-type", "")
        length = request.headers.get("content-length")
        boundary = boundary_of(content_type)
        if boundary is not None:
            rewriter = ModelFieldRewriter(boundary, self._upstream_name)
            if self.config.upstream_model in (None, self.config.model) and length:
                headers["content-length"] = length  # no rename: the same bytes
            return _rewritten(request.stream(), rewriter)
        kind = content_type.split(";", 1)[0].strip().lower()
        if kind and kind != "application/json" and not kind.endswith("+json"):
            if length:
                headers["content-length"] = length
            return request.stream()
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_JSON_BODY:
                raise _BodyTooLarge(f"a JSON body may have at most {MAX_JSON_BODY} bytes")
        return self._rewrite(bytes(body)) if body and request.method != "GET" else bytes(body)

    def _upstream_name(self, requested: Any) -> Any:
        """The name the upstream knows a requested model by; _WrongModel for another model."""
        upstream_model = self.config.upstream_model
        if requested not in (self.config.model, upstream_model):
            raise _WrongModel(
                f"model '{requested}' is not served here; this server serves '{self.config.model}'"
            )
        return upstream_model or requested

    def _rewrite(self, body: bytes) -> bytes:
        """The JSON request body with the served model name replaced by the upstream's."""
        try:
            payload: Any = json.loads(body)
        except ValueError:
            return body  # not JSON: the upstream judges it
        if not isinstance(payload, dict) or "model" not in payload:
            return body
        requested = payload["model"]
        renamed = self._upstream_name(requested)
        if renamed == requested:
            return body
        payload["model"] = renamed
        return json.dumps(payload).encode()


class _BodyTooLarge(Exception):
    """A JSON body over MAX_JSON_BODY."""


async def _rewritten(
    chunks: AsyncIterator[bytes], rewriter: ModelFieldRewriter
) -> AsyncIterator[bytes]:
    """A multipart body with its model field rewritten, as it arrives."""
    async for chunk in chunks:
        out = rewriter.feed(chunk)
        if out:
            yield out
    rest = rewriter.close()
    if rest:
        yield rest
    if rewriter.model is None:
        log.debug("a multipart body without a model field went upstream")


class _WrongModel(Exception):
    """A request names a model this proxy does not serve."""


async def _relay(resp: httpx.Response) -> AsyncIterator[bytes]:
    """The upstream's body bytes as they arrive (compressed or not: headers pass through)."""
    try:
        async for chunk in resp.aiter_raw():
            yield chunk
    except httpx.HTTPError as e:
        log.warning("upstream stream broke: %s", type(e).__name__)
        raise


def parse_args(argv: list[str] | None = None) -> tuple[ProxyConfig, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog="python -m corral.backends.openai_proxy")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--model", required=True, help="the model name clients use")
    parser.add_argument("--upstream", required=True, help="base URL, e.g. https://host/v1")
    parser.add_argument("--upstream-model", default=None, help="the upstream's model name")
    parser.add_argument(
        "--api-key-env", default=None, help="environment variable holding the upstream API key"
    )
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            parser.error(f"environment variable {args.api_key_env} is not set")
    config = ProxyConfig(
        model=args.model,
        upstream=ProxyConfig.base_url(args.upstream),
        upstream_model=args.upstream_model,
        api_key=api_key,
        timeout=args.timeout,
    )
    return config, args


def main(argv: list[str] | None = None) -> None:
    config, args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr)
    log.warning("proxying model %s to %s", config.model, config.upstream)
    uvicorn.run(
        OpenAIProxy(config).app(),
        host=args.host,
        port=args.port,
        log_level=args.log_level.lower(),
        access_log=False,
    )


if __name__ == "__main__":
    main()

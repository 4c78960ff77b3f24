"""The frontend's ASGI application: a raw fast path for /v1 inference, FastAPI for the rest."""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException

from corral import __version__
from corral.errors import (
    BadRequest,
    CorralError,
    MethodNotAllowed,
    ModelNotAllowed,
    ModelNotFound,
    NotFound,
)
from corral.frontend.admin import admin_router
from corral.frontend.artifacts_api import artifact_router
from corral.frontend.asgi import Message, Receive, Scope, Send, error_headers, error_payload
from corral.frontend.errors_http import describe
from corral.frontend.http.protocol import Handler
from corral.frontend.metrics import CONTENT_TYPE, render
from corral.frontend.model_cards import model_card, model_list
from corral.frontend.nodes_api import node_router, require_node
from corral.frontend.request import BY_ID, ENDPOINTS, endpoint_for
from corral.frontend.service import Frontend
from corral.frontend.ui import dashboard_router
from corral.frontend.usage_api import usage_router
from corral.store.db import DB_ERRORS, RECONCILER_LOCK, input_error

log = logging.getLogger(__name__)


#: the admin API's description and its viewers: they follow the admin API's rule
ADMIN_DOCS = frozenset({"/docs", "/docs/", "/redoc", "/openapi.json", "/docs/oauth2-redirect"})


def error_response(exc: CorralError) -> JSONResponse:
    headers = {k.decode(): v.decode() for k, v in error_headers(exc) if k != b"content-type"}
    return JSONResponse(error_payload(exc), status_code=describe(exc).status, headers=headers)


def request_id(scope: Scope) -> str:
    """The client's `x-request-id` (when short and printable) or a new one, for a log line and
    an error answer to name the same request."""
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id" and 0 < len(value) <= 128 and value.isascii():
            text: str = value.decode("ascii")
            if text.isprintable():
                return text
    return "req-" + secrets.token_hex(8)


def unexpected_response(scope: Scope, exc: BaseException) -> JSONResponse:
    """A JSON 500 naming a request id; the error is logged with its traceback under that id."""
    rid = request_id(scope)
    log.error(
        "unexpected error in %s %s (request id %s)",
        scope.get("method", ""),
        scope.get("path", ""),
        rid,
        exc_info=exc,
    )
    failure = CorralError(f"internal server error (request id {rid})", request_id=rid)
    response = error_response(failure)
    response.headers["x-request-id"] = rid
    return response


def build_api(frontend: Frontend, *, manage_lifecycle: bool = True) -> FastAPI:
    """FastAPI app for everything but the inference fast path."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if manage_lifecycle:
            await frontend.start()
        try:
            yield
        finally:
            if manage_lifecycle:
                await frontend.stop()

    # /docs (Swagger UI) and /redoc from assets shipped in a package: they work offline
    api = FastAPIOffline(
        title="Corral",
        version=__version__,
        lifespan=lifespan,
        static_url="/docs/assets",
        swagger_ui_parameters={"validatorUrl": None},  # no badge fetched from swagger.io
    )
    api.state.frontend = frontend

    @api.exception_handler(CorralError)
    async def corral_error(request: Request, exc: CorralError) -> JSONResponse:
        status = describe(exc).status
        level = logging.WARNING if status >= 500 else logging.INFO
        log.log(level, "%s %s: %d %s", request.method, request.url.path, status, exc.message)
        return error_response(exc)

    @api.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        field = ".".join(str(p) for p in first["loc"] if p != "body")
        msg = str(first["msg"])
        return error_response(BadRequest(f"{field}: {msg}" if field else msg))

    async def stored(request: Request, exc: Exception) -> JSONResponse:
        """A value PostgreSQL cannot store is a 400; any other database error a JSON 500."""
        bad = input_error(exc)
        if bad is not None:
            return error_response(bad)
        return unexpected_response(request.scope, exc)

    for cls in DB_ERRORS:
        api.add_exception_handler(cls, stored)

    @api.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        return unexpected_response(request.scope, exc)

    @api.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return error_response(NotFound("no such endpoint"))
        if exc.status_code == 405:
            return error_response(MethodNotAllowed("method not allowed on this endpoint"))
        return error_response(BadRequest(str(exc.detail)))

    @api.get("/healthz")
    @api.get("/health", summary="Health (as /healthz: the name vLLM and LiteLLM use)")
    async def healthz() -> dict[str, Any]:
        return {
            "status": "ok" if frontend.started else "starting",
            "frontend_id": frontend.id,
            "version": __version__,
            "reconciler_leader": frontend.reconciler.leader,
        }

    @api.get("/readyz", summary="Ready: can serve (leader known, at least one healthy node)")
    async def readyz() -> JSONResponse:
        """Unlike /healthz (the process is alive), 200 only once inference requests can be
        served: the loops run, a reconciler leads, and a node is healthy; else 503."""
        healthy = sum(1 for n in frontend.view.nodes.values() if n.schedulable)
        try:
            leader = frontend.reconciler.leader or await frontend.registry.lock_held(
                RECONCILER_LOCK
            )
        except Exception:  # the database is unreachable: not ready
            leader = False
        checks = {"started": frontend.started, "leader": leader, "healthy_nodes": healthy}
        ready = frontend.started and leader and healthy > 0
        body = {"status": "ready" if ready else "not_ready", "frontend_id": frontend.id, **checks}
        return JSONResponse(body, status_code=200 if ready else 503)

    @api.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        grant = frontend.authorizer.inference(request.scope["headers"])
        listed = model_list(frontend.view, frontend.catalog.capabilities_of)
        if grant is not None and grant.models is not None:
            listed["data"] = [m for m in listed["data"] if grant.allows_model(m["id"])]
        return listed

    @api.get("/v1/models/{name:path}")
    async def model(name: str, request: Request) -> dict[str, Any]:
        grant = frontend.authorizer.inference(request.scope["headers"])
        spec = frontend.view.models.get(name)
        if spec is None:
            raise ModelNotFound(f"The model '{name}' does not exist", param="model")
        if grant is not None and not grant.allows_model(name):
            raise ModelNotAllowed(f"this API key may not use the model '{name}'", param="model")
        return model_card(frontend.view, spec, frontend.catalog.capabilities_of)

    @api.get("/metrics")
    async def metrics(request: Request) -> Response:
        frontend.authorizer.metrics(request.scope)
        return Response(render(frontend.metrics_registry), media_type=CONTENT_TYPE)

    if frontend.artifacts is not None:  # workers fetch model-store files, with their credential
        api.include_router(
            artifact_router(frontend.artifacts), dependencies=[Depends(require_node)]
        )
    api.include_router(node_router())
    api.include_router(admin_router())
    api.include_router(usage_router())
    api.include_router(dashboard_router())
    return api


class CorralApp:
    """The ASGI callable: inference requests go straight to the proxy, the rest to FastAPI.

    On Corral's own server the inference paths never reach this: `native_routes()` hands
    them to the proxy without ASGI; under any other ASGI server they pass through here.
    """

    def __init__(self, frontend: Frontend, api: FastAPI) -> None:
        self.frontend = frontend
        self.api = api

    def native_routes(self) -> dict[bytes, Handler]:
        """Every inference path (`corral.frontend.request.ENDPOINTS`), to the proxy."""
        handle = self.frontend.proxy.handle
        return {path: handle for path in ENDPOINTS}

    def native_prefixes(self) -> list[tuple[bytes, Handler]]:
        """Inference paths under a prefix (a stored response by id), to the proxy."""
        handle = self.frontend.proxy.handle
        return [(prefix, handle) for prefix, _ in BY_ID]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path: str = scope["path"]
            if endpoint_for(path.encode()) is not None:
                await self.frontend.proxy(scope, receive, send)
                return
            if path in ADMIN_DOCS:  # the API's description follows the admin API's rule
                try:
                    self.frontend.authorizer.admin(scope)
                except CorralError as exc:
                    await error_response(exc)(scope, receive, send)
                    return
        if scope["type"] != "http":
            await self.api(scope, receive, send)
            return
        state = {"started": False}

        async def tracked(message: Message) -> None:
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        try:
            await self.api(scope, receive, tracked)
        except Exception as exc:
            # FastAPI answered it (a JSON 500 with a request id, logged) and raised it again:
            # the answer is complete and the connection stays usable
            if not state["started"]:
                await unexpected_response(scope, exc)(scope, receive, send)


def create_app(frontend: Frontend) -> CorralApp:
    return CorralApp(frontend, build_api(frontend))

"""The frontend's ASGI application: a raw fast path for /v1 inference, FastAPI for the rest."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException

from corral import __version__
from corral.errors import BadRequest, CorralError, MethodNotAllowed, ModelNotFound, NotFound
from corral.frontend.admin import admin_router
from corral.frontend.artifacts_api import artifact_router
from corral.frontend.asgi import Receive, Scope, Send, error_headers, error_payload
from corral.frontend.errors_http import describe
from corral.frontend.http.protocol import Handler
from corral.frontend.metrics import render_metrics
from corral.frontend.model_cards import model_card, model_list
from corral.frontend.nodes_api import node_router, require_node
from corral.frontend.request import BY_ID, ENDPOINTS, endpoint_for
from corral.frontend.service import Frontend
from corral.frontend.ui import dashboard_router

log = logging.getLogger(__name__)


def error_response(exc: CorralError) -> JSONResponse:
    headers = {k.decode(): v.decode() for k, v in error_headers(exc) if k != b"content-type"}
    return JSONResponse(error_payload(exc), status_code=describe(exc).status, headers=headers)


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

    @api.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        frontend.authorizer.check(request.scope)
        return model_list(frontend.view, frontend.catalog.capabilities_of)

    @api.get("/v1/models/{name:path}")
    async def model(name: str, request: Request) -> dict[str, Any]:
        frontend.authorizer.check(request.scope)
        spec = frontend.view.models.get(name)
        if spec is None:
            raise ModelNotFound(f"The model '{name}' does not exist", param="model")
        return model_card(frontend.view, spec, frontend.catalog.capabilities_of)

    @api.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(render_metrics(frontend, time.time()))

    if frontend.artifacts is not None:  # workers fetch model-store files, with their credential
        api.include_router(
            artifact_router(frontend.artifacts), dependencies=[Depends(require_node)]
        )
    api.include_router(node_router())
    api.include_router(admin_router())
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
        if scope["type"] == "http" and endpoint_for(scope["path"].encode()) is not None:
            await self.frontend.proxy(scope, receive, send)
            return
        await self.api(scope, receive, send)


def create_app(frontend: Frontend) -> CorralApp:
    return CorralApp(frontend, build_api(frontend))

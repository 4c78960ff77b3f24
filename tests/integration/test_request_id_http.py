"""Over real sockets: every response of Corral's HTTP server says its request id in
x-request-id (the client's when valid), native or through the ASGI bridge, errors included,
and the log lines written while serving a request carry that id."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from fastapi import FastAPI

from corral.errors import NotFound
from corral.frontend.http import HttpServer, bind_socket
from corral.frontend.http.exchange import Exchange, respond_error
from corral.logs import JsonFormatter, RequestIdFilter

log = logging.getLogger("corral.test.request_ids")


async def missing(ex: Exchange) -> None:
    """Native: logs, then answers an error (which logs too)."""
    log.warning("looking for it")
    await respond_error(ex, NotFound("nothing here"))


def make_app() -> FastAPI:
    app = FastAPI()

    @app.get("/hello")
    async def hello() -> dict[str, str]:
        log.warning("saying hello")
        return {"hello": "world"}

    return app


@pytest.fixture
async def server() -> AsyncIterator[HttpServer]:
    server = HttpServer(make_app(), native={b"/native/missing": missing})
    await server.startup()
    await server.start(bind_socket("127.0.0.1", 0))
    yield server
    await server.stop()
    await server.shutdown()


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.addHandler(handler)
    level = root.level
    root.setLevel(logging.INFO)
    yield out
    root.removeHandler(handler)
    root.setLevel(level)


def _lines(out: io.StringIO) -> list[dict[str, str]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


async def test_ids_echoed_generated_and_logged(server: HttpServer, json_log: io.StringIO) -> None:
    base = f"http://127.0.0.1:{server.port}"
    async with httpx.AsyncClient(base_url=base, timeout=10) as c:
        sent = await c.get("/native/missing", headers={"x-request-id": "trace-42"})
        assert sent.status_code == 404
        assert sent.json()["error"]["code"] == "not_found"
        assert sent.headers.get_list("x-request-id") == ["trace-42"]

        unsafe = await c.get("/hello", headers={"x-request-id": "bad id with spaces"})
        assert unsafe.status_code == 200
        generated = unsafe.headers["x-request-id"]
        assert generated != "bad id with spaces" and " " not in generated

        again = await c.get("/hello")
        assert again.headers["x-request-id"] not in (generated, "trace-42")

    lines = _lines(json_log)
    mine = [line for line in lines if line.get("request_id") == "trace-42"]
    assert [line["message"] for line in mine] == [
        "looking for it",
        "GET /native/missing: 404 not_found: nothing here",
    ]
    hello = [line for line in lines if line["message"] == "saying hello"]
    assert [line["request_id"] for line in hello] == [generated, again.headers["x-request-id"]]

"""Small raw-ASGI helpers for the hot path: read a body, send JSON, send OpenAI-style errors."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson

from corral.errors import CorralError, PayloadTooLarge
from corral.frontend.errors_http import describe

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

JSON_HEADERS = [(b"content-type", b"application/json")]


class ClientGone(Exception):
    """The client disconnected before its request body arrived."""


async def read_body(receive: Receive, limit: int) -> bytes:
    """Read the whole request body; PayloadTooLarge past `limit` bytes."""
    message = await receive()
    if message["type"] == "http.disconnect":
        raise ClientGone
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        if len(body) > limit:
            raise PayloadTooLarge(f"request body exceeds {limit} bytes")
        return body
    parts = [body]
    size = len(body)
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body exceeds {limit} bytes")
        parts.append(chunk)
        if not message.get("more_body", False):
            return b"".join(parts)


def error_payload(exc: CorralError) -> dict[str, Any]:
    """The OpenAI-style error object for `exc` (extra fields such as load progress included)."""
    wire = describe(exc)
    error: dict[str, Any] = {
        "message": exc.message,
        "type": wire.type,
        "param": exc.extra.get("param"),
        "code": wire.code,
    }
    for key, value in exc.extra.items():
        if key not in error and key not in ("no_responders", "timed_out"):
            error[key] = value
    return {"error": error}


def error_headers(exc: CorralError) -> list[tuple[bytes, bytes]]:
    headers = list(JSON_HEADERS)
    if exc.retry_after is not None:
        headers.append((b"retry-after", str(max(1, math.ceil(exc.retry_after))).encode()))
    return headers


async def send_json(
    send: Send, status: int, payload: Any, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    body = orjson.dumps(payload)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": (headers or JSON_HEADERS) + [(b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def send_error(send: Send, exc: CorralError) -> None:
    await send_json(send, describe(exc).status, error_payload(exc), error_headers(exc))


def sse_error(exc: CorralError) -> bytes:
    """An OpenAI-style error as one SSE event, to end a stream that already started."""
    return b"data: " + orjson.dumps(error_payload(exc)) + b"\n\n"

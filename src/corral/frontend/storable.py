"""Input PostgreSQL can store: no NUL or lone surrogate in a request's path, query or JSON body.

PostgreSQL text and JSONB cannot hold U+0000, and a lone UTF-16 surrogate (`"\\ud800"` in JSON)
cannot be encoded at all; either would fail deep in a write as a 500. Checked once at the API
edge (the admin and node APIs, not the inference fast path), a 400 names the field instead.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request

from corral.errors import BadRequest


def unstorable(text: str) -> str | None:
    """Why PostgreSQL cannot store `text` (None: it can)."""
    if "\x00" in text:
        return "contains a NUL character (U+0000)"
    for ch in text:
        if "\ud800" <= ch <= "\udfff":
            return f"contains a lone surrogate (U+{ord(ch):04X})"
    return None


def find_unstorable(value: Any, where: str = "") -> tuple[str, str] | None:
    """The first (field path, reason) of a string in `value` PostgreSQL cannot store."""
    if isinstance(value, str):
        reason = unstorable(value)
        return (where or "body", reason) if reason else None
    if isinstance(value, dict):
        for key, item in value.items():
            path = f"{where}.{key}" if where else str(key)
            reason = unstorable(str(key))
            if reason:
                return (path, f"has a key that {reason}")
            found = find_unstorable(item, path)
            if found:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = find_unstorable(item, f"{where}[{i}]")
            if found:
                return found
    return None


async def storable(request: Request) -> None:
    """FastAPI dependency: 400 naming the field for input PostgreSQL cannot store."""
    reason = unstorable(request.scope["path"])
    if reason:
        raise BadRequest(f"the path {reason}", param="path")
    for name, value in request.query_params.multi_items():
        reason = unstorable(name) or unstorable(value)
        if reason:
            raise BadRequest(f"query parameter {name!r} {reason}", param=name)
    if request.method not in ("POST", "PUT", "PATCH"):
        return
    if "json" not in request.headers.get("content-type", ""):
        return
    body = await request.body()
    if b"\\u0000" not in body and b"\x00" not in body and b"\\ud" not in body.lower():
        return  # the usual case: nothing to look for
    try:
        data = json.loads(body)
    except ValueError:
        return  # FastAPI answers the syntax error
    found = find_unstorable(data)
    if found:
        field, reason = found
        raise BadRequest(f"{field} {reason}", param=field)

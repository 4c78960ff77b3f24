"""Operator API for usage: GET /api/usage (summed per key, model and time bucket) and the
per-key limits, GET and PUT /api/keys/{id}/limits. Behind the admin credential."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from corral.domain.usage import Limits
from corral.errors import BadRequest, NotFound
from corral.frontend.admin import require_admin
from corral.frontend.nodes_api import frontend_of
from corral.store.usage import GROUPS


class LimitsBody(BaseModel):
    """A key's limits; null (or left out): no limit."""

    requests_per_minute: int | None = Field(default=None, ge=1)
    tokens_per_day: int | None = Field(default=None, ge=1)


def parse_groups(group_by: str) -> list[str]:
    """`group_by` ("key,model", "model,day", ...) checked against `GROUPS`."""
    groups = [g.strip() for g in group_by.split(",") if g.strip()]
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        raise BadRequest(
            f"cannot group usage by {', '.join(unknown)}: use any of {', '.join(GROUPS)}",
            param="group_by",
        )
    if sum(g in ("minute", "hour", "day") for g in groups) > 1:
        raise BadRequest("group usage by one of minute, hour or day", param="group_by")
    return groups


def usage_router() -> APIRouter:
    router = APIRouter(prefix="/api", tags=["usage"], dependencies=[Depends(require_admin)])

    @router.get("/usage")
    async def get_usage(
        request: Request,
        key: str | None = None,
        model: str | None = None,
        since: float | None = None,
        until: float | None = None,
        group_by: str = "key,model",
    ) -> dict[str, Any]:
        """Requests, errors, refusals over a limit, and tokens, summed over the minutes from
        `since` to `until` (seconds since the epoch) per `group_by`; `key` is an id or a name.
        This frontend's counts are flushed first; other frontends' arrive with their flush."""
        groups = parse_groups(group_by)
        if since is not None and until is not None and since > until:
            raise BadRequest("since is after until", param="since")
        fe = frontend_of(request)
        await fe.usage.flush()
        rows = await fe.registry.usage.query(
            key=key, model=model, since=since, until=until, group_by=groups
        )
        return {"usage": rows, "group_by": groups, "since": since, "until": until}

    @router.get("/keys/{key_id}/limits")
    async def get_limits(key_id: str, request: Request) -> dict[str, Any]:
        """An API key's limits (null: none)."""
        limits = await frontend_of(request).registry.usage.limits(key_id)
        if limits is None:
            raise NotFound(f"API key {key_id} not found")
        return {
            "id": key_id,
            "requests_per_minute": limits.requests_per_minute,
            "tokens_per_day": limits.tokens_per_day,
        }

    @router.put("/keys/{key_id}/limits")
    async def put_limits(key_id: str, body: LimitsBody, request: Request) -> dict[str, Any]:
        """Set an API key's limits (null: none); 429 `rate_limited` past them."""
        fe = frontend_of(request)
        limits = Limits(body.requests_per_minute, body.tokens_per_day)
        if not await fe.registry.usage.set_limits(key_id, limits):
            raise NotFound(f"API key {key_id} not found")
        fe.usage.set_limits(key_id, limits)
        await fe.registry.audit.add(
            "apikey.limits",
            f"{key_id}: {limits.requests_per_minute} requests/minute,"
            f" {limits.tokens_per_day} tokens/day",
        )
        return {"id": key_id, **body.model_dump()}

    return router

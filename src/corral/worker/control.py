"""The worker's HTTP client to a frontend: register, heartbeat, report exits, drain, deregister.

Bodies are the shared contract models of `corral.bus.contracts`.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from corral.bus.contracts import (
    DeregisterReply,
    DrainReply,
    ExitReply,
    ExitReport,
    HeartbeatReply,
    HeartbeatRequest,
    RegisterReply,
    RegisterRequest,
)
from corral.errors import Forbidden, FrontendUnreachable, NotFound, Unauthorized

R = TypeVar("R", bound=BaseModel)


def tls_verify(ca_file: Path | None) -> ssl.SSLContext | bool:
    """How a worker checks a frontend's certificate: against `ca_file`, else the system's
    trust store (httpx's default)."""
    if ca_file is None:
        return True
    return ssl.create_default_context(cafile=str(ca_file))


class ControlClient:
    """Talks to the frontend at `join_url` as one node."""

    def __init__(
        self, join_url: str, *, timeout: float = 10.0, ca_file: Path | None = None
    ) -> None:
        self.join_url = join_url.rstrip("/")
        self.timeout = timeout
        self.ca_file = ca_file  # the CA an https:// frontend's certificate is checked against
        self._client: httpx.AsyncClient | None = None

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                base_url=self.join_url, timeout=self.timeout, verify=tls_verify(self.ca_file)
            )
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def register(self, token: str, body: RegisterRequest) -> RegisterReply:
        return await self._post("/api/nodes/register", token, body, RegisterReply)

    async def heartbeat(
        self, node_id: str, credential: str, body: HeartbeatRequest
    ) -> HeartbeatReply:
        return await self._post(f"/api/nodes/{node_id}/heartbeat", credential, body, HeartbeatReply)

    async def replica_exited(self, node_id: str, credential: str, body: ExitReport) -> ExitReply:
        path = f"/api/nodes/{node_id}/replica-exited"
        return await self._post(path, credential, body, ExitReply)

    async def drain(self, node_id: str, credential: str) -> DrainReply:
        return await self._post(f"/api/nodes/{node_id}/self-drain", credential, None, DrainReply)

    async def deregister(self, node_id: str, credential: str) -> DeregisterReply:
        path = f"/api/nodes/{node_id}/deregister"
        return await self._post(path, credential, None, DeregisterReply)

    async def _post(self, path: str, secret: str, body: BaseModel | None, reply: type[R]) -> R:
        payload = body.model_dump(mode="json") if body is not None else {}
        try:
            response = await self.client.post(
                path, json=payload, headers={"authorization": f"Bearer {secret}"}
            )
        except httpx.HTTPError as exc:
            raise FrontendUnreachable(f"frontend {self.join_url} unreachable: {exc!r}") from None
        if response.status_code < 300:
            try:
                return reply.model_validate_json(response.content)
            except ValidationError as exc:
                raise FrontendUnreachable(
                    f"frontend {self.join_url} answered {path} with an unexpected body: {exc}"
                ) from None
        message = _message(response)
        if response.status_code == 401:
            raise Unauthorized(message)
        if response.status_code == 403:
            raise Forbidden(message)
        if response.status_code == 404:
            raise NotFound(message)
        raise FrontendUnreachable(f"frontend answered {response.status_code}: {message}")


def _message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:200]

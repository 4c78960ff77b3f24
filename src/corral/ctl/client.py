"""The admin API as the operator commands call it: one request, JSON back, errors in one line."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NoReturn
from urllib.parse import quote

import httpx
import typer

from corral.keyfile import default_admin_key


def fail(message: str, status: int = 1) -> NoReturn:
    """Print `error: message` on stderr and exit with `status`."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(status)


def seg(value: str) -> str:
    """One path segment (a node id or name, a key id), escaped."""
    return quote(value, safe="")


def model_path(name: str) -> str:
    """A model name in a path: its "/" stay separators, as the admin routes expect."""
    return quote(name, safe="/")


@dataclass(frozen=True, slots=True)
class Admin:
    """A frontend's admin API, with the admin key when there is one (given, else the admin.key
    file `corral serve` and `corral up` create)."""

    url: str
    api_key: str | None

    def call(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, Any] | None = None,
        timeout: float = 30.0,
        missing: str | None = None,
    ) -> Any:
        """Send one request; exit with one line on any failure. `missing`: the line to print
        when this frontend has no such endpoint (an older version)."""
        key = self.api_key or default_admin_key()
        headers = {"authorization": f"Bearer {key}"} if key else {}
        query = {k: v for k, v in (params or {}).items() if v is not None}
        try:
            response = httpx.request(
                method,
                self.url.rstrip("/") + path,
                headers=headers,
                json=json,
                params=query,
                timeout=timeout,
            )
        except httpx.HTTPError as exc:
            fail(f"cannot reach {self.url}: {exc or type(exc).__name__}")
        try:
            data = response.json() if response.content else {}
        except ValueError:
            data = None
        if response.status_code < 400:
            if data is None:
                fail(f"{self.url} answered {method} {path} with something other than JSON")
            return data
        error = data.get("error") if isinstance(data, dict) else None
        error = error if isinstance(error, dict) else {}
        message = str(error.get("message") or response.text.strip() or response.reason_phrase)
        if missing and response.status_code == 404 and message == "no such endpoint":
            fail(missing)
        if response.status_code == 401:
            message += " (give an admin key: --api-key or CORRAL_API_KEY)"
        fail(f"{message} (HTTP {response.status_code})")

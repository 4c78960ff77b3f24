"""The operator dashboard at /ui: serves the packaged static files, and only those.

Files are looked up by exact name in a table built from the package's `static/` folder, so
no request path (`..`, encoded or not) can reach anything else. Every answer carries an ETag
and `Cache-Control: no-cache`: browsers revalidate each file and get a 304 while it is
unchanged, so a new version shows up at the next load without stale modules.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib.resources import files
from importlib.resources.abc import Traversable

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response

from corral.errors import NotFound

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}

#: The page loads nothing but its own files and talks only to this frontend's API.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

COMMON_HEADERS = {
    "cache-control": "no-cache",
    "x-content-type-options": "nosniff",
}

HTML_HEADERS = {
    "content-security-policy": CSP,
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
}


@dataclass(frozen=True)
class Asset:
    """One static file, held in memory."""

    body: bytes
    content_type: str
    etag: str

    def headers(self) -> dict[str, str]:
        out = {**COMMON_HEADERS, "etag": self.etag}
        if self.content_type.startswith("text/html"):
            out.update(HTML_HEADERS)
        return out


class Assets:
    """The dashboard's files by relative name ("index.html", "js/app.js"), read once."""

    def __init__(self, root: Traversable) -> None:
        self.root = root
        self._files: dict[str, Asset] | None = None

    def get(self, name: str) -> Asset | None:
        if self._files is None:
            self._files = dict(_walk(self.root, ""))
        return self._files.get(name)


def _walk(folder: Traversable, prefix: str) -> list[tuple[str, Asset]]:
    found: list[tuple[str, Asset]] = []
    for entry in folder.iterdir():
        name = prefix + entry.name
        if entry.is_dir():
            found.extend(_walk(entry, name + "/"))
            continue
        suffix = "." + entry.name.rpartition(".")[2]
        content_type = CONTENT_TYPES.get(suffix)
        if content_type is None or entry.name.startswith("."):
            continue  # only known web files are served
        body = entry.read_bytes()
        etag = '"' + hashlib.sha256(body).hexdigest()[:20] + '"'
        found.append((name, Asset(body, content_type, etag)))
    return found


def packaged_assets() -> Assets:
    return Assets(files(__name__) / "static")


def asset_response(request: Request, asset: Asset) -> Response:
    """The file, or 304 when the browser's copy (If-None-Match) is current."""
    headers = asset.headers()
    tags = request.headers.get("if-none-match", "")
    if asset.etag in {t.strip().removeprefix("W/") for t in tags.split(",")} or tags == "*":
        return Response(status_code=304, headers=headers)
    body = b"" if request.method == "HEAD" else asset.body
    response = Response(body, media_type=asset.content_type, headers=headers)
    response.headers["content-length"] = str(len(asset.body))
    return response


def dashboard_router(assets: Assets | None = None) -> APIRouter:
    """GET/HEAD /ui (redirects to /ui/), /ui/ (the app) and /ui/<file>."""
    store = assets or packaged_assets()
    router = APIRouter(include_in_schema=False)

    @router.api_route("/ui", methods=["GET", "HEAD"])
    async def ui_root() -> Response:
        # relative, so the redirect also works behind a proxy that mounts Corral under a prefix
        return RedirectResponse("ui/", status_code=308, headers=COMMON_HEADERS)

    @router.api_route("/ui/", methods=["GET", "HEAD"])
    async def ui_index(request: Request) -> Response:
        return await ui_file("index.html", request)

    @router.api_route("/ui/{name:path}", methods=["GET", "HEAD"])
    async def ui_file(name: str, request: Request) -> Response:
        asset = store.get(name)
        if asset is None:
            raise NotFound("no such file in the dashboard; the app is at /ui/")
        return asset_response(request, asset)

    return router

"""The frontend's model store over HTTP: workers fetch artifacts with Range, ETag and SHA-256."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from corral.errors import BadRequest, CorralError, NotFound
from corral.frontend.asgi import error_payload
from corral.frontend.errors_http import describe

log = logging.getLogger(__name__)

DIGEST_HEADER = "X-Corral-Digest"  # hex SHA-256 of the whole file
_CHUNK = 1 << 20
_RANGE_RE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$")


@dataclass(frozen=True, slots=True)
class ArtifactInfo:
    """One file of the model store."""

    path: Path
    size: int
    digest: str  # hex SHA-256
    mtime_ns: int


class RangeNotSatisfiable(Exception):
    """A Range header that lies wholly past the end of the file (HTTP 416)."""


def is_store_path(artifact: str) -> bool:
    """A relative path: served from the frontends' model store."""
    return "://" not in artifact and not artifact.startswith("/")


def resolve_artifact(store_dir: Path, relpath: str) -> Path:
    """The file `relpath` names inside `store_dir`. BadRequest for absolute paths and `..`;
    NotFound when it does not exist, is not a regular file, or (via symlinks) lies outside."""
    pure = PurePosixPath(relpath)
    if not relpath or pure.is_absolute() or "\\" in relpath or ".." in pure.parts:
        raise BadRequest(f"invalid artifact path {relpath!r}")
    root = store_dir.resolve()
    path = (root / pure).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        raise NotFound(f"no artifact {relpath!r} in the model store")
    return path


def file_digest(path: Path) -> str:
    """The hex SHA-256 of a file (reads it whole; call from a thread)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def artifact_info(store_dir: Path, relpath: str) -> tuple[int, str]:
    """(size, hex SHA-256) of `relpath` in the store, computed now (no cache; blocking I/O).
    Prefer `ArtifactStore.info`, which digests each file version once."""
    path = resolve_artifact(store_dir, relpath)
    return path.stat().st_size, file_digest(path)


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The inclusive byte range a `Range` header asks for, or None to send the whole file (no
    header, a malformed one, or several ranges: a server may ignore those).
    Raises RangeNotSatisfiable when the range starts past the end."""
    if not header:
        return None
    m = _RANGE_RE.match(header)
    if m is None:
        return None
    first, last = m.groups()
    if not first and not last:
        return None
    if not first:  # suffix: the last N bytes
        n = int(last)
        if n == 0 or size == 0:
            raise RangeNotSatisfiable
        return max(0, size - n), size - 1
    start = int(first)
    end = size - 1 if not last else min(int(last), size - 1)
    if last and int(last) < start:
        return None  # syntactically invalid: ignore
    if start >= size:
        raise RangeNotSatisfiable
    return start, end


class ArtifactStore:
    """A model store directory; digests each file version (path, mtime, size) once."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._digests: dict[Path, tuple[int, int, str]] = {}  # path → (mtime_ns, size, digest)
        self._pending: dict[tuple[Path, int, int], asyncio.Task[str]] = {}

    async def info(self, relpath: str) -> ArtifactInfo:
        """Size and digest of `relpath` (BadRequest / NotFound as `resolve_artifact`)."""
        path = resolve_artifact(self.root, relpath)
        st = path.stat()
        cached = self._digests.get(path)
        if cached is not None and cached[:2] == (st.st_mtime_ns, st.st_size):
            return ArtifactInfo(path, st.st_size, cached[2], st.st_mtime_ns)
        key = (path, st.st_mtime_ns, st.st_size)
        task = self._pending.get(key)
        if task is None:
            task = asyncio.create_task(asyncio.to_thread(file_digest, path))
            self._pending[key] = task
            task.add_done_callback(lambda t: self._digested(key, t))
        digest = await asyncio.shield(task)
        return ArtifactInfo(path, st.st_size, digest, st.st_mtime_ns)

    async def size(self, artifact: str | None) -> int | None:
        """Bytes of a model-store artifact (for a memory estimate); None when it is not one,
        or cannot be read."""
        if not artifact or not is_store_path(artifact):
            return None
        try:
            return (await self.info(artifact)).size
        except CorralError:
            return None

    def _digested(self, key: tuple[Path, int, int], task: asyncio.Task[str]) -> None:
        self._pending.pop(key, None)
        if task.cancelled() or task.exception() is not None:
            return
        path, mtime_ns, size = key
        self._digests[path] = (mtime_ns, size, task.result())


def artifact_router(store: ArtifactStore | Path, *, prefix: str = "/api/artifacts") -> APIRouter:
    """GET/HEAD `{prefix}/{path}`: a file of the model store, with Range (206 + Content-Range),
    If-Range, a strong ETag (the digest) and X-Corral-Digest. Mount behind worker auth."""
    artifacts = store if isinstance(store, ArtifactStore) else ArtifactStore(store)
    router = APIRouter()

    @router.api_route(prefix + "/{relpath:path}", methods=["GET", "HEAD"])
    async def get_artifact(relpath: str, request: Request) -> Response:
        try:
            info = await artifacts.info(relpath)
        except CorralError as exc:
            return JSONResponse(error_payload(exc), status_code=describe(exc).status)
        etag = f'"{info.digest}"'
        headers = {
            "Accept-Ranges": "bytes",
            "ETag": etag,
            DIGEST_HEADER: info.digest,
            "Content-Type": "application/octet-stream",
        }
        byte_range = None
        if_range = request.headers.get("if-range")
        if if_range is None or if_range.strip() == etag:
            try:
                byte_range = parse_range(request.headers.get("range"), info.size)
            except RangeNotSatisfiable:
                headers["Content-Range"] = f"bytes */{info.size}"
                return Response(status_code=416, headers=headers)
        start, end = byte_range if byte_range is not None else (0, info.size - 1)
        length = end - start + 1
        headers["Content-Length"] = str(length)
        status = 200
        if byte_range is not None:
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{info.size}"
        if request.method == "HEAD":
            return Response(status_code=status, headers=headers)
        return _FileSlice(info.path, start, length, status, headers)

    return router


class _FileSlice(Response):
    """Sends `length` bytes of a file from `start`, read off the event loop; the file is closed
    however the send ends (a worker that disconnects mid-body included)."""

    def __init__(
        self, path: Path, start: int, length: int, status: int, headers: dict[str, str]
    ) -> None:
        super().__init__(status_code=status, headers=headers)
        self.path = path
        self.start = start
        self.length = length

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        f = await asyncio.to_thread(self.path.open, "rb")
        try:
            await asyncio.to_thread(f.seek, self.start)
            remaining = self.length
            while remaining > 0:
                chunk = await asyncio.to_thread(f.read, min(_CHUNK, remaining))
                if not chunk:
                    log.warning("artifact %s shrank while being sent", self.path)
                    break
                remaining -= len(chunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            f.close()

"""Artifact staging on a worker: model files fetched once, verified, and cached by digest."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib
import logging
import re
import secrets
import shutil
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx

from corral.domain.sizes import format_size
from corral.errors import ArtifactError
from corral.worker.control import tls_verify

log = logging.getLogger(__name__)

DIGEST_HEADER = "X-Corral-Digest"  # what the frontend's artifact endpoint sends (hex SHA-256)
_CHUNK = 1 << 20
_HEX = re.compile(r"^[0-9a-f]{64}$")


class _StartOver(Exception):
    """The partial file cannot be resumed; download from the first byte."""


@dataclass(frozen=True, slots=True)
class StageProgress:
    """Progress of staging one artifact."""

    ref: str
    phase: Literal["downloading", "verifying", "staged", "failed"]
    done: int = 0  # bytes on disk so far
    total: int | None = None  # bytes expected, when known
    error: str | None = None

    @property
    def percent(self) -> float | None:
        if self.phase == "staged":
            return 100.0
        if not self.total:
            return None
        return min(100.0, 100.0 * self.done / self.total)


#: Receives progress events; the constructor's for every stage, `stage(progress=...)` for one.
Progress = Callable[[StageProgress], Awaitable[None]]


def _disk_free(path: Path) -> int:
    """Free bytes on the file system holding `path` (or its nearest existing parent)."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return shutil.disk_usage(candidate).free
    return shutil.disk_usage("/").free


class ArtifactStager:
    """Puts model artifacts on this node's disk and returns their local paths.

    - `url` given (the frontend's model store): downloaded to `partial/<digest>`, resumed with
      `Range` after an interruption, SHA-256 verified, then renamed to `blobs/<digest>/<name>`.
      A digest in `blobs` is never fetched again.
    - `hf://org/repo[@revision][/path]`: downloaded with huggingface_hub into `hf/`.
    - an absolute path (shared storage): used in place; it must exist.

    Free disk space must cover what is left to download plus `headroom` before a byte is
    written (`free_space` says how much is free; the file system's answer by default).
    Identical concurrent stages share one download.
    """

    def __init__(
        self,
        cache_dir: Path,
        *,
        publish: Progress | None = None,
        headroom: int = 512 * 1024 * 1024,
        free_space: Callable[[Path], int] = _disk_free,
        retries: int = 5,
        timeout: float = 30.0,
        progress_interval: float = 0.5,
        ca_file: Path | None = None,  # the CA an https:// frontend is checked against
    ) -> None:
        self._cache = cache_dir
        self._ca_file = ca_file
        self._publish = publish
        self._headroom = headroom
        self._free_space = free_space
        self._retries = retries
        self._timeout = timeout
        self._progress_interval = progress_interval
        self._inflight: dict[str, asyncio.Task[Path]] = {}
        self._listeners: dict[str, list[Progress]] = {}

    # --- public API -----------------------------------------------------------------------

    async def stage(
        self,
        ref: str,
        *,
        url: str | None = None,
        digest: str | None = None,
        size: int | None = None,
        headers: Mapping[str, str] | None = None,
        progress: Progress | None = None,
    ) -> Path:
        """The local path of artifact `ref`, fetching it first when needed (ArtifactError)."""
        if url is not None:
            hexdigest = _normalise_digest(digest) if digest else None
            key = hexdigest or f"url:{url}"
            if hexdigest is not None and (blob := self.blob(hexdigest)) is not None:
                await self._emit([progress], StageProgress(ref, "staged", blob.stat().st_size))
                return blob
            coro = self._download(ref, url, hexdigest, size, dict(headers or {}), key)
        elif ref.startswith("hf://"):
            key = ref
            coro = self._from_hub(ref, key)
        else:
            path = Path(ref.removeprefix("file://"))
            if not path.is_absolute():
                raise ArtifactError(
                    f"cannot stage {ref!r}: not an absolute path or hf:// reference, and no URL"
                )
            if not await asyncio.to_thread(path.exists):  # shared storage may be slow
                raise ArtifactError(f"artifact {ref} does not exist on this node")
            return path
        listeners = self._listeners.setdefault(key, [])
        if progress is not None:
            listeners.append(progress)
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.create_task(self._run(ref, key, coro), name=f"stage {ref}")
            self._inflight[key] = task
            task.add_done_callback(lambda t: self._stage_done(key, t))
        else:
            coro.close()  # never started: the running stage serves this call too
        try:
            return await asyncio.shield(task)
        finally:
            if progress is not None and progress in listeners:
                listeners.remove(progress)

    def blob(self, digest: str) -> Path | None:
        """The cached file with this digest, or None."""
        directory = self._cache / "blobs" / _normalise_digest(digest)
        if not directory.is_dir():
            return None
        files = sorted(p for p in directory.iterdir() if p.is_file())
        return files[0] if files else None

    def held(self) -> list[str]:
        """Digests of the cached blobs and `hf://` references of the hub files on this node."""
        out: list[str] = []
        blobs = self._cache / "blobs"
        if blobs.is_dir():
            out += sorted(p.name for p in blobs.iterdir() if _HEX.match(p.name))
        hub = self._cache / "hf"
        if hub.is_dir():
            for repo in sorted(hub.glob("models--*")):
                repo_id = repo.name.removeprefix("models--").replace("--", "/")
                for snapshot in sorted((repo / "snapshots").glob("*")):
                    for f in sorted(snapshot.rglob("*")):
                        if f.is_file():
                            out.append(f"hf://{repo_id}/{f.relative_to(snapshot).as_posix()}")
        return sorted(set(out))

    async def close(self) -> None:
        """Cancel the stages in progress (their partial files stay, to resume later)."""
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # --- frontend model store -------------------------------------------------------------

    async def _download(
        self,
        ref: str,
        url: str,
        digest: str | None,
        size: int | None,
        headers: dict[str, str],
        key: str,
    ) -> Path:
        name = digest or hashlib.sha256(url.encode()).hexdigest()
        partial = _Partial(self._cache / "partial" / name)
        on_disk = partial.path.stat().st_size if partial.path.exists() else 0
        if size is not None:
            self._check_space(ref, size - on_disk)  # before anything is written
        await partial.load()
        last_emit = 0.0
        failures = 0
        async with httpx.AsyncClient(
            timeout=httpx.Timeout(self._timeout), trust_env=False, verify=tls_verify(self._ca_file)
        ) as client:
            while True:
                request_headers = {**headers, "Accept-Encoding": "identity"}
                if partial.size:
                    request_headers["Range"] = f"bytes={partial.size}-"
                    if digest:
                        request_headers["If-Range"] = f'"{digest}"'
                try:
                    async with client.stream("GET", url, headers=request_headers) as resp:
                        if resp.status_code == 416 and partial.size:
                            if partial.size == size:
                                break  # the partial file is already whole
                            raise _StartOver  # the partial file is longer than the artifact
                        start, total = _response_span(resp, url)
                        server_digest = resp.headers.get(DIGEST_HEADER)
                        if digest and server_digest and _normalise_digest(server_digest) != digest:
                            raise ArtifactError(
                                f"artifact {ref} changed on the frontend: it now has digest "
                                f"{server_digest}, expected {digest}"
                            )
                        size = total if total is not None else size
                        if size is not None:
                            self._check_space(ref, size - (start if start else 0))
                        if start == 0 and partial.size:  # a whole answer (200): from scratch
                            await partial.restart()
                        elif start != partial.size:  # a range we did not ask for
                            raise _StartOver
                        async for chunk in resp.aiter_raw():
                            await partial.append(chunk)
                            now = time.monotonic()
                            if now - last_emit >= self._progress_interval:
                                last_emit = now
                                event = StageProgress(ref, "downloading", partial.size, size)
                                await self._emit_key(key, event)
                        await partial.flush()
                    break
                except _StartOver:
                    failures += 1
                    if failures > self._retries:
                        raise ArtifactError(f"GET {url}: cannot resume {ref}") from None
                    await partial.restart()
                except httpx.TransportError as e:
                    await partial.flush()  # keep what arrived, to resume from there
                    failures += 1
                    if failures > self._retries:
                        raise ArtifactError(
                            f"downloading {ref} from {url} failed after {failures} attempts "
                            f"({partial.size} bytes kept to resume): {e!r}"
                        ) from e
                    log.warning(
                        "download of %s interrupted at %d bytes (%r); resuming",
                        ref,
                        partial.size,
                        e,
                    )
                    await asyncio.sleep(min(0.1 * 2**failures, 5.0))  # retry delay
        await self._emit_key(key, StageProgress(ref, "verifying", partial.size, size))
        have, actual = partial.size, partial.hexdigest()
        if size is not None and have != size:
            partial.path.unlink(missing_ok=True)
            raise ArtifactError(f"artifact {ref}: got {have} bytes, expected {size}")
        if digest is not None and actual != digest:
            partial.path.unlink(missing_ok=True)
            raise ArtifactError(f"artifact {ref}: SHA-256 {actual} does not match {digest}")
        blob = await asyncio.to_thread(self._commit, partial.path, actual, _file_name(ref))
        log.info("staged %s (%s, sha256 %s)", ref, format_size(have), actual)
        await self._emit_key(key, StageProgress(ref, "staged", have, have))
        return blob

    def _check_space(self, ref: str, remaining: int) -> None:
        need = max(0, remaining) + self._headroom
        free = self._free_space(self._cache)
        if free < need:
            raise ArtifactError(
                f"not enough disk space to stage {ref}: needs {format_size(need)} "
                f"({format_size(max(0, remaining))} + {format_size(self._headroom)} headroom), "
                f"{format_size(free)} free in {self._cache}"
            )

    def _commit(self, partial: Path, digest: str, name: str) -> Path:
        """Move a verified partial file to `blobs/<digest>/<name>` atomically."""
        blobs = self._cache / "blobs"
        final = blobs / digest
        if (existing := self.blob(digest)) is not None:
            partial.unlink(missing_ok=True)
            return existing
        staging = blobs / f".tmp-{digest}-{secrets.token_hex(4)}"
        staging.mkdir(parents=True)
        partial.rename(staging / name)
        try:
            staging.rename(final)
        except OSError:  # another stager won the race
            shutil.rmtree(staging, ignore_errors=True)
        blob = self.blob(digest)
        if blob is None:
            raise ArtifactError(f"staged blob {digest} vanished from {blobs}")
        return blob

    # --- hub ------------------------------------------------------------------------------

    async def _from_hub(self, ref: str, key: str) -> Path:
        m = re.match(r"^hf://([^/@]+/[^/@]+)(?:@([^/]+))?(?:/(.+))?$", ref)
        if m is None:
            raise ArtifactError(f"invalid hub reference {ref!r} (expected hf://org/repo/file)")
        repo_id, revision, filename = m.groups()
        try:
            hub: Any = importlib.import_module("huggingface_hub")
        except ImportError:
            raise ArtifactError(
                f"cannot download {ref}: huggingface_hub is not installed on this node"
            ) from None
        cache = str(self._cache / "hf")
        await self._emit_key(key, StageProgress(ref, "downloading"))
        try:
            if filename:
                size: int | None = None
                with contextlib.suppress(Exception):  # the size is advisory: check when known
                    url = hub.hf_hub_url(repo_id, filename, revision=revision)
                    meta = await asyncio.to_thread(hub.get_hf_file_metadata, url)
                    size = None if meta.size is None else int(meta.size)
                if size is not None:
                    self._check_space(ref, size)
                path = await asyncio.to_thread(
                    hub.hf_hub_download,
                    repo_id=repo_id,
                    filename=filename,
                    revision=revision,
                    cache_dir=cache,
                )
            else:
                path = await asyncio.to_thread(
                    hub.snapshot_download, repo_id=repo_id, revision=revision, cache_dir=cache
                )
        except ArtifactError:
            raise
        except Exception as e:
            raise ArtifactError(f"cannot download {ref}: {e}") from e
        await self._emit_key(key, StageProgress(ref, "staged"))
        return Path(path)

    # --- progress -------------------------------------------------------------------------

    async def _run(self, ref: str, key: str, work: Awaitable[Path]) -> Path:
        try:
            return await work
        except Exception as e:
            await self._emit_key(key, StageProgress(ref, "failed", error=str(e)))
            raise

    def _stage_done(self, key: str, task: asyncio.Task[Path]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
            self._listeners.pop(key, None)
        if not task.cancelled():
            task.exception()  # the callers get it; retrieved here so it is never unobserved

    async def _emit_key(self, key: str, event: StageProgress) -> None:
        await self._emit(list(self._listeners.get(key, [])), event)

    async def _emit(self, listeners: list[Progress | None], event: StageProgress) -> None:
        for callback in [self._publish, *listeners]:
            if callback is None:
                continue
            try:
                await callback(event)
            except Exception:
                log.exception("publishing staging progress of %s failed", event.ref)


class _Partial:
    """A download in progress on disk and the SHA-256 of its bytes, kept in step. Writes are
    buffered (up to 1 MiB) and done off the event loop; `flush` before relying on the file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.size = 0  # bytes in the file plus the buffer
        self._hasher = hashlib.sha256()
        self._buffer: list[bytes] = []
        self._buffered = 0

    async def load(self) -> None:
        """Take what the file already holds (from an earlier, interrupted download)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            self._hasher = await asyncio.to_thread(_hash_file, self.path)
            self.size = self.path.stat().st_size

    async def restart(self) -> None:
        self._buffer, self._buffered = [], 0
        self.path.unlink(missing_ok=True)
        self._hasher, self.size = hashlib.sha256(), 0

    async def append(self, chunk: bytes) -> None:
        self._buffer.append(chunk)
        self._buffered += len(chunk)
        self.size += len(chunk)
        if self._buffered >= _CHUNK:
            await self.flush()

    async def flush(self) -> None:
        if not self._buffer:
            return
        data = b"".join(self._buffer)
        self._buffer, self._buffered = [], 0
        await asyncio.to_thread(_append_file, self.path, data)
        self._hasher.update(data)

    def hexdigest(self) -> str:
        return self._hasher.hexdigest()


def _append_file(path: Path, data: bytes) -> None:
    with path.open("ab") as f:
        f.write(data)


def _normalise_digest(digest: str) -> str:
    """Hex SHA-256 from `abc…`, `sha256:abc…` or `sha256=abc…` (ArtifactError otherwise)."""
    value = digest.strip().lower()
    for prefix in ("sha256:", "sha256="):
        value = value.removeprefix(prefix)
    if not _HEX.match(value):
        raise ArtifactError(f"not a SHA-256 digest: {digest!r}")
    return value


def _hash_file(path: Path) -> Any:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h


def _file_name(ref: str) -> str:
    """A safe file name for the blob of `ref` (its last path part: engines may look at the
    extension, e.g. `.gguf`)."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", ref.rstrip("/").rsplit("/", 1)[-1]).lstrip(".")
    return name or "artifact"


def _response_span(resp: httpx.Response, url: str) -> tuple[int, int | None]:
    """(first byte offset, total size or None) of a 200 or 206 answer; ArtifactError otherwise."""
    if resp.status_code == 200:
        length = resp.headers.get("content-length")
        return 0, int(length) if length is not None and length.isdigit() else None
    if resp.status_code == 206:
        m = re.match(r"^bytes (\d+)-(\d+)/(\d+|\*)$", resp.headers.get("content-range", ""))
        if m is None:
            raise ArtifactError(f"GET {url}: 206 without a usable Content-Range")
        total = m.group(3)
        return int(m.group(1)), int(total) if total != "*" else None
    raise ArtifactError(f"GET {url}: HTTP {resp.status_code}")

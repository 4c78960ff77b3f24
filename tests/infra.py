"""Test infrastructure: a PostgreSQL and a NATS server per session, a database per test, and
`poll_until`, the one way tests wait for a condition (a deadline, never a bare sleep)."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from corral.embedded import EmbeddedNats, EmbeddedPostgres

ENV_DATABASE_URL = "CORRAL_TEST_DATABASE_URL"
"""A server to use instead of an embedded one, e.g. postgresql://postgres@127.0.0.1:5432/postgres."""

ENV_NATS_URL = "CORRAL_TEST_NATS_URL"
"""A NATS server (JetStream enabled) to use instead of an embedded one."""

TEST_DATABASE_PREFIX = "corral_t_"

T = TypeVar("T")

# The session's server holds throwaway data: no need to make it durable.
_THROWAWAY_SETTINGS = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}


@contextlib.contextmanager
def _scratch_dir(prefix: str) -> Iterator[Path]:
    # Not pytest's tmp_path: its root is 0700 and PostgreSQL runs as another user under root.
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """Yield the URL of a PostgreSQL server: $CORRAL_TEST_DATABASE_URL or an embedded one."""
    external = os.environ.get(ENV_DATABASE_URL)
    if external:
        yield external
        return
    with (
        _scratch_dir("corral-test-pg-") as root,
        EmbeddedPostgres(root, database="postgres", settings=_THROWAWAY_SETTINGS) as pg,
    ):
        yield pg.url


@contextlib.contextmanager
def nats_server() -> Iterator[str]:
    """Yield the URL of a NATS server: $CORRAL_TEST_NATS_URL or an embedded one."""
    external = os.environ.get(ENV_NATS_URL)
    if external:
        yield external
        return
    with _scratch_dir("corral-test-nats-") as root, EmbeddedNats(root) as nats:
        yield nats.url


def with_database(server_url: str, name: str) -> str:
    """`server_url` pointing at database `name` instead (query parameters kept)."""
    parts = urlsplit(server_url)
    return urlunsplit(parts._replace(path=f"/{name}"))


def database_name(url: str) -> str:
    """The database a postgresql:// URL names."""
    return urlsplit(url).path.lstrip("/")


def unique_prefix() -> str:
    """A NATS subject prefix (one token: letters, digits, underscore) unique to the caller."""
    return f"corral_t{uuid.uuid4().hex[:12]}"


async def create_database(server_url: str) -> str:
    """Create an empty database `corral_t_<hex>` on the server and return its URL."""
    name = f"{TEST_DATABASE_PREFIX}{uuid.uuid4().hex[:16]}"
    conn = await asyncpg.connect(server_url, timeout=10)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return with_database(server_url, name)


async def drop_database(server_url: str, url: str) -> None:
    """Drop the database of `url` after terminating its connections."""
    name = database_name(url)
    if not name.startswith(TEST_DATABASE_PREFIX):
        raise ValueError(f"refusing to drop {name!r}: not a test database")
    conn = await asyncpg.connect(server_url, timeout=10)
    try:
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = $1 AND pid <> pg_backend_pid()",
            name,
        )
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


# --- waiting for a condition ---------------------------------------------------------------


class _Deadline:
    """When a poll gives up, and the message it fails with."""

    def __init__(self, timeout: float, what: object) -> None:
        self.timeout = timeout
        self.what = what
        self.end = time.monotonic() + timeout
        self.last: BaseException | None = None

    def expire(self) -> None:
        if time.monotonic() > self.end:
            raise AssertionError(
                f"timed out after {self.timeout}s waiting for {self.what}"
                + (f": {self.last!r}" if self.last is not None else "")
            )


def poll_until(
    check: Callable[[], T],
    *,
    timeout: float = 30.0,
    interval: float = 0.05,
    what: str = "",
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """Call `check` until it returns something truthy and return that; fail after `timeout`
    seconds naming `what`. Exceptions of the `ignore` types count as "not yet"."""
    deadline = _Deadline(timeout, what or check)
    while True:
        try:
            value = check()
            if value:
                return value
        except ignore as exc:
            deadline.last = exc
        deadline.expire()
        time.sleep(interval)


async def apoll_until(
    check: Callable[[], T | Awaitable[T]],
    *,
    timeout: float = 30.0,
    interval: float = 0.02,
    what: str = "",
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """`poll_until` inside an event loop: `check` may be a plain or an async function."""
    deadline = _Deadline(timeout, what or check)
    while True:
        try:
            value: Any = check()
            if inspect.isawaitable(value):
                value = await value
            if value:
                return value  # type: ignore[no-any-return]
        except ignore as exc:
            deadline.last = exc
        deadline.expire()
        await asyncio.sleep(interval)

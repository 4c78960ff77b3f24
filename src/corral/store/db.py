"""The one door to PostgreSQL: engine creation and schema migration under an advisory lock."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import asyncpg.exceptions
from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, event, text
from sqlalchemy.engine import ExceptionContext
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from corral.config import to_async_url
from corral.errors import BadRequest

log = logging.getLogger(__name__)

#: Advisory lock keys (arbitrary constants, unique within Corral).
MIGRATION_LOCK = 0x636F7272_616C0001
RECONCILER_LOCK = 0x636F7272_616C0002

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


#: what a write of a value PostgreSQL cannot store raises (see `input_error`)
DB_ERRORS: tuple[type[Exception], ...] = (DBAPIError, UnicodeEncodeError)
_DATA_ERRORS = (
    asyncpg.exceptions.DataError,  # SQLSTATE class 22: out of range, too long, bad character
    asyncpg.exceptions._base.DataError,  # an argument asyncpg cannot encode (int32 overflow)
    UnicodeEncodeError,  # a lone surrogate
)


def input_error(exc: BaseException) -> BadRequest | None:
    """The caller's fault in a database error: a value PostgreSQL cannot store (a number out
    of its column's range, a string too long, a character it cannot hold), as a BadRequest
    naming the column when PostgreSQL says it. None for any other error."""
    seen: BaseException | None = exc
    for _ in range(8):  # the wrapped error, its cause, ...
        if seen is None:
            break
        if isinstance(seen, _DATA_ERRORS):
            column = getattr(seen, "column_name", None)
            first = (str(seen).strip().splitlines() or ["invalid value"])[0]
            where = f"{column}: " if column else ""
            return BadRequest(f"{where}a value cannot be stored: {first}", param=column)
        seen = getattr(seen, "orig", None) or seen.__cause__
    return None


def create_engine(database_url: str, *, pool_size: int = 10) -> AsyncEngine:
    """Create the async engine for a postgresql:// (or postgresql+asyncpg://) URL."""
    return create_async_engine(
        to_async_url(database_url),
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,
        pool_recycle=1800,
    )


def on_error(engine: AsyncEngine, callback: Callable[[], None]) -> None:
    """Call `callback` on every error the database driver raises (connecting included)."""

    def handle_error(_: ExceptionContext) -> None:
        callback()

    event.listen(engine.sync_engine, "handle_error", handle_error)


def alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return cfg


async def migrate(engine: AsyncEngine) -> None:
    """Bring the schema to the newest revision.

    Runs inside one transaction holding a transaction-level advisory lock, so any number of
    frontends starting at once serialize here and all come up on the same schema.
    """
    async with engine.begin() as conn:
        await conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK})
        await conn.run_sync(_upgrade)


def _upgrade(connection: Connection) -> None:
    cfg = alembic_config()
    cfg.attributes["connection"] = connection
    command.upgrade(cfg, "head")

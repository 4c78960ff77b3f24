"""Embedded PostgreSQL under root without a system user of its own (`--no-create-user`): it runs
as the unprivileged owner of the data directory, changes no permission, and fails saying what
to do when it cannot."""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import psutil
import pytest

from corral.embedded import EmbeddedError, EmbeddedPostgres

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the rules apply only under root")


@pytest.fixture
def scratch() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="corral-test-nouser-"))  # 0700, owned by root
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_data_directory_root_owns_is_refused_clearly(scratch: Path) -> None:
    pg = EmbeddedPostgres(scratch / "postgres", create_user=False)
    with pytest.raises(EmbeddedError) as info:
        pg.start()
    assert "cannot run as root" in info.value.message
    assert "--no-create-user" in info.value.message and "--data-dir" in info.value.message
    assert _mode(scratch) == 0o700, "no permission changed"
    assert not (scratch / "postgres" / "pgdata").exists()


def test_an_owner_who_cannot_reach_the_data_directory_is_told_where(scratch: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    home = scratch / "home"
    home.mkdir()
    os.chown(home, nobody.pw_uid, nobody.pw_gid)
    with pytest.raises(EmbeddedError) as info:
        EmbeddedPostgres(home / "postgres", create_user=False).start()
    assert f"user nobody (who runs PostgreSQL) cannot reach {scratch}" in info.value.message
    assert f"chmod o+x {scratch}" in info.value.message
    assert _mode(scratch) == 0o700, "told, not changed"


async def test_postgres_runs_as_the_owner_of_the_data_directory(scratch: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    scratch.chmod(0o755)
    home = scratch / "home"
    home.mkdir()
    os.chown(home, nobody.pw_uid, nobody.pw_gid)
    with EmbeddedPostgres(home / "postgres", create_user=False) as pg:
        conn = await asyncpg.connect(pg.url, timeout=10)
        try:
            assert await conn.fetchval("SELECT 1") == 1
        finally:
            await conn.close()
        assert pg.pid is not None
        assert psutil.Process(pg.pid).uids().real == nobody.pw_uid
        assert (home / "postgres" / "pgdata").stat().st_uid == nobody.pw_uid

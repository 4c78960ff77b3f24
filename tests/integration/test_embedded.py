"""Embedded PostgreSQL and NATS as real child processes, and the shared infrastructure fixtures."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import nats
import psutil
import pytest

import infra
from corral.embedded import EmbeddedError, EmbeddedNats, EmbeddedPostgres, supervision
from infra import poll_until


@pytest.fixture
def scratch() -> Iterator[Path]:
    # Not tmp_path: pytest's root for it is 0700, and PostgreSQL runs as another user as root.
    path = Path(tempfile.mkdtemp(prefix="corral-test-embedded-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _descendants() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


async def _fetchval(url: str, sql: str) -> object:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


async def _execute(url: str, *statements: str) -> None:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        for sql in statements:
            await conn.execute(sql)
    finally:
        await conn.close()


# --- PostgreSQL ------------------------------------------------------------------------------


async def test_postgres_data_survives_restart(scratch: Path) -> None:
    pg = EmbeddedPostgres(scratch)
    url = pg.start()
    try:
        assert url == f"postgresql://postgres@127.0.0.1:{pg.bound_port}/corral"
        running = pg.pid
        assert running is not None
        await _execute(url, "CREATE TABLE kept (v text)", "INSERT INTO kept VALUES ('hello')")
    finally:
        pg.stop()
    assert pg.pid is None
    assert _gone(running)
    assert (scratch / "pgdata" / "PG_VERSION").exists()
    assert not (scratch / "pgdata" / "postmaster.pid").exists()  # clean shutdown

    with EmbeddedPostgres(scratch) as again:
        assert await _fetchval(again.url, "SELECT v FROM kept") == "hello"


async def test_two_postgres_instances_run_at_once(scratch: Path) -> None:
    with (
        EmbeddedPostgres(scratch / "a", database="alpha", settings={"max_connections": "42"}) as a,
        EmbeddedPostgres(scratch / "b", database="beta") as b,
    ):
        assert a.bound_port != b.bound_port
        assert await _fetchval(a.url, "SHOW max_connections") == "42"
        assert a.pid != b.pid
        for pg, name in ((a, "alpha"), (b, "beta")):
            assert await _fetchval(pg.url, "SELECT current_database()") == name
            data_dir = await _fetchval(pg.url, "SHOW data_directory")
            assert Path(str(data_dir)).resolve() == pg.pgdata.resolve()


async def test_stop_leaves_no_child_process(scratch: Path) -> None:
    before = _descendants()
    pg = EmbeddedPostgres(scratch / "pg")
    nc = EmbeddedNats(scratch / "nats")
    pg.start()
    nc.start()
    try:
        conn = await asyncpg.connect(pg.url, timeout=10)  # one backend process more
        started = _descendants() - before
        assert pg.pid in started
        assert nc.pid in started
        assert len(started) >= 4  # postmaster, its helpers and our backend, nats-server
        await conn.close()
    finally:
        nc.stop()
        pg.stop()
    left = [pid for pid in started if not _gone(pid)]
    assert left == []


async def test_start_after_sigkill_with_stale_pidfile(scratch: Path) -> None:
    pg = EmbeddedPostgres(scratch)
    pg.start()
    await _execute(pg.url, "CREATE TABLE kept (v int)", "INSERT INTO kept VALUES (42)")
    # A backend frozen by SIGSTOP outlives its postmaster and keeps the old shared memory
    # attached: PostgreSQL alone would refuse to start until it is gone.
    conn = await asyncpg.connect(pg.url, timeout=10)
    backend = await conn.fetchval("SELECT pg_backend_pid()")
    os.kill(backend, signal.SIGSTOP)
    killed = pg.pid
    assert killed is not None
    try:
        os.kill(killed, signal.SIGKILL)
        poll_until(lambda: pg.pid is None, timeout=20, what="the postmaster to die")
        pidfile = scratch / "pgdata" / "postmaster.pid"
        assert pidfile.read_text().split("\n", 1)[0] == str(killed)
        assert not _gone(backend)

        with EmbeddedPostgres(scratch) as again:
            assert again.pid != killed
            assert _gone(backend)
            assert await _fetchval(again.url, "SELECT v FROM kept") == 42
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(backend, signal.SIGKILL)
        conn.terminate()
    pg.stop()  # reaping the killed server is harmless
    assert pg.pid is None


def test_second_server_on_the_same_data_dir_is_refused(scratch: Path) -> None:
    with EmbeddedPostgres(scratch) as first:
        with pytest.raises(EmbeddedError, match=f"pid {first.pid}"):
            EmbeddedPostgres(scratch).start()
        assert first.pid is not None
        assert not _gone(first.pid)


def test_leftover_server_of_a_dead_owner_is_replaced(scratch: Path) -> None:
    old = EmbeddedNats(scratch)
    old.start()
    leftover = old.pid
    assert leftover is not None
    # Pretend the process that started it is gone (its pid now names another process).
    record_file = scratch / "nats.owner.json"
    record = json.loads(record_file.read_text())
    assert record["pid"] == leftover
    record_file.write_text(json.dumps({**record, "owner_create_time": 0.0}))

    with EmbeddedNats(scratch) as new:
        assert new.pid != leftover
        assert _gone(leftover)
    old.stop()


# --- NATS ------------------------------------------------------------------------------------


async def test_nats_serves_jetstream_and_keeps_streams(scratch: Path) -> None:
    server = EmbeddedNats(scratch)
    url = server.start()
    try:
        assert url == f"nats://127.0.0.1:{server.bound_port}"
        client = await nats.connect(url)
        try:
            js = client.jetstream()
            await js.add_stream(name="KEPT", subjects=["kept.>"])
            await js.publish("kept.one", b"payload")
        finally:
            await client.close()
    finally:
        server.stop()
    assert server.pid is None

    with EmbeddedNats(scratch) as again:
        client = await nats.connect(again.url)
        try:
            info = await client.jetstream().stream_info("KEPT")
            assert info.state.messages == 1
        finally:
            await client.close()


def test_fixed_port_in_use_fails_with_the_log(scratch: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(EmbeddedError, match="could not bind"):
            EmbeddedNats(scratch, port=port).start()
        assert "already in use" in (scratch / "nats.log").read_text()


def test_picked_port_taken_is_retried(scratch: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        occupied = taken.getsockname()[1]
        spare = supervision.free_port()
        ports = iter([occupied, spare])
        monkeypatch.setattr(supervision, "free_port", lambda host="127.0.0.1": next(ports))
        with EmbeddedNats(scratch) as server:
            assert server.bound_port == spare
            assert server.url.endswith(f":{spare}")


# --- parent death ----------------------------------------------------------------------------

_CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from corral.embedded import EmbeddedNats, EmbeddedPostgres
    root = Path(sys.argv[1])
    pg = EmbeddedPostgres(root / "pg")
    pg.start()
    server = EmbeddedNats(root / "nats")
    server.start()
    print(pg.pid, server.pid, flush=True)
    while True:
        time.sleep(60)
    """
)


def test_servers_die_with_a_killed_parent(scratch: Path) -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(scratch)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert parent.stdout is not None
    line = parent.stdout.readline()
    if not line:
        _, err = parent.communicate(timeout=30)
        pytest.fail(f"the child could not start the servers:\n{err}")
    pg_pid, nats_pid = (int(x) for x in line.split())
    assert not _gone(pg_pid)
    assert not _gone(nats_pid)

    parent.kill()
    parent.communicate(timeout=30)
    poll_until(
        lambda: _gone(pg_pid) and _gone(nats_pid), timeout=20, what="the orphaned servers to exit"
    )
    # SIGINT is a fast shutdown: postgres removed its pid file, the next start is clean.
    assert not (scratch / "pg" / "pgdata" / "postmaster.pid").exists()


# --- the shared fixtures (tests/conftest.py) -------------------------------------------------


@pytest.fixture(scope="module")
def seen() -> dict[str, set[str]]:
    return {"databases": set(), "prefixes": set()}


@pytest.mark.parametrize("round_", [1, 2])
async def test_database_url_is_fresh_and_private(
    database_url: str, pg_server_url: str, seen: dict[str, set[str]], round_: int
) -> None:
    name = infra.database_name(database_url)
    assert name.startswith("corral_t_")
    assert name not in seen["databases"]
    existing = {r["datname"] for r in await _rows(pg_server_url, "SELECT datname FROM pg_database")}
    assert name in existing
    assert not seen["databases"] & existing  # earlier tests' databases were dropped
    tables = await _fetchval(
        database_url,
        "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'",
    )
    assert tables == 0
    await _execute(database_url, f"CREATE TABLE round_{round_} (id int)")
    seen["databases"].add(name)


async def _rows(url: str, sql: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        return list(await conn.fetch(sql))
    finally:
        await conn.close()


async def test_drop_database_terminates_its_connections(pg_server_url: str) -> None:
    url = await infra.create_database(pg_server_url)
    conn = await asyncpg.connect(url, timeout=10)
    try:
        await infra.drop_database(pg_server_url, url)
        rows = await _rows(pg_server_url, "SELECT datname FROM pg_database")
        assert infra.database_name(url) not in {r["datname"] for r in rows}
    finally:
        conn.terminate()


@pytest.mark.parametrize("round_", [1, 2])
async def test_nats_prefix_is_unique_and_usable(
    nats_url: str, nats_prefix: str, seen: dict[str, set[str]], round_: int
) -> None:
    assert nats_prefix not in seen["prefixes"]
    seen["prefixes"].add(nats_prefix)
    client = await nats.connect(nats_url)
    try:
        sub = await client.subscribe(f"{nats_prefix}.>")
        await client.publish(f"{nats_prefix}.round.{round_}", b"hi")
        msg = await sub.next_msg(timeout=5)
        assert msg.subject == f"{nats_prefix}.round.{round_}"
    finally:
        await client.close()

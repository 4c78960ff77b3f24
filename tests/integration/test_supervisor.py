"""Tests of the supervisor with real backend processes (small Python scripts written here)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import psutil
import pytest

from corral.errors import Conflict, ProcessStartError
from corral.worker.ports import PortAllocator
from corral.worker.process import LaunchSpec, ProcessState, RunningProcess
from corral.worker.supervisor import Supervisor
from infra import apoll_until

SRC = Path(__file__).resolve().parents[2] / "src"

BACKEND = textwrap.dedent(
    """
    import argparse, http.server, json, os, signal, subprocess, sys, time

    p = argparse.ArgumentParser()
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--delay", type=float, default=0.0)
    p.add_argument("--never-ready", action="store_true")
    p.add_argument("--ignore-term", action="store_true")
    p.add_argument("--term-marker")
    p.add_argument("--grandchild")
    p.add_argument("--grandchild-setsid", action="store_true")
    a = p.parse_args()
    started = time.monotonic()

    if a.ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    elif a.term_marker:
        def on_term(signum, frame):
            with open(a.term_marker, "w") as f:
                f.write("got SIGTERM")
            os._exit(0)
        signal.signal(signal.SIGTERM, on_term)
    if a.grandchild:
        child = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(600)"],
            start_new_session=a.grandchild_setsid,
        )
        with open(a.grandchild + ".tmp", "w") as f:
            f.write(str(child.pid))
        os.rename(a.grandchild + ".tmp", a.grandchild)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            code = 200
            if self.path == "/health":
                waited = time.monotonic() - started >= a.delay
                code = 200 if waited and not a.never_ready else 503
            body = json.dumps(
                {"pid": os.getpid(), "greeting": os.environ.get("GREETING"), "cwd": os.getcwd()}
            ).encode()
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer((a.host, a.port), Handler)
    print(f"backend pid={os.getpid()} listening on {a.port}", flush=True)
    server.serve_forever()
    """
)

FAILING = textwrap.dedent(
    """
    import sys
    print("loading weights", flush=True)
    print("fatal: model weights not found at /nope", file=sys.stderr)
    sys.exit(3)
    """
)

PARENT = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from corral.worker.ports import PortAllocator
    from corral.worker.process import LaunchSpec
    from corral.worker.supervisor import Supervisor

    async def main():
        sup = Supervisor(PortAllocator(), Path(sys.argv[1]))
        argv = [sys.executable, sys.argv[2], "--host", "{host}", "--port", "{port}"]
        info = await sup.start(LaunchSpec(("orphan", 0), "test", argv, ready_timeout=30))
        print(info.pid, flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())
    """
)


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def read_pid(path: Path) -> int:
    await apoll_until(path.exists, timeout=10)
    return int(path.read_text())


async def get(address: str, path: str = "/") -> httpx.Response:
    async with httpx.AsyncClient(trust_env=False) as client:
        return await client.get(f"http://{address}{path}", timeout=5.0)


@pytest.fixture
def scripts(tmp_path: Path) -> dict[str, Path]:
    out = {}
    for name, text in {"backend": BACKEND, "failing": FAILING, "parent": PARENT}.items():
        out[name] = tmp_path / f"{name}.py"
        out[name].write_text(text)
    return out


@pytest.fixture
def ports() -> PortAllocator:
    return PortAllocator()


@pytest.fixture
async def sup(ports: PortAllocator, tmp_path: Path) -> AsyncIterator[Supervisor]:
    supervisor = Supervisor(ports, tmp_path / "logs", stop_grace=5.0)
    yield supervisor
    await supervisor.stop_all()


def backend_spec(
    scripts: dict[str, Path],
    *args: str,
    key: tuple[str, int] = ("m", 0),
    ready_timeout: float = 30.0,
    **kw: object,
) -> LaunchSpec:
    argv = [sys.executable, str(scripts["backend"]), "--host", "{host}", "--port", "{port}", *args]
    return LaunchSpec(key=key, backend="test", argv=argv, ready_timeout=ready_timeout, **kw)  # type: ignore[arg-type]


async def test_start_becomes_ready_and_is_reachable(
    sup: Supervisor, scripts: dict[str, Path], ports: PortAllocator, tmp_path: Path
) -> None:
    spec = backend_spec(scripts, env={"GREETING": "on {host}:{port}"}, cwd=tmp_path)
    info = await sup.start(spec)
    assert info.state is ProcessState.READY
    assert info.address == f"127.0.0.1:{info.port}"
    assert info.port in ports.in_use
    assert os.getpgid(info.pid) == info.pid  # leads its own process group
    assert abs(info.started_at - time.time()) < 60
    body = (await get(info.address)).json()
    assert body == {"pid": info.pid, "greeting": f"on 127.0.0.1:{info.port}", "cwd": str(tmp_path)}
    assert sup.running() == [info]
    assert "listening" in sup.log_tail(("m", 0))


async def test_advertise_host_is_used_in_the_address(
    sup: Supervisor, scripts: dict[str, Path]
) -> None:
    info = await sup.start(backend_spec(scripts, advertise_host="localhost"))
    assert info.address == f"localhost:{info.port}"
    assert (await get(info.address)).json()["pid"] == info.pid


async def test_slow_health_is_waited_for(sup: Supervisor, scripts: dict[str, Path]) -> None:
    t0 = time.monotonic()
    info = await sup.start(backend_spec(scripts, "--delay", "1.0"))
    assert time.monotonic() - t0 >= 1.0
    assert info.state is ProcessState.READY
    assert (await get(info.address, "/health")).status_code == 200


async def test_never_ready_fails_after_the_timeout_with_the_log_tail(
    sup: Supervisor, scripts: dict[str, Path], ports: PortAllocator
) -> None:
    t0 = time.monotonic()
    with pytest.raises(ProcessStartError) as err:
        await sup.start(backend_spec(scripts, "--never-ready", ready_timeout=1.0))
    assert 1.0 <= time.monotonic() - t0 < 10
    msg = err.value.message
    assert "not ready after 1s" in msg
    assert "listening on" in msg  # the log tail
    match = re.search(r"backend pid=(\d+)", msg)
    assert match is not None
    assert not alive(int(match.group(1)))
    assert ports.in_use == frozenset()
    assert sup.running() == []


async def test_exit_with_error_fails_fast_with_stderr(
    sup: Supervisor, scripts: dict[str, Path], ports: PortAllocator
) -> None:
    spec = LaunchSpec(
        key=("broken", 1),
        backend="test",
        argv=[sys.executable, str(scripts["failing"])],
        ready_timeout=60.0,
    )
    t0 = time.monotonic()
    with pytest.raises(ProcessStartError) as err:
        await sup.start(spec)
    assert time.monotonic() - t0 < 10  # did not wait for the 60 s timeout
    assert "exit code 3" in err.value.message
    assert "fatal: model weights not found at /nope" in err.value.message
    assert ports.in_use == frozenset()
    assert "model weights not found" in sup.log_tail(("broken", 1))
    assert sup.running() == []


async def test_missing_executable_is_a_start_error(sup: Supervisor, ports: PortAllocator) -> None:
    spec = LaunchSpec(key=("m", 0), backend="test", argv=["/nonexistent/backend-binary"])
    with pytest.raises(ProcessStartError, match="nonexistent"):
        await sup.start(spec)
    assert ports.in_use == frozenset()


async def test_stop_sends_sigterm(
    sup: Supervisor, scripts: dict[str, Path], ports: PortAllocator, tmp_path: Path
) -> None:
    marker = tmp_path / "terminated"
    info = await sup.start(backend_spec(scripts, "--term-marker", str(marker)))
    t0 = time.monotonic()
    assert await sup.stop(info.key) is True
    assert time.monotonic() - t0 < 5.0  # exited on SIGTERM, no SIGKILL after the grace
    assert marker.read_text() == "got SIGTERM"
    assert not alive(info.pid)
    assert ports.in_use == frozenset()
    assert sup.running() == []
    assert await sup.stop(info.key) is False


async def test_process_ignoring_sigterm_is_killed_after_the_grace(
    ports: PortAllocator, scripts: dict[str, Path], tmp_path: Path
) -> None:
    sup = Supervisor(ports, tmp_path / "logs", stop_grace=0.5)
    info = await sup.start(backend_spec(scripts, "--ignore-term"))
    t0 = time.monotonic()
    assert await sup.stop(info.key) is True
    assert time.monotonic() - t0 >= 0.5
    assert not alive(info.pid)
    assert ports.in_use == frozenset()


@pytest.mark.parametrize("setsid", [False, True], ids=["same-group", "own-session"])
async def test_stop_kills_grandchildren(
    sup: Supervisor, scripts: dict[str, Path], tmp_path: Path, setsid: bool
) -> None:
    pidfile = tmp_path / "grandchild.pid"
    extra = ["--grandchild-setsid"] if setsid else []
    info = await sup.start(backend_spec(scripts, "--grandchild", str(pidfile), *extra))
    grandchild = await read_pid(pidfile)
    assert alive(grandchild)
    assert await sup.stop(info.key) is True
    await apoll_until(lambda: not alive(grandchild), timeout=10)
    assert not alive(info.pid)


async def test_stop_with_wrong_expected_address_stops_nothing(
    sup: Supervisor, scripts: dict[str, Path]
) -> None:
    info = await sup.start(backend_spec(scripts))
    assert await sup.stop(info.key, expected_address="127.0.0.1:1") is False
    assert alive(info.pid)
    assert sup.running() == [info]
    assert (await get(info.address)).status_code == 200
    assert await sup.stop(info.key, expected_address=info.address) is True
    assert not alive(info.pid)


async def test_concurrent_identical_starts_make_one_process(
    sup: Supervisor, scripts: dict[str, Path]
) -> None:
    spec = backend_spec(scripts, "--delay", "0.3")
    first, second = await asyncio.gather(sup.start(spec), sup.start(spec))
    assert first.pid == second.pid
    assert len(sup.running()) == 1
    again = await sup.start(backend_spec(scripts, "--delay", "0.3"))  # equal spec, new object
    assert again.pid == first.pid
    with pytest.raises(Conflict):
        await sup.start(backend_spec(scripts, "--delay", "0.4"))
    assert len(sup.running()) == 1


async def test_stop_during_start_fails_the_start(
    sup: Supervisor, scripts: dict[str, Path], ports: PortAllocator
) -> None:
    starting = asyncio.create_task(sup.start(backend_spec(scripts, "--never-ready")))
    await apoll_until(lambda: bool(sup.running()), timeout=10)
    (info,) = sup.running()
    assert info.state is ProcessState.STARTING
    assert await sup.stop(info.key) is True
    with pytest.raises(ProcessStartError, match="stopped while starting"):
        await starting
    assert not alive(info.pid)
    assert ports.in_use == frozenset()
    assert sup.running() == []


async def test_unexpected_exit_calls_on_exit_and_releases_the_port(
    ports: PortAllocator, scripts: dict[str, Path], tmp_path: Path
) -> None:
    exits: list[tuple[RunningProcess, int]] = []
    called = asyncio.Event()

    async def on_exit(process: RunningProcess, returncode: int) -> None:
        exits.append((process, returncode))
        called.set()

    sup = Supervisor(ports, tmp_path / "logs", on_exit=on_exit)
    info = await sup.start(backend_spec(scripts))
    os.kill(info.pid, signal.SIGTERM)
    await asyncio.wait_for(called.wait(), 10)
    assert exits == [(info, -signal.SIGTERM)]
    assert info.port not in ports.in_use
    assert sup.running() == []
    assert await sup.stop(info.key) is False


async def test_ports_never_collide_across_concurrent_starts(
    sup: Supervisor, scripts: dict[str, Path], ports: PortAllocator
) -> None:
    specs = [backend_spec(scripts, key=("many", i)) for i in range(20)]
    infos = await asyncio.gather(*(sup.start(s) for s in specs))
    assert len({i.port for i in infos}) == 20
    assert ports.in_use == frozenset(i.port for i in infos)
    for info in infos:
        assert (await get(info.address)).json()["pid"] == info.pid
    await sup.stop_all()
    assert not any(alive(i.pid) for i in infos)


async def test_stop_all_leaves_no_process(
    ports: PortAllocator, scripts: dict[str, Path], tmp_path: Path
) -> None:
    sup = Supervisor(ports, tmp_path / "logs", stop_grace=0.5)
    pidfile = tmp_path / "grandchild.pid"
    infos = await asyncio.gather(
        sup.start(backend_spec(scripts, key=("a", 0))),
        sup.start(backend_spec(scripts, "--ignore-term", key=("b", 0))),
        sup.start(backend_spec(scripts, "--grandchild", str(pidfile), key=("c", 0))),
    )
    pids = [i.pid for i in infos] + [await read_pid(pidfile)]
    await sup.stop_all()
    assert not any(alive(p) for p in pids)
    assert sup.running() == []
    assert ports.in_use == frozenset()


async def test_backend_dies_with_a_killed_parent(scripts: dict[str, Path], tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
    parent = await asyncio.create_subprocess_exec(
        sys.executable,
        str(scripts["parent"]),
        str(tmp_path / "logs"),
        str(scripts["backend"]),
        stdout=asyncio.subprocess.PIPE,
        env=env,
    )
    assert parent.stdout is not None
    try:
        line = await asyncio.wait_for(parent.stdout.readline(), 30)
        backend_pid = int(line)
        assert alive(backend_pid)
        assert psutil.Process(backend_pid).ppid() == parent.pid
    finally:
        parent.kill()
        await parent.communicate()
    await apoll_until(lambda: not alive(backend_pid), timeout=10)


async def test_bad_health_path_is_a_start_error(
    sup: Supervisor, scripts: dict[str, Path], ports: PortAllocator
) -> None:
    with pytest.raises(ProcessStartError, match="bad health URL"):
        await sup.start(backend_spec(scripts, health_path="health"))
    assert ports.in_use == frozenset()
    assert sup.running() == []

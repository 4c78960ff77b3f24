"""Backend installs with real installers (uv and pip) on tiny local projects; no network."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import uvicorn
from starlette.staticfiles import StaticFiles

from corral.backends.catalog import BackendEntry
from corral.bus.messages import InstallProgress
from corral.errors import InstallError
from corral.worker.installs import BackendInstaller, InstallState
from corral.worker.pipconfig import PipSettings
from corral.worker.venvs import MARKER, version_hash
from fixtures.local_packages import (
    build_started,
    build_wheel,
    builds,
    requirement,
    set_failing,
    write_project,
)
from infra import apoll_until

SRC = Path(__file__).resolve().parents[2] / "src"
TESTS = Path(__file__).resolve().parents[1]


def entry(name: str, *projects: Path, version: str = "1") -> BackendEntry:
    return BackendEntry(
        name=name,
        version=version,
        requirements=tuple(requirement(p) for p in projects),
        command=("{python}", "-c", "pass"),
    )


def leftovers(root: Path, name: str) -> list[str]:
    d = root / name
    return sorted(p.name for p in d.iterdir() if p.name.startswith(".")) if d.exists() else []


class Events:
    def __init__(self) -> None:
        self.items: list[InstallProgress] = []

    async def __call__(self, event: InstallProgress) -> None:
        self.items.append(event)

    def states(self, backend: str) -> list[str]:
        return [e.state for e in self.items if e.backend == backend]


# --- one install --------------------------------------------------------------------------


@pytest.mark.parametrize("use_uv", [True, False], ids=["uv", "pip"])
async def test_install_builds_a_venv_that_works_after_the_swap(
    tmp_path: Path, use_uv: bool
) -> None:
    project = write_project(tmp_path / "src", "relocpkg")
    events = Events()
    inst = BackendInstaller(tmp_path / "root", publish=events, node_id="n1", use_uv=use_uv)
    e = entry("reloc", project)
    assert inst.installed(e) is None

    python = await inst.ensure(e)

    venv = tmp_path / "root" / "reloc" / version_hash(e)
    assert python == str(venv / "bin" / "python")
    assert inst.installed(e) == python
    marker = json.loads((venv / MARKER).read_text())
    assert marker["requirements"] == list(e.requirements)
    assert marker["installer"] == ("uv" if use_uv else "pip")
    # The venv was built elsewhere and renamed: its console scripts must still work...
    out = subprocess.run(
        [str(venv / "bin" / "relocpkg-hello")], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == f"hello from relocpkg {venv}"
    # ...and its interpreter imports what was installed.
    out = subprocess.run(
        [python, "-c", "import relocpkg, sys; print(sys.prefix)"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == str(venv)
    for script in (venv / "bin").iterdir():
        if script.is_file() and not script.is_symlink() and script.stat().st_size < 1 << 20:
            assert b"/.tmp-" not in script.read_bytes(), script
    assert leftovers(tmp_path / "root", "reloc") == []
    states = events.states("reloc")
    assert states[0] == "resolving" and states[-1] == "installed"
    assert "installing" in states
    assert events.items[-1].node_id == "n1" and events.items[-1].percent == 100.0
    st = inst.status()["reloc"]
    assert (st.state, st.attempts, st.python) == (InstallState.INSTALLED, 0, python)

    # Installed: asking again installs nothing, also for a new installer (a restarted worker).
    restarted = BackendInstaller(tmp_path / "root", use_uv=use_uv)
    other = entry("other", project)
    survey = restarted.survey([e, other])
    assert (survey["reloc"].state, survey["reloc"].python) == (InstallState.INSTALLED, python)
    assert survey["other"].state is InstallState.MISSING
    assert await restarted.ensure(e) == python
    assert builds(project) == 1


async def test_entry_without_requirements_runs_in_corral_environment(tmp_path: Path) -> None:
    inst = BackendInstaller(tmp_path / "root")
    e = BackendEntry(name="plain", command=("{python}",))
    assert await inst.ensure(e) == sys.executable
    assert not (tmp_path / "root").exists()


# --- concurrency --------------------------------------------------------------------------


async def test_two_backends_install_concurrently(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    a = write_project(tmp_path / "src", "conca", gate=gate)
    b = write_project(tmp_path / "src", "concb", gate=gate)
    inst = BackendInstaller(tmp_path / "root")
    ta = asyncio.create_task(inst.ensure(entry("a", a)))
    tb = asyncio.create_task(inst.ensure(entry("b", b)))
    # Both builds run at the same time: neither can finish before the gate opens.
    await apoll_until(
        lambda: build_started(a) and build_started(b),
        timeout=120,
        interval=0.05,
        what="both builds to start",
    )
    assert not ta.done() and not tb.done()
    assert inst.status()["a"].state in (InstallState.RESOLVING, InstallState.DOWNLOADING)
    gate.touch()
    pa, pb = await asyncio.gather(ta, tb)
    assert pa != pb
    assert inst.installed(entry("a", a)) == pa and inst.installed(entry("b", b)) == pb


async def test_identical_concurrent_ensures_share_one_install(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    project = write_project(tmp_path / "src", "samepkg", gate=gate)
    events = Events()
    inst = BackendInstaller(tmp_path / "root", publish=events)
    e = entry("same", project)
    tasks = [asyncio.create_task(inst.ensure(e)) for _ in range(3)]
    await apoll_until(
        lambda: build_started(project), timeout=120, interval=0.05, what="the build to start"
    )
    tasks.append(asyncio.create_task(inst.ensure(e, force=True)))  # joins the running one
    gate.touch()
    results = await asyncio.gather(*tasks)
    assert len(set(results)) == 1
    assert builds(project) == 1
    assert events.states("same").count("installed") == 1
    assert events.states("same").count("resolving") == 1


async def test_slow_upgrade_of_one_backend_does_not_delay_another(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    v1 = write_project(tmp_path / "src", "slowv1")
    v2 = write_project(tmp_path / "src", "slowv2", gate=gate)
    quick = write_project(tmp_path / "src", "quickpkg")
    inst = BackendInstaller(tmp_path / "root")
    old = await inst.ensure(entry("slow", v1, version="1"))

    upgrade = asyncio.create_task(inst.upgrade(entry("slow", v2, version="2")))
    await apoll_until(
        lambda: build_started(v2),
        timeout=120,
        interval=0.05,
        what="the slow upgrade's build to start",
    )
    started = time.monotonic()
    python = await inst.ensure(entry("quick", quick))  # another backend: not held up
    took = time.monotonic() - started
    assert inst.installed(entry("quick", quick)) == python
    assert not upgrade.done(), "the slow upgrade finished before its gate opened"
    assert inst.status()["slow"].state is not InstallState.INSTALLED
    # The old version stays usable while its upgrade runs.
    assert Path(old).exists()

    gate.touch()
    new = await upgrade
    assert new != old
    assert not Path(old).exists(), "upgrade keeps only the new version"
    assert took < 60


async def test_upgrade_rebuilds_the_same_version_in_a_fresh_venv(tmp_path: Path) -> None:
    project = write_project(tmp_path / "src", "uppkg")
    inst = BackendInstaller(tmp_path / "root")
    e = entry("up", project)
    python = await inst.ensure(e)
    venv = Path(python).parents[1]
    (venv / "stale-file").write_text("from the old venv")
    assert await inst.upgrade(e) == python
    assert not (venv / "stale-file").exists()
    assert inst.installed(e) == python
    assert leftovers(tmp_path / "root", "up") == []


# --- failures -----------------------------------------------------------------------------


async def test_failure_keeps_installer_output_and_retries_with_backoff(tmp_path: Path) -> None:
    project = write_project(tmp_path / "src", "failpkg", fail="BOOM: the build broke (xyz-42)")
    now = [1000.0]
    events = Events()
    inst = BackendInstaller(
        tmp_path / "root", publish=events, backoff=30, backoff_max=100, clock=lambda: now[0]
    )
    e = entry("fails", project)

    with pytest.raises(InstallError, match=r"xyz-42") as info:
        await inst.ensure(e)
    assert "install of backend fails failed" in info.value.message
    st = inst.status()["fails"]
    assert (st.state, st.attempts) == (InstallState.FAILED, 1)
    assert st.error is not None and "xyz-42" in st.error
    assert st.retry_in == pytest.approx(30)
    assert events.items[-1].state == "failed" and "xyz-42" in (events.items[-1].error or "")
    assert inst.installed(e) is None
    assert not (tmp_path / "root" / "fails" / version_hash(e)).exists()
    assert leftovers(tmp_path / "root", "fails") == []

    # Within the backoff: the same error at once, no new attempt.
    with pytest.raises(InstallError, match=r"xyz-42[\s\S]*next retry in 30s") as again:
        await inst.ensure(e)
    assert again.value.retry_after == pytest.approx(30)
    assert builds(project) == 1

    # After it: a new attempt, which fails again and doubles the backoff.
    now[0] += 31
    with pytest.raises(InstallError, match="xyz-42"):
        await inst.ensure(e)
    assert builds(project) == 2
    st = inst.status()["fails"]
    assert (st.attempts, st.retry_in) == (2, pytest.approx(60))

    # Fixed: the next attempt after the backoff succeeds and resets the count.
    set_failing(project, None)
    now[0] += 61
    python = await inst.ensure(e)
    st = inst.status()["fails"]
    assert (st.state, st.attempts, st.error, st.python) == (InstallState.INSTALLED, 0, None, python)


async def test_cancelled_install_leaves_nothing_and_kills_the_installer(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    project = write_project(tmp_path / "src", "cancelpkg", gate=gate)
    inst = BackendInstaller(tmp_path / "root")
    e = entry("cancelled", project)
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}  # e.g. session servers
    task = asyncio.create_task(inst.ensure(e))
    await apoll_until(
        lambda: build_started(project), timeout=120, interval=0.05, what="the build to start"
    )
    assert _installers_of(me, before)
    await inst.close()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert inst.installed(e) is None
    assert leftovers(tmp_path / "root", "cancelled") == []
    assert inst.status()["cancelled"].state is InstallState.MISSING
    # The installer's process group (uv and the build it ran) is gone.
    await apoll_until(
        lambda: not _installers_of(me, before),
        timeout=120,
        interval=0.05,
        what="the installer processes to exit",
    )
    gate.touch()
    assert await inst.ensure(e) == inst.installed(e)  # no backoff after a cancel


def _installers_of(proc: psutil.Process, exclude: set[int]) -> list[psutil.Process]:
    out = []
    for child in proc.children(recursive=True):
        if child.pid in exclude:
            continue
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                out.append(child)
        except psutil.Error:
            pass
    return out


async def test_killed_worker_leaves_no_ready_install_and_next_ensure_rebuilds(
    tmp_path: Path,
) -> None:
    gate = tmp_path / "gate"
    project = write_project(tmp_path / "src", "killpkg", gate=gate)
    root = tmp_path / "root"
    e = entry("killed", project)
    script = textwrap.dedent(
        f"""
        import asyncio
        from pathlib import Path
        from corral.backends.catalog import BackendEntry
        from corral.worker.installs import BackendInstaller
        entry = BackendEntry.model_validate_json({e.model_dump_json()!r})
        asyncio.run(BackendInstaller(Path({str(root)!r})).ensure(entry))
        """
    )
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{TESTS}"}
    worker = subprocess.Popen([sys.executable, "-c", script], env=env, start_new_session=True)
    try:
        await apoll_until(
            lambda: build_started(project) or worker.poll() is not None,
            timeout=120,
            interval=0.05,
            what="the build to start",
        )
        assert worker.poll() is None, "the worker process exited on its own"
        stragglers = psutil.Process(worker.pid).children(recursive=True)
        os.killpg(worker.pid, signal.SIGKILL)  # the worker dies mid-install
        worker.wait(timeout=30)
        # The kernel kills the installer with the worker (PR_SET_PDEATHSIG); the build it ran
        # was left waiting on the gate: end it here.
        await apoll_until(
            lambda: not any(p.is_running() and p.name() == "uv" for p in _alive(stragglers)),
            timeout=120,
            interval=0.05,
            what="the installer to die with the worker",
        )
        for p in _alive(stragglers):
            p.kill()
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()

    assert BackendInstaller(root).installed(e) is None, "a half-built venv looks ready"
    assert not (root / "killed" / version_hash(e)).exists()
    assert any(n.startswith(".tmp-") for n in leftovers(root, "killed"))

    gate.touch()
    inst = BackendInstaller(root)
    python = await inst.ensure(e)
    assert inst.installed(e) == python
    assert leftovers(root, "killed") == [], "the dead install's temporary dir is removed"


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:
            pass
    return out


# --- uv honours pip's configuration -------------------------------------------------------


async def test_uv_installs_from_pip_configured_find_links(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A distribution only pip's find-links has (no index at all) installs with uv too."""
    wheels = tmp_path / "wheels"
    build_wheel(write_project(tmp_path / "src", "onlylocal"), wheels)
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    inst = BackendInstaller(tmp_path / "root", use_uv=True)
    e = BackendEntry(name="fl", requirements=("onlylocal==1.0",), command=("{python}",))
    python = await inst.ensure(e)
    out = subprocess.run(
        [python, "-c", "import onlylocal; print(onlylocal.__name__)"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "onlylocal"
    log = (tmp_path / "root" / "fl" / "install.log").read_text()
    assert f"--find-links {wheels}" in log and "--no-index" in log


def test_pip_settings_from_pip_config_list() -> None:
    text = "\n".join(
        [
            ":env:.find-links='/opt/wheels'",
            ":env:.cert='/etc/ssl/certs/ca.crt'",
            "global.constraint='/etc/xdg/pip/constraints.txt'",
            "global.extra-index-url='file:///a/simple file:///b/simple'",
            "global.find-links='/ignored/because/env/wins'",
            "global.index-url='https://mirror.example/simple'",
            "install.index-url='https://install.example/simple'",
        ]
    )
    s = PipSettings.parse(text)
    assert s.find_links == ("/opt/wheels",)
    assert s.index_url == "https://install.example/simple"
    assert s.extra_index_urls == ("file:///a/simple", "file:///b/simple")
    assert s.constraints == ("/etc/xdg/pip/constraints.txt",)
    args = s.uv_args()
    assert args[args.index("--find-links") + 1] == "/opt/wheels"
    assert args[args.index("--constraint") + 1] == "/etc/xdg/pip/constraints.txt"
    assert args[-2:] == ["--index-strategy", "unsafe-best-match"]
    assert s.uv_env() == {"SSL_CERT_FILE": "/etc/ssl/certs/ca.crt"}
    assert PipSettings.from_env({"PIP_FIND_LINKS": "/w1 /w2", "HOME": "/"}).find_links == (
        "/w1",
        "/w2",
    )


async def test_uv_installs_from_its_cache_first_and_online_only_when_needed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An HTTP package index (the "network"): needed for the first install only."""
    wheel = build_wheel(write_project(tmp_path / "src", "cachedpkg"), tmp_path / "web" / "files")
    page = tmp_path / "web" / "simple" / "cachedpkg" / "index.html"
    page.parent.mkdir(parents=True)
    page.write_text(
        f'<html><body><a href="../../files/{wheel.name}">{wheel.name}</a></body></html>'
    )
    hits: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            hits.append(scope["path"])
        await StaticFiles(directory=tmp_path / "web", html=True)(scope, receive, send)

    monkeypatch.setenv("UV_CACHE_DIR", str(tmp_path / "uv-cache"))
    async with serving(app) as url:
        monkeypatch.setenv("PIP_INDEX_URL", f"{url}/simple")
        e = BackendEntry(name="cached", requirements=("cachedpkg==1.0",), command=("{python}",))

        first = BackendInstaller(tmp_path / "root1", use_uv=True)
        python = await first.ensure(e)
        log = (tmp_path / "root1" / "cached" / "install.log").read_text()
        assert "--offline" in log and "installing online" in log
        assert any(h.endswith(".whl") for h in hits)

        hits.clear()
        second = BackendInstaller(tmp_path / "root2", use_uv=True)
        assert await second.ensure(e) != python
        log = (tmp_path / "root2" / "cached" / "install.log").read_text()
        assert "installing online" not in log
        assert hits == [], "a cached install went to the network"

        # An upgrade may pick up what is new: uv decides, with the network allowed.
        await second.upgrade(e)
        log = (tmp_path / "root2" / "cached" / "install.log").read_text()
        assert "--offline" not in log


@contextlib.asynccontextmanager
async def serving(app: Any) -> AsyncIterator[str]:
    """Serve an ASGI app with uvicorn on a free local port (in this event loop)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="critical", lifespan="off"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    await apoll_until(
        lambda: server.started, timeout=10, interval=0.05, what="the test server to start"
    )
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await task
        sock.close()

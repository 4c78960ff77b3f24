"""Processes the bench starts: spawn with a log, pin to cores, wait until ready, stop them all.

Every child runs in its own session and is registered here; `stop_all()` (called from a
`finally`, on SIGINT/SIGTERM and at exit) sends SIGTERM to each process tree, then SIGKILL
to whatever is left after a grace period. Children also get PR_SET_PDEATHSIG, so a bench
killed with SIGKILL does not leave servers behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import httpx
import psutil

_LIVE: list[Proc] = []


def _pdeathsig() -> Callable[[], None] | None:
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    parent = os.getpid()

    def pre() -> None:
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return pre


class Proc:
    """One child process (and its descendants)."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log: Path,
        *,
        env: dict[str, str] | None = None,
        cpus: Sequence[int] | None = None,
        capture_stdout: bool = False,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        self._logf = open(log, "ab")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            self.argv,
            env=env,
            stdout=subprocess.PIPE if capture_stdout else self._logf,
            stderr=self._logf,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_pdeathsig(),
        )
        _LIVE.append(self)
        if cpus is not None:
            pin(self.pid, cpus)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tree(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.pid)
            return [root, *root.children(recursive=True)]
        except psutil.Error:
            return []

    def read_line(self, pattern: str, timeout: float) -> re.Match[str]:
        """Read stdout lines until one matches `pattern` (stdout must be captured)."""
        assert self.popen.stdout is not None
        deadline = time.monotonic() + timeout
        os.set_blocking(self.popen.stdout.fileno(), False)
        buf = b""
        while time.monotonic() < deadline:
            chunk = self.popen.stdout.read()
            if chunk:
                buf += chunk
                self._logf.write(chunk)
                m = re.search(pattern, buf.decode(errors="replace"))
                if m:
                    return m
            elif not self.alive():
                break
            time.sleep(0.005)
        raise RuntimeError(
            f"{self.name}: no line matching {pattern!r}; log {self.log}:\n" + self.tail()
        )

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, grace: float = 10.0) -> None:
        tree = self.tree()
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        for p in tree:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(tree, timeout=5)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)
        if self.popen.stdout is not None:
            self.popen.stdout.close()
        self._logf.close()
        if self in _LIVE:
            _LIVE.remove(self)

    def kill(self) -> None:
        """SIGKILL this process only (what a crash looks like)."""
        with contextlib.suppress(ProcessLookupError):
            self.popen.kill()
        self.popen.wait(10)


def stop_all() -> None:
    for p in reversed(list(_LIVE)):
        with contextlib.suppress(Exception):
            p.stop(grace=8)


def pin(pid: int, cpus: Sequence[int] | None, *, tree: bool = True) -> None:
    """Set the CPU affinity of `pid` (and its descendants)."""
    if cpus is None:
        return
    try:
        root = psutil.Process(pid)
        procs = [root, *(root.children(recursive=True) if tree else [])]
    except psutil.Error:
        return
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.cpu_affinity(list(cpus))


def wait_http(url: str, timeout: float, proc: Proc | None = None, ok: int = 200) -> None:
    """Poll GET `url` until it answers `ok`."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited while starting:\n{proc.tail()}")
        try:
            r = httpx.get(url, timeout=2)
            if r.status_code == ok:
                return
            last = r.status_code
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.1)
    tail = proc.tail() if proc is not None else ""
    raise RuntimeError(f"{url} not ready after {timeout}s ({last!r})\n{tail}")


class CpuMeter:
    """CPU seconds (user + system) used by a set of process trees between start and stop."""

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = list(pids)
        self._t0 = 0.0
        self._c0 = 0.0

    def _procs(self) -> list[psutil.Process]:
        out: list[psutil.Process] = []
        for pid in self.pids:
            try:
                root = psutil.Process(pid)
                out += [root, *root.children(recursive=True)]
            except psutil.Error:
                pass
        return out

    def _cpu(self) -> float:
        total = 0.0
        for p in self._procs():
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                total += t.user + t.system
        return total

    def start(self) -> None:
        self._c0 = self._cpu()
        self._t0 = time.perf_counter()

    def stop(self) -> float:
        """Cores used on average (1.0 = one core busy all the time)."""
        dt = time.perf_counter() - self._t0
        return (self._cpu() - self._c0) / dt if dt > 0 else 0.0


class Background:
    """CPU used on the machine by processes the bench did not start (other people's work).

    System-wide busy time minus the bench's own process trees, in cores; a noisy run shows.
    """

    def __init__(self, extra_pids: Sequence[int] = ()) -> None:
        self.extra = list(extra_pids)
        self._busy0 = 0.0
        self._ours = CpuMeter([])

    @staticmethod
    def _busy() -> float:
        t = psutil.cpu_times()
        return sum(t) - t.idle - getattr(t, "iowait", 0.0)

    def start(self) -> None:
        self._ours = CpuMeter([os.getpid(), *self.extra, *(p.pid for p in _LIVE)])
        self._ours.start()
        self._busy0 = self._busy()

    def stop(self) -> float:
        dt = time.perf_counter() - self._ours._t0
        ours = self._ours.stop()
        return max(0.0, (self._busy() - self._busy0) / dt - ours) if dt > 0 else 0.0

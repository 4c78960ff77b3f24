"""Extra frontend processes on one port (`--processes N`): spawned, supervised, stopped.

The parent serves as one frontend itself and runs N-1 children. Each child is a full
frontend with its own id (bus connection, in-flight reports, cold path), so balancing and
concurrency limits hold across them as across frontends on different machines; reconciler
leadership stays one per cluster (an advisory lock). Every process binds the port with
SO_REUSEPORT and the kernel spreads new connections over them.

A child gets its settings as JSON on stdin (secrets never appear in argv or the
environment), answers "ready" on stdout once it listens, dies with its parent
(PR_SET_PDEATHSIG), and is restarted with a backoff if it exits on its own.
`python -m corral.frontends` is the child's entry point.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import orjson
from pydantic import SecretStr

from corral.config import FrontendSettings
from corral.logs import current_format, setup_logging
from corral.proc import die_with_parent

log = logging.getLogger(__name__)

READY_TIMEOUT = 120.0  # seconds a child may take to start listening
_BACKOFF = (1.0, 2.0, 5.0, 10.0, 30.0)


def settings_payload(settings: FrontendSettings, log_level: int) -> bytes:
    """The settings (secrets revealed: this goes through a pipe only) and the log level."""
    data: dict[str, Any] = {}
    for name, value in settings.model_dump().items():
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        elif isinstance(value, list):
            value = [v.get_secret_value() if isinstance(v, SecretStr) else v for v in value]
        elif isinstance(value, Path):
            value = str(value)
        data[name] = value
    return orjson.dumps({"settings": data, "log_level": log_level, "log_format": current_format()})


class _Child:
    """One child process slot: its current process and how often it was restarted."""

    def __init__(self, index: int, settings: FrontendSettings) -> None:
        self.index = index
        self.settings = settings
        self.proc: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self.task: asyncio.Task[None] | None = None  # its supervisor
        self.output: asyncio.Task[None] | None = None  # copies its stdout to ours


class FrontendGroup:
    """`children` frontend processes listening on `port` beside this process's frontend."""

    def __init__(self, settings: FrontendSettings, *, port: int, children: int) -> None:
        self.settings = settings
        self.port = port
        self.children = children
        self._slots: list[_Child] = []
        self._stopping = False

    def stopping(self) -> bool:
        return self._stopping

    @property
    def pids(self) -> list[int]:
        return [c.proc.pid for c in self._slots if c.proc is not None]

    async def start(self) -> None:
        """Spawn every child and wait until each listens (RuntimeError if one cannot)."""
        base = self.settings.frontend_id
        for i in range(1, self.children + 1):
            child_settings = self.settings.model_copy(
                update={"port": self.port, "frontend_id": f"{base}-{i}"}
            )
            self._slots.append(_Child(i, child_settings))
        await asyncio.gather(*(self._spawn(slot) for slot in self._slots))
        for slot in self._slots:
            slot.task = asyncio.create_task(self._supervise(slot), name=f"frontend-{slot.index}")

    async def _spawn(self, slot: _Child) -> None:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "corral.frontends",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            preexec_fn=die_with_parent(signal.SIGTERM),
        )
        slot.proc = proc
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(settings_payload(slot.settings, logging.getLogger().getEffectiveLevel()))
        await proc.stdin.drain()
        proc.stdin.close()
        try:
            async with asyncio.timeout(READY_TIMEOUT):
                line = await proc.stdout.readline()
        except TimeoutError:
            line = b""
        if not line.startswith(b"ready"):
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise RuntimeError(
                f"frontend process {slot.index} did not start (exit code {proc.returncode})"
            )
        slot.output = asyncio.create_task(_forward(proc.stdout), name=f"frontend-{slot.index}-out")
        log.info(
            "frontend process %d (%s) ready, pid %d",
            slot.index,
            slot.settings.frontend_id,
            proc.pid,
        )

    async def _supervise(self, slot: _Child) -> None:
        """Restart a child that exits on its own (with a growing pause)."""
        while not self.stopping():
            assert slot.proc is not None
            code = await slot.proc.wait()
            if self.stopping():
                return
            pause = _BACKOFF[min(slot.restarts, len(_BACKOFF) - 1)]
            slot.restarts += 1
            log.error(
                "frontend process %d exited with code %s; restarting in %gs",
                slot.index,
                code,
                pause,
            )
            await asyncio.sleep(pause)
            if self.stopping():
                return
            try:
                await self._spawn(slot)
            except (RuntimeError, OSError) as exc:
                log.error("restarting frontend process %d failed: %s", slot.index, exc)

    async def stop(self) -> None:
        """SIGTERM every child, wait for them (SIGKILL after the shutdown timeout)."""
        self._stopping = True
        for slot in self._slots:
            if slot.task is not None:
                slot.task.cancel()
        procs = [s.proc for s in self._slots if s.proc is not None and s.proc.returncode is None]
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        grace = self.settings.shutdown_timeout + 10.0
        try:
            async with asyncio.timeout(grace):
                await asyncio.gather(*(p.wait() for p in procs))
        except TimeoutError:
            for proc in procs:
                if proc.returncode is None:
                    log.error("frontend process %d did not stop; killing it", proc.pid)
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
            await asyncio.gather(*(p.wait() for p in procs))
        tasks = [t for s in self._slots for t in (s.task, s.output) if t is not None]
        await asyncio.gather(*tasks, return_exceptions=True)


async def _forward(stream: asyncio.StreamReader) -> None:
    """Copy a child's stdout to ours (after its ready line), so nothing blocks on a full pipe."""
    while line := await stream.readline():
        sys.stdout.buffer.write(line)
        sys.stdout.flush()


# --- the child -----------------------------------------------------------------------------


async def _child(settings: FrontendSettings) -> None:
    from corral.runner import FrontendProcess, install_stop_handler, settle_heap

    stop = asyncio.Event()
    install_stop_handler(stop)
    frontend = FrontendProcess(settings)
    await frontend.start()
    try:
        settle_heap()
        sys.stdout.write(f"ready {os.getpid()} {settings.frontend_id}\n")
        sys.stdout.flush()
        await stop.wait()
    finally:
        await frontend.stop()


def main() -> None:
    from corral.runner import run_async

    payload = orjson.loads(sys.stdin.buffer.read())
    setup_logging(payload["log_level"], payload.get("log_format", "text"))
    settings = FrontendSettings(**payload["settings"])
    run_async(lambda: _child(settings))


if __name__ == "__main__":
    main()

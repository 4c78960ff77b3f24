"""Where a worker's backends listen and how other machines reach them (bind and advertise hosts)."""

from __future__ import annotations

import socket
from urllib.parse import urlparse

from corral.config import WorkerSettings


def advertise_host(settings: WorkerSettings) -> str:
    """The host other machines reach this node's backends at: the setting, else a guess."""
    return settings.advertise_host or guess_advertise_host(settings.join)


def bind_host(settings: WorkerSettings) -> str:
    """The address backends bind to: the setting, else loopback when only we reach them."""
    if settings.bind_host:
        return settings.bind_host
    return "127.0.0.1" if is_loopback(advertise_host(settings)) else "0.0.0.0"


def guess_advertise_host(join_url: str) -> str:
    """The local address other machines reach us at: the one that routes to the frontend."""
    host = urlparse(join_url).hostname or "127.0.0.1"
    if is_loopback(host):
        return "127.0.0.1"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, 9))
            addr: str = s.getsockname()[0]
            return addr
    except OSError:
        return socket.gethostbyname(socket.gethostname())


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")

"""NATS credentials per role: keys, server configuration, worker credentials, client options.

Mechanism: nats-server auth callout (docs/architecture.md, Security). Three nkeys, kept as
seed files (mode 0600) in one directory that every frontend of a cluster shares:

* `frontend.nk`: the user nkey every frontend connects with; account CORRAL, no subject
  restriction; listed in `auth_users`, so it bypasses the callout;
* `system.nk`: a user nkey in the system account SYS, used only to find and kick the
  connections of revoked workers (`$SYS.REQ.SERVER.*.CONNZ|KICK`); also in `auth_users`;
* `issuer.nk`: the account nkey that signs callout responses; the server trusts responses
  signed by it (`auth_callout.issuer`).

Every other connection is a worker: the server hands its user/password to the callout
(`$SYS.REQ.USER.AUTH`), a frontend checks the password's digest against PostgreSQL and answers
with a user JWT allowing only that node's subjects (`worker_permissions`). Only public keys
appear in the server configuration; the files here are the secrets.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corral.bus.natsjwt import (
    ACCOUNT,
    USER,
    AuthRequest,
    NatsAuthError,
    NKey,
    Permissions,
    authorization_response,
    encode,
    user_claims,
)
from corral.bus.subjects import Subjects

log = logging.getLogger(__name__)

CORRAL_ACCOUNT = "CORRAL"
"""The config account frontends and workers share (all of Corral's subjects live in it)."""

SYSTEM_ACCOUNT = "SYS"

AUTH_TIMEOUT = 3.0
"""Seconds the server waits for a callout answer before refusing the connection."""

_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_WORKER_SEP = ".node."


# --- keys ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NatsAuthKeys:
    """The three nkeys of a cluster's NATS auth (module docstring)."""

    frontend: NKey
    system: NKey
    issuer: NKey

    @classmethod
    def generate(cls) -> NatsAuthKeys:
        return cls(
            frontend=NKey.generate(USER), system=NKey.generate(USER), issuer=NKey.generate(ACCOUNT)
        )

    def check(self) -> None:
        """Raise NatsAuthError unless each key has its role."""
        for name, key, role in (
            ("frontend", self.frontend, USER),
            ("system", self.system, USER),
            ("issuer", self.issuer, ACCOUNT),
        ):
            if key.role != role:
                raise NatsAuthError(f"the {name} nkey has the wrong role (prefix {key.public[0]})")

    def frontend_credentials(self, ca_file: Path | None = None) -> NatsCredentials:
        return NatsCredentials(nkey_seed=self.frontend.seed, ca_file=ca_file)

    def system_credentials(self, ca_file: Path | None = None) -> NatsCredentials:
        return NatsCredentials(nkey_seed=self.system.seed, ca_file=ca_file)


class NatsAuthDir:
    """The directory holding a cluster's NATS auth seeds (0700, files 0600) and server config."""

    FILES = {"frontend": "frontend.nk", "system": "system.nk", "issuer": "issuer.nk"}
    SERVER_CONFIG = "nats-server.conf"

    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def server_config_path(self) -> Path:
        return self.path / self.SERVER_CONFIG

    def exists(self) -> bool:
        return any((self.path / name).exists() for name in self.FILES.values())

    def load(self) -> NatsAuthKeys:
        """Read the three seeds; NatsAuthError naming the file when one is missing or malformed."""
        seeds: dict[str, NKey] = {}
        for role, name in self.FILES.items():
            file = self.path / name
            try:
                text = file.read_text()
                mode = file.stat().st_mode
            except OSError as exc:
                raise NatsAuthError(f"cannot read NATS auth key {file}: {exc.strerror}") from None
            if mode & 0o077:
                log.warning("NATS auth key %s is readable by others (mode %o)", file, mode & 0o777)
            try:
                seeds[role] = NKey.parse(text)
            except NatsAuthError as exc:
                raise NatsAuthError(f"{file}: {exc.message}") from None
        keys = NatsAuthKeys(**seeds)
        keys.check()
        return keys

    def load_or_create(self) -> NatsAuthKeys:
        """The stored keys, or new ones written now when the directory holds none."""
        if self.exists():
            return self.load()
        keys = NatsAuthKeys.generate()
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        for role, name in self.FILES.items():
            key: NKey = getattr(keys, role)
            _write_private(self.path / name, key.seed + "\n")
        log.info("created NATS auth keys in %s", self.path)
        return keys

    def write_server_config(self, text: str) -> Path:
        """Write a nats-server configuration beside the keys (0600) and return its path."""
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        _write_private(self.server_config_path, text)
        return self.server_config_path


def _write_private(path: Path, text: str) -> None:
    """Write `text` to `path` with mode 0600, atomically (a temporary file renamed)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# --- server configuration --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServerTls:
    """The certificate and key a nats-server presents to clients."""

    cert_file: Path
    key_file: Path


def _q(value: str | Path) -> str:
    return json.dumps(str(value))


def auth_config(
    keys: NatsAuthKeys, *, auth_timeout: float = AUTH_TIMEOUT, jetstream: bool = False
) -> str:
    """The nats-server configuration that turns Corral's authentication on.

    An operator adds exactly this to their own server's configuration (it holds only public
    keys); `server_config` adds it to the embedded server's.
    """
    js = "    jetstream: enabled\n" if jetstream else ""
    return (
        "accounts {\n"
        f"  {CORRAL_ACCOUNT} {{\n"
        f"{js}"
        f"    users: [ {{ nkey: {_q(keys.frontend.public)} }} ]\n"
        "  }\n"
        f"  {SYSTEM_ACCOUNT} {{\n"
        f"    users: [ {{ nkey: {_q(keys.system.public)} }} ]\n"
        "  }\n"
        "}\n"
        f"system_account: {SYSTEM_ACCOUNT}\n"
        "authorization {\n"
        f"  timeout: {auth_timeout:g}\n"
        "  auth_callout {\n"
        f"    issuer: {_q(keys.issuer.public)}\n"
        f"    account: {CORRAL_ACCOUNT}\n"
        f"    auth_users: [ {_q(keys.frontend.public)}, {_q(keys.system.public)} ]\n"
        "  }\n"
        "}\n"
    )


def server_config(
    keys: NatsAuthKeys,
    *,
    host: str,
    port: int,
    server_name: str | None = None,
    store_dir: Path | None = None,
    tls: ServerTls | None = None,
    auth_timeout: float = AUTH_TIMEOUT,
) -> str:
    """A complete configuration for an embedded nats-server: listen, JetStream, TLS, auth."""
    lines = [f"host: {_q(host)}", f"port: {port}"]
    if server_name:
        lines.append(f"server_name: {_q(server_name)}")
    if store_dir is not None:
        lines.append(f"jetstream {{ store_dir: {_q(store_dir)} }}")
    if tls is not None:
        lines.append(f"tls {{ cert_file: {_q(tls.cert_file)}, key_file: {_q(tls.key_file)} }}")
    body = "\n".join(lines) + "\n"
    return body + auth_config(keys, auth_timeout=auth_timeout, jetstream=store_dir is not None)


# --- worker credentials ----------------------------------------------------------------------


def _check_token(what: str, value: str) -> None:
    if not _TOKEN.match(value):
        raise ValueError(f"{what} {value!r} is not one NATS subject token of [A-Za-z0-9_-]")


def worker_user(prefix: str, node_id: str) -> str:
    """The NATS user name a worker presents: `<prefix>.node.<node id>`."""
    _check_token("node id", node_id)
    return f"{prefix}{_WORKER_SEP}{node_id}"


def parse_worker_user(user: str) -> tuple[str, str] | None:
    """(prefix, node id) of a worker user name, None when `user` is not one."""
    prefix, sep, node_id = user.rpartition(_WORKER_SEP)
    if not sep or not prefix or not _TOKEN.match(node_id):
        return None
    return prefix, node_id


def worker_inbox_prefix(prefix: str, node_id: str) -> str:
    """The inbox prefix a worker's requests use; only it may subscribe below it."""
    _check_token("node id", node_id)
    return f"_INBOX.{prefix}.node.{node_id}"


def worker_permissions(subjects: Subjects, node_id: str) -> Permissions:
    """What a worker's NATS identity allows: its own node subjects and reply inboxes in,
    its own progress out, plus one reply to each request it receives."""
    _check_token("node id", node_id)
    return Permissions(
        publish=[subjects.node_progress(node_id)],
        subscribe=[
            subjects.node_all(node_id),
            worker_inbox_prefix(subjects.prefix, node_id) + ".>",
        ],
        responses=1,
    )


def session_name(prefix: str, node_id: str, credential_digest: str) -> str:
    """The authorized user name of a worker connection: its user plus a tag of the credential
    it used, so revoking one credential kicks only the connections made with it."""
    return f"{worker_user(prefix, node_id)}.{credential_digest[:16]}"


def new_worker_secret() -> str:
    """A fresh worker NATS password (store only its digest)."""
    return secrets.token_urlsafe(32)


def worker_credentials(
    prefix: str, node_id: str, secret: str, *, ca_file: Path | None = None
) -> NatsCredentials:
    """The client options of a worker holding `secret` for `node_id`."""
    return NatsCredentials(
        user=worker_user(prefix, node_id),
        password=secret,
        inbox_prefix=worker_inbox_prefix(prefix, node_id),
        ca_file=ca_file,
    )


# --- client side -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NatsCredentials:
    """What one process presents to NATS: an nkey seed or a user/password, and its TLS trust.

    `ca_file` verifies a `tls://` server against that CA instead of the system's.
    """

    user: str | None = None
    password: str | None = field(default=None, repr=False)
    nkey_seed: str | None = field(default=None, repr=False)
    ca_file: Path | None = None
    inbox_prefix: str | None = None

    def connect_options(self, url: str) -> dict[str, Any]:
        """Keyword arguments for `nats.connect` (servers excluded)."""
        opts: dict[str, Any] = {}
        if self.nkey_seed is not None:
            opts["nkeys_seed_str"] = self.nkey_seed
        elif self.user is not None:
            opts["user"] = self.user
            opts["password"] = self.password or ""
        if self.inbox_prefix:
            opts["inbox_prefix"] = self.inbox_prefix
        if self.ca_file is not None or url.startswith("tls://"):
            opts["tls"] = client_tls_context(self.ca_file)
        return opts


def client_tls_context(ca_file: Path | None) -> ssl.SSLContext:
    """A client TLS context verifying the server (hostname included) against `ca_file`,
    or against the system's trust store when None."""
    try:
        return ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    except (OSError, ssl.SSLError) as exc:
        raise NatsAuthError(f"cannot load CA file {ca_file}: {exc}") from None


# --- callout answers (pure: a signed JWT from a request and a verdict) -----------------------


def grant(
    request: AuthRequest,
    *,
    prefix: str,
    node_id: str,
    credential_digest: str,
    issuer: NKey,
    account: str = CORRAL_ACCOUNT,
) -> str:
    """The signed callout answer admitting `request`'s client as worker `node_id`."""
    user_jwt = encode(
        user_claims(
            request.user_nkey,
            account=account,
            name=session_name(prefix, node_id, credential_digest),
            permissions=worker_permissions(Subjects(prefix), node_id),
        ),
        issuer,
    )
    answer = authorization_response(
        user_nkey=request.user_nkey, server_id=request.server_id, user_jwt=user_jwt
    )
    return encode(answer, issuer)


def refuse(request: AuthRequest, reason: str, *, issuer: NKey) -> str:
    """The signed callout answer refusing `request`'s client with `reason` (server log only)."""
    answer = authorization_response(
        user_nkey=request.user_nkey, server_id=request.server_id, error=reason
    )
    return encode(answer, issuer)

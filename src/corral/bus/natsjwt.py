"""NATS nkeys and JWTs: key generation, signing, and the claims auth callout exchanges.

Pure functions (no I/O). A NATS JWT is `base64url(header).base64url(claims).base64url(sig)`
with header `{"typ":"JWT","alg":"ed25519-nkey"}`; the signature is the issuer nkey's ed25519
signature over the first two parts; `jti` is a base32 SHA-512/256 digest of the claims (a
unique id, not recomputed by servers). This is the v2 format nats-server decodes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import nacl.exceptions
import nacl.signing
import nkeys  # type: ignore[import-untyped]

from corral.errors import CorralError

JWT_HEADER = {"typ": "JWT", "alg": "ed25519-nkey"}
JWT_VERSION = 2

# nkey roles (the first letter of a public key)
ACCOUNT = nkeys.PREFIX_BYTE_ACCOUNT  # 'A'
USER = nkeys.PREFIX_BYTE_USER  # 'U'
SERVER = nkeys.PREFIX_BYTE_SERVER  # 'N'
_ROLE_LETTER = {ACCOUNT: "A", USER: "U", SERVER: "N"}


class NatsAuthError(CorralError):
    """A NATS key, JWT or auth file is malformed or fails verification; the message says why."""

    code = "nats_auth_error"


# --- nkeys -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NKey:
    """An nkey pair held by its seed (`S…`); `public` is the key others may know."""

    seed: str = field(repr=False)

    @classmethod
    def generate(cls, role: int) -> NKey:
        """A fresh random key for `role` (ACCOUNT, USER or SERVER)."""
        return cls(nkeys.encode_seed(os.urandom(32), role).decode())

    @classmethod
    def parse(cls, seed: str) -> NKey:
        """Check `seed` and wrap it; NatsAuthError when it is not an nkey seed."""
        seed = seed.strip()
        try:
            nkeys.from_seed(bytearray(seed.encode()))
        except (nkeys.NkeysError, ValueError, binascii.Error) as exc:
            raise NatsAuthError(f"not an nkey seed: {type(exc).__name__}") from None
        return cls(seed)

    @property
    def role(self) -> int:
        prefix, _ = nkeys.decode_seed(bytearray(self.seed.encode()))
        return int(prefix)

    @property
    def public(self) -> str:
        return str(self._pair().public_key.decode())

    def sign(self, data: bytes) -> bytes:
        return bytes(self._pair().sign(data))

    def _pair(self) -> Any:
        return nkeys.from_seed(bytearray(self.seed.encode()))


def _decode_public(public: str) -> tuple[int, bytes]:
    """The role byte and raw ed25519 key of a public nkey; NatsAuthError when malformed."""
    try:
        raw = base64.b32decode(public + "=" * (-len(public) % 8))
    except (binascii.Error, ValueError):
        raise NatsAuthError("public nkey is not base32") from None
    if len(raw) != 35:
        raise NatsAuthError("public nkey has the wrong length")
    body, crc = raw[:-2], raw[-2:]
    if nkeys.crc16(bytearray(body)).to_bytes(2, "little") != crc:
        raise NatsAuthError("public nkey checksum mismatch")
    return body[0], body[1:]


def is_public_key(public: str, role: int) -> bool:
    """True when `public` is a well-formed public nkey of `role`."""
    try:
        prefix, _ = _decode_public(public)
    except NatsAuthError:
        return False
    return prefix == role


def verify_signature(public: str, data: bytes, signature: bytes) -> bool:
    """True when `signature` is `public`'s ed25519 signature of `data`."""
    try:
        _, raw = _decode_public(public)
        nacl.signing.VerifyKey(raw).verify(data, signature)
    except (NatsAuthError, nacl.exceptions.BadSignatureError, ValueError):
        return False
    return True


# --- JWT encoding ----------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def encode(claims: dict[str, Any], signer: NKey, *, now: float | None = None) -> str:
    """Sign `claims` with `signer`: sets `iss`, `iat` and `jti`, returns the compact JWT."""
    body = dict(claims)
    body["iss"] = signer.public
    body["iat"] = int(now if now is not None else time.time())
    body.pop("jti", None)
    digest = hashlib.new("sha512_256", _json(body)).digest()
    body["jti"] = base64.b32encode(digest).rstrip(b"=").decode()
    signed = f"{_b64(_json(JWT_HEADER))}.{_b64(_json(body))}"
    return f"{signed}.{_b64(signer.sign(signed.encode()))}"


def decode(token: str, *, issuer_role: int | None = None) -> dict[str, Any]:
    """The claims of `token` once its signature verifies against its own `iss` key.

    This proves integrity and who signed it, not that the signer is trusted: callers check
    `iss` (or rely on who could send the token). `issuer_role` also requires that `iss` is a
    public key of that role. Raises NatsAuthError.
    """
    parts = token.strip().split(".")
    if len(parts) != 3:
        raise NatsAuthError("a JWT has three dot-separated parts")
    try:
        header = json.loads(_unb64(parts[0]))
        claims = json.loads(_unb64(parts[1]))
        signature = _unb64(parts[2])
    except (ValueError, binascii.Error):
        raise NatsAuthError("JWT parts are not base64url JSON") from None
    if not isinstance(header, dict) or header.get("alg") != JWT_HEADER["alg"]:
        raise NatsAuthError("JWT algorithm is not ed25519-nkey")
    if not isinstance(claims, dict) or not isinstance(claims.get("iss"), str):
        raise NatsAuthError("JWT claims have no issuer")
    issuer: str = claims["iss"]
    if issuer_role is not None and not is_public_key(issuer, issuer_role):
        raise NatsAuthError(f"JWT issuer is not a public key of role {_ROLE_LETTER[issuer_role]}")
    if not verify_signature(issuer, f"{parts[0]}.{parts[1]}".encode(), signature):
        raise NatsAuthError("JWT signature does not verify")
    return claims


# --- claims ----------------------------------------------------------------------------------


RESPONSE_TTL = 24 * 3600.0
"""Seconds a worker may take to answer a request (starts and installs can take long)."""


@dataclass(frozen=True, slots=True)
class Permissions:
    """Subjects a NATS user may publish and subscribe to (allow lists; all else denied).

    `responses` lets the user publish that many replies to the reply subject of each request
    it receives (NATS `allow_responses`), so a worker answers requests without being allowed
    to publish on inboxes in general; for `response_ttl` seconds after the request. Its zero
    does not mean "forever": nats-server then allows two minutes, and a replica start or a
    backend install answers much later than that. `None` for an unrestricted direction.
    """

    publish: Sequence[str] | None
    subscribe: Sequence[str] | None
    responses: int = 0
    response_ttl: float = RESPONSE_TTL

    def claims(self) -> dict[str, Any]:
        """The `pub`/`sub`/`resp` fields of a user JWT's `nats` object."""
        out: dict[str, Any] = {}
        if self.publish is not None:
            out["pub"] = {"allow": list(self.publish)} if self.publish else {"deny": [">"]}
        if self.subscribe is not None:
            out["sub"] = {"allow": list(self.subscribe)} if self.subscribe else {"deny": [">"]}
        if self.responses:
            out["resp"] = {"max": self.responses, "ttl": int(self.response_ttl * 1e9)}  # ns
        return out


def user_claims(
    user_nkey: str, *, account: str, name: str, permissions: Permissions, expires: int = 0
) -> dict[str, Any]:
    """Claims of a user JWT for `user_nkey`, placed in config account `account`.

    `name` becomes the connection's authorized user name (monitoring, kicking).
    """
    nats: dict[str, Any] = {
        **permissions.claims(),
        "subs": -1,
        "data": -1,
        "payload": -1,
        "type": "user",
        "version": JWT_VERSION,
    }
    claims: dict[str, Any] = {"aud": account, "name": name, "sub": user_nkey, "nats": nats}
    if expires:
        claims["exp"] = expires
    return claims


def authorization_response(
    *, user_nkey: str, server_id: str, user_jwt: str = "", error: str = ""
) -> dict[str, Any]:
    """Claims answering one auth callout request: a user JWT or an error, never both."""
    if bool(user_jwt) == bool(error):
        raise ValueError("an authorization response carries a user JWT or an error")
    nats: dict[str, Any] = {"type": "authorization_response", "version": JWT_VERSION}
    if user_jwt:
        nats["jwt"] = user_jwt
    else:
        nats["error"] = error
    return {"aud": server_id, "sub": user_nkey, "nats": nats}


@dataclass(frozen=True, slots=True)
class AuthRequest:
    """What a nats-server asks its auth callout about one connecting client."""

    server_id: str
    user_nkey: str
    user: str
    password: str = field(repr=False)
    client_name: str
    client_id: int
    host: str

    @classmethod
    def from_token(cls, token: str) -> AuthRequest:
        """Parse and verify an `authorization_request` JWT signed by a server nkey."""
        claims = decode(token, issuer_role=SERVER)
        nats = claims.get("nats")
        if not isinstance(nats, dict) or nats.get("type") != "authorization_request":
            raise NatsAuthError("not an authorization request")
        server = nats.get("server_id") or {}
        opts = nats.get("connect_opts") or {}
        info = nats.get("client_info") or {}
        user_nkey = nats.get("user_nkey", "")
        server_id = server.get("id", "") if isinstance(server, dict) else ""
        if not is_public_key(user_nkey, USER) or not is_public_key(server_id, SERVER):
            raise NatsAuthError("authorization request lacks the user or server key")
        if not isinstance(opts, dict) or not isinstance(info, dict):
            raise NatsAuthError("authorization request has malformed client fields")
        return cls(
            server_id=server_id,
            user_nkey=user_nkey,
            user=str(opts.get("user", "")),
            password=str(opts.get("pass", "")),
            client_name=str(opts.get("name", "")),
            client_id=int(info.get("id", 0) or 0),
            host=str(info.get("host", "")),
        )

"""Pure parts of NATS auth: nkeys, JWT signing and verification, claims, worker names and
permissions, callout answers, server configuration text, client connect options."""

from __future__ import annotations

import base64
import json
import ssl
from pathlib import Path
from typing import Any

import pytest

from corral.bus import natsjwt
from corral.bus.authservice import AuthCallout
from corral.bus.client import Bus
from corral.bus.natsauth import (
    NatsAuthKeys,
    NatsCredentials,
    ServerTls,
    auth_config,
    grant,
    parse_worker_user,
    refuse,
    server_config,
    session_name,
    worker_credentials,
    worker_inbox_prefix,
    worker_permissions,
    worker_user,
)
from corral.bus.natsjwt import (
    ACCOUNT,
    SERVER,
    USER,
    AuthRequest,
    NatsAuthError,
    NKey,
    Permissions,
    decode,
    encode,
    is_public_key,
)
from corral.bus.subjects import Subjects

# --- nkeys ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("role", "letter"), [(ACCOUNT, "A"), (USER, "U"), (SERVER, "N")])
def test_generated_keys_have_their_role(role: int, letter: str) -> None:
    key = NKey.generate(role)
    assert key.seed.startswith("S" + letter)
    assert key.public.startswith(letter) and len(key.public) == 56
    assert key.role == role
    assert is_public_key(key.public, role)
    assert NKey.parse(key.seed + "\n") == key
    assert key.seed not in repr(key)


@pytest.mark.parametrize("seed", ["", "hello", "SUAAAA", NKey.generate(USER).public])
def test_parse_rejects_what_is_not_a_seed(seed: str) -> None:
    with pytest.raises(NatsAuthError):
        NKey.parse(seed)


def test_is_public_key_checks_role_and_checksum() -> None:
    public = NKey.generate(USER).public
    assert not is_public_key(public, ACCOUNT)
    corrupted = public[:-1] + ("A" if public[-1] != "A" else "B")
    assert not is_public_key(corrupted, USER)
    assert not is_public_key("not a key", USER)


def test_signatures_verify_only_for_the_signed_data() -> None:
    key = NKey.generate(ACCOUNT)
    sig = key.sign(b"data")
    assert natsjwt.verify_signature(key.public, b"data", sig)
    assert not natsjwt.verify_signature(key.public, b"datA", sig)
    assert not natsjwt.verify_signature(NKey.generate(ACCOUNT).public, b"data", sig)


# --- JWTs -------------------------------------------------------------------------------------


def _parts(token: str) -> list[Any]:
    return [
        json.loads(base64.urlsafe_b64decode(p + "=" * (-len(p) % 4))) for p in token.split(".")[:2]
    ]


def test_encode_signs_and_decode_verifies() -> None:
    issuer = NKey.generate(ACCOUNT)
    token = encode({"sub": "x", "nats": {"type": "user"}}, issuer, now=1000)
    header, claims = _parts(token)
    assert header == {"typ": "JWT", "alg": "ed25519-nkey"}
    assert claims["iss"] == issuer.public and claims["iat"] == 1000
    assert len(claims["jti"]) == 52  # base32 of 32 bytes, no padding
    assert decode(token, issuer_role=ACCOUNT) == claims


def test_decode_rejects_tampering_and_wrong_issuer_role() -> None:
    issuer = NKey.generate(ACCOUNT)
    token = encode({"sub": "x"}, issuer)
    head, body, sig = token.split(".")
    forged_body = base64.urlsafe_b64encode(
        json.dumps({**_parts(token)[1], "sub": "y"}).encode()
    ).rstrip(b"=")
    cases = [
        f"{head}.{forged_body.decode()}.{sig}",  # changed claims
        f"{head}.{body}.{base64.urlsafe_b64encode(b'x' * 64).decode().rstrip('=')}",
        f"{head}.{body}",  # two parts
        "not.a.jwt",
    ]
    for bad in cases:
        with pytest.raises(NatsAuthError):
            decode(bad)
    with pytest.raises(NatsAuthError, match="role"):
        decode(token, issuer_role=SERVER)


@pytest.mark.parametrize(
    ("permissions", "expected"),
    [
        (Permissions(publish=None, subscribe=None), {}),
        (
            Permissions(publish=["a.>"], subscribe=["b.>", "c"], responses=1),
            {
                "pub": {"allow": ["a.>"]},
                "sub": {"allow": ["b.>", "c"]},
                "resp": {"max": 1, "ttl": 24 * 3600 * 10**9},
            },
        ),
        (Permissions(publish=[], subscribe=None), {"pub": {"deny": [">"]}}),
    ],
)
def test_permission_claims(permissions: Permissions, expected: dict[str, Any]) -> None:
    assert permissions.claims() == expected


def test_authorization_response_carries_a_jwt_or_an_error() -> None:
    ok = natsjwt.authorization_response(user_nkey="U", server_id="N", user_jwt="j")
    assert ok["nats"] == {"type": "authorization_response", "version": 2, "jwt": "j"}
    no = natsjwt.authorization_response(user_nkey="U", server_id="N", error="e")
    assert no["nats"]["error"] == "e" and "jwt" not in no["nats"]
    with pytest.raises(ValueError):
        natsjwt.authorization_response(user_nkey="U", server_id="N")
    with pytest.raises(ValueError):
        natsjwt.authorization_response(user_nkey="U", server_id="N", user_jwt="j", error="e")


def _request(server: NKey, **connect_opts: str) -> str:
    user = NKey.generate(USER)
    claims = {
        "aud": "nats-authorization-request",
        "sub": "A",
        "nats": {
            "type": "authorization_request",
            "version": 2,
            "server_id": {"id": server.public, "name": "s", "host": "h"},
            "user_nkey": user.public,
            "client_info": {"host": "10.0.0.7", "id": 42},
            "connect_opts": {"protocol": 1, **connect_opts},
        },
    }
    return encode(claims, server)


def test_auth_request_from_a_server_is_parsed() -> None:
    server = NKey.generate(SERVER)
    req = AuthRequest.from_token(_request(server, user="corral.node.n1", **{"pass": "s3cret"}))
    assert req.server_id == server.public
    assert req.user == "corral.node.n1" and req.password == "s3cret"
    assert req.client_id == 42 and req.host == "10.0.0.7"
    assert is_public_key(req.user_nkey, USER)
    assert "s3cret" not in repr(req)


def test_auth_request_signed_by_a_non_server_key_is_rejected() -> None:
    with pytest.raises(NatsAuthError):
        AuthRequest.from_token(_request(NKey.generate(ACCOUNT), user="u"))


# --- workers ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("user", "parsed"),
    [
        ("corral.node.n1", ("corral", "n1")),
        ("a.b.node.abc-DEF_9", ("a.b", "abc-DEF_9")),
        ("x.node.node.n1", ("x.node", "n1")),
        ("corral.node.", None),
        (".node.n1", None),
        ("corral.n1", None),
        ("corral.node.n.1", None),
        ("corral.node.n*", None),
        ("", None),
    ],
)
def test_parse_worker_user(user: str, parsed: tuple[str, str] | None) -> None:
    assert parse_worker_user(user) == parsed


@pytest.mark.parametrize("node_id", ["", "a.b", "a*", "a>", "a b", "x" * 65])
def test_node_ids_that_are_not_one_token_are_refused(node_id: str) -> None:
    with pytest.raises(ValueError):
        worker_user("corral", node_id)
    with pytest.raises(ValueError):
        worker_permissions(Subjects("corral"), node_id)


def test_worker_permissions_cover_only_its_own_node() -> None:
    perms = worker_permissions(Subjects("corral"), "n1")
    assert list(perms.publish or []) == ["corral.progress.n1.>"]
    assert list(perms.subscribe or []) == ["corral.node.n1.>", "_INBOX.corral.node.n1.>"]
    assert perms.responses == 1
    assert worker_inbox_prefix("corral", "n1") == "_INBOX.corral.node.n1"


def test_session_name_tags_the_credential() -> None:
    assert session_name("corral", "n1", "0123456789abcdef" * 4) == "corral.node.n1.0123456789abcdef"
    assert parse_worker_user(worker_user("corral", "n1")) == ("corral", "n1")


def test_grant_issues_a_user_jwt_for_the_requested_user_key() -> None:
    server, issuer = NKey.generate(SERVER), NKey.generate(ACCOUNT)
    req = AuthRequest.from_token(_request(server, user="corral.node.n1", **{"pass": "p"}))
    answer = decode(
        grant(req, prefix="corral", node_id="n1", credential_digest="ab" * 32, issuer=issuer)
    )
    assert answer["iss"] == issuer.public
    assert answer["aud"] == server.public and answer["sub"] == req.user_nkey
    user = decode(answer["nats"]["jwt"], issuer_role=ACCOUNT)
    assert user["iss"] == issuer.public and user["sub"] == req.user_nkey
    assert user["aud"] == "CORRAL" and user["name"] == "corral.node.n1." + "ab" * 8
    assert user["nats"]["pub"] == {"allow": ["corral.progress.n1.>"]}
    assert user["nats"]["sub"] == {"allow": ["corral.node.n1.>", "_INBOX.corral.node.n1.>"]}
    assert user["nats"]["type"] == "user" and "exp" not in user


def test_refuse_carries_the_reason() -> None:
    server, issuer = NKey.generate(SERVER), NKey.generate(ACCOUNT)
    req = AuthRequest.from_token(_request(server, user="corral.node.n1"))
    answer = decode(refuse(req, "invalid credential", issuer=issuer), issuer_role=ACCOUNT)
    assert answer["nats"]["error"] == "invalid credential" and "jwt" not in answer["nats"]


# --- server configuration ---------------------------------------------------------------------


def test_auth_config_names_public_keys_only() -> None:
    keys = NatsAuthKeys.generate()
    text = auth_config(keys)
    for key in (keys.frontend, keys.system, keys.issuer):
        assert key.public in text and key.seed not in text
    assert "system_account: SYS" in text and "account: CORRAL" in text
    assert "jetstream" not in text
    assert "jetstream: enabled" in auth_config(keys, jetstream=True)


def test_server_config_adds_listen_jetstream_and_tls() -> None:
    keys = NatsAuthKeys.generate()
    tls = ServerTls(Path("/c/cert.pem"), Path("/c/key.pem"))
    text = server_config(
        keys, host="0.0.0.0", port=4222, server_name="s", store_dir=Path("/d/js"), tls=tls
    )
    assert text.startswith('host: "0.0.0.0"\nport: 4222\nserver_name: "s"\n')
    assert 'jetstream { store_dir: "/d/js" }' in text
    assert 'tls { cert_file: "/c/cert.pem", key_file: "/c/key.pem" }' in text
    assert text.endswith(auth_config(keys, jetstream=True))


def test_key_roles_are_checked() -> None:
    keys = NatsAuthKeys.generate()
    keys.check()
    swapped = NatsAuthKeys(frontend=keys.issuer, system=keys.system, issuer=keys.frontend)
    with pytest.raises(NatsAuthError, match="frontend"):
        swapped.check()


# --- client options ---------------------------------------------------------------------------


def test_connect_options_per_identity() -> None:
    keys = NatsAuthKeys.generate()
    assert keys.frontend_credentials().connect_options("nats://h:4222") == {
        "nkeys_seed_str": keys.frontend.seed
    }
    worker = worker_credentials("corral", "n1", "pw").connect_options("nats://h:4222")
    assert worker == {
        "user": "corral.node.n1",
        "password": "pw",
        "inbox_prefix": "_INBOX.corral.node.n1",
    }
    assert NatsCredentials().connect_options("nats://h:4222") == {}
    assert "pw" not in repr(worker_credentials("corral", "n1", "pw"))


def test_tls_urls_get_a_verifying_context() -> None:
    opts = NatsCredentials().connect_options("tls://h:4222")
    ctx = opts["tls"]
    assert isinstance(ctx, ssl.SSLContext)
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname


def test_a_missing_ca_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(NatsAuthError, match="CA file"):
        NatsCredentials(ca_file=tmp_path / "nope.pem").connect_options("tls://h:4222")


# --- the callout's decision (no connection needed) --------------------------------------------


async def test_callout_answers_only_its_own_prefix_and_refuses_on_errors() -> None:
    checked: list[tuple[str, str]] = []

    async def verify(node_id: str, secret: str) -> str | None:
        checked.append((node_id, secret))
        if secret == "boom":
            raise RuntimeError("database down")
        return "cd" * 32 if secret == "good" else None

    issuer, server = NKey.generate(ACCOUNT), NKey.generate(SERVER)
    callout = AuthCallout(Bus("nats://unused:4222", prefix="a"), issuer, verify)

    def ask(user: str, secret: str) -> AuthRequest:
        return AuthRequest.from_token(_request(server, user=user, **{"pass": secret}))

    assert await callout.decide(ask("b.node.n1", "good")) is None  # another cluster's worker
    assert await callout.decide(ask("frontend", "good")) is None  # not a worker name
    assert checked == []
    answers = {}
    for secret in ("good", "bad", "boom"):
        answer = await callout.decide(ask("a.node.n1", secret))
        assert answer is not None
        answers[secret] = decode(answer, issuer_role=ACCOUNT)["nats"]
    assert checked == [("n1", "good"), ("n1", "bad"), ("n1", "boom")]
    assert "jwt" in answers["good"]
    assert answers["bad"]["error"] == "invalid credential for node n1"
    assert answers["boom"]["error"] == "credential check failed"

"""API keys and bearer tokens: digests compared in constant time, auth on and off."""

from __future__ import annotations

from typing import Any

import pytest

from corral.domain.access import ADMIN, Grant, Role
from corral.errors import Forbidden, Unauthorized
from corral.frontend.auth import Authorizer, bearer, digest, is_loopback, matches_any


def _scope(*headers: tuple[bytes, bytes]) -> dict[str, Any]:
    return {"type": "http", "headers": list(headers)}


BEARERS: list[tuple[str, list[tuple[bytes, bytes]], str | None]] = [
    ("no-header", [], None),
    ("bearer", [(b"authorization", b"Bearer sk-1")], "sk-1"),
    ("scheme-case-insensitive", [(b"authorization", b"bEaReR sk-1")], "sk-1"),
    ("whitespace-trimmed", [(b"authorization", b"Bearer   sk-1  ")], "sk-1"),
    ("empty-token", [(b"authorization", b"Bearer ")], None),
    ("only-scheme", [(b"authorization", b"Bearer")], None),
    ("basic-scheme", [(b"authorization", b"Basic dXNlcjpwYXNz")], None),
    ("other-headers-ignored", [(b"x-api-key", b"sk-1"), (b"accept", b"*/*")], None),
    ("after-other-headers", [(b"accept", b"*/*"), (b"authorization", b"Bearer k")], "k"),
]


@pytest.mark.parametrize(
    ("headers", "expected"), [b[1:] for b in BEARERS], ids=[b[0] for b in BEARERS]
)
def test_bearer(headers: list[tuple[bytes, bytes]], expected: str | None) -> None:
    assert bearer(_scope(*headers)) == expected


def test_matches_any() -> None:
    digests = [digest("a"), digest("b")]
    assert matches_any("a", digests)
    assert matches_any("b", digests)
    assert not matches_any("c", digests)
    assert not matches_any("a", [])
    assert not matches_any(digest("a"), digests), "a digest is not a key"


def _client(host: str, *headers: tuple[bytes, bytes]) -> dict[str, Any]:
    return {"type": "http", "headers": list(headers), "client": (host, 5000)}


def _key(token: str) -> tuple[bytes, bytes]:
    return (b"authorization", f"Bearer {token}".encode())


STORED = {
    digest("inf"): Grant.of("inference", None, "key-1"),
    digest("chat-only"): Grant.of("inference", ["chat"], "key-2"),
    digest("adm"): Grant.of("admin", None, "key-3"),
}


def test_authorizer_open_without_keys() -> None:
    auth = Authorizer()
    assert auth.inference_open and not auth.admin_configured
    assert auth.inference([]) is None  # no header, no error
    assert auth.inference([_key("anything")]) is None


@pytest.mark.parametrize(
    ("headers", "ok", "text"),
    [
        ([(b"authorization", b"Bearer good")], True, ""),
        ([(b"authorization", b"Bearer bad")], False, "invalid API key"),
        ([], False, "missing API key"),
        ([(b"authorization", b"Basic good")], False, "missing API key"),
    ],
    ids=["right-key", "wrong-key", "no-key", "wrong-scheme"],
)
def test_authorizer_enabled(headers: list[tuple[bytes, bytes]], ok: bool, text: str) -> None:
    auth = Authorizer(static=[digest("good"), digest("other")])
    assert not auth.inference_open
    if ok:
        assert auth.inference(headers) == ADMIN  # --api-keys are admin keys
        return
    with pytest.raises(Unauthorized) as info:
        auth.inference(headers)
    assert info.value.status == 401
    assert text in info.value.message


def test_stored_keys_close_inference_and_are_dropped_again() -> None:
    auth = Authorizer()
    auth.update(STORED)
    assert not auth.inference_open
    with pytest.raises(Unauthorized):
        auth.inference([])
    grant = auth.inference([_key("chat-only")])
    assert grant is not None and grant.allows_model("chat") and not grant.allows_model("other")
    inference = auth.inference([_key("inf")])
    assert inference is not None and inference.role is Role.INFERENCE
    assert inference.allows_model("anything") and inference.key_id == "key-1"
    auth.update({})
    assert auth.inference_open and auth.inference([]) is None


def test_the_data_dirs_admin_key_closes_only_the_admin_api() -> None:
    auth = Authorizer()
    auth.set_admin([digest("file-key")])
    assert auth.inference_open and auth.admin_configured
    assert auth.inference([]) is None
    auth.admin(_client("127.0.0.1", _key("file-key")))
    with pytest.raises(Unauthorized, match="missing API key"):
        auth.admin(_client("127.0.0.1"))  # loopback too needs the key once there is one
    with pytest.raises(Unauthorized, match="invalid API key"):
        auth.admin(_client("127.0.0.1", _key("nope")))


ADMIN_CASES: list[tuple[str, dict[str, Any], bool, str | None, str]] = [
    # (id, stored keys, admin configured?, host, key) -> expected outcome below
    ("open-loopback-v4", {}, False, "127.0.0.1", ""),
    ("open-loopback-v6", {}, False, "::1", ""),
    ("open-loopback-mapped", {}, False, "::ffff:127.0.0.1", ""),
    ("open-remote", {}, False, "10.0.0.7", ""),
    ("open-no-client", {}, False, None, ""),
    ("open-inference-key", STORED, False, "127.0.0.1", "inf"),
    ("closed-admin-key-remote", STORED, True, "10.0.0.7", "adm"),
    ("closed-no-key-loopback", STORED, True, "127.0.0.1", ""),
    ("closed-inference-key", STORED, True, "127.0.0.1", "inf"),
    ("closed-model-key", STORED, True, "10.0.0.7", "chat-only"),
]
ADMIN_EXPECTED = {
    "open-loopback-v4": None,
    "open-loopback-v6": None,
    "open-loopback-mapped": None,
    "open-remote": (Forbidden, "--api-keys"),
    "open-no-client": (Forbidden, "answers only on loopback"),
    "open-inference-key": (Forbidden, "inference key"),
    "closed-admin-key-remote": None,
    "closed-no-key-loopback": (Unauthorized, "missing API key"),
    "closed-inference-key": (Forbidden, "inference key"),
    "closed-model-key": (Forbidden, "inference key"),
}


@pytest.mark.parametrize(
    ("stored", "configured", "host", "key"),
    [c[1:] for c in ADMIN_CASES],
    ids=[c[0] for c in ADMIN_CASES],
)
def test_admin_api_rule(
    request: pytest.FixtureRequest,
    stored: dict[str, Grant],
    configured: bool,
    host: str | None,
    key: str,
) -> None:
    auth = Authorizer()
    auth.update({d: g for d, g in stored.items() if configured or not g.admin})
    assert auth.admin_configured is configured
    scope = _client(host, _key(key)) if host else _scope(*([_key(key)] if key else []))
    if host and not key:
        scope["headers"] = []
    expected = ADMIN_EXPECTED[request.node.callspec.id]
    if expected is None:
        auth.admin(scope)
        return
    kind, text = expected
    with pytest.raises(kind) as info:
        auth.admin(scope)
    assert text in info.value.message


def test_metrics_key() -> None:
    open_metrics = Authorizer(static=[digest("adm")])
    open_metrics.metrics(_scope())  # no metrics key: open
    auth = Authorizer(static=[digest("adm")], metrics=[digest("scrape")])
    auth.update({digest("inf"): Grant.of("inference", None)})
    auth.metrics(_scope(_key("scrape")))
    auth.metrics(_scope(_key("adm")))  # an admin key reads them too
    for headers in ([], [_key("inf")], [_key("nope")]):
        with pytest.raises(Unauthorized):
            auth.metrics(_scope(*headers))


@pytest.mark.parametrize(
    ("client", "loopback"),
    [
        (("127.0.0.1", 1), True),
        (("127.8.9.10", 1), True),
        (("::1", 1), True),
        (("::ffff:127.0.0.1", 1), True),
        (("10.1.2.3", 1), False),
        (("::ffff:10.1.2.3", 1), False),
        (("testclient", 1), False),
        (None, False),
    ],
)
def test_is_loopback(client: Any, loopback: bool) -> None:
    assert is_loopback(client) is loopback

"""API keys and bearer tokens: digests compared in constant time, auth on and off."""

from __future__ import annotations

from typing import Any

import pytest

from corral.errors import (
    Unauthorized,
)
from corral.frontend.auth import Authorizer, bearer, digest, matches_any


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


def test_authorizer_open_without_keys() -> None:
    auth = Authorizer()
    assert not auth.enabled
    auth.check(_scope())  # no header, no error
    auth.check(_scope((b"authorization", b"Bearer anything")))


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
    auth = Authorizer([digest("good"), digest("other")])
    assert auth.enabled
    if ok:
        auth.check(_scope(*headers))
        return
    with pytest.raises(Unauthorized) as info:
        auth.check(_scope(*headers))
    assert info.value.status == 401
    assert text in info.value.message


def test_authorizer_update_turns_auth_on_and_off() -> None:
    auth = Authorizer()
    auth.update([digest("k")])
    assert auth.enabled
    with pytest.raises(Unauthorized):
        auth.check(_scope())
    auth.check(_scope((b"authorization", b"Bearer k")))
    auth.update([])
    assert not auth.enabled
    auth.check(_scope())

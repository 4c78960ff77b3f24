"""Which request headers reach a backend: custom ones pass, credentials, hop-by-hop headers and
Corral's own control headers never do."""

from __future__ import annotations

import pytest

from corral.config import FrontendSettings
from corral.frontend.headers import HeaderFilter


@pytest.mark.parametrize(
    ("name", "forwarded"),
    [
        ("accept", True),
        ("user-agent", True),
        ("x-request-id", True),
        ("x-session-id", True),
        ("x-stainless-lang", True),  # the openai client's own headers
        ("traceparent", True),
        ("tracestate", True),
        ("openai-organization", True),
        ("openai-beta", True),
        ("authorization", False),
        ("proxy-authorization", False),
        ("x-api-key", False),
        ("x-corral-priority", False),
        ("connection", False),
        ("keep-alive", False),
        ("transfer-encoding", False),
        ("te", False),
        ("upgrade", False),
        ("host", False),
        ("content-length", False),
        ("content-type", False),  # the proxy writes its own
        ("expect", False),
        ("cookie", False),
        ("anthropic-version", False),  # only when configured
        ("accept-encoding", False),  # answers are relayed as they come: no compression asked
    ],
)
def test_default_rule(name: str, forwarded: bool) -> None:
    assert HeaderFilter().allows(name.encode()) is forwarded


def test_configured_names_and_prefixes_pass_but_never_credentials_or_hop_by_hop() -> None:
    rule = HeaderFilter(["Anthropic-Version", " vendor-* ", "", "authorization", "upgrade"])
    assert rule.allows(b"anthropic-version")
    assert rule.allows(b"vendor-trace") and rule.allows(b"vendor-")
    assert not rule.allows(b"authorization"), "a credential for Corral, whatever is configured"
    assert not rule.allows(b"upgrade")
    assert not rule.allows(b"cookie")


def test_a_request_keeps_its_order_and_drops_what_its_connection_header_names() -> None:
    headers = [
        (b"host", b"corral"),
        (b"x-b", b"2"),
        (b"connection", b"keep-alive, X-Hop"),
        (b"authorization", b"Bearer sk-secret"),
        (b"x-hop", b"per-connection"),
        (b"x-a", b"1"),
        (b"x-a", b"again"),
        (b"x-corral-priority", b"high"),
        (b"traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
    ]
    rule = HeaderFilter()
    assert not rule.allows(b"connection")  # asked alone first: the value still counts below
    assert rule(headers) == [
        (b"x-b", b"2"),
        (b"x-a", b"1"),
        (b"x-a", b"again"),
        (b"traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
    ]


def test_the_decision_per_name_is_remembered() -> None:
    rule = HeaderFilter()
    for _ in range(3):
        rule([(b"x-a", b"1"), (b"authorization", b"k")])
    assert rule._decided == {b"x-a": True, b"authorization": False}


def test_the_setting_takes_a_comma_separated_list() -> None:
    settings = FrontendSettings(forward_headers="anthropic-version, vendor-*")  # type: ignore[arg-type]
    assert settings.forward_headers == ["anthropic-version", "vendor-*"]

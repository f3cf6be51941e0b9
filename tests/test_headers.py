"""``gateway.headers`` and the claim encoding of ``gateway.gate``, as pure functions.

Issue 7 items 1 (every spelling of the gateway's cookies in an upstream ``Set-Cookie``),
6 (every name the gateway emits or trusts, stripped from clients), 7 and 8 (claims as
valid, unambiguous header values). The end-to-end counterparts are in ``test_gate.py``.
"""

from __future__ import annotations

import logging
from urllib.parse import unquote

import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.cookies import CookiePolicy
from gateway.gate import MAX_CLAIM_HEADER, identity_headers
from gateway.headers import (
    OwnCookies,
    client_headers,
    encode_value,
    set_cookie_name,
    upstream_headers,
)
from gateway.session import Identity

OWN = CookiePolicy("__Host-gw", secure=True, samesite="Lax").own

# Every one of these would set, or overwrite, a cookie the gateway reads back as its own.
HOSTILE_SET_COOKIES = [
    "__Host-gw=planted; Path=/; Secure",
    "__Host-gw=planted; SECURE; PATH=/; HTTPONLY; DOMAIN=example.com",
    "__HOST-gw=planted; Secure; Path=/",
    "__host-GW=planted; Secure; Path=/",
    "__Secure-gw=planted; Secure",
    "__Secure-__Host-gw=planted; Secure",
    "gw=planted",
    "GW=planted",
    " __Host-gw =planted; Path=/",
    "\t__Host-gw\t=planted",
    "=__Host-gw=planted; Path=/; Secure",
    "= __Host-gw=planted; Path=/",
    "  =__Host-gw=planted",
    "__Host-gw",
    "__Host-gw; Path=/",
    "__Host-gw-logout=planted; Path=/",
    "__HOST-GW-LOGOUT=planted",
    "__Host-gw-login-abc=planted; Path=/",
    "__Host-gw-login-=planted",
    "=__Host-gw-login-x=planted",
    "__host-gw-LOGIN-x=planted",
    "__Host-gw=planted\x00; Path=/",
]
HARMLESS_SET_COOKIES = [
    "theme=dark; Path=/",
    "gwx=1",
    "__Host-gwx=1; Secure; Path=/",
    "gw-other=1",
    "session=1; Path=/; Comment=__Host-gw=1",
]


def to_upstream(headers: CIMultiDict[str]) -> CIMultiDict[str]:
    return upstream_headers(
        CIMultiDictProxy(headers),
        strip=frozenset(),
        inject={},
        own_cookies=OWN,
        forwarded_for="198.51.100.1",
        forwarded_proto="https",
        forwarded_host="app.example",
        host=None,
        keep_content_length=False,
    )


@pytest.mark.parametrize("value", HOSTILE_SET_COOKIES)
def test_upstream_set_cookie_for_a_gateway_cookie_is_dropped(value: str) -> None:
    upstream = CIMultiDict([("Set-Cookie", value), ("Set-Cookie", "theme=dark")])
    out = client_headers(CIMultiDictProxy(upstream), OWN)
    assert out.getall("Set-Cookie") == ["theme=dark"], value


@pytest.mark.parametrize("value", HARMLESS_SET_COOKIES)
def test_other_set_cookies_pass(value: str) -> None:
    out = client_headers(CIMultiDictProxy(CIMultiDict([("Set-Cookie", value)])), OWN)
    assert out.getall("Set-Cookie") == [value]


def test_set_cookie_name_is_the_name_a_browser_sends_back() -> None:
    # RFC 6265bis §5.6: nameless cookies come back as their value alone.
    assert set_cookie_name("a=b; Path=/") == "a"
    assert set_cookie_name("=a=b") == "a"
    assert set_cookie_name("a") == "a"
    assert set_cookie_name("a; Secure") == "a"
    assert set_cookie_name(" a =b") == " a "
    assert OwnCookies(("A",)).matches(" __secure-a ")


def test_gateway_cookies_never_go_upstream_in_any_spelling() -> None:
    cookie = "theme=dark; __Host-gw=s; __host-gw=s2; GW=s3; __Host-gw-login-1=l; lang=en"
    out = to_upstream(CIMultiDict([("Cookie", cookie)]))
    assert out["Cookie"] == "theme=dark; lang=en"


EMITTED = [
    "X-Auth-Request-User",
    "x_auth_request_email",
    "X-AUTH-REQUEST-GROUPS",
    "X-Auth-Request-Preferred-Username",
    "X-Auth-Request-Access-Token",
    "X-Gateway-Login",
    "X_Gateway_Login",
    "X-Gateway-Anything",
    "X-Original-URI",
    "x_original_uri",
    "X-Original-Method",
    "X-Forwarded-Uri",
    "X_Forwarded_Method",
]


def test_names_the_gateway_emits_or_trusts_never_come_from_a_client() -> None:
    sent = CIMultiDict([(name, "forged") for name in EMITTED])
    sent.add("X-Auth-Request-User", "forged-duplicate")
    sent.add("Connection", "X-Auth-Request-Email, X-Kept-Hop")
    sent.add("X-Kept", "yes")
    out = to_upstream(sent)
    assert "forged" not in repr(out)
    assert out["X-Kept"] == "yes"
    assert out["X-Forwarded-For"] == "198.51.100.1"


# -- claims as header values ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("claim", "expected"),
    [
        ("alice", "alice"),
        ("alice smith", "alice smith"),
        ("a\x00b", "a%00b"),
        ("a\tb", "a%09b"),
        ("a\r\nX-Evil: 1", "a%0D%0AX-Evil: 1"),
        ("a\x7fb", "a%7Fb"),
        ("a\x85b", "a%C2%85b"),
        ("José", "Jos%C3%A9"),
        ("名前", "%E5%90%8D%E5%89%8D"),
        ("100%", "100%25"),
        (" padded ", "%20padded%20"),
        ("a,b", "a,b"),
    ],
)
def test_scalar_claims_are_percent_encoded_where_needed(claim: str, expected: str) -> None:
    out = identity_headers({"X-User": "name"}, Identity("s", {"name": claim}))
    assert out == {"X-User": expected}
    assert unquote(expected) == claim
    assert all(0x20 <= ord(c) < 0x7F for c in expected)


def test_list_items_cannot_look_like_two_items() -> None:
    groups = ["staff,admins", "staff", "50%", "a\x00", " x"]
    out = identity_headers({"X-Groups": "groups"}, Identity("s", {"groups": groups}))
    value = out["X-Groups"]
    assert value == "staff%2Cadmins,staff,50%25,a%00,%20x"
    assert [unquote(item) for item in value.split(",")] == groups


def test_a_claim_without_header_form_is_dropped_and_named_in_the_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    claims = {
        "address": {"street": "secret street"},
        "groups": ["staff", ["nested-secret"]],
        "huge": "x" * (MAX_CLAIM_HEADER + 1),
        "name": "ok",
    }
    mapping = {"X-Address": "address", "X-Groups": "groups", "X-Huge": "huge", "X-Name": "name"}
    with caplog.at_level(logging.WARNING, logger="gateway.gate"):
        out = identity_headers(mapping, Identity("s", claims))
    assert out == {"X-Name": "ok"}
    text = caplog.text
    for claim in ("address", "groups", "huge"):
        assert f"claim {claim} not sent" in text
    assert "secret" not in text and "xxxx" not in text


def test_encode_value_is_identity_on_plain_ascii() -> None:
    plain = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in "%")
    assert encode_value(plain) == plain
    assert encode_value(plain, list_item=True) == plain.replace(",", "%2C")


@given(st.lists(st.text(max_size=20), max_size=6))
def test_any_list_claim_round_trips_and_is_a_valid_header_value(items: list[str]) -> None:
    value = identity_headers({"X-L": "l"}, Identity("s", {"l": items}))["X-L"]
    assert all(0x20 <= ord(c) < 0x7F for c in value)
    assert value == value.strip()
    assert [unquote(item) for item in value.split(",")] == (items or [""])


@given(st.text(max_size=30))
def test_any_scalar_claim_round_trips_and_is_a_valid_header_value(text: str) -> None:
    value = encode_value(text)
    assert all(0x20 <= ord(c) < 0x7F for c in value)
    assert value == value.strip()
    assert unquote(value) == text


def test_own_cookie_prefixes_match_any_spelling_and_an_empty_prefix_matches_nothing() -> None:
    own = OwnCookies(("gw",), ("gw-login-", ""))
    assert own.matches("gw") and own.matches(" __Host-GW-Login-abc ")
    assert own.matches("__secure-gw-login-")
    assert not own.matches("other") and not own.matches("gw-logi")
    assert OwnCookies((), ("",)) == OwnCookies()


def test_strip_sets_and_injected_names_worked_out_once_are_each_calls_own() -> None:
    """``upstream_headers`` keeps the union of the decided names and a strip set, and the
    normalized injected names, per set it is called with (bounded): every call still
    removes exactly its own strip set and its own injected names, in any spelling, also
    after the kept tables were emptied."""
    from gateway import headers

    def send(strip: frozenset[str], inject: dict[str, str], websocket: bool) -> CIMultiDict[str]:
        sent = CIMultiDict([(f"x-{i}", "client") for i in range(3 * headers._KEPT)])
        sent.add("Sec-WebSocket-Key", "client")
        return upstream_headers(
            CIMultiDictProxy(sent), strip=strip, inject=inject, own_cookies=OWN,
            forwarded_for="", forwarded_proto="", forwarded_host="", host=None,
            keep_content_length=False, websocket=websocket,
        )  # fmt: skip

    for i in range(3 * headers._KEPT):  # more sets than the tables keep
        out = send(frozenset({f"x-{i}"}), {f"X_{(i + 1) % (3 * headers._KEPT)}": "gw"}, i % 2 == 1)
        gone = {f"x-{i}", f"x-{(i + 1) % (3 * headers._KEPT)}"}
        assert [k for k in out if out[k] == "client"] == [
            *(f"x-{j}" for j in range(3 * headers._KEPT) if f"x-{j}" not in gone),
            *(["Sec-WebSocket-Key"] if i % 2 == 0 else []),
        ]
        assert len(headers._removed_sets) <= headers._KEPT
        assert len(headers._injected_names) <= headers._KEPT

"""Fuzz forward-auth (``/oauth2/auth``): the original URI and method a proxy describes, and
the Envoy-style ``/oauth2/auth/<path>``, from a trusted proxy and from anyone else.

Oracle: the answer is the gate's decision for the original request, which we compute from the
route table for the normalized original path (the same normalization the gate uses): a public
route may pass anyone, a protected one only a session whose user the policy admits.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway import keys
from gateway.policy import PathRejected, normalize_path
from tests.fuzz.profiles import FUZZ
from tests.fuzz.properties import (
    USERS,
    answered_oversized,
    browser_target,
    check_all,
    mutated,
    norm,
    origin_of,
    raw_paths,
    same_sealed,
)
from tests.fuzz.stack import COOKIE, FuzzStack, Reply

pytestmark = pytest.mark.fuzz

URI_HEADERS = ("X-Forwarded-Uri", "X-Original-URI", "x-forwarded-uri", "X-ORIGINAL-URI")
METHOD_HEADERS = ("X-Forwarded-Method", "X-Original-Method")

uris = st.one_of(
    raw_paths(),
    st.builds(lambda p, q: p + "?" + q, raw_paths(), st.text(alphabet="abc=&%2F/?#", max_size=10)),
    st.builds(
        lambda s, p: s + p,
        st.sampled_from(["http://127.0.0.1", "https://evil.example", "HTTP://x", "http://"]),
        raw_paths(),
    ),
    st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30),
)
methods = st.one_of(
    st.sampled_from(["GET", "HEAD", "POST", "get", "DELETE", " GET ", "G3T", "X" * 30]),
    st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=8),
)
who = st.sampled_from([None, "alice", "bob", "damaged"])


def expected_route_path(uri: str) -> str | None:
    """The normalized original path, or None when the gateway must refuse to judge it."""
    raw = uri.strip()
    if raw.lower().startswith(("http://", "https://")):
        parts = urlsplit(raw)
        raw = parts.path or "/"
    try:
        return normalize_path(raw.partition("?")[0])
    except PathRejected:
        return None


def check_decision(stack: FuzzStack, reply: Reply, path: str | None, user: str | None) -> None:
    """Compare the answer with the gate's decision for ``path``."""
    assert stack.app is not None
    if answered_oversized(reply):
        return
    identity = {
        norm(k): v for k, v in reply.headers.items() if norm(k).startswith("x-auth-request-")
    }
    if path is None:
        assert reply.status == 400, f"{reply.status}: {reply.text[:200]}"
        return
    try:
        route = stack.app[keys.ROUTES].match(path)
    except PathRejected:  # a spelling that folds onto another route's path: refused
        assert reply.status == 400, f"{path}: {reply.status}"
        return
    if route is None:
        assert reply.status == 403
        return
    if route.public:
        assert reply.status == 200 and not identity
        return
    if user is None:
        assert reply.status in (401, 302), f"{path}: {reply.status}"
        assert not identity
        return
    groups = set(USERS[user]["groups"])  # type: ignore[call-overload]
    allowed = not route.settings.require.groups or groups & set(route.settings.require.groups)
    assert reply.status == (200 if allowed else 403), f"{user} on {path}: {reply.status}"
    if allowed:
        assert identity["x-auth-request-user"] == user


def send(
    stack: FuzzStack,
    tail: str,
    headers: list[tuple[str, str]],
    user: str | None,
    data: st.DataObject,
) -> tuple[Reply, str | None]:
    cookies = None
    if user == "damaged":
        value = data.draw(mutated(stack.sessions["alice"]))
        cookies = {COOKIE: value}
        user = None  # a damaged cookie is no session (see test_gate for the same-bytes case)
        if same_sealed(value, stack.sessions["alice"]):
            user = "alice"
    elif user is not None:
        cookies = {COOKIE: stack.sessions[user]}
    reply = stack.request(
        "GET", "/oauth2/auth" + tail, headers=headers, cookies=cookies, count="forward-auth"
    )
    return reply, user


def check_login_hints(stack: FuzzStack, reply: Reply) -> None:
    for name in ("X-Gateway-Login", "Location"):
        value = reply.headers.get(name)
        if value is not None:
            assert origin_of(browser_target(stack.url, value)) == origin_of(stack.url), value


@FUZZ
@given(
    uri=uris,
    uri_header=st.sampled_from(URI_HEADERS),
    method=st.one_of(st.none(), methods),
    method_header=st.sampled_from(METHOD_HEADERS),
    user=who,
    login=st.booleans(),
    html=st.booleans(),
    data=st.data(),
)
def test_original_uri_from_a_trusted_proxy(
    trusted_stack: FuzzStack, uri: str, uri_header: str, method: str | None, method_header: str,
    user: str | None, login: bool, html: bool, data: st.DataObject,
) -> None:  # fmt: skip
    headers = [(uri_header, uri)]
    if method is not None:
        headers.append((method_header, method))
    if html:
        headers.append(("Accept", "text/html"))
    tail = "?login=redirect" if login else ""
    reply, user = send(trusted_stack, tail, headers, user, data)
    check_all(trusted_stack, reply)
    check_login_hints(trusted_stack, reply)
    if uri.strip() == "" or reply.status == 302:
        return  # no URI: the route for "/" decides; a redirect is the 401's login variant
    check_decision(trusted_stack, reply, expected_route_path(uri), user)


@FUZZ
@given(tail=raw_paths(), user=who, data=st.data())
def test_envoy_path_prefix(
    trusted_stack: FuzzStack, tail: str, user: str | None, data: st.DataObject
) -> None:
    reply, user = send(trusted_stack, tail if tail != "/" else "/", [], user, data)
    check_all(trusted_stack, reply)
    check_login_hints(trusted_stack, reply)
    if reply.status == 404:
        # Not a forward-auth path after all (e.g. /oauth2/auth/../x is /oauth2/x): the gate's
        # own prefix answers 404, and that is the only other answer allowed.
        # And a decoded newline: aiohttp's router never matches it (``.*`` stops there).
        path = expected_route_path("/oauth2/auth" + tail)
        assert path is None or not path.startswith("/oauth2/auth/"), tail
        return
    check_decision(trusted_stack, reply, expected_route_path(tail), user)


@FUZZ
@given(uri=uris, uri_header=st.sampled_from(URI_HEADERS), data=st.data())
def test_an_untrusted_caller_cannot_describe_the_request(
    fuzz_stack: FuzzStack, uri: str, uri_header: str, data: st.DataObject
) -> None:
    """From anyone but a trusted proxy the original-request headers are ignored: the route
    for "/" decides, which needs a session."""
    reply, _ = send(fuzz_stack, "", [(uri_header, uri), ("X-Forwarded-Method", "GET")], None, data)
    check_all(fuzz_stack, reply)
    assert reply.status == 401, reply.status


@FUZZ
@given(
    uri=st.binary(min_size=1, max_size=30).map(lambda b: b"/" + b),
    header=st.sampled_from([b"X-Forwarded-Uri", b"X-Original-URI"]),
)
def test_raw_bytes_in_the_original_uri(trusted_stack: FuzzStack, uri: bytes, header: bytes) -> None:
    """A proxy passes the client's request target byte for byte (nginx ``$request_uri``):
    bytes that are not UTF-8 get an answer, never a 5xx."""
    uri = uri.replace(b"\r", b"").replace(b"\n", b"")
    head = b"GET /oauth2/auth HTTP/1.1\r\nHost: x\r\n" + header + b": " + uri + b"\r\n\r\n"
    status = trusted_stack.request_raw(head, count="forward-auth: raw original URI bytes")
    assert 0 < status < 500, status

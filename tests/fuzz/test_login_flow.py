"""Fuzz the login and sign-out flows: callback query, login-state cookies, ``rd``, sign-out
targets and the sign-out state cookie, against a real stack.

The strongest oracle is in ``test_a_callback_earns_a_session_only_when_everything_matches``:
each example runs a real sign-in at the provider up to the redirect back to the gateway, then
damages some of what the browser would send (code, state, iss, the login-state cookie).
A session cookie is issued exactly when nothing that matters was changed.
"""

from __future__ import annotations

import html
import json
import re
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import aiohttp
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from yarl import URL

from gateway import keys
from gateway.crypto import OpenError, b64u_decode
from gateway.flow import LoginState
from gateway.logout import _LOGOUT_PURPOSE
from gateway.policy import normalize_path
from tests.fuzz.profiles import FUZZ
from tests.fuzz.properties import (
    answered_oversized,
    apply_mutations,
    browser_target,
    check_all,
    check_location,
    cookie_text,
    mutated,
    mutations,
    origin_of,
    raw_paths,
    same_sealed,
    server_reads,
)
from tests.fuzz.stack import ALLOWED_ORIGIN, COOKIE, FuzzStack, Reply
from tests.idp_client import http_login

pytestmark = pytest.mark.fuzz

HTML = [("Accept", "text/html"), ("Sec-Fetch-Mode", "navigate")]

# Redirect targets: the classic open-redirect spellings, our own and the allowlisted origin,
# and random text around them.
_TARGET_PREFIXES = (
    "/", "//", "///", "/\\", "\\\\", "/%2f", "/%5c", "%2f%2f", "/%09/", "/\t/", " //", "/ /",
    "http://", "https://", "HTTPS://", "https:/", "https:", "//evil.example", "https://evil.example",
    "https://allowed.example", "https://allowed.example@evil.example", "https://evil.example#@allowed.example",
    "https://allowed.example.evil.example", "javascript:", "data:text/html,", "/%252f%252f",
    "http://127.0.0.1", "\x00/", "/\r\n//", "https://allowed.example:443", "//allowed.example",
    "%0d%0a", "/.//", "/..//", "https:\\\\", "/%E2%80%AE", "ftp://",
)  # fmt: skip
redirect_targets = st.one_of(
    st.builds(
        lambda a, b: a + b,
        st.sampled_from(_TARGET_PREFIXES),
        st.one_of(st.just(""), st.sampled_from(_TARGET_PREFIXES), st.text(max_size=20)),
    ),
    st.text(max_size=30),
    raw_paths(),
)


def with_own(stack: FuzzStack, target: str) -> str:
    return target.replace("http://127.0.0.1", stack.url, 1)


def return_to_of(stack: FuzzStack, reply: Reply) -> str:
    """The return path sealed in the login-state cookie that a /oauth2/start answer set."""
    assert stack.app is not None
    state = parse_qs(urlsplit(reply.headers["Location"]).query)["state"][0]
    value = next(v for n, v, _ in reply.set_cookies if n.startswith(COOKIE + "-login-"))
    return LoginState.open(value.split(".", 1)[1], state, stack.app[keys.RING]).return_to


def check_landing(stack: FuzzStack, target: str) -> None:
    landing = browser_target(stack.url, target)
    assert origin_of(landing) in {origin_of(stack.url), ALLOWED_ORIGIN}, (
        f"after login the browser would land on {landing!r} ({target!r})"
    )


@FUZZ
@given(rd=redirect_targets)
@example(rd="http://127.0.0.1//evil.example/x")  # our origin, then a path that reads as another
def test_rd_on_start_never_leads_off_origin(fuzz_stack: FuzzStack, rd: str) -> None:
    rd = with_own(fuzz_stack, rd)
    reply = fuzz_stack.request(
        "GET", "/oauth2/start?rd=" + quote(rd, safe=""), headers=HTML, count="login: rd"
    )
    check_all(fuzz_stack, reply)
    if reply.status == 302:
        check_landing(fuzz_stack, return_to_of(fuzz_stack, reply))
    else:
        assert reply.status == 400, reply.text


@FUZZ
@given(path=raw_paths(), query=st.text(max_size=20))
def test_a_login_from_any_path_returns_to_that_site(
    fuzz_stack: FuzzStack, path: str, query: str
) -> None:
    """The gate's own login redirect: follow it to /oauth2/start; the return path stays here."""
    target = path + ("?" + quote(query, safe="=&/") if query else "")
    reply = fuzz_stack.request("GET", target, headers=HTML, count="login: path to rd")
    check_all(fuzz_stack, reply)
    location = reply.headers.get("Location", "")
    if reply.status == 302 and location.startswith("/oauth2/start"):
        start = fuzz_stack.request("GET", location, headers=HTML, count="login: path to rd")
        check_all(fuzz_stack, start)
        assert start.status == 302, f"{target!r} led to a refused sign-in: {start.text}"
        landing = return_to_of(fuzz_stack, start)
        check_landing(fuzz_stack, landing)
        # ... and it is the page that was asked for.
        assert normalize_path(urlsplit(landing).path) == normalize_path(path)


# -- the callback ------------------------------------------------------------------------------

query_value = st.one_of(st.text(max_size=40), st.sampled_from(["", "x" * 5000, "%00", "a\x00b"]))
oauth_error = st.sampled_from(
    ["access_denied", "login_required", "server_error", "temporarily_unavailable",
     "<script>", "x\"y", "a" * 100, "invalid_request\r\nX: y"]
)  # fmt: skip


@st.composite
def callback_queries(draw: st.DrawFn, stack: FuzzStack) -> list[tuple[str, str]]:
    assert stack.flow is not None
    names = ["code", "state", "iss", "error", "error_description", "error_uri", "session_state"]
    query: list[tuple[str, str]] = []
    for name in draw(st.lists(st.sampled_from(names), max_size=7)):
        if name == "state":
            value = draw(
                st.one_of(query_value, mutated(stack.flow.state), st.just(stack.flow.state))
            )
        elif name == "iss":
            value = draw(st.one_of(query_value, st.just(stack.idp.issuer if stack.idp else "")))
        elif name == "error":
            value = draw(st.one_of(oauth_error, query_value))
        else:
            value = draw(query_value)
        query.append((name, value))
    return query


@FUZZ
@given(data=st.data())
def test_any_callback_query_and_flow_cookie(fuzz_stack: FuzzStack, data: st.DataObject) -> None:
    flow = fuzz_stack.flow
    assert flow is not None
    query = data.draw(callback_queries(fuzz_stack))
    cookie = data.draw(
        st.one_of(st.none(), st.just(flow.cookie_value), mutated(flow.cookie_value), cookie_text())
    )
    cookies: dict[str, str] | None = None
    if cookie is not None:
        name = data.draw(
            st.sampled_from([flow.cookie_name, COOKIE + "-login-0", COOKIE + "-login-9"])
        )
        cookies = {name: cookie}
    path = str(URL("/oauth2/callback").with_query(query)) if query else "/oauth2/callback"
    reply = fuzz_stack.request("GET", path, headers=HTML, cookies=cookies, count="login: callback")
    check_all(fuzz_stack, reply)
    assert reply.status == 400, f"{reply.status}: {reply.text[:200]}"


async def provider_redirect(stack: FuzzStack) -> tuple[dict[str, str], str, str]:
    """Sign bob in at the provider; stop at the redirect back to the gateway's callback.

    Returns the callback's query parameters and the login-state cookie (name, value) the
    browser holds."""
    async with aiohttp.ClientSession(
        cookie_jar=aiohttp.CookieJar(unsafe=True), headers={"Accept": "text/html"}
    ) as browser:
        result = await http_login(
            browser, stack.url + "/oauth2/start?rd=/landed", "bob", "bob",
            stop_at=stack.url + "/oauth2/callback",
        )  # fmt: skip
        assert result.location is not None, result.body
        query = {k: v[0] for k, v in parse_qs(urlsplit(result.location).query).items()}
        jar = browser.cookie_jar.filter_cookies(URL(stack.url))
        name = next(n for n in jar if n.startswith(COOKIE + "-login-"))
        return query, name, jar[name].value


def _same_flow_cookie(a: str, b: str) -> bool:
    """Whether two login-state cookie values carry the same sealed bytes (the stamp before
    the dot is only a hint for picking a slot)."""
    if "." not in a or "." not in b:
        return False
    try:
        return b64u_decode(a.split(".", 1)[1]) == b64u_decode(b.split(".", 1)[1])
    except ValueError:
        return False


@FUZZ
@given(data=st.data(), damage=st.sets(st.sampled_from(["code", "state", "iss", "cookie"])))
def test_a_callback_earns_a_session_only_when_everything_matches(
    fuzz_stack: FuzzStack, data: st.DataObject, damage: set[str]
) -> None:
    query, name, value = fuzz_stack.run(provider_redirect(fuzz_stack))
    sent = dict(query)
    for param in ("code", "state", "iss"):
        if param in damage:
            sent[param] = apply_mutations(query[param], data.draw(mutations))
    cookie = apply_mutations(value, data.draw(mutations)) if "cookie" in damage else value
    path = str(URL("/oauth2/callback").with_query(sent))
    reply = fuzz_stack.request(
        "GET", path, headers=HTML, cookies={name: cookie}, count="login: real callback damaged"
    )
    intact = sent == query and _same_flow_cookie(cookie, value)
    issued = [v for n, v, _ in reply.set_cookies if n == COOKIE and v]
    assert reply.status < 500, reply.text
    check_location(fuzz_stack, reply)
    if intact:
        assert reply.status == 302 and reply.headers["Location"] == "/landed", reply.text
        assert len(issued) == 1
        # The session is bob's, and works.
        seen = fuzz_stack.request("GET", "/oauth2/userinfo", cookies={COOKIE: issued[0]})
        assert json.loads(seen.text)["sub"] == "bob"
    else:
        assert issued == [], f"a session for a damaged callback ({sorted(damage)})"
        assert reply.status == 400, reply.text


# -- sign-out ----------------------------------------------------------------------------------


@FUZZ
@given(
    rd=redirect_targets,
    csrf=st.one_of(st.none(), st.text(max_size=40)),
    session=st.sampled_from([None, "garbage", "mutated"]),
    origin=st.sampled_from([None, "own", "https://evil.example", "null"]),
    data=st.data(),
)
def test_sign_out_targets_stay_on_site(
    fuzz_stack: FuzzStack,
    rd: str,
    csrf: str | None,
    session: str | None,
    origin: str | None,
    data: st.DataObject,
) -> None:
    rd = with_own(fuzz_stack, rd)
    cookies: dict[str, str] = {}
    if session == "garbage":
        cookies[COOKIE] = data.draw(st.text(alphabet="abcXYZ019-_.", max_size=60))
    elif session == "mutated":
        cookies[COOKIE] = data.draw(mutated(fuzz_stack.sessions["alice"]))
    form: dict[str, Any] = {"rd": rd}
    if csrf is not None:
        form["csrf"] = csrf
    headers = [("Origin", fuzz_stack.url if origin == "own" else origin)] if origin else []
    page = fuzz_stack.request(
        "GET", "/oauth2/sign_out?rd=" + quote(rd, safe=""), cookies=cookies or None,
        headers=HTML, count="sign-out: GET/POST rd",
    )  # fmt: skip
    check_all(fuzz_stack, page)
    if answered_oversized(page):
        return
    for href in re.findall(r'(?:href|value)="([^"]*)"', page.text):
        if href.startswith(("/", "http")):
            check_landing(fuzz_stack, html.unescape(href))
    reply = fuzz_stack.request(
        "POST", "/oauth2/sign_out", data=form, cookies=cookies or None, headers=headers,
        count="sign-out: GET/POST rd",
    )  # fmt: skip
    check_all(fuzz_stack, reply)
    if reply.status == 303:
        check_landing(fuzz_stack, reply.headers["Location"])
    # A damaged cookie that still carries alice's ticket is her session: without her CSRF
    # token the sign-out is refused. Anything else is no session: straight to the target.
    same = session == "mutated" and same_sealed(cookies[COOKIE], fuzz_stack.sessions["alice"])
    assert reply.status == (403 if same else 303), reply.text
    # alice's session still works.
    alive = fuzz_stack.request(
        "GET", "/oauth2/userinfo", cookies={COOKIE: fuzz_stack.sessions["alice"]}
    )
    assert alive.status == 200


@st.composite
def logout_cookies(draw: st.DrawFn, stack: FuzzStack) -> str | None:
    return draw(
        st.one_of(
            st.none(), st.just(stack.logout_cookie), mutated(stack.logout_cookie),
            cookie_text(),
        )
    )  # fmt: skip


@FUZZ
@given(data=st.data())
def test_signed_out_page_links_only_to_this_site(
    fuzz_stack: FuzzStack, data: st.DataObject
) -> None:
    cookie = data.draw(logout_cookies(fuzz_stack))
    state = data.draw(
        st.one_of(
            st.just(fuzz_stack.logout_state), mutated(fuzz_stack.logout_state), st.text(max_size=30)
        )
    )
    cookies = {COOKIE + "-logout": cookie} if cookie is not None else None
    reply = fuzz_stack.request(
        "GET", "/oauth2/signed_out?state=" + quote(state, safe=""), cookies=cookies,
        headers=HTML, count="sign-out: signed_out",
    )  # fmt: skip
    check_all(fuzz_stack, reply)
    if answered_oversized(reply):
        return
    assert reply.status == 200
    links = [html.unescape(h) for h in re.findall(r'href="([^"]*)"', reply.text)]
    assert links, reply.text
    for href in links:
        check_landing(fuzz_stack, href)
    assert fuzz_stack.app is not None
    real = cookie is not None and state == fuzz_stack.logout_state
    if real:
        try:
            opened = fuzz_stack.app[keys.RING].open_text(server_reads(cookie), _LOGOUT_PURPOSE)
            target = json.loads(opened)["target"]
        except OpenError:
            real = False
    assert links == ([target] if real else ["/"])


@FUZZ
@given(data=st.data())
def test_signed_out_page_never_touches_the_session_cookie(
    fuzz_stack: FuzzStack, data: st.DataObject
) -> None:
    cookie = data.draw(logout_cookies(fuzz_stack))
    cookies = {COOKIE: fuzz_stack.sessions["bob"]}
    if cookie is not None:
        cookies[COOKIE + "-logout"] = cookie
    reply = fuzz_stack.request(
        "GET", "/oauth2/signed_out", cookies=cookies, headers=[*HTML, ("Sec-Fetch-Site", "cross-site")],
        count="sign-out: signed_out cookie",
    )  # fmt: skip
    check_all(fuzz_stack, reply)
    assert COOKIE not in [n for n, _, _ in reply.set_cookies]


@FUZZ
@given(
    slots=st.dictionaries(
        st.integers(0, 9),
        st.one_of(cookie_text(), st.sampled_from(["²", "❼.x", "٣.x", "1.", "."])),
        max_size=4,
    ),
    rd=st.sampled_from(["/", "/x?y=1"]),
)
def test_any_login_state_cookies_on_start(
    fuzz_stack: FuzzStack, slots: dict[int, str], rd: str
) -> None:
    """Whatever login-state cookies a browser holds (another site may have tossed some), a
    sign-in starts."""
    cookies = {f"{COOKIE}-login-{i}": v for i, v in slots.items()}
    reply = fuzz_stack.request(
        "GET", "/oauth2/start?rd=" + quote(rd, safe=""), headers=HTML, cookies=cookies,
        count="login: start with login-state cookies",
    )  # fmt: skip
    check_all(fuzz_stack, reply)
    if not answered_oversized(reply):
        assert reply.status == 302, reply.text
        check_landing(fuzz_stack, return_to_of(fuzz_stack, reply))

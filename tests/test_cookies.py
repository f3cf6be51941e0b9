"""Cookies over real HTTP: attributes (SECURITY.md 10), bad cookies (13), sign-out CSRF (14).

Every test talks to a real gateway on loopback in front of the dev provider, the echo
upstream and a real redis-server. Set-Cookie headers are read straight off the wire with
``allow_redirects=False`` so the attributes are those the server sent, not what a jar kept.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from yarl import URL

from gateway.crypto import KeyRing, decode_secret, new_secret
from gateway.session import Ticket
from tests.conftest import Stack, StackFactory
from tests.idp_client import FormParser, http_login
from tests.support.spy import record_first_args

HOST_COOKIE = "__Host-gateway"
NAV = {"Accept": "text/html", "Sec-Fetch-Mode": "navigate"}
API = {"Accept": "application/json"}
# A bad cookie must be answered about as fast as no cookie at all; this bound only
# catches a hang (a retry loop, a blocking decode), it is not a timing assertion.
PROMPT = 10.0


def parse_set_cookie(header: str) -> tuple[str, str, dict[str, str]]:
    """(name, value, attributes with lowercased keys) of one Set-Cookie line."""
    first, *attrs = header.split(";")
    name, _, value = first.strip().partition("=")
    out: dict[str, str] = {}
    for attr in attrs:
        key, _, val = attr.strip().partition("=")
        out[key.strip().lower()] = val.strip()
    return name, value, out


def set_cookies(resp: aiohttp.ClientResponse) -> list[tuple[str, str, dict[str, str]]]:
    return [parse_set_cookie(h) for h in resp.headers.getall("Set-Cookie", [])]


def assert_host_cookie(name: str, attrs: dict[str, str]) -> None:
    """rfc6265bis §4.1.3.2 and SECURITY.md 10: what every gateway cookie carries."""
    assert name.startswith("__Host-"), name
    assert "secure" in attrs, (name, attrs)
    assert "httponly" in attrs, (name, attrs)
    assert attrs.get("path") == "/", (name, attrs)
    assert "domain" not in attrs, (name, attrs)
    assert attrs.get("samesite", "").lower() == "lax", (name, attrs)


def secure_browser(stack: Stack) -> aiohttp.ClientSession:
    """A browser-like client that keeps Secure cookies over plain http on loopback."""
    jar = aiohttp.CookieJar(unsafe=True, treat_as_secure_origin=[stack.url])
    return aiohttp.ClientSession(cookie_jar=jar, headers=NAV)


def jar_cookies(http: aiohttp.ClientSession, stack: Stack) -> dict[str, str]:
    return {
        name: morsel.value
        for name, morsel in http.cookie_jar.filter_cookies(URL(stack.url)).items()
    }


async def login(http: aiohttp.ClientSession, stack: Stack, user: str = "bob") -> str:
    """Sign ``user`` in through the real provider; the session cookie's value."""
    result = await http_login(http, stack.url + "/", user, user)
    assert result.status == 200, result.body
    value = jar_cookies(http, stack).get(stack.settings.session.cookie_name)
    assert value, "no session cookie after login"
    return value


async def status_with_cookie(stack: Stack, path: str, cookie: str, headers: dict[str, str]) -> int:
    """One request carrying exactly ``cookie`` as its Cookie header (no jar)."""
    async with (
        aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http,
        http.get(
            stack.url + path,
            headers={**headers, "Cookie": cookie},
            allow_redirects=False,
            timeout=aiohttp.ClientTimeout(total=PROMPT),
        ) as resp,
    ):
        await resp.read()
        return resp.status


async def session_works(stack: Stack, cookie_value: str) -> bool:
    """Whether the session cookie still opens a session (API call to a protected route)."""
    name = stack.settings.session.cookie_name
    return await status_with_cookie(stack, "/whoami", f"{name}={cookie_value}", API) == 200


# -- 10: cookie attributes ------------------------------------------------------------------


@pytest.fixture
async def host_stack(make_stack: StackFactory) -> Stack:
    stack: Stack = await make_stack(session={"cookie_name": HOST_COOKIE, "cookie_secure": True})
    return stack


@pytest.fixture
async def sbrowser(host_stack: Stack) -> AsyncIterator[aiohttp.ClientSession]:
    async with secure_browser(host_stack) as http:
        yield http


async def test_login_state_cookie_attributes(host_stack: Stack) -> None:
    async with (
        aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http,
        http.get(host_stack.url + "/oauth2/start?rd=/x", allow_redirects=False) as resp,
    ):
        assert resp.status == 302
        cookies = set_cookies(resp)
    login_cookies = [c for c in cookies if c[0].startswith(HOST_COOKIE + "-login-")]
    assert len(login_cookies) == 1, cookies
    name, value, attrs = login_cookies[0]
    assert value
    assert_host_cookie(name, attrs)
    max_age = int(attrs["max-age"])
    assert 0 < max_age <= 600


async def test_session_cookie_attributes(
    host_stack: Stack, sbrowser: aiohttp.ClientSession
) -> None:
    # Drive the login by hand up to the callback so its Set-Cookie lines can be read.
    result = await http_login(
        sbrowser, host_stack.url + "/", "bob", "bob", stop_at=host_stack.url + "/oauth2/callback"
    )
    assert result.status == 302 and result.location is not None
    async with sbrowser.get(result.location, allow_redirects=False) as resp:
        assert resp.status == 302
        assert resp.headers["Location"] == "/"
        cookies = set_cookies(resp)
    by_name = {name: (value, attrs) for name, value, attrs in cookies}
    value, attrs = by_name[HOST_COOKIE]
    assert value
    assert_host_cookie(HOST_COOKIE, attrs)
    # The used login-state cookie is cleared with the same attributes (else a browser
    # would refuse the deletion of a __Host- cookie).
    cleared = [(n, a) for n, v, a in cookies if n.startswith(HOST_COOKIE + "-login-")]
    assert cleared, cookies
    for name, attrs in cleared:
        assert_host_cookie(name, attrs)
        assert attrs.get("max-age") == "0"
    # And the session it names works.
    async with sbrowser.get(host_stack.url + "/x", headers=API) as resp:
        assert resp.status == 200


async def test_sign_out_cookies_keep_host_attributes(
    host_stack: Stack, sbrowser: aiohttp.ClientSession
) -> None:
    await login(sbrowser, host_stack)
    csrf, rd = await sign_out_form(sbrowser, host_stack)
    async with sbrowser.post(
        host_stack.url + "/oauth2/sign_out",
        data={"csrf": csrf, "rd": rd},
        headers={"Origin": host_stack.url, "Sec-Fetch-Site": "same-origin"},
        allow_redirects=False,
    ) as resp:
        assert resp.status == 303
        for name, _, attrs in set_cookies(resp):
            assert_host_cookie(name, attrs)


async def test_parallel_logins_keep_few_login_cookies(
    host_stack: Stack, sbrowser: aiohttp.ClientSession
) -> None:
    url = host_stack.url + "/oauth2/start?rd=/burst"

    async def start() -> int:
        async with sbrowser.get(url, allow_redirects=False) as resp:
            await resp.read()
            return resp.status

    statuses = await asyncio.gather(*(start() for _ in range(30)))
    assert statuses == [302] * 30
    prefix = HOST_COOKIE + "-login-"
    alive = [n for n in jar_cookies(sbrowser, host_stack) if n.startswith(prefix)]
    assert 1 <= len(alive) <= host_stack.settings.session.max_login_flows, alive

    # A login started after the burst completes: its cookie survives, and the Cookie
    # header the callback carries stays small enough for any server.
    result = await http_login(sbrowser, host_stack.url + "/after-burst?q=1", "bob", "bob")
    assert result.status == 200, result.body
    assert result.url == host_stack.url + "/after-burst?q=1"
    alive = [n for n in jar_cookies(sbrowser, host_stack) if n.startswith(prefix)]
    assert len(alive) <= host_stack.settings.session.max_login_flows


async def test_sequential_logins_keep_few_login_cookies(
    host_stack: Stack, sbrowser: aiohttp.ClientSession
) -> None:
    for _ in range(12):
        async with sbrowser.get(host_stack.url + "/oauth2/start", allow_redirects=False) as resp:
            assert resp.status == 302
    prefix = HOST_COOKIE + "-login-"
    alive = [n for n in jar_cookies(sbrowser, host_stack) if n.startswith(prefix)]
    assert 1 <= len(alive) <= host_stack.settings.session.max_login_flows, alive


async def test_two_tabs_logging_in_at_once_both_finish(
    host_stack: Stack, sbrowser: aiohttp.ClientSession
) -> None:
    """Two flows in flight in one browser: each callback finds its own state cookie."""
    cb = host_stack.url + "/oauth2/callback"
    first = await http_login(sbrowser, host_stack.url + "/one", "bob", "bob", stop_at=cb)
    second = await http_login(sbrowser, host_stack.url + "/two", "bob", "bob", stop_at=cb)
    assert first.location and second.location
    for callback, landing in ((first.location, "/one"), (second.location, "/two")):
        async with sbrowser.get(callback, allow_redirects=False) as resp:
            assert resp.status == 302, await resp.text()
            assert resp.headers["Location"] == landing


# -- 13: bad cookies ------------------------------------------------------------------------


def flip(value: str, index: int) -> str:
    """``value`` with one base64url character changed (one flipped bit of the sealed bytes)."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    c = value[index]
    return value[:index] + alphabet[(alphabet.index(c) ^ 1)] + value[index + 1 :]


def foreign_cookie(value_len_hint: int) -> str:
    """A well-formed ticket sealed under another deployment's cookie secret."""
    other = KeyRing([decode_secret(new_secret())])
    cookie = Ticket.new().to_cookie(other)
    assert abs(len(cookie) - value_len_hint) < 8
    return cookie


async def assert_no_session(stack: Stack, cookie_header: str) -> None:
    """Navigation → 302 to login, API → 401: never a 500, never a session."""
    assert await status_with_cookie(stack, "/deep?x=1", cookie_header, NAV) == 302
    assert await status_with_cookie(stack, "/deep?x=1", cookie_header, API) == 401
    assert await status_with_cookie(stack, "/oauth2/userinfo", cookie_header, API) == 401


async def test_bad_session_cookies_are_no_session(
    stack: Stack, browser: aiohttp.ClientSession
) -> None:
    good = await login(browser, stack)
    name = stack.settings.session.cookie_name
    assert await session_works(stack, good)
    variants = {
        "flipped first": flip(good, 0),
        "flipped middle": flip(good, len(good) // 2),
        # The last character may hold only padding bits that base64 ignores; the one
        # before it lies wholly in the authentication tag.
        "flipped in tag": flip(good, len(good) - 2),
        "truncated": good[:-4],
        "extended": good + "AAAA",
        "other deployment": foreign_cookie(len(good)),
        "garbage": "not-a-cookie-at-all!!",
        "non-base64": "@@@@" * 20,
        "padding": good + "==",
        "standard b64": base64.b64encode(b"\xff" * 60).decode(),
        "empty": "",
        "quoted garbage": '"AAAA"',
        "long but under limits": "A" * 4000,
        "json": json.dumps({"sub": "alice"}),
    }
    for label, value in variants.items():
        try:
            await assert_no_session(stack, f"{name}={value}")
        except AssertionError as exc:
            raise AssertionError(f"{label}: {exc}") from None
    # The good cookie still works: nothing above damaged the session.
    assert await session_works(stack, good)


async def test_login_cookie_cannot_be_used_as_session(
    stack: Stack, browser: aiohttp.ClientSession
) -> None:
    """A login-state cookie is sealed for another purpose: as the session cookie it is nothing."""
    async with browser.get(stack.url + "/oauth2/start", allow_redirects=False) as resp:
        (_, value, _), *_ = [c for c in set_cookies(resp) if "-login-" in c[0]]
    sealed = value.split(".", 1)[1]
    await assert_no_session(stack, f"{stack.settings.session.cookie_name}={sealed}")


async def test_many_cookies_are_no_session(stack: Stack) -> None:
    name = stack.settings.session.cookie_name
    many = "; ".join(f"c{i}=v{i}" for i in range(200))
    await assert_no_session(stack, many)
    # 200 cookies of the gateway's own names: duplicates of the session cookie and
    # login-state look-alikes (what the start handler inspects).
    dupes = "; ".join(f"{name}=junk{i}" for i in range(100))
    await assert_no_session(stack, dupes)
    lookalikes = "; ".join(f"{name}-login-{i:04d}={i}.junk" for i in range(200))
    await assert_no_session(stack, lookalikes)
    assert await status_with_cookie(stack, "/oauth2/start", lookalikes, NAV) == 302
    assert await status_with_cookie(stack, "/oauth2/sign_out", lookalikes, NAV) == 200


async def test_oversized_cookie_is_refused_and_server_keeps_serving(
    stack: Stack, browser: aiohttp.ClientSession
) -> None:
    good = await login(browser, stack)
    name = stack.settings.session.cookie_name
    # 64 KB is past aiohttp's header limit (server.max_header_size): the HTTP parser
    # refuses it itself with 400, never a 500.
    for cookie in (f"{name}={'A' * 65536}", f"{name}={good}; big={'B' * 65536}"):
        for headers in (NAV, API):
            status = await status_with_cookie(stack, "/deep", cookie, headers)
            assert status == 400, status
    # Under the parser's limit but far over any sealed value: no session, decided fast.
    await assert_no_session(stack, f"{name}={'A' * 12000}")
    assert await session_works(stack, good)
    async with browser.get(stack.url + "/healthz") as resp:
        assert resp.status == 200


async def test_bad_cookie_with_dead_record_is_cleared_not_500(
    stack: Stack, browser: aiohttp.ClientSession, redis_server: Any
) -> None:
    """A cookie whose session was deleted server-side (or whose record is garbage)."""
    good = await login(browser, stack)
    name = stack.settings.session.cookie_name
    import redis.asyncio as aredis

    client = aredis.Redis.from_url(redis_server.url)
    try:
        prefix = stack.settings.session.key_prefix
        keys = await client.keys(prefix + "s:*")
        assert len(keys) == 1
        for key in keys:
            await client.set(key, b"\x00garbage")
        await assert_no_session(stack, f"{name}={good}")
        for key in keys:
            await client.delete(key)
        await assert_no_session(stack, f"{name}={good}")
    finally:
        await client.aclose()


# -- 14: sign-out CSRF ----------------------------------------------------------------------


async def sign_out_form(http: aiohttp.ClientSession, stack: Stack) -> tuple[str, str]:
    """The confirmation page's CSRF token and rd, as a person's browser would see them."""
    async with http.get(stack.url + "/oauth2/sign_out") as resp:
        assert resp.status == 200
        body = await resp.text()
    parser = FormParser()
    parser.feed(body)
    forms = [f for f in parser.forms if f.method == "post"]
    assert len(forms) == 1, body
    fields = {name: value for _, name, value in forms[0].fields}
    return fields["csrf"], fields.get("rd", "")


async def post_sign_out(
    stack: Stack, cookie: str, data: dict[str, str], headers: dict[str, str]
) -> aiohttp.ClientResponse:
    name = stack.settings.session.cookie_name
    async with (
        aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http,
        http.post(
            stack.url + "/oauth2/sign_out",
            data=data,
            headers={"Cookie": f"{name}={cookie}", **headers},
            allow_redirects=False,
        ) as resp,
    ):
        await resp.read()
        return resp


async def test_cross_site_get_does_not_sign_out(
    stack: Stack, browser: aiohttp.ClientSession
) -> None:
    good = await login(browser, stack)
    cross = {"Sec-Fetch-Site": "cross-site", "Referer": "http://evil.example/"}
    for query in ("", "?rd=/", "?rd=http://evil.example/", "?csrf=x&confirm=1"):
        async with browser.get(
            stack.url + "/oauth2/sign_out" + query, headers=cross, allow_redirects=False
        ) as resp:
            assert resp.status == 200
            # The confirmation page never clears the session cookie.
            assert not any(n == stack.settings.session.cookie_name for n, _, _ in set_cookies(resp))
        assert await session_works(stack, good)
    async with browser.head(stack.url + "/oauth2/sign_out", allow_redirects=False) as resp:
        assert resp.status == 200
    assert await session_works(stack, good)


async def test_sign_out_post_needs_csrf_and_same_origin(
    stack: Stack, browser: aiohttp.ClientSession
) -> None:
    good = await login(browser, stack)
    csrf, _ = await sign_out_form(browser, stack)
    same = {"Origin": stack.url, "Sec-Fetch-Site": "same-origin"}
    refused: list[tuple[str, dict[str, str], dict[str, str]]] = [
        ("no token", {}, same),
        ("empty token", {"csrf": ""}, same),
        ("wrong token", {"csrf": "A" * len(csrf)}, same),
        ("token of another length", {"csrf": csrf + "x"}, same),
        ("evil origin", {"csrf": csrf}, {"Origin": "http://evil.example"}),
        ("null origin", {"csrf": csrf}, {"Origin": "null"}),
        ("cross-site fetch", {"csrf": csrf}, {"Sec-Fetch-Site": "cross-site"}),
        ("same-site fetch", {"csrf": csrf}, {"Sec-Fetch-Site": "same-site"}),
        (
            "evil origin, forged same-origin fetch",
            {"csrf": csrf},
            {"Origin": "http://evil.example", "Sec-Fetch-Site": "same-origin"},
        ),
    ]
    for label, data, headers in refused:
        resp = await post_sign_out(stack, good, data, headers)
        assert resp.status == 403, (label, resp.status)
        assert await session_works(stack, good), label
    # Another session's token does not fit this one.
    async with aiohttp.ClientSession(
        cookie_jar=aiohttp.CookieJar(unsafe=True), headers=NAV
    ) as other:
        await login(other, stack, "alice")
        other_csrf, _ = await sign_out_form(other, stack)
    assert other_csrf != csrf
    resp = await post_sign_out(stack, good, {"csrf": other_csrf}, same)
    assert resp.status == 403
    assert await session_works(stack, good)


async def test_real_sign_out_form_works(stack: Stack, browser: aiohttp.ClientSession) -> None:
    good = await login(browser, stack)
    csrf, rd = await sign_out_form(browser, stack)
    async with browser.post(
        stack.url + "/oauth2/sign_out",
        data={"csrf": csrf, "rd": rd},
        headers={"Origin": stack.url, "Sec-Fetch-Site": "same-origin"},
        allow_redirects=False,
    ) as resp:
        assert resp.status == 303
        assert resp.headers["Location"]
        cleared = {n: a for n, v, a in set_cookies(resp) if v in ("", '""')}
        assert stack.settings.session.cookie_name in cleared
    assert not await session_works(stack, good)


async def test_sign_out_without_origin_headers_still_needs_token(
    stack: Stack, browser: aiohttp.ClientSession
) -> None:
    """Old browsers send neither Origin nor Sec-Fetch-Site: the token alone decides."""
    good = await login(browser, stack)
    csrf, _ = await sign_out_form(browser, stack)
    resp = await post_sign_out(stack, good, {}, {})
    assert resp.status == 403
    assert await session_works(stack, good)
    resp = await post_sign_out(stack, good, {"csrf": csrf}, {})
    assert resp.status == 303
    assert not await session_works(stack, good)


async def test_sign_out_confirmation_page_escapes_and_filters_rd(
    stack: Stack, browser: aiohttp.ClientSession
) -> None:
    await login(browser, stack)
    for rd in ('/"><script>alert(1)</script>', "//evil.example", "http://evil.example/"):
        async with browser.get(stack.url + "/oauth2/sign_out", params={"rd": rd}) as resp:
            assert resp.status == 200
            body = await resp.text()
        assert "<script>alert" not in body
        assert "evil.example" not in body
    csrf_in_body = re.findall(r'name="csrf" value="([^"]+)"', body)
    assert len(csrf_in_body) == 1


async def test_session_value_is_what_aiohttp_reads_and_is_remembered_per_header(
    aiohttp_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``CookiePolicy.session_value`` answers what ``request.cookies`` would, for any Cookie
    header, and parses each distinct header once."""
    from aiohttp import web, web_request

    from gateway.cookies import CookiePolicy

    policy = CookiePolicy("gw", True, "Lax")
    parsed = record_first_args(monkeypatch, web_request, "parse_cookie_header")

    async def handler(request: web.Request) -> web.Response:
        value = policy.session_value(request)
        theirs = request.cookies.get("gw") if "compare" in request.query else None
        return web.json_response({"ours": value, "aiohttp": theirs})

    app = web.Application()
    app.router.add_get("/", handler)
    client = await aiohttp_client(app)
    headers = [
        "gw=abc",
        "a=1; gw=first; b=2; gw=second",  # duplicates: aiohttp's dict keeps the last
        'gw="quoted value"; x=y',
        "GW=upper; gw_x=prefix",
        "x=1",
        "gw=; y=2",
        "=gw; gw",
    ]
    first: dict[str, Any] = {}
    for header in headers:
        async with client.get("/?compare", headers={"Cookie": header}) as resp:
            body = await resp.json()
        assert body["ours"] == body["aiohttp"], header
        first[header] = body["ours"]
    assert parsed == headers  # one parse per request, shared by both reads
    for header in headers:  # again: from memory, no parse at all
        async with client.get("/", headers={"Cookie": header}) as resp:
            assert (await resp.json())["ours"] == first[header]
    assert parsed == headers
    long_header = "gw=v; pad=" + "p" * 5000  # too long to remember: parsed every time
    for _ in range(2):
        async with client.get("/", headers={"Cookie": long_header}) as resp:
            assert (await resp.json())["ours"] == "v"
    assert parsed.count(long_header) == 2

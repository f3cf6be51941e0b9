"""``/oauth2/auth`` over HTTP: the forward-auth answer a proxy asks for (nginx ``auth_request``,
Traefik ForwardAuth, Envoy ``ext_authz``).

The test client plays the proxy. It connects from 127.0.0.1, which is a trusted proxy in the
stacks made with ``TRUSTED`` and an ordinary client otherwise (SECURITY.md 16).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from multidict import CIMultiDictProxy

from gateway import keys
from gateway.echo import RunningEcho, start_echo
from tests.conftest import CLIENT_ID, RedisServer, Stack
from tests.idp_client import http_login

TRUSTED = {"server": {"trusted_proxies": ["127.0.0.1/32"]}}
NAVIGATE = {"Accept": "text/html", "Sec-Fetch-Mode": "navigate"}
API = {"Accept": "application/json", "Sec-Fetch-Mode": "cors"}

StackMaker = Any


async def check(
    http: aiohttp.ClientSession,
    stack: Stack,
    uri: str | None = None,
    *,
    path: str = "/oauth2/auth",
    method: str = "GET",
    headers: dict[str, str] | None = None,
) -> tuple[int, CIMultiDictProxy[str]]:
    """Ask the gateway about ``uri`` the way a proxy does; (status, response headers)."""
    sent = dict(API)
    if uri is not None:
        sent["X-Forwarded-Uri"] = uri
        sent["X-Forwarded-Method"] = method
    sent.update(headers or {})
    async with http.get(stack.url + path, headers=sent, allow_redirects=False) as resp:
        await resp.read()
        return resp.status, resp.headers


async def signed_in(stack: Stack, browser: aiohttp.ClientSession, user: str) -> None:
    result = await http_login(browser, stack.url + "/", user, user)
    assert result.status == 200, result.body


async def test_trusted_proxy_names_the_route(
    make_stack: StackMaker, browser: aiohttp.ClientSession
) -> None:
    stack = await make_stack(**TRUSTED)
    await signed_in(stack, browser, "bob")
    status, headers = await check(browser, stack, "/admin/panel?x=1")
    assert status == 403
    assert "X-Forwarded-User" not in headers and "Authorization" not in headers
    status, headers = await check(browser, stack, "/reports")
    assert status == 200
    assert headers["X-Forwarded-User"] == "bob"
    assert headers["X-Forwarded-Email"] == "bob@example.org"
    assert headers["X-Forwarded-Groups"] == "staff"
    assert headers["X-Forwarded-Preferred-Username"] == "bob"
    assert headers["X-Auth-Request-User"] == "bob"
    assert headers["X-Auth-Request-Email"] == "bob@example.org"
    assert headers["Cache-Control"].startswith("no-store")
    token = headers["Authorization"].removeprefix("Bearer ")
    assert stack.idp.state.active_access_token(token) is not None
    # nginx's own header name works the same; so does Envoy's path_prefix form.
    assert (await check(browser, stack, headers={"X-Original-URI": "/admin"}))[0] == 403
    assert (await check(browser, stack, path="/oauth2/auth/admin/x?y=1"))[0] == 403
    assert (await check(browser, stack, path="/oauth2/auth/reports"))[0] == 200


async def test_untrusted_callers_cannot_name_the_route(
    make_stack: StackMaker, browser: aiohttp.ClientSession
) -> None:
    stack = await make_stack()  # no trusted_proxies: the test client is just a client
    await signed_in(stack, browser, "bob")
    for kwargs in (
        {"uri": "/admin"},
        {"headers": {"X-Original-URI": "/admin"}},
        {"path": "/oauth2/auth/admin"},
    ):
        status, headers = await check(browser, stack, **kwargs)
        assert status == 200, kwargs  # the decision for "/", where bob may go
        assert headers["X-Forwarded-User"] == "bob"
        # Only a trusted proxy is handed the access token (SECURITY.md 11).
        assert "Authorization" not in headers


async def test_no_session_is_401_naming_the_sign_in_for_navigations(
    make_stack: StackMaker, api: aiohttp.ClientSession
) -> None:
    stack = await make_stack(**TRUSTED)
    status, headers = await check(api, stack, "/some/page?a=1&b=x%26y", headers=NAVIGATE)
    assert status == 401
    assert headers["WWW-Authenticate"] == 'Bearer realm="gateway"'
    rd = "/some/page?a=1&b=x%26y"
    assert headers["X-Gateway-Login"] == stack.url + "/oauth2/start?rd=" + quote(rd, safe="/")
    # The sign-in it names accepts that rd and leads to the provider.
    async with api.get(headers["X-Gateway-Login"], allow_redirects=False) as resp:
        assert resp.status == 302
        assert resp.headers["Location"].startswith(stack.idp.url)
    # API calls, POSTs and deny routes get a plain 401.
    for uri, method, sent in (
        ("/some/page", "GET", API),
        ("/some/page", "POST", NAVIGATE),
        ("/api/items", "GET", NAVIGATE),
    ):
        status, headers = await check(api, stack, uri, method=method, headers=sent)
        assert status == 401, (uri, method)
        assert "X-Gateway-Login" not in headers, (uri, method)


async def test_login_redirect_mode_for_traefik(
    make_stack: StackMaker, api: aiohttp.ClientSession
) -> None:
    stack = await make_stack(**TRUSTED)
    status, headers = await check(api, stack, "/deep/link", path="/oauth2/auth?login=redirect",
                                  headers=NAVIGATE)  # fmt: skip
    assert status == 302
    assert headers["Location"] == stack.url + "/oauth2/start?rd=/deep/link"
    assert headers["Cache-Control"].startswith("no-store")
    status, _ = await check(api, stack, "/deep/link", path="/oauth2/auth?login=redirect")
    assert status == 401


async def test_public_route_is_200_without_identity(
    make_stack: StackMaker, browser: aiohttp.ClientSession, api: aiohttp.ClientSession
) -> None:
    stack = await make_stack(**TRUSTED)
    status, headers = await check(api, stack, "/public/page")
    assert status == 200
    assert "X-Forwarded-User" not in headers
    await signed_in(stack, browser, "alice")
    status, headers = await check(browser, stack, "/public/page")
    assert status == 200
    assert "X-Forwarded-User" not in headers and "Authorization" not in headers


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("/public/../admin", 403),
        ("//admin", 403),
        ("/public/./../admin/", 403),
        ("/public?x=/admin", 200),
        ("/public#/../admin", 200),
        ("/admin;x", 400),
        ("/public%2F..%2Fadmin", 400),
        ("/public/%2e%2e/admin", 403),
        ("/%5Cadmin", 400),
        ("http://evil.example/admin", 403),
        ("https://evil.example/public", 200),
        ("not-a-path", 400),
        ("/" + "a" * 9000, 400),
        ("/%ff", 400),
        ("/%zz", 400),
    ],
)
async def test_the_original_uri_is_normalized_like_the_gate(
    make_stack: StackMaker, browser: aiohttp.ClientSession, uri: str, expected: int
) -> None:
    stack = await make_stack(**TRUSTED)
    await signed_in(stack, browser, "bob")
    status, _ = await check(browser, stack, uri)
    assert status == expected, uri


@pytest.fixture
async def echo() -> AsyncIterator[RunningEcho]:
    running = await start_echo()
    yield running
    await running.close()


def routes(echo: RunningEcho, *extra: dict[str, Any]) -> list[dict[str, Any]]:
    up = str(echo.url)
    return [
        {"prefix": "/", "upstream": up},
        {"prefix": "/api", "upstream": up, "on_unauthenticated": "deny", "accept_bearer": True},
        *({"upstream": up, **route} for route in extra),
    ]


async def test_pass_access_token_off_sends_no_token(
    make_stack: StackMaker, browser: aiohttp.ClientSession, echo: RunningEcho
) -> None:
    quiet = {"prefix": "/quiet", "pass_access_token": False,
             "identity_headers": {"X-User": "sub", "X-Name": "name"}}  # fmt: skip
    stack = await make_stack(echo=echo, routes=routes(echo, quiet), **TRUSTED)
    await signed_in(stack, browser, "alice")
    status, headers = await check(browser, stack, "/quiet/x")
    assert status == 200
    assert "Authorization" not in headers
    assert headers["X-User"] == "alice" and headers["X-Name"] == "Alice Liddell"
    assert "X-Forwarded-User" not in headers  # the route's own header names only
    assert headers["X-Auth-Request-User"] == "alice"


async def test_expiring_session_is_refreshed(
    make_stack: StackMaker, browser: aiohttp.ClientSession
) -> None:
    stack = await make_stack(**TRUSTED)
    await signed_in(stack, browser, "alice")
    _, before = await check(browser, stack, "/x")
    sessions = stack.app[keys.SESSIONS]
    sessions.clock = lambda: time.time() + 400  # past the 300 s access token, minus skew
    status, after = await check(browser, stack, "/x")
    assert status == 200
    assert stack.idp.state.token_calls["refresh_token"] == 1
    assert after["Authorization"] != before["Authorization"]
    assert stack.idp.state.active_access_token(after["Authorization"][7:]) is not None
    # Stored: the next check uses the refreshed token without asking the provider again.
    status, again = await check(browser, stack, "/x")
    assert status == 200 and again["Authorization"] == after["Authorization"]
    assert stack.idp.state.token_calls["refresh_token"] == 1


async def test_refused_refresh_is_401_and_clears_the_cookie(
    make_stack: StackMaker, browser: aiohttp.ClientSession, redis_server: RedisServer
) -> None:
    stack = await make_stack(**TRUSTED)
    await signed_in(stack, browser, "alice")
    stack.idp.state.faults.token_error = "invalid_grant"
    stack.idp.state.faults.token_error_grant = "refresh_token"
    stack.app[keys.SESSIONS].clock = lambda: time.time() + 400
    async with browser.get(
        stack.url + "/oauth2/auth", headers={"X-Forwarded-Uri": "/x", **NAVIGATE},
        allow_redirects=False,
    ) as resp:  # fmt: skip
        assert resp.status == 401
        assert resp.headers["X-Gateway-Login"].startswith(stack.url + "/oauth2/start?rd=/x")
        cleared = resp.cookies[stack.settings.session.cookie_name]
        assert cleared.value == ""
        assert cleared["max-age"] == "0"
    assert redis_server.keys(stack.settings.session.key_prefix + "s:*") == []


async def test_bearer_clients_at_the_check(
    make_stack: StackMaker, api: aiohttp.ClientSession, echo: RunningEcho
) -> None:
    stack = await make_stack(echo=echo, routes=routes(echo), **TRUSTED)
    token = stack.idp.state.issue_access_token("bob", CLIENT_ID, "openid", 300)
    bearer = {"Authorization": f"Bearer {token}"}
    status, headers = await check(api, stack, "/api/items", headers=bearer)
    assert status == 200
    assert headers["X-Forwarded-User"] == "bob"
    assert headers["Authorization"] == f"Bearer {token}"
    # Not on a route without accept_bearer; and a bad token is invalid_token.
    assert (await check(api, stack, "/other", headers=bearer))[0] == 401
    status, headers = await check(api, stack, "/api/x", headers={"Authorization": "Bearer a.b.c"})
    assert status == 401
    assert headers["WWW-Authenticate"] == 'Bearer realm="gateway", error="invalid_token"'


async def test_hostile_inputs_are_never_500(
    make_stack: StackMaker, api: aiohttp.ClientSession
) -> None:
    stack = await make_stack(**TRUSTED)
    cookie = {"Cookie": f"{stack.settings.session.cookie_name}=" + "A" * 4000}
    # Unauthenticated, each asks about a protected route (or a path the gateway refuses to
    # judge): exactly one answer each, never the 200 of an auth bypass.
    for headers, expected in (
        ({"X-Forwarded-Uri": ""}, 401),  # empty: not named, so "/" decides
        ({"X-Forwarded-Uri": "   "}, 401),  # a header value is trimmed: empty again
        ({"X-Forwarded-Uri": "/x", "X-Forwarded-Method": "G E T"}, 401),
        ({"X-Forwarded-Uri": "/x", "X-Forwarded-Method": "x" * 500}, 401),
        ({"X-Forwarded-Uri": "http://"}, 401),
        ({"X-Forwarded-Uri": "/x", **cookie}, 401),
        ({"X-Forwarded-Uri": "/x", "Authorization": "Bearer"}, 401),
        ({"X-Forwarded-Uri": "/%C0%AF"}, 400),
        ({"X-Forwarded-Uri": "/admin."}, 400),
        ({"X-Forwarded-Uri": "/admin%E2%80%8B"}, 400),
        ({"X-Forwarded-Uri": "/public/../admin"}, 401),
    ):
        async with api.get(stack.url + "/oauth2/auth", headers=headers) as resp:
            assert resp.status == expected, (headers, resp.status)
            assert "X-Auth-Request-User" not in resp.headers
    async with api.post(stack.url + "/oauth2/auth", data=b"x" * 1000) as resp:
        assert resp.status == 401


def test_traefik_recipe_matches_the_gateway() -> None:
    """deploy/traefik/dynamic.yml: valid YAML naming every header the gateway answers with."""
    from pathlib import Path

    import yaml

    from gateway.config import DEFAULT_IDENTITY_HEADERS

    recipe = Path(__file__).resolve().parents[1] / "deploy" / "traefik" / "dynamic.yml"
    http = yaml.safe_load(recipe.read_text())["http"]
    auth = http["middlewares"]["gateway-auth"]["forwardAuth"]
    assert auth["address"].endswith("/oauth2/auth?login=redirect")
    assert auth["trustForwardHeader"] is False
    assert "authRequestHeaders" not in auth
    assert set(DEFAULT_IDENTITY_HEADERS) | {"Authorization"} <= set(auth["authResponseHeaders"])
    assert http["routers"]["app"]["middlewares"][-1] == "gateway-auth"
    # Every other name the gateway emits or trusts from a proxy is deleted from the client's
    # request before it reaches the app (issue 7 item 6).
    from gateway.gate import EMITTED_ELSEWHERE

    strip = http["middlewares"]["gateway-strip"]["headers"]["customRequestHeaders"]
    assert http["routers"]["app"]["middlewares"][0] == "gateway-strip"
    deleted = {name.lower() for name, value in strip.items() if value == ""}
    for name in EMITTED_ELSEWHERE:
        assert name.lower() in deleted, name
    assert "!PathPrefix(`/oauth2/auth`)" in http["routers"]["gateway"]["rule"]
    stripped = http["middlewares"]["gateway-strip"]["headers"]["customRequestHeaders"]
    for name in DEFAULT_IDENTITY_HEADERS:
        assert stripped[name.replace("-", "_")] == ""


async def test_assertion_goes_to_trusted_proxies_only(
    make_stack: StackMaker, browser: aiohttp.ClientSession, echo: RunningEcho
) -> None:
    import jwt

    signed = {"prefix": "/signed", "assertion": True}
    stack = await make_stack(echo=echo, routes=routes(echo, signed), **TRUSTED)
    await signed_in(stack, browser, "alice")
    status, headers = await check(browser, stack, "/signed/x")
    assert status == 200
    async with browser.get(stack.url + "/.well-known/jwks.json") as resp:
        jwks = jwt.PyJWKSet.from_dict(await resp.json())
    token = headers["X-Gateway-Assertion"]
    key = jwks[jwt.get_unverified_header(token)["kid"]]
    claims = jwt.decode(token, key, algorithms=["ES256"], options={"verify_aud": False})
    assert claims["sub"] == "alice"
    assert "X-Gateway-Assertion" not in (await check(browser, stack, "/x"))[1]

    # An untrusted caller is judged for "/", here a route with assertion, and gets none.
    everywhere = [{"prefix": "/", "upstream": str(echo.url), "assertion": True}]
    untrusted = await make_stack(echo=echo, routes=everywhere)
    await signed_in(untrusted, browser, "alice")
    status, headers = await check(browser, untrusted, "/x")
    assert status == 200 and headers["X-Forwarded-User"] == "alice"
    assert "X-Gateway-Assertion" not in headers and "Authorization" not in headers


async def test_claims_use_the_one_header_encoding(
    make_stack: StackMaker, browser: aiohttp.ClientSession
) -> None:
    """Issue 7 items 7 and 8: X-Auth-Request-* carry claims encoded as the identity headers
    upstream do (docs/security.md): controls percent-encoded, a "," inside an item too."""
    from dataclasses import replace

    stack = await make_stack(**TRUSTED)
    users = stack.idp.state.users
    users["bob"] = replace(
        users["bob"], preferred_username="b\x00o\tb", groups=("staff,admins", "staff")
    )
    await signed_in(stack, browser, "bob")
    status, headers = await check(browser, stack, "/reports")
    assert status == 200
    for name in ("X-Auth-Request-Groups", "X-Forwarded-Groups"):
        assert headers.getall(name) == ["staff%2Cadmins,staff"], name
    for name in ("X-Auth-Request-Preferred-Username", "X-Forwarded-Preferred-Username"):
        assert headers.getall(name) == ["b%00o%09b"], name
    assert (await check(browser, stack, "/admin"))[0] == 403

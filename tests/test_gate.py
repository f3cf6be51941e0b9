"""The gate over real HTTP: what crosses to the upstream and how it is decided.

SECURITY.md 15 (identity headers in every spelling), 16 (X-Forwarded-* only from trusted
proxies), 17 (one normalized path), 18 (only configured upstreams), plus the CONTRACT's
unauthenticated classification and upstream failures. Requests whose exact bytes matter
go over a raw socket; the echo upstream's JSON says what arrived.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from tests.conftest import Stack, StackFactory
from tests.idp_client import http_login
from tests.support.ports import free_port
from tests.support.raw import raw_get, raw_request
from tests.support.spy import record_first_args

NAV = {"Accept": "text/html", "Sec-Fetch-Mode": "navigate"}
API = {"Accept": "application/json"}
IDENTITY = ("x-forwarded-user", "x-forwarded-email", "x-forwarded-groups")


# -- helpers ----------------------------------------------------------------------------------


def host_of(stack: Stack) -> str:
    return URL(stack.url).raw_authority


async def login(http: aiohttp.ClientSession, stack: Stack, user: str = "bob") -> str:
    result = await http_login(http, stack.url + "/", user, user)
    assert result.status == 200, result.body
    cookies = http.cookie_jar.filter_cookies(URL(stack.url))
    return cookies[stack.settings.session.cookie_name].value


def session_header(stack: Stack, cookie: str) -> tuple[str, str]:
    return ("Cookie", f"{stack.settings.session.cookie_name}={cookie}")


def seen_headers(echo: dict[str, Any]) -> list[tuple[str, str]]:
    return [(k.lower(), v) for k, v in echo["headers"]]


def values(echo: dict[str, Any], name: str) -> list[str]:
    """Every value of ``name`` the upstream received, in any spelling ('_' read as '-')."""
    norm = name.lower().replace("_", "-")
    return [v for k, v in seen_headers(echo) if k.replace("_", "-") == norm]


async def fetch_json(
    http: aiohttp.ClientSession, url: str | URL, headers: Any = None
) -> tuple[int, Any]:
    async with http.get(url, headers=headers or API, allow_redirects=False) as resp:
        body = await resp.text()
        return resp.status, (json.loads(body) if body.startswith("{") else body)


@pytest.fixture
async def bob(stack: Stack, browser: aiohttp.ClientSession) -> str:
    return await login(browser, stack, "bob")


# -- 15: identity headers ---------------------------------------------------------------------

SPOOF: list[tuple[str, str]] = [
    ("X-Forwarded-User", "mallory"),
    ("x-forwarded-user", "mallory2"),
    ("X-FORWARDED-USER", "mallory3"),
    ("X-Forwarded-User", "mallory4"),  # a duplicate of the first spelling
    ("X_Forwarded_User", "mallory5"),
    ("x_forwarded_user", "mallory6"),
    ("X-Forwarded-Email", "mallory@evil.example"),
    ("X_Forwarded_Email", "mallory@evil.example"),
    ("X-Forwarded-Groups", "admins"),
    ("X_FORWARDED_GROUPS", "admins"),
    ("X-Forwarded-Preferred-Username", "mallory"),
    ("X-Gateway-Assertion", "forged.jwt.value"),
    ("X_Gateway_Assertion", "forged.jwt.value"),
    ("X-Forwarded-Access-Token", "forged-token"),
    ("Authorization", "Bearer client-chosen-token"),
    ("Connection", "X-Forwarded-User, X-Hop-Custom"),
    ("X-Hop-Custom", "hop"),
    ("X-Kept", "yes"),
]


def assert_no_spoof(echo: dict[str, Any]) -> None:
    blob = json.dumps(echo["headers"])
    for word in ("mallory", "forged", "client-chosen", "hop"):
        assert word not in blob, (word, echo["headers"])
    assert values(echo, "x-kept") == ["yes"]
    assert values(echo, "x-gateway-assertion") == []
    assert values(echo, "x-forwarded-access-token") == []


async def test_spoofed_identity_headers_never_reach_protected_upstream(
    stack: Stack, api: aiohttp.ClientSession, bob: str
) -> None:
    headers = [*SPOOF, session_header(stack, bob), ("Accept", "application/json")]
    resp = await raw_request(stack.url, raw_get("/x", host_of(stack), headers))
    assert resp.status == 200, resp.body
    echo = resp.json()
    assert_no_spoof(echo)
    # The gateway's own values arrive, once each.
    assert values(echo, "x-forwarded-user") == ["bob"]
    assert values(echo, "x-forwarded-email") == ["bob@example.org"]
    assert values(echo, "x-forwarded-groups") == ["staff"]
    auth = values(echo, "authorization")
    assert len(auth) == 1 and auth[0].startswith("Bearer ")
    assert auth[0] != "Bearer client-chosen-token"


async def test_spoofed_identity_headers_never_reach_public_upstream(stack: Stack) -> None:
    for with_cookie in (False, True):
        headers = [*SPOOF, ("Accept", "application/json")]
        if with_cookie:
            headers.append(session_header(stack, "not-a-session"))
        resp = await raw_request(stack.url, raw_get("/public/page", host_of(stack), headers))
        assert resp.status == 200, resp.body
        echo = resp.json()
        blob = json.dumps(echo["headers"])
        for word in ("mallory", "forged", "hop"):
            assert word not in blob, (word, echo["headers"])
        for name in IDENTITY:
            assert values(echo, name) == [], name


async def test_public_route_sends_no_identity_even_with_a_session(
    stack: Stack, browser: aiohttp.ClientSession, bob: str
) -> None:
    status, echo = await fetch_json(browser, stack.url + "/public/x")
    assert status == 200
    for name in IDENTITY:
        assert values(echo, name) == []
    assert values(echo, "authorization") == []
    assert "gw_test" not in json.dumps(echo["headers"])


async def test_identity_headers_stripped_through_aiohttp_client_too(
    stack: Stack, browser: aiohttp.ClientSession, bob: str
) -> None:
    """The same, with duplicates sent as a multidict by an ordinary client library."""
    headers = CIMultiDict([*SPOOF, ("Accept", "application/json")])
    status, echo = await fetch_json(browser, stack.url + "/y", headers)
    assert status == 200
    assert_no_spoof(echo)
    assert values(echo, "x-forwarded-user") == ["bob"]


async def test_gateway_cookies_removed_other_cookies_pass(stack: Stack, bob: str) -> None:
    name = stack.settings.session.cookie_name
    cookie = f"theme=dark; {name}={bob}; {name}-login-3=1.abc; lang=en"
    headers = [("Cookie", cookie), ("Cookie", "second=2"), ("Accept", "application/json")]
    for path in ("/x", "/public/x"):
        resp = await raw_request(stack.url, raw_get(path, host_of(stack), headers))
        assert resp.status == 200, resp.body
        sent = values(resp.json(), "cookie")
        assert len(sent) == 1, sent
        pairs = [p.strip() for p in sent[0].split(";")]
        assert pairs == ["theme=dark", "lang=en", "second=2"], pairs
        assert bob not in json.dumps(resp.json())


# -- 16: X-Forwarded-* --------------------------------------------------------------------------

FORWARDED = [
    ("X-Forwarded-For", "203.0.113.66"),
    ("X-Forwarded-Proto", "https"),
    ("X-Forwarded-Host", "evil.example"),
    ("X-Forwarded-Port", "8443"),
    ("X-Forwarded-Prefix", "/admin"),
    ("X-Original-URL", "/admin"),
    ("X-Rewrite-URL", "/admin"),
    ("Forwarded", "for=203.0.113.66;host=evil.example;proto=https"),
    ("X-Real-IP", "203.0.113.66"),
]


async def authorize_redirect_uri(stack: Stack, headers: list[tuple[str, str]], rd: str) -> str:
    resp = await raw_request(
        stack.url,
        raw_get(f"/oauth2/start?rd={rd}", host_of(stack), [*headers, *NAV.items()]),
    )
    assert resp.status == 302, resp.body
    location = resp.headers["Location"]
    assert location.startswith(str(stack.idp.url)), location
    (redirect_uri,) = parse_qs(urlsplit(location).query)["redirect_uri"]
    return redirect_uri


@pytest.mark.parametrize("trusted", [False, True], ids=["untrusted", "trusted"])
async def test_forwarded_headers(make_stack: StackFactory, trusted: bool) -> None:
    server: dict[str, Any] = {"trusted_proxies": ["127.0.0.1/32"]} if trusted else {}
    stack: Stack = await make_stack(server=server)
    host = host_of(stack)
    async with aiohttp.ClientSession(
        cookie_jar=aiohttp.CookieJar(unsafe=True), headers=NAV
    ) as http:
        cookie = await login(http, stack)
    headers = [*FORWARDED, session_header(stack, cookie), ("Accept", "application/json")]
    for path in ("/public/f", "/f"):
        resp = await raw_request(stack.url, raw_get(path, host, headers))
        assert resp.status == 200, resp.body
        echo = resp.json()
        assert echo["path"] == path
        if trusted:
            assert values(echo, "x-forwarded-for") == ["203.0.113.66, 127.0.0.1"]
            assert values(echo, "x-forwarded-proto") == ["https"]
            assert values(echo, "x-forwarded-host") == ["evil.example"]
        else:
            assert values(echo, "x-forwarded-for") == ["127.0.0.1"]
            assert values(echo, "x-forwarded-proto") == ["http"]
            assert values(echo, "x-forwarded-host") == [host]
        for name in ("x-forwarded-port", "x-forwarded-prefix", "x-original-url", "x-rewrite-url",
                     "forwarded", "x-real-ip"):  # fmt: skip
            assert values(echo, name) == [], name

    # Never the route decision: bob is refused /admin whatever the headers say, and an
    # X-Original-URL of /admin on a public path is still the public path.
    resp = await raw_request(stack.url, raw_get("/admin", host, headers))
    assert resp.status == 403
    resp = await raw_request(
        stack.url, raw_get("/public/p", host, [*FORWARDED, ("Accept", "application/json")])
    )
    assert resp.status == 200 and resp.json()["path"] == "/public/p"

    # Never the redirect_uri.
    assert (
        await authorize_redirect_uri(stack, FORWARDED, "/after") == stack.url + "/oauth2/callback"
    )

    # Never the post-login target: an unauthenticated navigation is sent to a relative
    # start URL, and the login lands on a path of our own origin.
    resp = await raw_request(stack.url, raw_get("/deep?x=1", host, [*FORWARDED, *NAV.items()]))
    assert resp.status == 302
    assert resp.headers["Location"].startswith("/oauth2/start?rd=")
    async with aiohttp.ClientSession(
        cookie_jar=aiohttp.CookieJar(unsafe=True), headers={**NAV, **dict(FORWARDED)}
    ) as http:
        cb = stack.url + "/oauth2/callback"
        result = await http_login(http, stack.url + "/deep?x=1", "bob", "bob", stop_at=cb)
        assert result.location is not None
        async with http.get(result.location, allow_redirects=False) as done:
            assert done.status == 302
            assert done.headers["Location"] == "/deep?x=1"


# -- 17: paths -------------------------------------------------------------------------------

# (request target, expected status for bob, path the upstream receives when served)
PATHS: list[tuple[str, int, str | None]] = [
    ("/admin", 403, None),
    ("//admin", 403, None),
    ("///admin//", 403, None),
    ("/public/../admin", 403, None),
    ("/public/./../admin", 403, None),
    ("/public/%2e%2e/admin", 403, None),
    ("/public/.%2E/admin", 403, None),
    ("/./admin", 403, None),
    ("/admin/", 403, None),
    ("/admin/../admin/x", 403, None),
    ("/%61dmin", 403, None),
    ("/public/../../../admin", 403, None),
    ("/admin?x=/public", 403, None),
    ("/public%2F..%2Fadmin", 400, None),
    ("/public%2f..%2fadmin", 400, None),
    ("/public/..%2Fadmin", 400, None),
    ("/public%5C..%5Cadmin", 400, None),
    ("/public\\..\\admin", 400, None),
    ("/admin;x", 400, None),
    ("/public;/../admin", 400, None),
    ("/admin%3Bx", 400, None),
    ("/admin%00", 400, None),
    ("/public%252F..%252Fadmin", 400, None),
    ("/public?x=/admin", 200, "/public"),
    ("/public?x=/../admin", 200, "/public"),
    ("/public#/../admin", 200, "/public"),
    ("//public//a/./b/../c", 200, "/public/a/c"),
    ("/public/a/", 200, "/public/a/"),
    ("/publicity", 200, "/publicity"),  # not /public: the "/" route, bob may see it
    ("/public/%7Euser", 200, "/public/~user"),
]


@pytest.mark.parametrize(("target", "expected", "upstream_path"), PATHS, ids=[p[0] for p in PATHS])
async def test_path_decision_matches_upstream_path(
    stack: Stack, bob: str, target: str, expected: int, upstream_path: str | None
) -> None:
    headers = [session_header(stack, bob), ("Accept", "application/json")]
    resp = await raw_request(stack.url, raw_get(target, host_of(stack), headers))
    assert resp.status == expected, (target, resp.status, resp.body[:300])
    if upstream_path is not None:
        echo = resp.json()
        assert echo["path"] == upstream_path
        assert echo["raw_path"] == upstream_path  # "~" is unreserved: sent as itself
    if expected == 200 and "?" in target:
        assert resp.json()["query"] == target.split("?", 1)[1]


async def test_admin_gets_normalized_admin_path(
    stack: Stack, browser: aiohttp.ClientSession
) -> None:
    alice = await login(browser, stack, "alice")
    headers = [session_header(stack, alice), ("Accept", "application/json")]
    for target in ("//admin", "/public/../admin", "/public/%2e%2e/admin/", "/%61dmin?q=/public"):
        resp = await raw_request(stack.url, raw_get(target, host_of(stack), headers))
        assert resp.status == 200, (target, resp.body)
        echo = resp.json()
        assert echo["path"].rstrip("/") == "/admin", (target, echo["path"])
        assert echo["raw_path"].rstrip("/") == "/admin"


async def test_unauthenticated_admin_spellings_never_pass(stack: Stack) -> None:
    for target in ("//admin", "/public/../admin", "/%61dmin", "/public/%2e%2e/admin"):
        resp = await raw_request(
            stack.url, raw_get(target, host_of(stack), [("Accept", "application/json")])
        )
        assert resp.status == 401, (target, resp.status)


async def test_encoded_paths_via_aiohttp_client(
    stack: Stack, browser: aiohttp.ClientSession, bob: str
) -> None:
    for target, expected in (("/public%2F..%2Fadmin", 400), ("//admin", 403), ("/admin;x", 400)):
        url = URL(stack.url + target, encoded=True)
        async with browser.get(url, headers=API, allow_redirects=False) as resp:
            assert resp.status == expected, target


# -- 18: absolute-form request lines and Host ------------------------------------------------


class Recorder:
    """A loopback HTTP server that records every request it receives (the "evil" host)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, list[tuple[str, str]]]] = []
        self.port = free_port()
        self.runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append((request.method, request.raw_path, list(request.headers.items())))
        return web.json_response({"evil": True})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture
async def evil() -> AsyncIterator[Recorder]:
    rec = Recorder()
    await rec.start()
    yield rec
    await rec.close()


async def test_absolute_uri_and_spoofed_host_never_leave_configured_upstream(
    stack: Stack, bob: str, evil: Recorder
) -> None:
    evil_host = f"127.0.0.1:{evil.port}"
    cookie = session_header(stack, bob)
    accept = ("Accept", "application/json")
    requests = [
        raw_get(f"http://{evil_host}/x", evil_host, [cookie, accept]),
        raw_get(f"http://{evil_host}/x", host_of(stack), [cookie, accept]),
        raw_get(f"http://{host_of(stack)}/x", evil_host, [cookie, accept]),
        raw_get("/x", evil_host, [cookie, accept]),
        raw_get("/x", "evil.example", [cookie, accept]),
        raw_get(f"http://{evil_host}/public/x", evil_host, [accept]),
        raw_get("/public/x", evil_host, [accept]),
        raw_get("/x", host_of(stack), [cookie, accept, ("Host", evil_host)]),
        raw_get(f"{evil_host}", evil_host, [cookie, accept], method="CONNECT"),
        raw_get("*", evil_host, [cookie, accept], method="OPTIONS"),
    ]
    # Absolute forms and a second Host are refused; an origin-form request with another
    # Host goes to the configured upstream; CONNECT and "*" name no path of ours.
    expected = [(400, None), (400, None), (400, None), (200, "/x"), (200, "/x"), (400, None),
                (200, "/public/x"), (400, None), (404, None), (404, None)]  # fmt: skip
    for data, (status, path) in zip(requests, expected, strict=True):
        resp = await raw_request(stack.url, data)
        assert resp.status == status, (data, resp.status)
        if path is not None:
            echo = resp.json()
            assert "evil" not in echo
            # The request the token went with reached the configured echo upstream.
            assert echo["path"] == path
    assert evil.seen == []


async def test_preserve_host_route_still_connects_to_upstream(
    make_stack: StackFactory, evil: Recorder
) -> None:
    stack: Stack = await make_stack()
    routes = [
        {"prefix": "/", "upstream": str(stack.echo.url), "auth": "none", "preserve_host": True},
    ]
    stack2: Stack = await make_stack(routes=routes, idp=stack.idp, echo=stack.echo)
    evil_host = f"127.0.0.1:{evil.port}"
    resp = await raw_request(stack2.url, raw_get("/x", evil_host, [("Accept", "application/json")]))
    assert resp.status == 200
    assert values(resp.json(), "host") == [evil_host]
    assert evil.seen == []


# -- unauthenticated classification ------------------------------------------------------------


async def test_navigation_redirects_to_login_with_return_path(
    stack: Stack, api: aiohttp.ClientSession
) -> None:
    async with api.get(
        stack.url + "/deep/page?x=1&y=a%20b", headers=NAV, allow_redirects=False
    ) as resp:
        assert resp.status == 302
        location = resp.headers["Location"]
    parts = urlsplit(location)
    assert parts.scheme == "" and parts.netloc == "" and parts.path == "/oauth2/start"
    assert parse_qs(parts.query)["rd"] == ["/deep/page?x=1&y=a%20b"]
    # The start URL accepts that rd, and the flow's return path is the deep link.
    async with api.get(stack.url + location, allow_redirects=False) as resp:
        assert resp.status == 302
        assert resp.headers["Location"].startswith(str(stack.idp.url))


@pytest.mark.parametrize(
    "headers",
    [
        {"Accept": "text/html", "Sec-Fetch-Mode": "cors"},
        {"Accept": "application/json"},
        {"Accept": "application/json", "Sec-Fetch-Mode": "navigate"},
        {"Accept": "*/*"},
        {},
        {"Accept": "text/html", "X-Requested-With": "XMLHttpRequest"},
        {"Accept": "text/html", "Sec-Fetch-Mode": "no-cors"},
    ],
    ids=["cors", "json", "json-navigate", "any", "none", "xhr", "no-cors"],
)
async def test_api_calls_get_401_json(stack: Stack, headers: dict[str, str]) -> None:
    async with (
        aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http,
        http.get(stack.url + "/data", headers=headers, allow_redirects=False) as resp,
    ):
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        body = await resp.text()
        if "text/html" in headers.get("Accept", "") and headers.get("Sec-Fetch-Mode") is None:
            return  # an XHR asking for HTML: either shape is fine
        assert resp.content_type == "application/json", body
        assert json.loads(body)["error"] == "unauthenticated"


async def test_deny_route_gives_401_even_to_navigations(stack: Stack) -> None:
    async with (
        aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http,
        http.get(stack.url + "/api/v1/x", headers=NAV, allow_redirects=False) as resp,
    ):
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")


async def test_post_navigation_gets_401(stack: Stack) -> None:
    async with (
        aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http,
        http.post(stack.url + "/form", data={"a": "1"}, headers=NAV, allow_redirects=False) as resp,
    ):
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")


async def test_api_route_works_with_session(
    stack: Stack, browser: aiohttp.ClientSession, bob: str
) -> None:
    status, echo = await fetch_json(browser, stack.url + "/api/v1/x")
    assert status == 200
    assert values(echo, "x-forwarded-user") == ["bob"]


# -- upstream failures -------------------------------------------------------------------------


async def test_dead_upstream_is_502(make_stack: StackFactory) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    stack: Stack = await make_stack(
        routes=[
            {"prefix": "/", "upstream": dead},
            {"prefix": "/public", "upstream": dead, "auth": "none"},
        ]
    )
    async with aiohttp.ClientSession(
        cookie_jar=aiohttp.CookieJar(unsafe=True), headers=NAV
    ) as http:
        async with http.get(stack.url + "/public/x", allow_redirects=False) as resp:
            assert resp.status == 502
            assert resp.content_type == "text/html"
            body = await resp.text()
            assert len(body) < 4096
        async with http.get(stack.url + "/public/x", headers=API) as resp:
            assert resp.status == 502
            assert resp.content_type == "application/json"
            assert (await resp.json())["error"] == "bad_gateway"
        # Signed in, the protected route fails the same way (the login lands on it).
        result = await http_login(http, stack.url + "/p", "bob", "bob")
        assert result.status == 502
        async with http.get(stack.url + "/p", headers=API) as resp:
            assert resp.status == 502
            body = await resp.text()
            assert "Bearer" not in body


async def test_slow_upstream_is_504(make_stack: StackFactory) -> None:
    stack: Stack = await make_stack()
    stack2: Stack = await make_stack(
        idp=stack.idp,
        echo=stack.echo,
        routes=[
            {
                "prefix": "/",
                "upstream": str(stack.echo.url),
                "auth": "none",
                "timeouts": {"read": 0.3},
            },
        ],
    )
    async with aiohttp.ClientSession() as http:
        async with http.get(stack2.url + "/_echo/slow?delay=2", headers=API) as resp:
            assert resp.status == 504
            assert (await resp.json())["error"] == "gateway_timeout"
        async with http.get(stack2.url + "/_echo/slow?delay=2", headers=NAV) as resp:
            assert resp.status == 504
            assert resp.content_type == "text/html"
        # A quick answer on the same route still passes.
        async with http.get(stack2.url + "/_echo/slow?delay=0", headers=API) as resp:
            assert resp.status == 200


async def test_query_passes_byte_for_byte(stack: Stack, bob: str) -> None:
    """The query is the upstream's business: forwarded exactly as sent, never re-decoded."""
    query = "q=a%26b%3Dc&y=a%20b%2Bc&z=%2F..%2Fadmin&e=%C3%A9&p=1+2&r=%25"
    headers = [session_header(stack, bob), ("Accept", "application/json")]
    for path in ("/public/q", "/q"):
        resp = await raw_request(stack.url, raw_get(f"{path}?{query}", host_of(stack), headers))
        assert resp.status == 200, resp.body
        assert resp.json()["query"] == query
        assert resp.json()["path"] == path


async def test_gateway_prefix_is_never_proxied(stack: Stack, bob: str) -> None:
    """/oauth2/* with the wrong method, another spelling or an unknown name stays here."""
    headers = [session_header(stack, bob), ("Accept", "application/json"), ("Content-Length", "0")]
    for method, target in (
        ("POST", "/oauth2/start"),
        ("POST", "/oauth2/callback"),
        ("PUT", "/oauth2/userinfo"),
        ("GET", "//oauth2/start"),
        ("GET", "/x/../oauth2/start"),
        ("GET", "/oauth2/unknown"),
        ("GET", "/oauth2"),
    ):
        resp = await raw_request(stack.url, raw_get(target, host_of(stack), headers, method))
        assert resp.status == 404, (method, target, resp.status)
        assert b'"headers"' not in resp.body, (method, target)


# -- issue 7: cookies an upstream sets, names the gateway emits, claims, paths ---------------

PLANTED = [
    "gw_test=someone-elses-session; Path=/",
    "GW_TEST=planted; PATH=/; HTTPONLY",
    " gw_test =planted",
    "=gw_test=planted; Path=/",
    "gw_test",
    "__Host-gw_test=planted; Secure; Path=/",
    "__SECURE-gw_test=planted; Secure",
    "gw_test-logout=planted",
    "gw_test-login-abc=planted; Path=/",
    "=GW_TEST-LOGIN-x=planted",
]


@pytest.fixture
async def planting_upstream() -> AsyncIterator[str]:
    """An upstream that answers every request with the gateway's cookies in every spelling."""

    async def plant(request: web.Request) -> web.Response:
        headers = CIMultiDict([("Set-Cookie", value) for value in PLANTED])
        headers.add("Set-Cookie", "theme=dark; Path=/")
        return web.json_response({"path": request.path}, headers=headers)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", plant)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def test_upstream_never_plants_a_gateway_cookie(
    make_stack: StackFactory, planting_upstream: str, browser: aiohttp.ClientSession
) -> None:
    """Issue 7 item 1: whatever the request carried (here: nothing, a fresh visitor)."""
    stack = await make_stack(
        routes=[
            {"prefix": "/", "upstream": planting_upstream, "auth": "none"},
            {"prefix": "/app", "upstream": planting_upstream},
        ]
    )
    resp = await raw_request(stack.url, raw_get("/welcome", host_of(stack), list(API.items())))
    assert resp.status == 200
    assert resp.headers.getall("Set-Cookie") == ["theme=dark; Path=/"]
    # Signed in, on a protected route, with the gateway's cookie in the request: the same.
    result = await http_login(browser, stack.url + "/app/", "bob", "bob")
    assert result.status == 200, result.body
    cookie = browser.cookie_jar.filter_cookies(URL(stack.url))["gw_test"].value
    resp = await raw_request(
        stack.url, raw_get("/app/x", host_of(stack), [session_header(stack, cookie), *API.items()])
    )
    assert resp.status == 200
    assert resp.headers.getall("Set-Cookie") == ["theme=dark; Path=/"]
    # The browser still holds its own session, not a planted one.
    jar = browser.cookie_jar.filter_cookies(URL(stack.url))
    assert jar["gw_test"].value == cookie


EMITTED_SPOOF: list[tuple[str, str]] = [
    ("X-Auth-Request-User", "mallory"),
    ("X_Auth_Request_User", "mallory"),
    ("x-auth-request-email", "mallory@evil.example"),
    ("X-AUTH-REQUEST-GROUPS", "admins"),
    ("X-Auth-Request-Groups", "admins"),  # duplicate
    ("X-Auth-Request-Preferred-Username", "mallory"),
    ("X-Auth-Request-Access-Token", "forged"),
    ("X-Gateway-Login", "forged"),
    ("X-Original-URI", "/forged"),
    ("X_Original_Uri", "/forged"),
    ("X-Original-Method", "forged"),
    ("X-Forwarded-Uri", "/forged"),
    ("X-Forwarded-Method", "forged"),
    ("Connection", "X-Auth-Request-User"),
    ("X-Kept", "yes"),
]


@pytest.mark.parametrize("path", ["/x", "/public/x", "/api/x"])
async def test_names_the_gateway_emits_never_come_from_the_client(
    stack: Stack, bob: str, path: str
) -> None:
    """Issue 7 item 6: forward-auth's names and the trusted proxy's, on every route."""
    headers = [*EMITTED_SPOOF, session_header(stack, bob), ("Accept", "application/json")]
    resp = await raw_request(stack.url, raw_get(path, host_of(stack), headers))
    assert resp.status == 200, resp.body
    echo = resp.json()
    blob = json.dumps(echo["headers"])
    for word in ("mallory", "forged", "admins"):
        assert word not in blob, (word, echo["headers"])
    assert values(echo, "x-kept") == ["yes"]
    assert values(echo, "x-forwarded-for") == ["127.0.0.1"]


async def test_control_characters_and_separators_in_claims(
    stack: Stack, browser: aiohttp.ClientSession
) -> None:
    """Issue 7 items 7 and 8: a claim never breaks a request, a list item is never two."""
    from dataclasses import replace

    users = stack.idp.state.users
    users["bob"] = replace(
        users["bob"],
        preferred_username="b\x00o\tb\x7f\x85\u540d",
        groups=("staff,admins", "staff", "100%"),
    )
    cookie = await login(browser, stack, "bob")
    headers = [session_header(stack, cookie), ("Accept", "application/json")]
    resp = await raw_request(stack.url, raw_get("/x", host_of(stack), headers))
    assert resp.status == 200, resp.body
    echo = resp.json()
    assert values(echo, "x-forwarded-preferred-username") == ["b%00o%09b%7F%C2%85%E5%90%8D"]
    assert values(echo, "x-forwarded-groups") == ["staff%2Cadmins,staff,100%25"]
    # The gateway's own policy and the upstream read the same list: not in admins.
    resp = await raw_request(stack.url, raw_get("/admin", host_of(stack), headers))
    assert resp.status == 403


ADMIN_SPELLINGS = [
    "/admin.",
    "/admin%20",
    "/admin./x",
    "/admin%20/x",
    "/admin%E2%80%8B",
    "/%EF%BB%BFadmin",
    "/ad%C2%ADmin",
    "/%EF%BD%81dmin",
]


@pytest.mark.parametrize("target", ADMIN_SPELLINGS)
async def test_folded_admin_spellings_never_fall_to_a_weaker_route(
    stack: Stack, bob: str, target: str
) -> None:
    """Issue 7 item 9: bob may use "/" but not /admin; each spelling is refused."""
    headers = [session_header(stack, bob), ("Accept", "application/json")]
    resp = await raw_request(stack.url, raw_get(target, host_of(stack), headers))
    assert resp.status == 400, (target, resp.status, resp.body[:200])
    assert b'"headers"' not in resp.body


async def test_case_insensitive_routes(
    make_stack: StackFactory, browser: aiohttp.ClientSession
) -> None:
    """``server.case_insensitive_routes``: /ADMIN gets /admin's decision (403 for bob)."""
    stack = await make_stack(server={"case_insensitive_routes": True})
    cookie = await login(browser, stack, "bob")
    headers = [session_header(stack, cookie), ("Accept", "application/json")]
    for target in ("/ADMIN", "/Admin/", "/aDmIn/panel", "/PUBLIC/../ADMIN"):
        resp = await raw_request(stack.url, raw_get(target, host_of(stack), headers))
        assert resp.status == 403, (target, resp.status)
    # A public route answers its other case too, and the path goes upstream as sent.
    resp = await raw_request(stack.url, raw_get("/Public/Page", host_of(stack), headers))
    assert resp.status == 200
    assert resp.json()["path"] == "/Public/Page"
    assert values(resp.json(), "x-forwarded-user") == []
    for target in ("/OAUTH2/userinfo", "/Metrics"):
        resp = await raw_request(stack.url, raw_get(target, host_of(stack), headers))
        assert resp.status == 404, (target, resp.status)


async def test_routes_are_case_sensitive_by_default(stack: Stack, bob: str) -> None:
    headers = [session_header(stack, bob), ("Accept", "application/json")]
    resp = await raw_request(stack.url, raw_get("/ADMIN", host_of(stack), headers))
    assert resp.status == 200
    assert resp.json()["path"] == "/ADMIN"


OWN_SPELLINGS = [
    "/oauth2/%61uth",
    "/oauth2/%61uth/admin",
    "/oauth2/%75serinfo",
    "/oauth2/%73tart?rd=/",
    "/oauth2/sign%5fout",
    "/%6detrics",
    "/%68ealthz",
    "/readyz%2E",
    "/.well-known/jwks%2Ejson",
    "/./metrics",
    "/x/../healthz",
    "/metrics.",
    "/oauth2./auth",
    "/oauth2%20/userinfo",
]


@pytest.mark.parametrize("target", OWN_SPELLINGS)
async def test_own_endpoints_answer_only_their_canonical_spelling(
    make_stack: StackFactory, browser: aiohttp.ClientSession, target: str
) -> None:
    """Issue 7 item 10: one normalization decides every request; other spellings are 404."""
    stack = await make_stack(**{"server": {"trusted_proxies": ["127.0.0.1/32"]}})
    cookie = await login(browser, stack, "alice")
    headers = [session_header(stack, cookie), ("Accept", "application/json")]
    resp = await raw_request(stack.url, raw_get(target, host_of(stack), headers))
    assert resp.status == 404, (target, resp.status, resp.body[:200])
    for name in ("X-Auth-Request-User", "X-Forwarded-User", "Authorization"):
        assert name not in resp.headers
    assert b"alice" not in resp.body and b"gateway_requests" not in resp.body


async def test_no_server_version_on_any_answer(make_stack: StackFactory) -> None:
    """Issue 7 item 13: own answers, error pages, aiohttp's own 400 and the metrics port."""
    metrics_port = free_port()
    stack = await make_stack(observability={"metrics_listen": f"127.0.0.1:{metrics_port}"})
    host = host_of(stack)
    answers = [
        await raw_request(stack.url, raw_get("/healthz", host)),
        await raw_request(stack.url, raw_get("/oauth2/nothing", host)),
        await raw_request(stack.url, raw_get("/x", host, list(API.items()))),
        await raw_request(stack.url, b"GARBAGE\r\n\r\n"),
        await raw_request(f"http://127.0.0.1:{metrics_port}", raw_get("/metrics", host)),
        await raw_request(f"http://127.0.0.1:{metrics_port}", raw_get("/nope", host)),
    ]
    assert [a.status for a in answers] == [200, 404, 401, 400, 200, 404]
    for answer in answers:
        assert answer.headers.getall("Server") == ["gateway"], answer.headers


def test_identity_headers_are_kept_per_identity_object(monkeypatch: pytest.MonkeyPatch) -> None:
    """A route works a session's identity headers out once per ``Identity`` object (what the
    session cache hands back on every hit); a new object (refreshed, read again) gets its
    own, and the caller's additions never reach the kept copy."""
    from gateway import routes
    from gateway.config import validate
    from gateway.session import Identity
    from tests.conftest import gateway_config

    cfg = gateway_config("http://127.0.0.1:1", "http://127.0.0.1:2", "http://127.0.0.1:3", None)
    route = routes.Routes(validate(cfg, env={}), lambda _: None).compiled[0]  # type: ignore[arg-type,return-value]
    made: list[str] = []
    work = routes.identity_headers

    def counted(mapping: Any, identity: Identity) -> dict[str, str]:
        made.append(identity.sub)
        return work(mapping, identity)

    monkeypatch.setattr(routes, "identity_headers", counted)
    alice = Identity("alice", {"email": "alice@example.com"})
    first = route.identity(alice)
    first["Authorization"] = "Bearer added-by-the-caller"
    again = route.identity(alice)
    assert again["X-Forwarded-Email"] == "alice@example.com" and "Authorization" not in again
    assert made == ["alice"]
    changed = Identity("alice", {"email": "alice@new.example"})
    assert route.identity(changed)["X-Forwarded-Email"] == "alice@new.example"
    assert made == ["alice", "alice"]


def test_resolved_paths_are_kept_per_exact_raw_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The gate works a raw path's normalized path and route out once and remembers it by
    the exact raw path (before "?"): another spelling of the same path is worked out (and
    kept) on its own, a refused path is worked out every time and never kept, and the
    table is emptied when it is full."""
    from gateway import gate
    from gateway.config import validate
    from gateway.errors import BadRequest, NotFound
    from gateway.routes import Routes
    from tests.conftest import gateway_config

    cfg = gateway_config("http://127.0.0.1:1", "http://127.0.0.1:2", "http://127.0.0.1:3", None)
    routes = Routes(validate(cfg, env={}), lambda _: None)  # type: ignore[arg-type,return-value]
    g = gate.Gate()
    g.own("/oauth2/start", lambda r: None)  # type: ignore[arg-type,return-value]
    seen = record_first_args(monkeypatch, gate, "normalize_path")
    first = g.resolve("/a/b?x=1", routes)
    assert first[0] == "/a/b"
    assert g.resolve("/a/b?y=2", routes) is first  # the query is not part of the key
    assert g.resolve("/a/./b", routes) == first and g.resolve("/a/./b", routes) is not first
    assert seen == ["/a/b", "/a/./b"]
    for refused, error in (("/a/%2f", BadRequest), ("//oauth2/start", NotFound)):
        for _ in range(2):
            with pytest.raises(error):
                g.resolve(refused, routes)
    assert seen[2:] == ["/a/%2f", "/a/%2f", "//oauth2/start", "//oauth2/start"]
    monkeypatch.setattr(g._resolved, "limit", 2)
    g.resolve("/c", routes)  # the third path: the table was full, so it starts again
    assert g.resolve("/a/b", routes) is not first
    assert seen[-2:] == ["/c", "/a/b"]


def test_trusted_proxy_answers_are_kept_per_peer(monkeypatch: pytest.MonkeyPatch) -> None:
    """``Trust.is_trusted`` parses a peer address once and keeps the answer per exact peer
    text (bounded, emptied when full); each peer still gets its own answer."""
    from gateway import routes
    from gateway.config import validate
    from tests.conftest import gateway_config

    cfg = gateway_config("http://127.0.0.1:1", "http://127.0.0.1:2", "http://127.0.0.1:3", None)
    cfg["server"]["trusted_proxies"] = ["10.0.0.0/8", "192.0.2.7/32"]
    trust = routes.Trust(validate(cfg, env={}))
    parsed = record_first_args(monkeypatch, routes.ipaddress, "ip_address")
    peers = {"10.1.2.3": True, "192.0.2.7": True, "192.0.2.8": False, "not-an-ip": False}
    for _ in range(3):
        assert {peer: trust.is_trusted(peer) for peer in peers} == peers
    assert parsed == list(peers)
    monkeypatch.setattr(trust._peers, "limit", 4)
    assert trust.is_trusted("11.0.0.1") is False  # the table was full: it starts again
    assert trust.is_trusted("10.1.2.3") is True
    assert parsed[-2:] == ["11.0.0.1", "10.1.2.3"]

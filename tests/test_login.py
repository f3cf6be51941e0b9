"""The login flow end to end over HTTP: deep link → provider → callback → deep link.

Also the step-by-step helpers the login-security tests share: start a login, pass the
provider, call the callback by hand, and look at what the gateway wrote to Redis.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
from dataclasses import dataclass, field, replace
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import aiohttp
import pytest
from multidict import CIMultiDictProxy
from yarl import URL

from gateway import keys
from gateway.crypto import OpenError
from gateway.devidp.config import Faults
from gateway.flow import LoginState
from gateway.session import Session, Ticket
from tests.conftest import CLIENT_ID, RedisServer, Stack
from tests.idp_client import http_login

COOKIE = "gw_test"  # the session cookie name gateway_config() sets


# -- helpers shared with test_login_security.py and test_id_token.py -------------------------


@dataclass
class Answer:
    """One HTTP answer, read to the end."""

    status: int
    headers: CIMultiDictProxy[str]
    body: str
    set_cookies: dict[str, str] = field(default_factory=dict)  # name → value (may be "")

    @property
    def location(self) -> str | None:
        return self.headers.get("Location")

    def sets_session(self) -> bool:
        """Whether this answer hands the browser a (non-empty) session cookie."""
        return bool(self.set_cookies.get(COOKIE))


def new_browser() -> aiohttp.ClientSession:
    """Another browser: its own cookie jar, the same navigation headers as ``browser``."""
    return aiohttp.ClientSession(
        cookie_jar=aiohttp.CookieJar(unsafe=True),
        headers={"Accept": "text/html", "Sec-Fetch-Mode": "navigate"},
    )


async def fetch(
    http: aiohttp.ClientSession,
    url: str,
    *,
    method: str = "GET",
    data: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
) -> Answer:
    """One request, redirects not followed."""
    async with http.request(method, url, data=data, headers=headers, allow_redirects=False) as resp:
        body = await resp.text()
        jar = SimpleCookie()
        for raw in resp.headers.getall("Set-Cookie", []):
            jar.load(raw)
        cookies = {name: morsel.value for name, morsel in jar.items()}
        return Answer(resp.status, resp.headers, body, cookies)


async def start_login(http: aiohttp.ClientSession, stack: Stack, rd: str = "/") -> str:
    """GET /oauth2/start; the authorization URL the gateway sends the browser to."""
    answer = await fetch(http, f"{stack.url}/oauth2/start?rd={quote(rd, safe='/')}")
    assert answer.status == 302, answer.body
    assert answer.location and answer.location.startswith(stack.idp.url + "/authorize?")
    return answer.location


async def authorize(
    http: aiohttp.ClientSession,
    stack: Stack,
    auth_url: str,
    user: str = "alice",
    consent: str = "approve",
) -> str:
    """Sign in at the provider; the callback URL it redirects to (not visited)."""
    result = await http_login(
        http, auth_url, user, user, consent=consent, stop_at=stack.url + "/oauth2/callback"
    )
    assert result.location is not None, (result.status, result.body)
    return result.location


async def callback_url(
    http: aiohttp.ClientSession, stack: Stack, user: str = "alice", rd: str = "/"
) -> str:
    """A login driven up to (not including) the callback: its URL with code, state, iss."""
    return await authorize(http, stack, await start_login(http, stack, rd), user)


async def login(
    http: aiohttp.ClientSession, stack: Stack, user: str = "alice", rd: str = "/"
) -> Answer:
    """A whole login; the callback's answer (a 302 to ``rd`` when it worked)."""
    return await fetch(http, await callback_url(http, stack, user, rd))


async def follow(
    http: aiohttp.ClientSession,
    url: str,
    *,
    method: str = "GET",
    data: dict[str, str] | None = None,
    max_hops: int = 10,
) -> Answer:
    """Follow redirects by hand (every answer is read, so a recording session sees it all)."""
    for _ in range(max_hops):
        answer = await fetch(http, url, method=method, data=data)
        if answer.status not in (301, 302, 303, 307, 308) or not answer.location:
            return answer
        url, method, data = str(URL(url).join(URL(answer.location))), "GET", None
    raise AssertionError(f"more than {max_hops} redirects from {url}")


def query_of(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query, keep_blank_values=True).items()}


def with_query(url: str, **changes: str | None) -> str:
    """``url`` with query parameters replaced (None: removed), others kept in order."""
    parsed = URL(url)
    query = {k: v for k, v in parsed.query.items() if k not in changes}
    query.update({k: v for k, v in changes.items() if v is not None})
    return str(parsed.with_query(query))


def cookie_value(http: aiohttp.ClientSession, stack: Stack, name: str = COOKIE) -> str | None:
    found = http.cookie_jar.filter_cookies(URL(stack.url)).get(name)
    return found.value if found is not None and found.value else None


def login_cookies(http: aiohttp.ClientSession, stack: Stack) -> dict[str, str]:
    """The login-state cookies in the jar, by name."""
    jar = http.cookie_jar.filter_cookies(URL(stack.url))
    return {n: m.value for n, m in jar.items() if n.startswith(COOKIE + "-login-") and m.value}


def open_flow(http: aiohttp.ClientSession, stack: Stack, state: str) -> LoginState:
    """The login state sealed in whichever flow cookie belongs to ``state``."""
    for value in login_cookies(http, stack).values():
        try:
            return LoginState.open(value.split(".", 1)[1], state, stack.app[keys.RING])
        except (OpenError, IndexError):
            continue
    raise AssertionError("no login-state cookie opens for this state")


def redis_snapshot(redis_server: RedisServer, stack: Stack) -> dict[bytes, bytes]:
    """Every key (and value) this gateway has under its prefix, read without gateway code."""
    prefix = stack.settings.session.key_prefix.encode()
    return {k: v for k, v in redis_server.dump() if k.startswith(prefix)}


def session_keys(redis_server: RedisServer, stack: Stack) -> set[bytes]:
    """Stored session records (``<prefix>s:<key>``)."""
    return set(redis_server.keys(stack.settings.session.key_prefix + "s:*"))


async def stored_session(stack: Stack, cookie: str) -> tuple[Ticket, Session]:
    """Open a session cookie the way the gateway does: ticket, then the sealed record."""
    ticket = Ticket.from_cookie(cookie, stack.app[keys.RING])
    raw = await stack.app[keys.STORE].load(ticket.store_key)
    assert raw is not None, "no stored session for this cookie"
    return ticket, ticket.open_record(raw)


def store_key(stack: Stack, cookie: str) -> bytes:
    ticket = Ticket.from_cookie(cookie, stack.app[keys.RING])
    return f"{stack.settings.session.key_prefix}s:{ticket.store_key}".encode()


async def whoami(http: aiohttp.ClientSession, stack: Stack) -> tuple[int, dict[str, Any]]:
    """GET /oauth2/userinfo as JSON: (status, body)."""
    answer = await fetch(
        http, stack.url + "/oauth2/userinfo", headers={"Accept": "application/json"}
    )
    return answer.status, json.loads(answer.body) if answer.body else {}


_B64_RUN = re.compile(r"[A-Za-z0-9_\-+/]{16,}")


def exposes(secret: str, texts: list[str]) -> bool:
    """Whether ``secret`` shows in any of ``texts``, literally or inside a base64(url) run.

    The decoding catches a secret merely encoded (e.g. a cookie holding base64 JSON), which
    a plain substring search would miss.
    """
    needle = secret.encode()
    for text in texts:
        if secret in text:
            return True
        for run in _B64_RUN.findall(text):
            for start in range(4):  # the run may start mid-quantum
                chunk = run[start:]
                chunk = chunk[: len(chunk) - len(chunk) % 4]
                for alt in (b"-_", b"+/"):
                    try:
                        decoded = base64.b64decode(chunk.encode(), altchars=alt)
                    except (binascii.Error, ValueError):
                        continue
                    if needle in decoded:
                        return True
    return False


async def echo_json(http: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with http.get(url, headers={"Accept": "application/json"}) as resp:
        assert resp.status == 200, await resp.text()
        data: dict[str, Any] = json.loads(await resp.text())
        return data


# -- tests -------------------------------------------------------------------------------------


async def test_deep_link_login_lands_on_deep_link(
    stack: Stack, browser: aiohttp.ClientSession
) -> None:
    result = await http_login(browser, stack.url + "/some/deep/page?x=1&y=2", "alice", "alice")
    assert result.status == 200
    assert result.url == stack.url + "/some/deep/page?x=1&y=2"
    seen = await echo_json(browser, stack.url + "/some/deep/page?x=1")
    headers = {k.lower(): v for k, v in seen["headers"]}
    assert headers["x-forwarded-user"] == "alice"
    assert headers["x-forwarded-email"] == "alice@example.com"
    assert headers["x-forwarded-groups"] == "admins,staff"
    assert headers["authorization"].startswith("Bearer ")
    assert "gw_test" not in headers.get("cookie", "")


@pytest.mark.parametrize(
    "deep_link",
    [
        "/my%20file.pdf",  # a space in the path (found by tests/fuzz)
        "/notes/C%23%3F.txt",  # an encoded '#' and '?' in the path (found by tests/fuzz)
        "/search?q=a%0Ab",  # an encoded newline in the query (found by tests/fuzz)
        "/files?path=%5Cdir%5Cx",  # encoded backslashes in the query
        "/caf%C3%A9/menu?x=%1F",
    ],
)
async def test_deep_links_with_any_encoded_byte_survive_the_login(
    stack: Stack, browser: aiohttp.ClientSession, deep_link: str
) -> None:
    result = await http_login(
        browser, str(URL(stack.url + deep_link, encoded=True)), "alice", "alice"
    )
    assert result.status == 200, result.body
    assert result.url == stack.url + deep_link


@pytest.mark.parametrize("value", ["²", "❼.x", "1².x"])
async def test_a_login_state_cookie_with_a_unicode_digit_does_not_block_sign_in(
    stack: Stack, value: str
) -> None:
    # str.isdigit() is true for "²"; int() refused it: a 500 on every sign-in while such a
    # cookie (tossed by a sibling subdomain, say) was around (found by tests/fuzz).
    async with aiohttp.ClientSession() as http:
        answer = await fetch(
            http, stack.url + "/oauth2/start?rd=/x", headers={"Cookie": f"gw_test-login-0={value}"}
        )
    assert answer.status == 302


@pytest.mark.parametrize("method", ["none", "client_secret_post", "client_secret_basic"])
async def test_login_with_each_client_auth_method(
    make_stack: Any, browser: aiohttp.ClientSession, method: str
) -> None:
    """A public client (PKCE only, no secret) and both secret methods all log in.

    The dev provider accepts only the registered method (OIDC Core §9), so each passing run
    proves the gateway authenticated at the token endpoint the configured way.
    """
    stack = await make_stack(client_auth=method)
    answer = await login(browser, stack, "bob", rd="/after")
    assert answer.status == 302, answer.body
    assert answer.location == "/after"
    assert answer.sets_session()
    assert stack.idp.state.token_calls["authorization_code"] == 1
    status, me = await whoami(browser, stack)
    assert status == 200
    assert me["sub"] == "bob"


async def test_wrong_client_auth_method_fails_cleanly(
    make_stack: Any, browser: aiohttp.ClientSession
) -> None:
    """Control for the test above: a method the provider did not register is refused (400)."""
    stack = await make_stack(client_auth="client_secret_post")
    clients = stack.idp.state.clients
    clients[CLIENT_ID] = replace(
        clients[CLIENT_ID], token_endpoint_auth_method="client_secret_basic"
    )
    answer = await login(browser, stack)
    assert answer.status == 400, answer.status
    assert not answer.sets_session()


# -- provider metadata, default scopes, prompt, error responses (CONTRACT "Provider metadata") --


async def test_revocation_endpoint_from_rfc8414_metadata_is_used_at_sign_out(
    make_stack: Any, browser: aiohttp.ClientSession
) -> None:
    """Discovery without revocation/introspection endpoints; the RFC 8414 document has them."""
    faults = Faults(discovery_omit=["revocation_endpoint", "introspection_endpoint"])
    stack = await make_stack(idp_config={"faults": faults})
    async with aiohttp.ClientSession() as http:
        discovery = json.loads(
            (await fetch(http, stack.idp.url + "/.well-known/openid-configuration")).body
        )
    assert "revocation_endpoint" not in discovery
    answer = await login(browser, stack)
    assert answer.status == 302
    meta = await stack.app[keys.PROVIDER].metadata()
    assert meta.revocation_endpoint == stack.idp.url + "/revoke"
    assert meta.introspection_endpoint == stack.idp.url + "/introspect"
    from tests.test_logout import confirmation_form  # (test_logout imports this module)

    refresh = list(stack.idp.state.refresh_tokens)[-1]
    fields = await confirmation_form(browser, stack)
    async with browser.post(
        stack.url + "/oauth2/sign_out", data=fields, allow_redirects=False
    ) as resp:
        assert resp.status == 303
    assert refresh in stack.idp.state.revoked


async def test_rfc8414_metadata_of_another_issuer_is_ignored(make_stack: Any) -> None:
    faults = Faults(discovery_omit=["revocation_endpoint"], no_oauth_metadata=True)
    stack = await make_stack(idp_config={"faults": faults})
    meta = await stack.app[keys.PROVIDER].metadata()
    assert meta.revocation_endpoint is None
    other = meta.with_oauth_metadata(
        {"issuer": "https://other.example", "revocation_endpoint": "https://other.example/r"}
    )
    assert other.revocation_endpoint is None


@pytest.mark.parametrize(
    ("faults", "scopes", "want"),
    [
        pytest.param(Faults(), None, "openid email profile offline_access", id="listed"),
        pytest.param(
            Faults(scopes_supported=["openid", "email", "profile"]),
            None,
            "openid email profile",
            id="not-listed",
        ),
        pytest.param(
            Faults(discovery_omit=["scopes_supported"]),
            None,
            "openid email profile offline_access",
            id="no-list",
        ),
        pytest.param(
            Faults(scopes_supported=["openid"]),
            ["openid", "email", "offline_access"],
            "openid email offline_access",
            id="explicit-kept",
        ),
    ],
)
async def test_default_scopes_adapt_to_the_provider_and_no_consent_is_forced(
    make_stack: Any,
    browser: aiohttp.ClientSession,
    faults: Faults,
    scopes: list[str] | None,
    want: str,
) -> None:
    stack = await make_stack(idp_config={"faults": faults}, provider={"scopes": scopes})
    query = query_of(await start_login(browser, stack))
    assert query["scope"] == want
    assert "prompt" not in query


async def test_prompt_is_sent_only_when_configured(
    make_stack: Any, browser: aiohttp.ClientSession
) -> None:
    stack = await make_stack(provider={"prompt": "consent"})
    assert query_of(await start_login(browser, stack))["prompt"] == "consent"


async def test_provider_error_without_iss_is_shown_as_that_error_and_logged(
    stack: Stack,
    browser: aiohttp.ClientSession,
    redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.login")
    stack.idp.state.faults.omit_authz_iss = True
    result = await http_login(browser, stack.url + "/deep", "alice", "alice", consent="deny")
    assert result.url.startswith(stack.url + "/oauth2/callback?")
    assert "iss=" not in result.url
    assert result.status == 400
    assert "You declined the request" in result.body
    assert "did not name its issuer" not in result.body
    assert stack.idp.state.token_calls["authorization_code"] == 0
    assert set(redis_server.keys(stack.settings.session.key_prefix + "s:*")) == set()
    warned = [r for r in caplog.records if "did not name its issuer" in r.getMessage()]
    assert [(r.levelname, r.__dict__["error"]) for r in warned] == [("WARNING", "access_denied")]
    refused = [r for r in caplog.records if r.getMessage().startswith("sign-in refused")]
    assert [r.__dict__["error"] for r in refused] == ["access_denied"]


async def test_callback_refusal_is_logged_with_its_reason(
    stack: Stack, browser: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.login")
    answer = await fetch(browser, stack.settings.redirect_uri + "?state=short&code=x")
    assert answer.status == 400
    (record,) = [r for r in caplog.records if r.getMessage().startswith("sign-in callback")]
    assert (
        record.__dict__["reason"] == "The sign-in response has no valid state. Please start again."
    )

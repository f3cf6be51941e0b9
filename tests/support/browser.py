"""A browser driven step by step through a login: start it, pass the provider, call the
callback by hand, and look at what the gateway wrote to its cookies and to Redis."""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import aiohttp
from multidict import CIMultiDictProxy
from yarl import URL

from gateway import keys
from gateway.crypto import OpenError
from gateway.flow import LoginState
from gateway.session import Session, Ticket
from tests.conftest import RedisServer, Stack
from tests.idp_client import http_login

COOKIE = "gw_test"  # the session cookie name gateway_config() sets


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

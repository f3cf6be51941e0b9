"""A real gateway stack for fuzzing, driven from sync hypothesis tests through an asyncio.Runner.

The stack is the one the rest of the suite uses (dev provider, echo upstream, redis, the
gateway on a loopback port, ``tests.conftest.gateway_config``); on top it holds material
captured from real logins, which the "valid-ish" strategies mutate: the session cookies of
alice (admins) and bob (staff), a login-state cookie with its state, a sign-out state cookie
with its state, real access tokens (JWT and opaque) and the provider's signing key.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import re
import secrets
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from gateway.app import create_app
from gateway.config import Settings, validate
from gateway.devidp import ClientRegistration, DevIdpConfig, RunningIdp, demo_users, start_devidp
from gateway.devidp.records import AccessRecord
from gateway.devidp.tokens import BACKCHANNEL_EVENT, access_token_claims
from gateway.echo import RunningEcho, start_echo
from tests.conftest import CLIENT_ID, CLIENT_SECRET, RedisServer, gateway_config
from tests.idp_client import http_login
from tests.support.ports import free_port

ALLOWED_ORIGIN = "https://allowed.example"
COOKIE = "gw_test"

# The routes every fuzz stack serves (the suite's usual ones, plus a bearer API).
ROUTES = (
    ("/", {}),
    ("/public", {"auth": "none"}),
    ("/admin", {"require": {"groups": ["admins"]}}),
    ("/api", {"on_unauthenticated": "deny", "accept_bearer": True}),
    ("/api/admin", {"accept_bearer": True, "require": {"groups": ["admins"]}}),
)


@dataclass
class Reply:
    """One answer as the client saw it."""

    status: int
    headers: CIMultiDict[str]
    text: str
    method: str
    url: str
    # Whether the request exceeded the server's request-line (8190) or header-field
    # (server.max_header_size) limit, which aiohttp answers with 400 before any handler;
    # None within a few hundred bytes of a limit, where the exact count is not modelled.
    oversized: bool | None = False

    @property
    def set_cookies(self) -> list[tuple[str, str, str]]:
        """(name, value, attributes) of every Set-Cookie, split the way a browser does."""
        out = []
        for raw in self.headers.getall("Set-Cookie", []):
            pair, _, attrs = raw.partition(";")
            name, eq, value = pair.partition("=")
            if not eq:  # a nameless cookie (RFC 6265bis §5.6 step 4)
                name, value = "", name
            out.append((name.strip(), value.strip().strip('"'), attrs))
        return out

    def upstream(self) -> list[tuple[str, str]] | None:
        """The request headers the echo upstream received, when the echo answered."""
        ctype = self.headers.get("Content-Type", "")
        if ctype.startswith("application/json"):
            try:
                body = json.loads(self.text)
            except ValueError:
                return None
            if isinstance(body, dict) and "body_sha256" in body and "headers" in body:
                return [(str(n), str(v)) for n, v in body["headers"]]
            return None
        if ctype.startswith("text/html") and "Echo upstream" in self.text:
            rows = re.findall(r"<tr(?: class=\"hl\")?><td>(.*?)</td><td>(.*?)</td></tr>", self.text)
            return [(html.unescape(n), html.unescape(v)) for n, v in rows]
        return None


MAX_LINE = 8190  # aiohttp's request-line limit


def _oversized(line: int, field: int, max_field: int) -> bool | None:
    if line > MAX_LINE + 300 or field > max_field + 300:
        return True
    if line < MAX_LINE - 300 and field < max_field - 300:
        return False
    return None


@dataclass
class Flow:
    """A login in progress, captured from a real /oauth2/start."""

    state: str
    cookie_name: str
    cookie_value: str


@dataclass(repr=False)
class FuzzStack:
    runner: asyncio.Runner
    redis: RedisServer
    tried: Counter[str]
    url: str = ""
    idp: RunningIdp | None = None
    echo: RunningEcho | None = None
    settings: Settings | None = None
    app: web.Application | None = None
    site_runner: web.AppRunner | None = None
    http: aiohttp.ClientSession | None = None
    authorization_endpoint: str = ""
    end_session_endpoint: str = ""
    sessions: dict[str, str] = field(default_factory=dict)  # user -> session cookie value
    flow: Flow | None = None
    logout_cookie: str = ""
    logout_state: str = ""
    jwt_token: str = ""
    opaque_token: str = ""

    def __repr__(self) -> str:  # hypothesis prints it: never the captured cookies or tokens
        return f"FuzzStack({self.url})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # hypothesis' pretty printer
        printer.text(repr(self))

    # -- life cycle -----------------------------------------------------------------------

    async def start(self, *, trusted: bool = False) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.idp = await start_devidp(
            DevIdpConfig(
                users=demo_users(),
                clients=[
                    ClientRegistration(
                        client_id=CLIENT_ID,
                        client_secret=CLIENT_SECRET,
                        redirect_uris=(self.url + "/oauth2/callback",),
                        post_logout_redirect_uris=(self.url + "/oauth2/signed_out",),
                        backchannel_logout_uri=self.url + "/oauth2/backchannel_logout",
                    )
                ],
            )
        )
        self.echo = await start_echo()
        up = str(self.echo.url)
        server: dict[str, Any] = {"public_url": self.url}
        if trusted:
            server["trusted_proxies"] = ["127.0.0.1/32"]
        cfg = gateway_config(
            self.url,
            str(self.idp.url),
            up,
            self.redis.url,
            server=server,
            routes=[{"prefix": p, "upstream": up, **extra} for p, extra in ROUTES],
            logout={"allowed_redirects": [ALLOWED_ORIGIN]},
            observability={"log_format": "json", "log_level": "error"},
        )
        self.settings = validate(cfg, env={})
        self.app = create_app(self.settings)
        self.site_runner = web.AppRunner(self.app, access_log=None)
        await self.site_runner.setup()
        await web.TCPSite(self.site_runner, "127.0.0.1", port).start()
        self.http = aiohttp.ClientSession(
            cookie_jar=aiohttp.DummyCookieJar(), timeout=aiohttp.ClientTimeout(total=30)
        )
        async with self.http.get(str(self.idp.url) + "/.well-known/openid-configuration") as r:
            meta = await r.json()
        self.authorization_endpoint = meta["authorization_endpoint"]
        self.end_session_endpoint = meta.get("end_session_endpoint", "")
        for user in ("alice", "bob"):
            self.sessions[user] = await self.login(user)
        self.flow = await self.start_flow("/somewhere?x=1")
        await self.capture_logout()
        state = self.idp.state
        self.jwt_token = state.issue_access_token("alice", CLIENT_ID, "openid email", 3600)
        self.opaque_token = secrets.token_urlsafe(32)
        now = state.now()
        state.access_tokens[self.opaque_token] = AccessRecord(
            uuid.uuid4().hex, "alice", CLIENT_ID, ("openid", "email"), now, now + 3600, None
        )

    async def close(self) -> None:
        if self.http is not None:
            await self.http.close()
        if self.site_runner is not None:
            await self.site_runner.cleanup()
        if self.echo is not None:
            await self.echo.close()
        if self.idp is not None:
            await self.idp.close()

    # -- captured material ----------------------------------------------------------------

    async def login(self, user: str) -> str:
        """A real login through the provider; the session cookie's value."""
        async with aiohttp.ClientSession(
            cookie_jar=aiohttp.CookieJar(unsafe=True), headers={"Accept": "text/html"}
        ) as browser:
            result = await http_login(browser, self.url + "/", user, user)
            assert result.status == 200, result.body
            return browser.cookie_jar.filter_cookies(URL(self.url))[COOKIE].value

    async def start_flow(self, rd: str) -> Flow:
        reply = await self.send("GET", "/oauth2/start?rd=" + rd)
        assert reply.status == 302, reply.text
        state = parse_qs(urlsplit(reply.headers["Location"]).query)["state"][0]
        name, value, _ = next(c for c in reply.set_cookies if c[0].startswith(COOKIE + "-login-"))
        return Flow(state, name, value)

    async def capture_logout(self) -> None:
        """Sign a third session out for real; keep the sign-out state cookie and its state."""
        cookie = await self.login("bob")
        page = await self.send("GET", "/oauth2/sign_out", cookies={COOKIE: cookie})
        csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert csrf is not None, page.text
        reply = await self.send(
            "POST",
            "/oauth2/sign_out",
            cookies={COOKIE: cookie},
            data={"csrf": csrf.group(1), "rd": "/after"},
            headers=[("Origin", self.url)],
        )
        assert reply.status == 303, reply.text
        self.logout_state = parse_qs(urlsplit(reply.headers["Location"]).query)["state"][0]
        self.logout_cookie = next(v for n, v, _ in reply.set_cookies if n == COOKIE + "-logout")

    def sign(self, claims: dict[str, Any], headers: dict[str, Any] | None = None) -> str:
        assert self.idp is not None
        return self.idp.state.sign(claims, headers)

    def access_claims(self, sub: str = "alice") -> dict[str, Any]:
        assert self.idp is not None
        state = self.idp.state
        return access_token_claims(
            issuer=state.issuer, user=state.users.get(sub), sub=sub, client_id=CLIENT_ID,
            scope=("openid", "email"), now=int(time.time()), ttl=300, jti=secrets.token_hex(8),
        )  # fmt: skip

    def logout_claims(self, sub: str = "nobody-fuzz") -> dict[str, Any]:
        assert self.idp is not None
        now = int(time.time())
        return {
            "iss": self.idp.state.issuer, "aud": CLIENT_ID, "iat": now, "exp": now + 120,
            "jti": uuid.uuid4().hex, "sub": sub, "events": {BACKCHANNEL_EVENT: {}},
        }  # fmt: skip

    # -- requests -------------------------------------------------------------------------

    def settings_(self) -> Settings:
        assert self.settings is not None
        return self.settings

    def run(self, coro: Any) -> Any:
        return self.runner.run(coro)

    async def send(
        self,
        method: str,
        path: str,
        *,
        headers: Iterable[tuple[str, str]] = (),
        cookies: dict[str, str] | str | None = None,
        data: Any = None,
        count: str | None = None,
    ) -> Reply:
        """One request with exactly these headers (the raw path is sent as it is)."""
        assert self.http is not None
        sent: CIMultiDict[str] = CIMultiDict(headers)
        if isinstance(cookies, dict):
            sent.add("Cookie", "; ".join(f"{k}={v}" for k, v in cookies.items()))
        elif cookies is not None:
            sent.add("Cookie", cookies)
        url = URL(self.url + path, encoded=True)
        oversized = _oversized(
            len(method) + len(path) + 10,
            max((len(k) + len(v.encode()) for k, v in sent.items()), default=0),
            self.settings_().server.max_header_size,
        )
        if count is not None:
            self.tried[count] += 1
        try:
            async with self.http.request(
                method, url, headers=sent, data=data, allow_redirects=False
            ) as resp:
                text = (await resp.read()).decode("utf-8", "replace")
                return Reply(
                    resp.status, CIMultiDict(resp.headers), text, method, str(url), oversized
                )
        except aiohttp.ClientResponseError as exc:
            # aiohttp's server answers a request it cannot parse before any handler runs,
            # with a body even to HEAD, which its client then cannot read: keep the status.
            return Reply(exc.status, CIMultiDict(), str(exc.message), method, str(url), oversized)

    async def send_raw(self, head: bytes) -> int:
        """Send a raw request head on a new connection; the answer's status (0: none)."""
        port = int(self.url.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(head)
            await writer.drain()
            line = await asyncio.wait_for(reader.readline(), 30)
            parts = line.split(b" ", 2)
            return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def request_raw(self, head: bytes, count: str) -> int:
        self.tried[count] += 1
        status: int = self.run(self.send_raw(head))
        return status

    def request(self, method: str, path: str, **kw: Any) -> Reply:
        reply: Reply = self.run(self.send(method, path, **kw))
        return reply

"""The gateway against a third-party, OpenID-certified provider: the npm ``oidc-provider``.

For a confidential client (client_secret_basic) and a public PKCE-only client (auth method
``none``), run in-process via ``create_app`` and as a real ``gateway run --config FILE``
subprocess: a deep link logs in through oidc-provider's dev login and consent pages and
lands on the deep link; the upstream gets a bearer token oidc-provider accepts and the
identity headers; ``/oauth2/userinfo`` answers the identity; sign-out (POST with the CSRF
token of the confirmation page) revokes the tokens, goes through oidc-provider's
end_session and leaves no session behind. A back-channel logout from oidc-provider ends
the gateway's session too.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import pytest
from aiohttp import web

from gateway.app import create_app
from gateway.config import validate
from gateway.echo import RunningEcho, start_echo
from tests.conftest import RedisServer, gateway_config
from tests.gateway_proc import start_gateway_process
from tests.interop_idp import (
    INSTALL_HINT,
    InteropIdp,
    interop_available,
    interop_login,
    interop_logout,
    start_interop_idp,
)
from tests.support.ports import free_port

pytestmark = pytest.mark.interop

# The encoded "&" and "=" must survive the round trip through rd, the flow cookie and the
# callback (aiohttp's client would normalise an encoded "/" away, so none is used here).
DEEP_LINK = "/reports/2024?tab=summary&q=a%26b%3Dc"
SCOPES = ["openid", "email", "profile", "groups", "offline_access"]
NAVIGATE = {"Accept": "text/html", "Sec-Fetch-Mode": "navigate"}
CSRF_RE = re.compile(r'name="csrf" value="([^"]+)"')


@dataclass(frozen=True)
class Client:
    client_id: str
    secret: str | None
    method: str  # token_endpoint_auth_method at the provider = gateway client_auth_method


CONFIDENTIAL = Client(
    "gw-interop-confidential", "interop-secret-0123456789abcdef!&:%", "client_secret_basic"
)
PUBLIC = Client("gw-interop-public", None, "none")


def registration(client: Client, gateway_url: str) -> dict[str, Any]:
    reg: dict[str, Any] = {
        "client_id": client.client_id,
        "token_endpoint_auth_method": client.method,
        "redirect_uris": [gateway_url + "/oauth2/callback"],
        "post_logout_redirect_uris": [gateway_url + "/oauth2/signed_out"],
        "backchannel_logout_uri": gateway_url + "/oauth2/backchannel_logout",
    }
    if client.secret is not None:
        reg["client_secret"] = client.secret
    return reg


@dataclass
class Env:
    """The interop provider and echo upstream for one gateway URL (port chosen first)."""

    port: int
    url: str
    idp: InteropIdp
    echo: RunningEcho
    redis: RedisServer

    def config(self, client: Client) -> dict[str, Any]:
        cfg = gateway_config(self.url, self.idp.issuer, str(self.echo.url), self.redis.url)
        cfg["server"]["port"] = self.port
        provider: dict[str, Any] = {
            "issuer": self.idp.issuer,
            "client_id": client.client_id,
            "client_auth_method": client.method,
            "scopes": SCOPES,
            # oidc-provider honours offline_access only with prompt=consent (OIDC Core §11).
            "prompt": "consent",
        }
        if client.secret is not None:
            provider["client_secret"] = client.secret
        cfg["provider"] = provider
        return cfg


@pytest.fixture
async def env(redis_server: RedisServer) -> AsyncIterator[Env]:
    if not interop_available():
        pytest.fail(f"interop OpenID provider is not installed: {INSTALL_HINT}")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    idp = await start_interop_idp(
        {"clients": [registration(CONFIDENTIAL, url), registration(PUBLIC, url)]}
    )
    try:
        echo = await start_echo()
        try:
            yield Env(port, url, idp, echo, redis_server)
        finally:
            await echo.close()
    finally:
        await idp.close()
    assert "server_error" not in idp.stderr_tail, idp.stderr_tail


class GatewayStarter(Protocol):
    def __call__(
        self, env: Env, client: Client, mode: str = "in_process"
    ) -> Awaitable[Callable[[], str]]: ...


@pytest.fixture
async def run_gateway(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> AsyncIterator[GatewayStarter]:
    """Start the gateway in-process or as a subprocess; returns a function giving its log."""
    closers: list[Callable[[], Awaitable[None]]] = []

    async def in_process(env: Env, client: Client) -> Callable[[], str]:
        app = create_app(validate(env.config(client), env={}))
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        closers.append(runner.cleanup)
        await web.TCPSite(runner, "127.0.0.1", env.port).start()
        caplog.set_level(logging.DEBUG, logger="gateway")
        return lambda: caplog.text

    async def subprocess(env: Env, client: Client) -> Callable[[], str]:
        proc = await start_gateway_process(env.config(client), tmp_path)
        closers.append(proc.close)
        return proc.log

    modes = {"in_process": in_process, "subprocess": subprocess}

    async def start(env: Env, client: Client, mode: str = "in_process") -> Callable[[], str]:
        return await modes[mode](env, client)

    yield start
    for close in reversed(closers):
        await close()


def jar_session() -> aiohttp.ClientSession:
    # unsafe=True: the servers live on 127.0.0.1 and aiohttp's default jar drops IP cookies.
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True), headers=NAVIGATE)


async def get_json(http: aiohttp.ClientSession, url: str, **kw: Any) -> tuple[int, Any]:
    headers = {"Accept": "application/json", "Sec-Fetch-Mode": "cors", **kw.pop("headers", {})}
    async with http.get(url, headers=headers, allow_redirects=False, **kw) as resp:
        text = await resp.text()
        return resp.status, json.loads(text) if text else None


async def provider_userinfo(env: Env, token: str) -> int:
    """What oidc-provider itself says about a bearer token (200 while it is valid)."""
    async with aiohttp.ClientSession() as http:
        status, _ = await get_json(
            http, env.idp.issuer + "/me", headers={"Authorization": f"Bearer {token}"}
        )
        return status


async def login_to_deep_link(env: Env, http: aiohttp.ClientSession, login: str) -> dict[str, str]:
    """Deep link → oidc-provider login + consent → deep link; the headers the echo received."""
    result = await interop_login(http, env.url + DEEP_LINK, login)
    assert result.status == 200, result.history
    assert result.url == env.url + DEEP_LINK, result.history
    assert any("/oauth2/callback?" in step for step in result.history)
    assert "Echo upstream" in result.body
    status, seen = await get_json(http, env.url + DEEP_LINK)
    assert status == 200, seen
    assert seen["path"] == "/reports/2024"
    assert seen["query"] == DEEP_LINK.split("?", 1)[1]
    return {k.lower(): v for k, v in seen["headers"]}


def session_cookie(http: aiohttp.ClientSession) -> str:
    values = [c.value for c in http.cookie_jar if c.key == "gw_test"]
    assert len(values) == 1, [c.key for c in http.cookie_jar]
    return values[0]


async def sign_out(env: Env, http: aiohttp.ClientSession) -> str:
    """The UI's sign-out: GET the confirmation page, POST its form; the 303 target."""
    async with http.get(env.url + "/oauth2/sign_out") as resp:
        assert resp.status == 200
        page = await resp.text()
    match = CSRF_RE.search(page)
    assert match, page
    async with http.post(
        env.url + "/oauth2/sign_out",
        data={"csrf": match.group(1), "rd": ""},
        headers={"Origin": env.url, "Sec-Fetch-Site": "same-origin"},
        allow_redirects=False,
    ) as resp:
        assert resp.status == 303, await resp.text()
        return resp.headers["Location"]


@pytest.mark.parametrize("mode", ["in_process", "subprocess"])
@pytest.mark.parametrize("client", [CONFIDENTIAL, PUBLIC], ids=["confidential", "public"])
async def test_login_proxy_userinfo_sign_out(
    env: Env, run_gateway: GatewayStarter, client: Client, mode: str
) -> None:
    gateway_log = await run_gateway(env, client, mode)
    async with jar_session() as http:
        headers = await login_to_deep_link(env, http, "alice")
        scheme, _, token = headers["authorization"].partition(" ")
        assert scheme == "Bearer" and token
        assert headers["x-forwarded-user"] == "alice"
        assert headers["x-forwarded-email"] == "alice@example.com"
        assert headers["x-forwarded-groups"] == "staff,admins"
        assert headers["x-forwarded-preferred-username"] == "alice"
        assert "gw_test" not in headers.get("cookie", "")
        # The bearer token is a real oidc-provider access token.
        assert await provider_userinfo(env, token) == 200
        cookie = session_cookie(http)
        assert token not in cookie

        status, me = await get_json(http, env.url + "/oauth2/userinfo")
        assert status == 200
        assert me["sub"] == "alice" and me["email"] == "alice@example.com"
        assert token not in json.dumps(me)

        end_session = await sign_out(env, http)
        assert end_session.startswith(env.idp.issuer + "/session/end?"), end_session
        done = await interop_logout(http, end_session, stop_at_origin=env.url)
        assert done.stopped, done.history
        assert done.url.startswith(env.url + "/oauth2/signed_out?state="), done.url
        async with http.get(done.url) as resp:
            assert resp.status == 200
            assert "You have been signed out." in await resp.text()

        # No session any more: not in this browser, not for the old cookie, not at the provider.
        status, _ = await get_json(http, env.url + "/oauth2/userinfo")
        assert status == 401
        async with aiohttp.ClientSession(cookies={"gw_test": cookie}) as replay:
            status, _ = await get_json(replay, env.url + "/oauth2/userinfo")
            assert status == 401
        assert await provider_userinfo(env, token) == 401, "the access token was not revoked"
        # oidc-provider's session ended too: the next visit shows its login prompt again.
        async with http.get(env.url + DEEP_LINK) as resp:
            assert resp.url.host == "127.0.0.1" and resp.url.port == env.idp.port
            assert 'name="prompt" value="login"' in await resp.text()

    log = gateway_log()
    assert "/oauth2/callback" in log  # the access log was captured
    assert cookie not in log and token not in log


async def test_backchannel_logout_from_oidc_provider_ends_session(
    env: Env, run_gateway: GatewayStarter
) -> None:
    await run_gateway(env, CONFIDENTIAL)
    async with jar_session() as http:
        await login_to_deep_link(env, http, "bob")
        status, me = await get_json(http, env.url + "/oauth2/userinfo")
        assert status == 200 and me["sub"] == "bob"
        # Sign out at the provider only; it posts a logout_token to the gateway.
        done = await interop_logout(
            http,
            env.idp.issuer + "/session/end?client_id=" + CONFIDENTIAL.client_id,
        )
        assert done.status == 200, done.history
        status, _ = await get_json(http, env.url + "/oauth2/userinfo")
        assert status == 401
    assert "backchannel.error" not in env.idp.stderr_tail, env.idp.stderr_tail


@pytest.mark.parametrize("client", [CONFIDENTIAL, PUBLIC], ids=["confidential", "public"])
async def test_refresh_with_rotating_refresh_tokens(env: Env, client: Client) -> None:
    """oidc-provider rotates refresh tokens and revokes the grant when a used one comes back;
    a refresh skew longer than the access token's life makes every request refresh."""
    cfg = env.config(client)
    cfg["session"]["refresh_skew"] = "1h"
    runner = web.AppRunner(create_app(validate(cfg, env={})), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", env.port).start()
        async with jar_session() as http:
            first = (await login_to_deep_link(env, http, "alice"))["authorization"]
            seen = [first]
            for _ in range(2):
                status, echoed = await get_json(http, env.url + "/plain")
                assert status == 200, echoed
                seen.append(dict((k.lower(), v) for k, v in echoed["headers"])["authorization"])
            assert len(set(seen)) == 3, "every request should have refreshed the access token"
            # Concurrent requests share one refresh: a rotated refresh token is never replayed.
            answers = await asyncio.gather(*(get_json(http, env.url + f"/c{i}") for i in range(10)))
            assert [status for status, _ in answers] == [200] * 10
            status, echoed = await get_json(http, env.url + "/after")
            assert status == 200, echoed
            headers = {k.lower(): v for k, v in echoed["headers"]}
            assert headers["x-forwarded-user"] == "alice"
            assert await provider_userinfo(env, headers["authorization"].split(" ", 1)[1]) == 200
    finally:
        await runner.cleanup()

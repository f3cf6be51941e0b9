"""private_key_jwt and pushed authorization requests against the npm ``oidc-provider``.

oidc-provider verifies every client assertion (signature with the registered JWK Set, iss,
sub, aud, exp, single-use jti) at its token, revocation, introspection and PAR endpoints,
and serves PAR as RFC 9126 says. Login (to a deep link), refresh (every request, with
rotating refresh tokens), bearer introspection, and sign-out with revocation, for:
private_key_jwt with PAR, private_key_jwt without PAR (provider without the endpoint), a
client-secret client at a provider that requires PAR, and the gateway as a subprocess.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import aiohttp
import pytest
from aiohttp import web

from gateway.app import create_app
from gateway.config import validate
from gateway.echo import RunningEcho, start_echo
from gateway.oidc.client_auth import ClientKey
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
from tests.support.client_keys import certificate, ec_pem, rsa_pem
from tests.support.ports import free_port

pytestmark = pytest.mark.interop

CLIENT_ID = "gw-interop-pkjwt"
SECRET = "interop-secret-0123456789abcdef"
SCOPES = ["openid", "email", "profile", "groups", "offline_access"]
NAVIGATE = {"Accept": "text/html", "Sec-Fetch-Mode": "navigate"}
API = {"Accept": "application/json", "Sec-Fetch-Mode": "cors"}


class World:
    """oidc-provider (with one client registered for ``method``), the echo upstream, and
    the port the gateway will listen on."""

    def __init__(
        self,
        idp: InteropIdp,
        echo: RunningEcho,
        port: int,
        redis: RedisServer,
        method: str,
        audience: str,
    ) -> None:
        self.idp, self.echo, self.port, self.redis = idp, echo, port, redis
        self.method, self.audience = method, audience
        self.url = f"http://127.0.0.1:{port}"

    def provider(self) -> dict[str, Any]:
        """The gateway's provider keys for the registered client."""
        if self.method == "private_key_jwt":
            return {
                "client_auth_method": "private_key_jwt",
                "client_private_key": KEYS,
                "client_assertion_audience": self.audience,
            }
        return {"client_auth_method": self.method, "client_secret": SECRET}

    def config(self, provider: dict[str, Any]) -> dict[str, Any]:
        cfg = gateway_config(self.url, self.idp.issuer, str(self.echo.url), self.redis.url)
        cfg["server"]["port"] = self.port
        cfg["session"]["refresh_skew"] = "1h"  # every request refreshes
        cfg["provider"] = {
            "issuer": self.idp.issuer,
            "client_id": CLIENT_ID,
            "scopes": SCOPES,
            # oidc-provider issues a refresh token for offline_access only with consent.
            "extra_auth_params": {"prompt": "consent"},
            **provider,
        }
        cfg["routes"] = [{"prefix": "/", "upstream": str(self.echo.url), "accept_bearer": True}]
        return cfg


KEYS = [rsa_pem(), ec_pem()]


def registration(url: str, method: str) -> dict[str, Any]:
    reg: dict[str, Any] = {
        "client_id": CLIENT_ID,
        "token_endpoint_auth_method": method,
        "redirect_uris": [url + "/oauth2/callback"],
        "post_logout_redirect_uris": [url + "/oauth2/signed_out"],
    }
    if method == "private_key_jwt":
        reg["jwks"] = {"keys": [ClientKey.from_pem(k).public_jwk for k in KEYS]}
    else:
        reg["client_secret"] = SECRET
    return reg


@pytest.fixture
async def world(redis_server: RedisServer, request: pytest.FixtureRequest) -> AsyncIterator[World]:
    if not interop_available():
        pytest.fail(f"interop OpenID provider is not installed: {INSTALL_HINT}")
    par, method, audience = request.param
    port = free_port()
    idp = await start_interop_idp(
        {
            "clients": [registration(f"http://127.0.0.1:{port}", method)],
            "par": par,
            "access_token_format": "opaque",
        }
    )
    try:
        echo = await start_echo()
        try:
            yield World(idp, echo, port, redis_server, method, audience)
        finally:
            await echo.close()
    finally:
        await idp.close()
    assert "server_error" not in idp.stderr_tail, idp.stderr_tail


async def run_in_process(cfg: dict[str, Any], port: int) -> web.AppRunner:
    runner = web.AppRunner(create_app(validate(cfg, env={})), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


async def status_of(http: aiohttp.ClientSession, url: str, token: str | None = None) -> int:
    headers = dict(API)
    if token:
        headers["Authorization"] = f"Bearer {token}"
    async with http.get(url, headers=headers, allow_redirects=False) as resp:
        return resp.status


async def journey(world: World, *, pushed: bool) -> None:
    """Login → refresh → bearer introspection → sign-out with revocation."""
    async with aiohttp.ClientSession(
        cookie_jar=aiohttp.CookieJar(unsafe=True), headers=NAVIGATE
    ) as http:
        result = await interop_login(http, world.url + "/deep?x=1", "alice")
        assert result.status == 200, result.history
        assert result.url == world.url + "/deep?x=1", result.history
        auth = next(h for h in result.history if h.startswith(f"GET {world.idp.issuer}/auth?"))
        sent = dict(parse_qsl(urlsplit(auth.split()[1]).query))
        if pushed:
            assert set(sent) == {"client_id", "request_uri"}, auth
            assert sent["client_id"] == CLIENT_ID
        else:
            assert {"code_challenge", "state", "nonce"} <= set(sent), auth

        tokens = []
        for i in range(2):  # each request refreshes with the rotated refresh token
            async with http.get(world.url + f"/r{i}", headers=API) as resp:
                assert resp.status == 200
                seen = {k.lower(): v for k, v in (await resp.json())["headers"]}
                tokens.append(seen["authorization"].removeprefix("Bearer "))
        assert len(set(tokens)) == 2
        async with aiohttp.ClientSession() as api:
            # The gateway introspects an API client's opaque token at oidc-provider.
            assert await status_of(api, world.url + "/api", tokens[-1]) == 200
            assert await status_of(api, world.idp.issuer + "/me", tokens[-1]) == 200

        async with http.get(world.url + "/oauth2/sign_out") as resp:
            page = await resp.text()
        csrf = page.split('name="csrf" value="', 1)[1].split('"', 1)[0]
        async with http.post(
            world.url + "/oauth2/sign_out",
            data={"csrf": csrf, "rd": ""},
            headers={"Origin": world.url, "Sec-Fetch-Site": "same-origin"},
            allow_redirects=False,
        ) as resp:
            assert resp.status == 303
            end_session = resp.headers["Location"]
        async with aiohttp.ClientSession() as api:
            # Revoked by the sign-out POST (before the provider's session ends): oidc-provider
            # accepted the authenticated revocation and no longer takes the access token.
            assert await status_of(api, world.idp.issuer + "/me", tokens[-1]) == 401
        done = await interop_logout(http, end_session, stop_at_origin=world.url)
        assert done.stopped, done.history
        assert await status_of(http, world.url + "/oauth2/userinfo") == 401


@pytest.mark.parametrize(
    ("world", "pushed"),
    [
        (("enabled", "private_key_jwt", "issuer"), True),
        (("enabled", "private_key_jwt", "endpoint"), True),
        (("off", "private_key_jwt", "token_endpoint"), False),
        (("required", "client_secret_basic", "issuer"), True),
    ],
    ids=[
        "private_key_jwt+par",
        "private_key_jwt+par-aud-endpoint",
        "private_key_jwt-no-par-aud-token-endpoint",
        "secret+par-required",
    ],
    indirect=["world"],
)
async def test_login_refresh_introspection_sign_out(world: World, pushed: bool) -> None:
    runner = await run_in_process(world.config(world.provider()), world.port)
    try:
        await journey(world, pushed=pushed)
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("world", [("enabled", "private_key_jwt", "issuer")], indirect=True)
async def test_gateway_run_with_a_key_file(world: World, tmp_path: Path) -> None:
    key_file = tmp_path / "client.pem"
    key_file.write_text(KEYS[0])
    cfg = world.config(
        {"client_auth_method": "private_key_jwt", "client_private_key": str(key_file)}
    )
    proc = await start_gateway_process(cfg, tmp_path)
    try:
        await journey(world, pushed=True)
    finally:
        await proc.close()
    assert "PRIVATE KEY" not in proc.log()


@pytest.mark.parametrize("world", [("off", "private_key_jwt", "token_endpoint")], indirect=True)
async def test_certificate_style_assertions(world: World) -> None:
    """With a certificate the header also names it (x5t#S256, x5t) and nbf is set, as
    Microsoft Entra ID wants; oidc-provider accepts such assertions all the same."""
    cfg = world.config({**world.provider(), "client_certificate": certificate(KEYS[0])})
    runner = await run_in_process(cfg, world.port)
    try:
        await journey(world, pushed=False)
    finally:
        await runner.cleanup()


async def test_offline_access_implies_consent_for_pushed_requests_too() -> None:
    """server.mjs's ``offline_access_implies_consent_prompt`` covers a pushed request (its
    parameters are in the PAR body): a refresh token without the client sending prompt."""
    import base64
    import hashlib
    import secrets

    if not interop_available():
        pytest.fail(f"interop OpenID provider is not installed: {INSTALL_HINT}")
    rp = f"http://127.0.0.1:{free_port()}"
    idp = await start_interop_idp(
        {
            "clients": [registration(rp, "client_secret_basic")],
            "offline_access_implies_consent_prompt": True,
        }
    )
    basic = {
        "Authorization": "Basic " + base64.b64encode(f"{CLIENT_ID}:{SECRET}".encode()).decode()
    }
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=")
    try:
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
            push = {
                "response_type": "code",
                "client_id": CLIENT_ID,
                "redirect_uri": rp + "/oauth2/callback",
                "scope": "openid offline_access",
                "state": secrets.token_urlsafe(16),
                "nonce": secrets.token_urlsafe(16),
                "code_challenge": challenge.decode(),
                "code_challenge_method": "S256",
            }
            async with http.post(idp.issuer + "/request", data=push, headers=basic) as resp:
                assert resp.status == 201, await resp.text()
                uri = (await resp.json())["request_uri"]
            query = urlencode({"client_id": CLIENT_ID, "request_uri": uri})
            done = await interop_login(
                http, f"{idp.issuer}/auth?{query}", "frank", stop_at_origin=rp
            )
            assert done.stopped, done.history
            form = {
                "grant_type": "authorization_code",
                "code": done.query["code"],
                "redirect_uri": rp + "/oauth2/callback",
                "code_verifier": verifier,
            }
            async with http.post(idp.issuer + "/token", data=form, headers=basic) as resp:
                tokens = await resp.json()
            assert tokens["refresh_token"]
            assert "offline_access" in tokens["scope"].split()
    finally:
        await idp.close()
    assert "server_error" not in idp.stderr_tail, idp.stderr_tail

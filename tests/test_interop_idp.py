"""Smoke tests of the interop OpenID provider helper (tests/interop_idp.py) on its own.

These drive the npm ``oidc-provider`` by hand with aiohttp: discovery, authorization code +
PKCE for a confidential and a public client, ID token verification against the JWKS,
refresh token rotation, revocation, introspection, RP-initiated and back-channel logout.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import aiohttp
import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.interop_idp import (
    INSTALL_HINT,
    InteropIdp,
    interop_available,
    interop_login,
    interop_logout,
    start_interop_idp,
)

pytestmark = pytest.mark.interop

CONFIDENTIAL_ID = "gw-confidential"
CONFIDENTIAL_SECRET = "s3cret-confidential-xxxxxxxxxxxxxxxx"
PUBLIC_ID = "gw-public"
SCOPE = "openid email profile groups offline_access"

ServerFactory = Callable[..., Awaitable[TestServer]]


def _basic(client_id: str = CONFIDENTIAL_ID, secret: str = CONFIDENTIAL_SECRET) -> dict[str, str]:
    return {"Authorization": aiohttp.encode_basic_auth(client_id, secret)}


def _pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode()).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


@dataclass
class Rp:
    """A tiny relying party: callback page + back-channel logout receiver."""

    origin: str
    callback: str
    logout_tokens: list[str]


@pytest.fixture
def require_interop() -> None:
    if not interop_available():
        pytest.fail(f"interop OpenID provider is not installed: {INSTALL_HINT}")


@pytest.fixture
async def rp(aiohttp_server: ServerFactory) -> Rp:
    tokens: list[str] = []

    async def callback(request: web.Request) -> web.Response:
        return web.Response(text="callback reached")

    async def backchannel_logout(request: web.Request) -> web.Response:
        form = await request.post()
        tokens.append(str(form["logout_token"]))
        return web.Response(status=200)

    app = web.Application()
    app.router.add_get("/oauth2/callback", callback)
    app.router.add_post("/oauth2/backchannel_logout", backchannel_logout)
    server = await aiohttp_server(app, host="127.0.0.1")
    origin = str(server.make_url("")).rstrip("/")
    return Rp(origin=origin, callback=f"{origin}/oauth2/callback", logout_tokens=tokens)


def _config(rp: Rp, **extra: Any) -> dict[str, Any]:
    return {
        "port": 0,
        "host": "127.0.0.1",
        "clients": [
            {
                "client_id": CONFIDENTIAL_ID,
                "client_secret": CONFIDENTIAL_SECRET,
                "token_endpoint_auth_method": "client_secret_basic",
                "redirect_uris": [rp.callback],
                "post_logout_redirect_uris": [f"{rp.origin}/"],
                "backchannel_logout_uri": f"{rp.origin}/oauth2/backchannel_logout",
            },
            {
                "client_id": PUBLIC_ID,
                "token_endpoint_auth_method": "none",
                "redirect_uris": [rp.callback],
            },
        ],
        "access_token_ttl": 300,
        "id_token_ttl": 300,
        "refresh_token_ttl": 86400,
        "access_token_format": "opaque",
        **extra,
    }


@pytest.fixture
async def idp(require_interop: None, rp: Rp) -> AsyncIterator[InteropIdp]:
    provider = await start_interop_idp(_config(rp))
    try:
        yield provider
    finally:
        await provider.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        yield session


async def _json(resp: aiohttp.ClientResponse) -> dict[str, Any]:
    data: dict[str, Any] = await resp.json(content_type=None)
    return data


async def _discovery(http: aiohttp.ClientSession, issuer: str) -> dict[str, Any]:
    async with http.get(f"{issuer}/.well-known/openid-configuration") as resp:
        assert resp.status == 200
        return await _json(resp)


async def _verify(http: aiohttp.ClientSession, meta: dict[str, Any], token: str, **kw: Any) -> Any:
    async with http.get(meta["jwks_uri"]) as resp:
        jwks = jwt.PyJWKSet.from_dict(await _json(resp))
    key = next(k for k in jwks.keys if k.key_id == jwt.get_unverified_header(token)["kid"])
    return jwt.decode(token, key, algorithms=["RS256"], issuer=meta["issuer"], **kw)


async def _authorize(
    http: aiohttp.ClientSession,
    meta: dict[str, Any],
    rp: Rp,
    client_id: str,
    login: str,
    **params: str,
) -> tuple[dict[str, str], str, str]:
    """Log in through the provider's pages; return (callback query, code_verifier, nonce)."""
    verifier, challenge = _pkce()
    nonce = secrets.token_urlsafe(16)
    query = {
        "response_type": "code",
        "client_id": client_id,
        "redirect_uri": rp.callback,
        "scope": SCOPE,
        "state": "st-" + secrets.token_urlsafe(8),
        "nonce": nonce,
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        "prompt": "consent",  # OIDC Core: offline_access is ignored without it
        **params,
    }
    query = {k: v for k, v in query.items() if v}  # pass prompt="" to leave it out
    url = f"{meta['authorization_endpoint']}?{urlencode(query)}"
    result = await interop_login(http, url, login, stop_at_origin=rp.origin)
    assert result.stopped, result.history
    assert result.url.startswith(rp.callback)
    assert result.query["state"] == query["state"]
    assert result.query["iss"] == meta["issuer"]  # RFC 9207 iss parameter
    return result.query, verifier, nonce


async def _token(
    http: aiohttp.ClientSession,
    meta: dict[str, Any],
    data: dict[str, str],
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any]]:
    async with http.post(meta["token_endpoint"], data=data, headers=headers or {}) as resp:
        return resp.status, await _json(resp)


async def _code_tokens(
    http: aiohttp.ClientSession, meta: dict[str, Any], rp: Rp, login: str, **params: str
) -> dict[str, Any]:
    callback, verifier, _ = await _authorize(http, meta, rp, CONFIDENTIAL_ID, login, **params)
    status, tokens = await _token(
        http,
        meta,
        {
            "grant_type": "authorization_code",
            "code": callback["code"],
            "redirect_uri": rp.callback,
            "code_verifier": verifier,
        },
        _basic(),
    )
    assert status == 200, tokens
    return tokens


async def _introspect(http: aiohttp.ClientSession, meta: dict[str, Any], token: str) -> Any:
    async with http.post(
        meta["introspection_endpoint"], data={"token": token}, headers=_basic()
    ) as resp:
        assert resp.status == 200
        return await _json(resp)


async def test_discovery(idp: InteropIdp, http: aiohttp.ClientSession) -> None:
    assert idp.issuer == f"http://127.0.0.1:{idp.port}"
    meta = await _discovery(http, idp.issuer)
    assert meta["issuer"] == idp.issuer
    assert meta["code_challenge_methods_supported"] == ["S256"]
    assert meta["authorization_response_iss_parameter_supported"] is True
    assert meta["backchannel_logout_supported"] is True
    assert meta["backchannel_logout_session_supported"] is True
    assert meta["response_types_supported"] == ["code"]
    for endpoint in ("revocation_endpoint", "introspection_endpoint", "end_session_endpoint"):
        assert meta[endpoint].startswith(idp.issuer + "/")
    assert {"openid", "offline_access", "email", "profile", "groups"} <= set(
        meta["scopes_supported"]
    )


async def test_pkce_is_required(idp: InteropIdp, http: aiohttp.ClientSession, rp: Rp) -> None:
    meta = await _discovery(http, idp.issuer)
    query = {
        "response_type": "code",
        "client_id": CONFIDENTIAL_ID,
        "redirect_uri": rp.callback,
        "scope": "openid",
        "state": "s1",
    }
    url = f"{meta['authorization_endpoint']}?{urlencode(query)}"
    result = await interop_login(http, url, "bob", stop_at_origin=rp.origin)
    assert result.stopped
    assert result.query["error"] == "invalid_request"
    assert "PKCE" in result.query["error_description"]


async def test_confidential_client_code_flow_refresh_revoke(
    idp: InteropIdp, http: aiohttp.ClientSession, rp: Rp
) -> None:
    meta = await _discovery(http, idp.issuer)
    callback, verifier, nonce = await _authorize(http, meta, rp, CONFIDENTIAL_ID, "alice")

    status, tokens = await _token(
        http,
        meta,
        {
            "grant_type": "authorization_code",
            "code": callback["code"],
            "redirect_uri": rp.callback,
            "code_verifier": verifier,
        },
        _basic(),
    )
    assert status == 200, tokens
    assert tokens["token_type"] == "Bearer"
    assert set(tokens["scope"].split()) == set(SCOPE.split())
    claims = await _verify(http, meta, tokens["id_token"], audience=CONFIDENTIAL_ID)
    assert claims["aud"] == CONFIDENTIAL_ID  # a plain string, not a list
    assert claims["nonce"] == nonce
    assert claims["sub"] == "alice"
    assert claims["email"] == "alice@example.com"
    assert claims["email_verified"] is True
    assert claims["preferred_username"] == "alice"
    assert claims["groups"] == ["staff", "admins"]
    assert claims["sid"]

    async with http.get(
        meta["userinfo_endpoint"], headers={"Authorization": f"Bearer {tokens['access_token']}"}
    ) as resp:
        assert resp.status == 200
        assert (await _json(resp))["groups"] == ["staff", "admins"]

    # Every refresh rotates the refresh token.
    old_refresh = tokens["refresh_token"]
    status, refreshed = await _token(
        http, meta, {"grant_type": "refresh_token", "refresh_token": old_refresh}, _basic()
    )
    assert status == 200, refreshed
    assert refreshed["refresh_token"] != old_refresh
    assert refreshed["access_token"] != tokens["access_token"]
    new_claims = await _verify(http, meta, refreshed["id_token"], audience=CONFIDENTIAL_ID)
    assert new_claims["sub"] == "alice"
    assert new_claims["sid"] == claims["sid"]

    info = await _introspect(http, meta, refreshed["access_token"])
    assert info["active"] is True
    assert info["client_id"] == CONFIDENTIAL_ID
    assert info["sub"] == "alice"
    assert info["token_type"] == "Bearer"
    assert (await _introspect(http, meta, refreshed["refresh_token"]))["active"] is True
    assert (await _introspect(http, meta, old_refresh))["active"] is False

    # Replaying the rotated refresh token fails -- and revokes every token of the grant.
    status, error = await _token(
        http, meta, {"grant_type": "refresh_token", "refresh_token": old_refresh}, _basic()
    )
    assert (status, error["error"]) == (400, "invalid_grant")
    assert (await _introspect(http, meta, refreshed["access_token"]))["active"] is False
    status, error = await _token(
        http,
        meta,
        {"grant_type": "refresh_token", "refresh_token": refreshed["refresh_token"]},
        _basic(),
    )
    assert (status, error["error"]) == (400, "invalid_grant")

    # Log in again (the provider session remains, only consent is asked), then revoke the
    # access token: that revokes all tokens of its grant, the refresh token included.
    tokens = await _code_tokens(http, meta, rp, "ignored")
    assert (await _introspect(http, meta, tokens["access_token"]))["sub"] == "alice"
    async with http.post(
        meta["revocation_endpoint"],
        data={"token": tokens["access_token"], "token_type_hint": "access_token"},
        headers=_basic(),
    ) as resp:
        assert resp.status == 200
    assert (await _introspect(http, meta, tokens["access_token"]))["active"] is False
    assert (await _introspect(http, meta, tokens["refresh_token"]))["active"] is False


async def test_public_client_code_flow_and_refresh(
    idp: InteropIdp, http: aiohttp.ClientSession, rp: Rp
) -> None:
    meta = await _discovery(http, idp.issuer)
    callback, verifier, nonce = await _authorize(http, meta, rp, PUBLIC_ID, "bob")

    status, tokens = await _token(
        http,
        meta,
        {
            "grant_type": "authorization_code",
            "code": callback["code"],
            "redirect_uri": rp.callback,
            "code_verifier": "wrong-" + verifier,
            "client_id": PUBLIC_ID,
        },
    )
    assert (status, tokens["error"]) == (400, "invalid_grant")  # bad verifier burns the code

    callback, verifier, nonce = await _authorize(http, meta, rp, PUBLIC_ID, "bob")
    status, tokens = await _token(
        http,
        meta,
        {
            "grant_type": "authorization_code",
            "code": callback["code"],
            "redirect_uri": rp.callback,
            "code_verifier": verifier,
            "client_id": PUBLIC_ID,
        },
    )
    assert status == 200, tokens
    claims = await _verify(http, meta, tokens["id_token"], audience=PUBLIC_ID)
    assert (claims["sub"], claims["nonce"], claims["groups"]) == ("bob", nonce, ["staff"])

    status, refreshed = await _token(
        http,
        meta,
        {
            "grant_type": "refresh_token",
            "refresh_token": tokens["refresh_token"],
            "client_id": PUBLIC_ID,
        },
    )
    assert status == 200, refreshed
    assert refreshed["refresh_token"] != tokens["refresh_token"]
    status, error = await _token(
        http,
        meta,
        {
            "grant_type": "refresh_token",
            "refresh_token": tokens["refresh_token"],
            "client_id": PUBLIC_ID,
        },
    )
    assert (status, error["error"]) == (400, "invalid_grant")


async def test_jwt_access_tokens(
    require_interop: None, http: aiohttp.ClientSession, rp: Rp
) -> None:
    idp = await start_interop_idp(_config(rp, access_token_format="jwt"))
    try:
        meta = await _discovery(http, idp.issuer)
        callback, verifier, _ = await _authorize(http, meta, rp, CONFIDENTIAL_ID, "alice")
        status, tokens = await _token(
            http,
            meta,
            {
                "grant_type": "authorization_code",
                "code": callback["code"],
                "redirect_uri": rp.callback,
                "code_verifier": verifier,
            },
            _basic(),
        )
        assert status == 200, tokens
        assert jwt.get_unverified_header(tokens["access_token"])["typ"] == "at+jwt"
        access = await _verify(
            http, meta, tokens["access_token"], audience="urn:gateway:interop:api"
        )
        assert access["sub"] == "alice"
        assert access["client_id"] == CONFIDENTIAL_ID

        # A replayed authorization code fails and revokes what it was exchanged for.
        status, error = await _token(
            http,
            meta,
            {
                "grant_type": "authorization_code",
                "code": callback["code"],
                "redirect_uri": rp.callback,
                "code_verifier": verifier,
            },
            _basic(),
        )
        assert (status, error["error"]) == (400, "invalid_grant")
        status, error = await _token(
            http,
            meta,
            {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]},
            _basic(),
        )
        assert (status, error["error"]) == (400, "invalid_grant")
    finally:
        await idp.close()


async def test_offline_access_needs_prompt_consent_unless_configured(
    idp: InteropIdp, http: aiohttp.ClientSession, rp: Rp
) -> None:
    meta = await _discovery(http, idp.issuer)
    tokens = await _code_tokens(http, meta, rp, "erin", prompt="")
    assert "refresh_token" not in tokens
    assert "offline_access" not in tokens["scope"].split()

    lenient = await start_interop_idp(_config(rp, offline_access_implies_consent_prompt=True))
    try:
        meta = await _discovery(http, lenient.issuer)
        tokens = await _code_tokens(http, meta, rp, "erin", prompt="")
        assert tokens["refresh_token"]
        assert "offline_access" in tokens["scope"].split()
    finally:
        await lenient.close()


async def test_rp_initiated_and_backchannel_logout(
    idp: InteropIdp, http: aiohttp.ClientSession, rp: Rp
) -> None:
    meta = await _discovery(http, idp.issuer)
    tokens = await _code_tokens(http, meta, rp, "carol")
    id_claims = await _verify(http, meta, tokens["id_token"], audience=CONFIDENTIAL_ID)

    query = {
        "id_token_hint": tokens["id_token"],
        "post_logout_redirect_uri": f"{rp.origin}/",
        "state": "bye",
    }
    result = await interop_logout(
        http, f"{meta['end_session_endpoint']}?{urlencode(query)}", stop_at_origin=rp.origin
    )
    assert result.stopped, result.history
    assert result.url == f"{rp.origin}/?state=bye"

    # The back-channel logout request was delivered before the redirect.
    assert len(rp.logout_tokens) == 1
    logout = await _verify(http, meta, rp.logout_tokens[0], audience=CONFIDENTIAL_ID)
    assert logout["sub"] == "carol"
    assert logout["sid"] == id_claims["sid"]
    assert "http://schemas.openid.net/event/backchannel-logout" in logout["events"]
    assert "nonce" not in logout
    assert logout["jti"]
    assert jwt.get_unverified_header(rp.logout_tokens[0])["typ"] == "logout+jwt"

    # offline_access grants survive logout: the refresh token is still active until the
    # RP revokes it (revoking a refresh token revokes its whole grant).
    assert (await _introspect(http, meta, tokens["refresh_token"]))["active"] is True
    async with http.post(
        meta["revocation_endpoint"], data={"token": tokens["refresh_token"]}, headers=_basic()
    ) as resp:
        assert resp.status == 200
    assert (await _introspect(http, meta, tokens["refresh_token"]))["active"] is False
    assert (await _introspect(http, meta, tokens["access_token"]))["active"] is False

    # The provider session is gone: the next login shows the login form again.
    tokens = await _code_tokens(http, meta, rp, "dave")
    assert (await _verify(http, meta, tokens["id_token"], audience=CONFIDENTIAL_ID))[
        "sub"
    ] == "dave"


async def test_start_failure_reports_stderr(require_interop: None) -> None:
    with pytest.raises(RuntimeError, match="refusing to listen on non-loopback host"):
        await start_interop_idp({"host": "0.0.0.0", "clients": []})

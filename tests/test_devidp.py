"""The development OpenID provider, over real HTTP on loopback (no mocks).

PKCE is made by hand here on purpose: the gateway's own helpers are tested elsewhere.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote_plus

import aiohttp
import jwt
import pytest
from aiohttp import web
from yarl import URL

from gateway.devidp import (
    STATE_KEY,
    ClientRegistration,
    DevIdpConfig,
    Faults,
    RunningIdp,
    demo_users,
    start_devidp,
)
from tests.idp_client import http_login

CALLBACK = "http://127.0.0.1:9/callback"  # never contacted: logins stop at it
BYE = "http://127.0.0.1:9/bye"
SECRETS = {"web": "s3cr:et/+", "post": "post-secret", "spa": None}
METHODS = {"web": "client_secret_basic", "post": "client_secret_post", "spa": "none"}
SCOPE = "openid email profile offline_access"
BCL_EVENT = "http://schemas.openid.net/event/backchannel-logout"

Start = Callable[..., Awaitable[RunningIdp]]


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def pkce() -> tuple[str, str]:
    verifier = b64url(secrets.token_bytes(48))  # 64 characters
    return verifier, b64url(hashlib.sha256(verifier.encode()).digest())


def make_cfg(backchannel: str | None = None, **overrides: Any) -> DevIdpConfig:
    clients = [
        ClientRegistration(
            client_id=cid,
            client_secret=SECRETS[cid],
            redirect_uris=(CALLBACK,),
            token_endpoint_auth_method=METHODS[cid],
            post_logout_redirect_uris=(BYE,),
            backchannel_logout_uri=backchannel if cid == "web" else None,
        )
        for cid in SECRETS
    ]
    return DevIdpConfig(users=demo_users(), clients=clients, **overrides)


@pytest.fixture
async def start() -> AsyncIterator[Start]:
    running: list[RunningIdp] = []

    async def _start(backchannel: str | None = None, **overrides: Any) -> RunningIdp:
        idp = await start_devidp(make_cfg(backchannel, **overrides))
        running.append(idp)
        return idp

    yield _start
    for idp in running:
        await idp.close()


@pytest.fixture
async def idp(start: Start) -> RunningIdp:
    return await start()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        yield session


@dataclass
class Authz:
    params: dict[str, str]
    verifier: str
    nonce: str
    state: str

    @property
    def code(self) -> str:
        return self.params["code"]


async def authorize(
    http: aiohttp.ClientSession,
    idp: RunningIdp,
    *,
    client: str = "web",
    scope: str = SCOPE,
    user: str = "alice",
    consent: str = "approve",
    extra: dict[str, str] | None = None,
) -> Authz:
    verifier, challenge = pkce()
    nonce, state = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
    query = {
        "client_id": client,
        "redirect_uri": CALLBACK,
        "response_type": "code",
        "scope": scope,
        "state": state,
        "nonce": nonce,
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        **(extra or {}),
    }
    query = {k: v for k, v in query.items() if v != ""}
    url = URL(idp.url + "/authorize").with_query(query)
    result = await http_login(http, str(url), user, user, consent=consent, stop_at=CALLBACK)
    assert result.status == 302, result.body
    assert result.location is not None
    return Authz(dict(URL(result.location).query), verifier, nonce, state)


def client_auth(client: str, form: dict[str, str]) -> dict[str, str]:
    """Adds the client's credentials to ``form``; returns the headers to send."""
    secret = SECRETS[client]
    if METHODS[client] == "client_secret_basic":
        assert secret is not None
        raw = f"{quote_plus(client)}:{quote_plus(secret)}".encode()
        return {"Authorization": "Basic " + base64.b64encode(raw).decode()}
    form["client_id"] = client
    if secret is not None:
        form["client_secret"] = secret
    return {}


async def post(
    http: aiohttp.ClientSession, idp: RunningIdp, path: str, form: dict[str, str], client: str
) -> tuple[int, Any, Any]:
    form = dict(form)
    headers = client_auth(client, form)
    async with http.post(idp.url + path, data=form, headers=headers) as resp:
        text = await resp.text()
        body = json.loads(text) if resp.content_type == "application/json" else text
        return resp.status, body, resp.headers


async def exchange(
    http: aiohttp.ClientSession, idp: RunningIdp, authz: Authz, client: str = "web"
) -> tuple[int, Any, Any]:
    form = {
        "grant_type": "authorization_code",
        "code": authz.code,
        "redirect_uri": CALLBACK,
        "code_verifier": authz.verifier,
    }
    return await post(http, idp, "/token", form, client)


async def login_tokens(
    http: aiohttp.ClientSession, idp: RunningIdp, client: str = "web", **kw: Any
) -> tuple[Authz, dict[str, Any]]:
    authz = await authorize(http, idp, client=client, **kw)
    status, body, _ = await exchange(http, idp, authz, client)
    assert status == 200, body
    return authz, body


async def refresh(
    http: aiohttp.ClientSession, idp: RunningIdp, token: str, client: str = "web"
) -> tuple[int, Any, Any]:
    form = {"grant_type": "refresh_token", "refresh_token": token}
    return await post(http, idp, "/token", form, client)


async def jwks(http: aiohttp.ClientSession, idp: RunningIdp) -> jwt.PyJWKSet:
    async with http.get(idp.url + "/jwks") as resp:
        return jwt.PyJWKSet.from_dict(await resp.json())


async def verify(
    http: aiohttp.ClientSession, idp: RunningIdp, token: str, aud: str = "web"
) -> dict[str, Any]:
    keys = await jwks(http, idp)
    header = jwt.get_unverified_header(token)
    key = keys[header["kid"]]
    claims: dict[str, Any] = jwt.decode(
        token, key, algorithms=[header["alg"]], audience=aud, issuer=idp.url
    )
    return claims


def unverified(token: str) -> dict[str, Any]:
    claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return claims


# -- metadata and keys ---------------------------------------------------------------


async def test_discovery_fields(http: aiohttp.ClientSession, idp: RunningIdp) -> None:
    async with http.get(idp.url + "/.well-known/openid-configuration") as resp:
        meta = await resp.json()
    assert meta["issuer"] == idp.url
    for name in ("authorization", "token", "userinfo", "revocation", "introspection"):
        assert meta[f"{name}_endpoint"].startswith(idp.url + "/")
    assert meta["end_session_endpoint"] == idp.url + "/end_session"
    assert meta["jwks_uri"] == idp.url + "/jwks"
    assert meta["response_types_supported"] == ["code"]
    assert meta["grant_types_supported"] == ["authorization_code", "refresh_token"]
    assert meta["code_challenge_methods_supported"] == ["S256"]
    assert meta["id_token_signing_alg_values_supported"] == ["RS256"]
    assert set(meta["token_endpoint_auth_methods_supported"]) == set(METHODS.values())
    assert "openid" in meta["scopes_supported"] and "groups" in meta["claims_supported"]
    assert meta["authorization_response_iss_parameter_supported"] is True
    assert meta["backchannel_logout_supported"] is True
    assert meta["backchannel_logout_session_supported"] is True
    assert meta["subject_types_supported"] == ["public"]


@pytest.mark.parametrize("alg", ["RS256", "ES256"])
async def test_jwks_verifies_id_token(http: aiohttp.ClientSession, start: Start, alg: str) -> None:
    idp = await start(signing_alg=alg)
    async with http.get(idp.url + "/jwks") as resp:
        published = (await resp.json())["keys"]
    assert [(k["alg"], k["use"]) for k in published] == [(alg, "sig")]
    assert "d" not in published[0]
    authz, tokens = await login_tokens(http, idp)
    claims = await verify(http, idp, tokens["id_token"])
    assert jwt.get_unverified_header(tokens["id_token"])["kid"] == published[0]["kid"]
    assert claims["nonce"] == authz.nonce


async def test_key_rotation_keeps_both_keys(http: aiohttp.ClientSession, idp: RunningIdp) -> None:
    _, before = await login_tokens(http, idp)
    old_kid = jwt.get_unverified_header(before["id_token"])["kid"]
    idp.state.rotate_keys()
    kids = [k.key_id for k in (await jwks(http, idp)).keys]
    assert len(kids) == 2 and old_kid in kids
    _, after = await login_tokens(http, idp)
    new_kid = jwt.get_unverified_header(after["id_token"])["kid"]
    assert new_kid != old_kid and new_kid in kids
    await verify(http, idp, before["id_token"])
    await verify(http, idp, after["id_token"])


async def test_sign_forges_tokens_with_current_or_unpublished_key(
    http: aiohttp.ClientSession, idp: RunningIdp
) -> None:
    claims = {"iss": idp.url, "aud": "web", "sub": "alice", "exp": int(time.time()) + 60}
    token = idp.state.sign(claims, {"typ": "logout+jwt"})
    assert jwt.get_unverified_header(token)["typ"] == "logout+jwt"
    assert (await verify(http, idp, token))["sub"] == "alice"
    hidden = idp.state.sign(claims, key="unpublished")
    kids = [k.key_id for k in (await jwks(http, idp)).keys]
    assert jwt.get_unverified_header(hidden)["kid"] not in kids
    idp.state.rotate_keys()  # the unpublished key is the next one to be published
    assert (await verify(http, idp, hidden))["sub"] == "alice"


# -- authorization endpoint ------------------------------------------------------------


async def test_code_flow_with_pkce(http: aiohttp.ClientSession, idp: RunningIdp) -> None:
    authz = await authorize(http, idp)
    assert authz.params["state"] == authz.state
    assert authz.params["iss"] == idp.url
    cookie = next(c for c in http.cookie_jar if c.key == "devidp_session")
    assert cookie["httponly"] and cookie["samesite"] == "Lax" and cookie["path"] == "/"
    status, tokens, headers = await exchange(http, idp, authz)
    assert status == 200
    assert headers["Cache-Control"] == "no-store"
    assert tokens["token_type"] == "Bearer" and tokens["expires_in"] == 300
    assert tokens["scope"] == SCOPE and tokens["refresh_expires_in"] == 86400
    assert tokens["refresh_token"]
    claims = await verify(http, idp, tokens["id_token"])
    assert claims["sub"] == "alice" and claims["nonce"] == authz.nonce
    assert claims["groups"] == ["admins", "staff"] and claims["email"] == "alice@example.com"
    assert claims["email_verified"] is True and claims["preferred_username"] == "alice"
    assert claims["sid"] and claims["auth_time"] <= claims["iat"] < claims["exp"]
    digest = hashlib.sha256(tokens["access_token"].encode()).digest()
    assert claims["at_hash"] == b64url(digest[:16])
    assert jwt.get_unverified_header(tokens["access_token"])["typ"] == "at+jwt"
    access = await verify(http, idp, tokens["access_token"])
    assert access["client_id"] == "web" and access["scope"] == SCOPE and access["jti"]
    assert access["groups"] == ["admins", "staff"]


@pytest.mark.parametrize(
    "extra",
    [
        {"code_challenge": "", "code_challenge_method": ""},
        {"code_challenge_method": "plain"},
        {"code_challenge_method": ""},
        {"code_challenge": "short"},
        {"response_type": "token"},
    ],
)
async def test_bad_authorization_requests_redirect_with_error(
    http: aiohttp.ClientSession, idp: RunningIdp, extra: dict[str, str]
) -> None:
    authz = await authorize(http, idp, extra=extra)
    error = "unsupported_response_type" if "response_type" in extra else "invalid_request"
    assert authz.params["error"] == error
    assert authz.params["state"] == authz.state and authz.params["iss"] == idp.url
    assert "code" not in authz.params


@pytest.mark.parametrize(
    "query",
    [
        {"client_id": "web", "redirect_uri": "http://127.0.0.1:9/evil"},
        {"client_id": "web", "redirect_uri": CALLBACK + "/"},
        {"client_id": "nobody", "redirect_uri": CALLBACK},
        {"client_id": "web"},
    ],
)
async def test_bad_client_or_redirect_uri_never_redirects(
    http: aiohttp.ClientSession, idp: RunningIdp, query: dict[str, str]
) -> None:
    url = URL(idp.url + "/authorize").with_query(response_type="code", **query)
    async with http.get(url, allow_redirects=False) as resp:
        assert resp.status == 400
        assert "Location" not in resp.headers
        assert resp.content_type == "text/html"


async def test_bad_password_shows_the_form_again_escaped(
    http: aiohttp.ClientSession, idp: RunningIdp
) -> None:
    _, challenge = pkce()
    url = URL(idp.url + "/authorize").with_query(
        client_id="web",
        redirect_uri=CALLBACK,
        response_type="code",
        scope="openid",
        code_challenge=challenge,
        code_challenge_method="S256",
    )
    result = await http_login(http, str(url), "<b>mallory</b>", "wrong", stop_at=CALLBACK)
    assert result.status == 200
    assert "Wrong username or password" in result.body
    assert "&lt;b&gt;mallory&lt;/b&gt;" in result.body and "<b>mallory" not in result.body
    assert 'action="/login"' in result.body and "alice" in result.body  # hint listed


async def test_consent_deny_is_access_denied(http: aiohttp.ClientSession, idp: RunningIdp) -> None:
    authz = await authorize(http, idp, consent="deny")
    assert authz.params["error"] == "access_denied"
    assert authz.params["state"] == authz.state and authz.params["iss"] == idp.url


async def test_consent_is_remembered_and_prompt_values(
    http: aiohttp.ClientSession, idp: RunningIdp
) -> None:
    await authorize(http, idp)
    again = await authorize(http, idp, extra={"prompt": "none"})
    assert "code" in again.params  # session and consent remembered: no page at all
    wider = await authorize(http, idp, scope=SCOPE + " groups", extra={"prompt": "none"})
    assert wider.params["error"] == "consent_required"
    http.cookie_jar.clear()
    anonymous = await authorize(http, idp, extra={"prompt": "none"})
    assert anonymous.params["error"] == "login_required"


async def test_prompt_login_forces_the_form(http: aiohttp.ClientSession, idp: RunningIdp) -> None:
    await authorize(http, idp)
    _, challenge = pkce()
    url = URL(idp.url + "/authorize").with_query(
        client_id="web",
        redirect_uri=CALLBACK,
        response_type="code",
        scope=SCOPE,
        prompt="login",
        code_challenge=challenge,
        code_challenge_method="S256",
    )
    async with http.get(url, allow_redirects=False) as resp:
        assert resp.status == 200
        assert 'name="password"' in await resp.text()


async def test_no_consent_page_when_not_required(http: aiohttp.ClientSession, start: Start) -> None:
    idp = await start(require_consent=False)
    authz = await authorize(http, idp)
    assert "code" in authz.params


# -- token endpoint ----------------------------------------------------------------------


async def test_wrong_verifier_is_invalid_grant(
    http: aiohttp.ClientSession, idp: RunningIdp
) -> None:
    authz = await authorize(http, idp)
    authz.verifier = pkce()[0]
    status, body, _ = await exchange(http, idp, authz)
    assert (status, body["error"]) == (400, "invalid_grant")


async def test_code_reuse_is_invalid_grant_and_revokes_its_tokens(
    http: aiohttp.ClientSession, idp: RunningIdp
) -> None:
    authz, tokens = await login_tokens(http, idp)
    status, body, _ = await exchange(http, idp, authz)
    assert (status, body["error"]) == (400, "invalid_grant")
    _, intro, _ = await post(http, idp, "/introspect", {"token": tokens["access_token"]}, "web")
    assert intro == {"active": False}
    status, body, _ = await refresh(http, idp, tokens["refresh_token"])
    assert (status, body["error"]) == (400, "invalid_grant")


async def test_code_is_bound_to_client_redirect_uri_and_time(
    http: aiohttp.ClientSession, idp: RunningIdp
) -> None:
    authz = await authorize(http, idp)
    status, body, _ = await exchange(http, idp, authz, client="post")
    assert (status, body["error"]) == (400, "invalid_grant")
    authz = await authorize(http, idp)
    form = {"grant_type": "authorization_code", "code": authz.code, "code_verifier": authz.verifier}
    status, body, _ = await post(http, idp, "/token", form, "web")
    assert (status, body["error"]) == (400, "invalid_grant")
    authz = await authorize(http, idp)
    idp.state.clock = lambda: time.time() + 61
    status, body, _ = await exchange(http, idp, authz)
    assert (status, body["error"]) == (400, "invalid_grant")


@pytest.mark.parametrize("client", ["web", "post", "spa"])
async def test_each_client_auth_method(
    http: aiohttp.ClientSession, idp: RunningIdp, client: str
) -> None:
    _, tokens = await login_tokens(http, idp, client=client)
    assert (await verify(http, idp, tokens["id_token"], aud=client))["aud"] == client


@pytest.mark.parametrize(
    ("headers", "form"),
    [
        ({}, {"client_id": "web", "client_secret": SECRETS["web"]}),  # post, registered basic
        ({}, {"client_id": "web"}),  # none for a confidential client
        ({"Authorization": "Basic " + base64.b64encode(b"web:wrong").decode()}, {}),
        ({}, {"client_id": "post", "client_secret": "wrong"}),
        ({}, {"client_id": "spa", "client_secret": "anything"}),
        ({}, {"client_id": "nobody"}),
        ({"Authorization": "Bearer x"}, {}),
    ],
)
async def test_client_authentication_failures(
    http: aiohttp.ClientSession, idp: RunningIdp, headers: dict[str, str], form: dict[str, str]
) -> None:
    data = {"grant_type": "refresh_token", "refresh_token": "x", **form}
    async with http.post(idp.url + "/token", data=data, headers=headers) as resp:
        assert resp.status == 401
        assert (await resp.json())["error"] == "invalid_client"


async def test_refresh_rotation_and_reuse_detection(
    http: aiohttp.ClientSession, idp: RunningIdp
) -> None:
    _, first = await login_tokens(http, idp)
    idp.state.set_user_groups("alice", ["staff", "auditors"])
    status, second, headers = await refresh(http, idp, first["refresh_token"])
    assert status == 200 and headers["Cache-Control"] == "no-store"
    assert second["refresh_token"] != first["refresh_token"]
    old, new = (
        await verify(http, idp, first["id_token"]),
        await verify(http, idp, second["id_token"]),
    )
    assert new["sub"] == old["sub"] and new["sid"] == old["sid"] and "nonce" not in new
    assert new["groups"] == ["staff", "auditors"]
    assert (await verify(http, idp, second["access_token"]))["groups"] == ["staff", "auditors"]
    status, body, _ = await refresh(http, idp, first["refresh_token"])  # reuse
    assert (status, body["error"]) == (400, "invalid_grant")
    status, body, _ = await refresh(http, idp, second["refresh_token"])  # family revoked
    assert (status, body["error"]) == (400, "invalid_grant")
    assert idp.state.token_calls == {"authorization_code": 1, "refresh_token": 3}


async def test_refresh_without_rotation_keeps_the_token(
    http: aiohttp.ClientSession, start: Start
) -> None:
    idp = await start(rotate_refresh_tokens=False)
    _, first = await login_tokens(http, idp)
    for _ in range(2):
        status, body, _ = await refresh(http, idp, first["refresh_token"])
        assert status == 200 and "refresh_token" not in body


async def test_refresh_is_bound_to_client_and_expires(
    http: aiohttp.ClientSession, idp: RunningIdp
) -> None:
    _, tokens = await login_tokens(http, idp)
    status, body, _ = await refresh(http, idp, tokens["refresh_token"], client="post")
    assert (status, body["error"]) == (400, "invalid_grant")
    idp.state.clock = lambda: time.time() + 86401
    status, body, _ = await refresh(http, idp, tokens["refresh_token"])
    assert (status, body["error"]) == (400, "invalid_grant")


# -- userinfo, revocation, introspection -------------------------------------------------


async def test_userinfo_by_scope(http: aiohttp.ClientSession, idp: RunningIdp) -> None:
    _, tokens = await login_tokens(http, idp, scope="openid email")
    bearer = {"Authorization": "Bearer " + tokens["access_token"]}
    async with http.get(idp.url + "/userinfo", headers=bearer) as resp:
        assert resp.status == 200
        assert await resp.json() == {
            "sub": "alice",
            "email": "alice@example.com",
            "email_verified": True,
        }
    async with http.post(idp.url + "/userinfo", headers=bearer) as resp:
        assert resp.status == 200
    for headers in ({}, {"Authorization": "Bearer nope"}):
        async with http.get(idp.url + "/userinfo", headers=headers) as resp:
            assert resp.status == 401
            assert resp.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'


async def test_revoke_and_introspect(http: aiohttp.ClientSession, idp: RunningIdp) -> None:
    _, tokens = await login_tokens(http, idp)
    access, refresh_token = tokens["access_token"], tokens["refresh_token"]
    status, intro, _ = await post(http, idp, "/introspect", {"token": access}, "web")
    assert status == 200 and intro["active"] is True
    assert intro["sub"] == "alice" and intro["client_id"] == "web" and intro["scope"] == SCOPE
    assert intro["iss"] == idp.url and intro["groups"] == ["admins", "staff"]
    assert intro["email"] == "alice@example.com" and intro["exp"] > intro["iat"]
    status, intro, _ = await post(http, idp, "/introspect", {"token": refresh_token}, "web")
    assert intro["active"] is True and intro["token_type"] == "refresh_token"

    status, _, _ = await post(http, idp, "/revoke", {"token": access}, "post")  # not its token
    assert status == 200 and idp.state.revoked == []
    status, _, _ = await post(http, idp, "/revoke", {"token": access}, "web")
    assert status == 200 and idp.state.revoked == [access]
    _, intro, _ = await post(http, idp, "/introspect", {"token": access}, "web")
    assert intro == {"active": False}
    async with http.get(
        idp.url + "/userinfo", headers={"Authorization": "Bearer " + access}
    ) as resp:
        assert resp.status == 401

    status, _, _ = await post(http, idp, "/revoke", {"token": refresh_token}, "web")
    assert status == 200 and idp.state.revoked == [access, refresh_token]
    status, body, _ = await refresh(http, idp, refresh_token)
    assert (status, body["error"]) == (400, "invalid_grant")
    status, _, _ = await post(http, idp, "/revoke", {"token": "unknown"}, "web")
    assert status == 200
    async with http.post(idp.url + "/revoke", data={"token": access}) as resp:
        assert resp.status == 401


async def test_introspection_answer_switch(http: aiohttp.ClientSession, idp: RunningIdp) -> None:
    """``faults.introspection_answer`` bends active answers (None removes a member); an
    inactive answer stays ``{"active": false}``."""
    _, tokens = await login_tokens(http, idp)
    access = tokens["access_token"]
    _, intro, _ = await post(http, idp, "/introspect", {"token": access}, "web")
    assert intro["email_verified"] is True and intro["token_type"] == "Bearer"
    idp.state.faults.introspection_answer = {"aud": None, "client_id": None, "typ": "Refresh"}
    _, bent, _ = await post(http, idp, "/introspect", {"token": access}, "web")
    assert bent == {k: v for k, v in intro.items() if k not in ("aud", "client_id")} | {
        "typ": "Refresh"
    }
    _, unknown, _ = await post(http, idp, "/introspect", {"token": "unknown"}, "web")
    assert unknown == {"active": False}


async def test_opaque_access_tokens(http: aiohttp.ClientSession, start: Start) -> None:
    idp = await start(access_token_format="opaque")
    _, tokens = await login_tokens(http, idp)
    assert tokens["access_token"].count(".") == 0
    _, intro, _ = await post(http, idp, "/introspect", {"token": tokens["access_token"]}, "spa")
    assert intro["active"] is True and intro["sub"] == "alice"
    bearer = {"Authorization": "Bearer " + tokens["access_token"]}
    async with http.get(idp.url + "/userinfo", headers=bearer) as resp:
        assert (await resp.json())["groups"] == ["admins", "staff"]


async def test_issue_access_token_for_tests(http: aiohttp.ClientSession, idp: RunningIdp) -> None:
    token = idp.app[STATE_KEY].issue_access_token("bob", "web", "openid profile", 60)
    claims = await verify(http, idp, token)
    assert claims["sub"] == "bob" and claims["exp"] - claims["iat"] == 60
    bearer = {"Authorization": "Bearer " + token}
    async with http.get(idp.url + "/userinfo", headers=bearer) as resp:
        assert (await resp.json())["preferred_username"] == "bob"


# -- logout -----------------------------------------------------------------------------


@pytest.fixture
async def receiver(aiohttp_server: Any) -> AsyncIterator[tuple[str, list[str]]]:
    received: list[str] = []

    async def handle(request: web.Request) -> web.Response:
        received.append(str((await request.post())["logout_token"]))
        return web.Response(headers={"Cache-Control": "no-store"})

    app = web.Application()
    app.router.add_post("/backchannel", handle)
    server = await aiohttp_server(app)
    yield str(server.make_url("/backchannel")), received


async def test_end_session_sends_backchannel_logout_and_redirects(
    http: aiohttp.ClientSession, start: Start, receiver: tuple[str, list[str]]
) -> None:
    uri, received = receiver
    idp = await start(backchannel=uri)
    _, tokens = await login_tokens(http, idp)
    await login_tokens(http, idp, client="post")  # no back-channel URI registered
    sid = unverified(tokens["id_token"])["sid"]
    url = URL(idp.url + "/end_session").with_query(
        id_token_hint=tokens["id_token"], post_logout_redirect_uri=BYE, state="s-1"
    )
    async with http.get(url, allow_redirects=False) as resp:
        assert resp.status == 302
        assert resp.headers["Location"] == BYE + "?state=s-1"
    assert len(received) == 1
    logout = received[0]
    header = jwt.get_unverified_header(logout)
    assert header["typ"] == "logout+jwt"
    claims = await verify(http, idp, logout)
    assert claims["sub"] == "alice" and claims["sid"] == sid and "nonce" not in claims
    assert claims["events"] == {BCL_EVENT: {}} and claims["exp"] - claims["iat"] == 120
    assert claims["jti"] and idp.state.backchannel_sent == [claims]
    assert not any(c.key == "devidp_session" and c.value for c in http.cookie_jar)
    status, _, _ = await refresh(http, idp, tokens["refresh_token"])
    assert status == 200  # offline_access survives the IdP session
    authz = await authorize(http, idp, extra={"prompt": "none"})
    assert authz.params["error"] == "login_required"


async def test_end_session_ends_non_offline_grants(
    http: aiohttp.ClientSession, idp: RunningIdp
) -> None:
    _, tokens = await login_tokens(http, idp, scope="openid email")
    async with http.get(idp.url + "/end_session") as resp:
        assert resp.status == 200 and "signed out" in await resp.text()
    status, body, _ = await refresh(http, idp, tokens["refresh_token"])
    assert (status, body["error"]) == (400, "invalid_grant")


async def test_backchannel_failure_is_logged_without_token_and_ignored(
    http: aiohttp.ClientSession, start: Start, caplog: pytest.LogCaptureFixture
) -> None:
    idp = await start(backchannel="http://127.0.0.1:9/unreachable")
    _, tokens = await login_tokens(http, idp)
    url = URL(idp.url + "/end_session").with_query(
        id_token_hint=tokens["id_token"], post_logout_redirect_uri=BYE
    )
    with caplog.at_level("DEBUG", logger="gateway.devidp"):
        async with http.get(url, allow_redirects=False) as resp:
            assert resp.status == 302
    assert len(idp.state.backchannel_sent) == 1
    assert "back-channel logout" in caplog.text
    names = ("access_token", "id_token", "refresh_token")
    for secret in (*(tokens[n] for n in names), SECRETS["web"]):
        assert secret not in caplog.text


@pytest.mark.parametrize(
    "query",
    [
        {"post_logout_redirect_uri": "http://127.0.0.1:9/evil", "client_id": "web"},
        {"post_logout_redirect_uri": BYE},  # no client named
    ],
)
async def test_end_session_refuses_unregistered_targets(
    http: aiohttp.ClientSession, idp: RunningIdp, query: dict[str, str]
) -> None:
    await login_tokens(http, idp)
    url = URL(idp.url + "/end_session").with_query(query)
    async with http.get(url, allow_redirects=False) as resp:
        assert resp.status == 200 and "Location" not in resp.headers
        assert "You are signed out" in await resp.text()


async def test_end_session_rejects_foreign_hint_and_accepts_expired(
    http: aiohttp.ClientSession, idp: RunningIdp
) -> None:
    forged = jwt.encode({"iss": idp.url, "aud": "web"}, "k" * 32, algorithm="HS256")
    url = URL(idp.url + "/end_session").with_query(id_token_hint=forged)
    async with http.get(url, allow_redirects=False) as resp:
        assert resp.status == 400
    idp.state.faults.id_token_exp_offset = -3600
    _, tokens = await login_tokens(http, idp)
    form = {"id_token_hint": tokens["id_token"], "post_logout_redirect_uri": BYE}
    async with http.post(idp.url + "/end_session", data=form, allow_redirects=False) as resp:
        assert resp.status == 302 and resp.headers["Location"] == BYE


# -- fault switches ----------------------------------------------------------------------


ID_TOKEN_FAULTS: list[tuple[dict[str, Any], Callable[[dict[str, Any], Authz], bool]]] = [
    ({"id_token_iss": "https://evil.example"}, lambda c, a: c["iss"] == "https://evil.example"),
    ({"id_token_aud": ["web", "other"]}, lambda c, a: c["aud"] == ["web", "other"]),
    ({"id_token_azp": "other"}, lambda c, a: c["azp"] == "other"),
    ({"id_token_nonce": "wrong"}, lambda c, a: c["nonce"] == "wrong"),
    ({"omit_nonce": True}, lambda c, a: "nonce" not in c),
    ({"id_token_exp_offset": -3600}, lambda c, a: c["exp"] < time.time() - 3000),
    ({"id_token_iat_offset": 86400}, lambda c, a: c["iat"] > time.time() + 80000),
]


@pytest.mark.parametrize(("fault", "check"), ID_TOKEN_FAULTS)
async def test_id_token_claim_faults(
    http: aiohttp.ClientSession,
    idp: RunningIdp,
    fault: dict[str, Any],
    check: Callable[[dict[str, Any], Authz], bool],
) -> None:
    idp.state.faults = Faults(**fault)
    authz, tokens = await login_tokens(http, idp)
    assert check(unverified(tokens["id_token"]), authz)


async def test_signature_faults(http: aiohttp.ClientSession, idp: RunningIdp) -> None:
    faults = idp.state.faults
    keys = await jwks(http, idp)
    pem = idp.state.keys.current.public_pem()

    faults.bad_signature = True
    _, tokens = await login_tokens(http, idp)
    with pytest.raises(jwt.InvalidSignatureError):
        await verify(http, idp, tokens["id_token"])
    faults.bad_signature = False

    faults.alg_none = True
    _, tokens = await login_tokens(http, idp)
    assert jwt.get_unverified_header(tokens["id_token"])["alg"] == "none"
    assert tokens["id_token"].endswith(".")
    faults.alg_none = False

    faults.hs256_with_public_key = True
    _, tokens = await login_tokens(http, idp)
    head, payload, sig = tokens["id_token"].split(".")
    assert jwt.get_unverified_header(tokens["id_token"])["alg"] == "HS256"
    mac = hmac.new(pem, f"{head}.{payload}".encode(), hashlib.sha256).digest()
    assert sig == b64url(mac) and b"BEGIN PUBLIC KEY" in pem
    faults.hs256_with_public_key = False

    faults.unknown_kid = True
    _, tokens = await login_tokens(http, idp)
    kid = jwt.get_unverified_header(tokens["id_token"])["kid"]
    assert kid not in [k.key_id for k in keys.keys]
    idp.state.rotate_keys()
    await verify(http, idp, tokens["id_token"])  # published now


@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        ({"authz_iss": "https://evil.example"}, "https://evil.example"),
        ({"omit_authz_iss": True}, None),
    ],
)
async def test_authorization_response_iss_faults(
    http: aiohttp.ClientSession, idp: RunningIdp, fault: dict[str, Any], expected: str | None
) -> None:
    idp.state.faults = Faults(**fault)
    authz = await authorize(http, idp)
    assert authz.params.get("iss") == expected and "code" in authz.params


async def test_token_error_faults(http: aiohttp.ClientSession, idp: RunningIdp) -> None:
    faults = idp.state.faults
    faults.token_error, faults.token_error_grant = "invalid_grant", "refresh_token"
    _, tokens = await login_tokens(http, idp)  # the code grant is not affected
    status, body, _ = await refresh(http, idp, tokens["refresh_token"])
    assert (status, body["error"]) == (400, "invalid_grant")
    faults.token_error = "server_error"
    status, body, _ = await refresh(http, idp, tokens["refresh_token"])
    assert (status, body["error"]) == (500, "server_error")
    faults.token_error = None
    faults.token_status = 503
    status, body, _ = await refresh(http, idp, tokens["refresh_token"])
    assert status == 503 and isinstance(body, str)
    faults.token_status = None
    status, body, _ = await refresh(http, idp, tokens["refresh_token"])
    assert status == 200  # the faults did not consume the refresh token
    assert idp.state.token_calls["refresh_token"] == 4


async def test_token_delay_and_no_refresh_token(
    http: aiohttp.ClientSession, idp: RunningIdp
) -> None:
    idp.state.faults.token_delay = 0.2
    idp.state.faults.no_refresh_token = True
    began = time.monotonic()
    _, tokens = await login_tokens(http, idp)
    assert time.monotonic() - began >= 0.2
    assert "refresh_token" not in tokens and tokens["id_token"]


# -- serving -------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.1", "example.com"])
async def test_start_refuses_non_loopback(host: str) -> None:
    with pytest.raises(ValueError, match="loopback"):
        await start_devidp(make_cfg(), host=host)


async def test_start_on_localhost_sets_issuer(http: aiohttp.ClientSession) -> None:
    async with await start_devidp(make_cfg(), host="localhost") as idp:
        assert idp.url.startswith("http://localhost:") and idp.state.issuer == idp.url
        async with http.get(idp.url + "/.well-known/openid-configuration") as resp:
            assert (await resp.json())["issuer"] == idp.url
        async with http.get(idp.url + "/") as resp:
            assert resp.status == 200 and "alice" in await resp.text()

"""Bearer clients on ``accept_bearer`` routes: API callers with their own access tokens.

Real dev provider (JWT access tokens checked against its JWKS, opaque ones by RFC 7662
introspection), real Redis, the echo upstream. Forged tokens are signed with the
provider's own keys (``state.sign``) or none at all. Clocks are injected, never slept on.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest

from gateway import keys
from gateway.bearer import BearerVerifier
from gateway.devidp.keys import corrupt_signature, hs256_with, unsigned
from gateway.devidp.tokens import access_token_claims, id_token_claims, logout_token_claims
from gateway.echo import RunningEcho, start_echo
from tests.conftest import CLIENT_ID, CLIENT_SECRET, RedisServer, Stack
from tests.idp_client import http_login
from tests.support.ports import free_port

API = {"Accept": "application/json"}
INVALID_TOKEN = 'Bearer realm="gateway", error="invalid_token"'


def routes(echo: RunningEcho) -> list[dict[str, Any]]:
    up = str(echo.url)
    return [
        {"prefix": "/", "upstream": up},
        {"prefix": "/public", "upstream": up, "auth": "none"},
        {"prefix": "/api", "upstream": up, "accept_bearer": True, "on_unauthenticated": "deny"},
        {"prefix": "/api/admin", "upstream": up, "accept_bearer": True,
         "require": {"groups": ["admins"]}},
        {"prefix": "/api/invoices", "upstream": up, "accept_bearer": True,
         "require": {"scopes": ["invoices:read"]}},
        {"prefix": "/api/staff", "upstream": up, "accept_bearer": True,
         "require": {"email_domains": ["example.org"]}},
    ]  # fmt: skip


@pytest.fixture
async def echo() -> AsyncIterator[RunningEcho]:
    running = await start_echo()
    yield running
    await running.close()


StackMaker = Callable[..., Any]


@pytest.fixture
def bearer_stack(make_stack: StackMaker, echo: RunningEcho) -> StackMaker:
    async def factory(**overrides: Any) -> Stack:
        stack: Stack = await make_stack(echo=echo, routes=routes(echo), **overrides)
        return stack

    return factory


class Clock:
    """The verifier's clock, moved by tests instead of sleeping."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


def verifier_of(stack: Stack) -> BearerVerifier:
    return stack.app[keys.BEARER]


def with_clock(stack: Stack) -> Clock:
    clock = Clock()
    verifier_of(stack).clock = clock
    return clock


async def call(
    http: aiohttp.ClientSession, url: str, token: str | None = None, **headers: str
) -> tuple[int, dict[str, Any], aiohttp.typedefs.LooseHeaders]:
    sent = {**API, **headers}
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    async with http.get(url, headers=sent, allow_redirects=False) as resp:
        text = await resp.text()
        try:
            body = json.loads(text)
        except ValueError:
            body = {"text": text}
        return resp.status, body, resp.headers


def seen(body: dict[str, Any]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, value in body["headers"]:
        out.setdefault(name.lower(), []).append(value)
    return out


def at_claims(stack: Stack, sub: str = "bob", **changes: Any) -> dict[str, Any]:
    """RFC 9068 claims as the dev provider issues them, with ``changes`` (None removes)."""
    state = stack.idp.state
    claims = access_token_claims(
        issuer=state.issuer, user=state.users.get(sub), sub=sub, client_id=CLIENT_ID,
        scope=("openid", "email"), now=int(time.time()), ttl=300, jti=secrets.token_hex(8),
    )  # fmt: skip
    claims.update(changes)
    return {k: v for k, v in claims.items() if v is not None}


def session_keys(redis: RedisServer, stack: Stack) -> list[bytes]:
    return redis.keys(stack.settings.session.key_prefix + "*")


# -- JWT access tokens -------------------------------------------------------------------


async def test_good_jwt_reaches_the_upstream_with_identity_and_no_session(
    bearer_stack: StackMaker, api: aiohttp.ClientSession, redis_server: RedisServer
) -> None:
    stack = await bearer_stack()
    token = stack.idp.state.issue_access_token("bob", CLIENT_ID, "openid email", 300)
    for _ in range(3):
        status, body, headers = await call(api, stack.url + "/api/items?x=1", token)
        assert status == 200, body
        got = seen(body)
        assert got["x-forwarded-user"] == ["bob"]
        assert got["x-forwarded-email"] == ["bob@example.org"]
        assert got["x-forwarded-groups"] == ["staff"]
        assert got["authorization"] == [f"Bearer {token}"]  # the client's own, exactly once
        assert body["path"] == "/api/items" and body["query"] == "x=1"
        assert "Set-Cookie" not in headers
    assert session_keys(redis_server, stack) == []
    assert api.cookie_jar.filter_cookies(stack.url) == {}  # type: ignore[arg-type]
    assert stack.idp.state.introspect_calls == 0  # a JWT is checked locally


async def test_long_lived_token_issued_hours_ago_is_accepted(
    bearer_stack: StackMaker, api: aiohttp.ClientSession
) -> None:
    stack = await bearer_stack()
    now = int(time.time())
    token = stack.idp.state.sign(
        at_claims(stack, iat=now - 7200, exp=now + 3600), {"typ": "at+jwt"}
    )
    status, body, _ = await call(api, stack.url + "/api/x", token)
    assert status == 200, body


def _forgeries(stack: Stack) -> dict[str, str]:
    state = stack.idp.state
    kid = state.keys.current.kid
    now = int(time.time())
    at = {"typ": "at+jwt"}
    good = state.sign(at_claims(stack), at)
    id_claims = id_token_claims(
        issuer=state.issuer, user=state.users["bob"], client_id=CLIENT_ID, now=now, ttl=300,
        auth_time=now, sid="sid-1", nonce="n-123", access_token=None,
    )  # fmt: skip
    refreshed_id = {k: v for k, v in id_claims.items() if k != "nonce"} | {"at_hash": "abc"}
    logout = logout_token_claims(
        issuer=state.issuer, client_id=CLIENT_ID, sub="bob", sid="sid-1", now=now, jti="j1"
    )
    return {
        "expired": state.sign(at_claims(stack, iat=now - 600, exp=now - 120), at),
        "not yet valid": state.sign(at_claims(stack, nbf=now + 600), at),
        "wrong audience": state.sign(at_claims(stack, aud="another-api"), at),
        "wrong issuer": state.sign(at_claims(stack, iss="http://127.0.0.1:1"), at),
        "no exp": state.sign(at_claims(stack, exp=None), at),
        "alg none": unsigned(at_claims(stack), {"typ": "at+jwt", "kid": kid}),
        "HS256 with the public key": hs256_with(
            state.keys.current.public_pem(), at_claims(stack), {"typ": "at+jwt", "kid": kid}
        ),
        "unknown kid": state.sign(at_claims(stack), at, key="unpublished"),
        "bad signature": corrupt_signature(good),
        "ID token": state.sign(id_claims, {"typ": "JWT"}),
        "refreshed ID token": state.sign(refreshed_id, {"typ": "JWT"}),
        "logout token": state.sign(logout, {"typ": "logout+jwt"}),
        "logout token typed JWT": state.sign(logout | {"scope": "openid"}, {"typ": "JWT"}),
        "DPoP-bound": state.sign(at_claims(stack, cnf={"jkt": "x" * 43}), at),
        "not base64": "abc$def",
    }


async def test_bad_jwts_are_401_invalid_token(
    bearer_stack: StackMaker, api: aiohttp.ClientSession, redis_server: RedisServer
) -> None:
    stack = await bearer_stack()
    for what, token in _forgeries(stack).items():
        status, body, headers = await call(api, stack.url + "/api/items", token)
        assert status == 401, (what, body)
        assert body["error"] == "invalid_token", what
        assert headers.getall("WWW-Authenticate") == [INVALID_TOKEN], what  # type: ignore[attr-defined]
        assert "headers" not in body, what  # the upstream never saw it
    assert session_keys(redis_server, stack) == []


async def test_malformed_authorization(
    bearer_stack: StackMaker, api: aiohttp.ClientSession
) -> None:
    stack = await bearer_stack()
    token = stack.idp.state.issue_access_token("bob", CLIENT_ID, "openid", 300)
    async with api.get(
        stack.url + "/api/x",
        headers=[("Authorization", f"Bearer {token}"), ("Authorization", "Bearer other")],
    ) as resp:
        assert resp.status == 400
        assert 'error="invalid_request"' in resp.headers["WWW-Authenticate"]
    for value in ("Bearer ", "Bearer a b", "Bearer a$b"):
        async with api.get(stack.url + "/api/x", headers={"Authorization": value}) as resp:
            assert resp.status == 401, value
            assert resp.headers["WWW-Authenticate"] == INVALID_TOKEN, value
    # A header beyond server.max_header_size is refused before any handler runs.
    async with api.get(
        stack.url + "/api/x", headers={"Authorization": "Bearer " + "a" * 20000}
    ) as resp:
        assert resp.status == 400
    # Another scheme is not a bearer token: the route answers as for no credentials.
    async with api.get(
        stack.url + "/api/x", headers={"Authorization": "Basic Ym9iOmJvYg=="}
    ) as resp:
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"] == 'Bearer realm="gateway"'


async def test_route_policy_applies_to_bearer_clients(
    bearer_stack: StackMaker, api: aiohttp.ClientSession
) -> None:
    stack = await bearer_stack()
    state = stack.idp.state
    bob = state.issue_access_token("bob", CLIENT_ID, "openid", 300)
    alice = state.issue_access_token("alice", CLIENT_ID, "openid", 300)
    status, _, _ = await call(api, stack.url + "/api/admin/users", bob)
    assert status == 403
    status, body, _ = await call(api, stack.url + "/api/admin/users", alice)
    assert status == 200 and seen(body)["x-forwarded-user"] == ["alice"]
    # Email domains: bob@example.org passes, alice@example.com does not.
    assert (await call(api, stack.url + "/api/staff", bob))[0] == 200
    assert (await call(api, stack.url + "/api/staff", alice))[0] == 403
    # Scopes come from the token's own scope claim (RFC 6750 §3.1 insufficient_scope).
    status, _, headers = await call(api, stack.url + "/api/invoices", bob)
    assert status == 403
    assert headers["WWW-Authenticate"] == (
        'Bearer realm="gateway", error="insufficient_scope", scope="invoices:read"'
    )
    scoped = state.issue_access_token("bob", CLIENT_ID, "openid invoices:read", 300)
    assert (await call(api, stack.url + "/api/invoices", scoped))[0] == 200
    scp = state.sign(at_claims(stack, scope=None, scp=["invoices:read"]), {"typ": "at+jwt"})
    assert (await call(api, stack.url + "/api/invoices", scp))[0] == 200


async def test_routes_without_accept_bearer_ignore_bearer_tokens(
    bearer_stack: StackMaker, api: aiohttp.ClientSession, browser: aiohttp.ClientSession
) -> None:
    stack = await bearer_stack()
    bob = stack.idp.state.issue_access_token("bob", CLIENT_ID, "openid", 300)
    status, body, _ = await call(api, stack.url + "/elsewhere", bob)
    assert status == 401 and body["error"] == "unauthenticated"
    # A public route passes the request on; the token is not turned into an identity.
    status, body, _ = await call(api, stack.url + "/public/x", bob)
    assert status == 200 and "x-forwarded-user" not in seen(body)
    # A session wins over a bearer token, and the client's token is replaced by the session's.
    assert (await http_login(browser, stack.url + "/", "alice", "alice")).status == 200
    for path in ("/elsewhere", "/api/items"):
        status, body, _ = await call(browser, stack.url + path, bob)
        assert status == 200
        got = seen(body)
        assert got["x-forwarded-user"] == ["alice"], path
        assert got["authorization"] != [f"Bearer {bob}"] and len(got["authorization"]) == 1


async def test_jwks_unreachable_is_503(
    bearer_stack: StackMaker, api: aiohttp.ClientSession
) -> None:
    dead = f"http://127.0.0.1:{free_port()}/jwks"
    stack = await bearer_stack(provider={"jwks_uri": dead})
    token = stack.idp.state.issue_access_token("bob", CLIENT_ID, "openid", 300)
    status, body, headers = await call(api, stack.url + "/api/x", token)
    assert status == 503, body
    assert headers["Retry-After"]


# -- opaque tokens (RFC 7662 introspection) --------------------------------------------


OPAQUE = {"idp_config": {"access_token_format": "opaque"}}


async def test_opaque_token_via_introspection_is_cached(
    bearer_stack: StackMaker, api: aiohttp.ClientSession, redis_server: RedisServer
) -> None:
    stack = await bearer_stack(**OPAQUE)
    state = stack.idp.state
    clock = with_clock(stack)
    token = state.issue_access_token("alice", CLIENT_ID, "openid email", 300)
    assert token.count(".") == 0
    for _ in range(5):
        status, body, _ = await call(api, stack.url + "/api/admin/x", token)
        assert status == 200, body
        got = seen(body)
        assert got["x-forwarded-user"] == ["alice"]
        assert got["x-forwarded-groups"] == ["admins,staff"]
        assert got["authorization"] == [f"Bearer {token}"]
    assert state.introspect_calls == 1
    # The cache is keyed by the token's hash, never the token.
    cache_keys = list(verifier_of(stack)._good)
    assert len(cache_keys) == 1 and token not in cache_keys[0] and len(cache_keys[0]) == 64
    # At most a minute: then the provider is asked again.
    clock.offset = 61
    assert (await call(api, stack.url + "/api/x", token))[0] == 200
    assert state.introspect_calls == 2
    assert session_keys(redis_server, stack) == []


async def test_revoked_opaque_token_is_refused_once_the_cache_lapses(
    bearer_stack: StackMaker, api: aiohttp.ClientSession
) -> None:
    stack = await bearer_stack(**OPAQUE)
    state = stack.idp.state
    clock = with_clock(stack)
    token = state.issue_access_token("bob", CLIENT_ID, "openid", 300)
    assert (await call(api, stack.url + "/api/x", token))[0] == 200
    async with api.post(
        state.issuer + "/revoke",
        data={"token": token, "token_type_hint": "access_token"},
        headers={"Authorization": aiohttp.encode_basic_auth(CLIENT_ID, CLIENT_SECRET)},
    ) as resp:
        assert resp.status == 200
    assert token in state.revoked
    clock.offset = 61
    status, _, headers = await call(api, stack.url + "/api/x", token)
    assert status == 401 and headers["WWW-Authenticate"] == INVALID_TOKEN
    assert state.introspect_calls == 2
    # The refusal is remembered briefly (5 s), then asked again.
    assert (await call(api, stack.url + "/api/x", token))[0] == 401
    assert state.introspect_calls == 2
    clock.offset = 67
    assert (await call(api, stack.url + "/api/x", token))[0] == 401
    assert state.introspect_calls == 3


async def test_cache_never_outlives_the_token(
    bearer_stack: StackMaker, api: aiohttp.ClientSession
) -> None:
    stack = await bearer_stack(**OPAQUE)
    state = stack.idp.state
    clock = with_clock(stack)
    token = state.issue_access_token("bob", CLIENT_ID, "openid", 20)
    assert (await call(api, stack.url + "/api/x", token))[0] == 200
    clock.offset = 25  # past exp, well within the minute a cached answer may live
    assert (await call(api, stack.url + "/api/x", token))[0] == 401
    assert state.introspect_calls == 2


async def test_unknown_and_refresh_tokens_are_refused_by_introspection(
    bearer_stack: StackMaker, api: aiohttp.ClientSession, browser: aiohttp.ClientSession
) -> None:
    stack = await bearer_stack(**OPAQUE)
    state = stack.idp.state
    assert (await call(api, stack.url + "/api/x", "no-such-token"))[0] == 401
    assert (await call(api, stack.url + "/api/x", "no-such-token"))[0] == 401
    assert state.introspect_calls == 1  # negative answers are cached too
    # A refresh token is active at the introspection endpoint, but it is no access token.
    assert (await http_login(browser, stack.url + "/", "alice", "alice")).status == 200
    refresh = next(iter(state.refresh_tokens))
    status, body, _ = await call(api, stack.url + "/api/x", refresh)
    assert status == 401, body
    # A token issued to another client is not meant for this API.
    other = state.issue_access_token("bob", "some-other-client", "openid", 300)
    assert (await call(api, stack.url + "/api/x", other))[0] == 401


# Members an active introspection answer gets from the provider (None removes one).
NOT_FOR_US = {
    "neither aud nor client_id": {"aud": None, "client_id": None},
    "no aud, another client_id": {"aud": None, "client_id": "some-other-client"},
    "another aud": {"aud": "another-api"},
    "aud list without us": {"aud": ["another-api", "a-third"]},
    "Keycloak refresh token": {"typ": "Refresh", "token_type": None},
    "Keycloak offline token": {"typ": "Offline", "token_type": None},
    "Keycloak ID token": {"typ": "ID", "token_type": None},
    "Keycloak logout token": {"typ": "Logout", "token_type": None},
    "typ Refresh beside Bearer": {"typ": "Refresh"},
    "token_type refresh_token": {"token_type": "refresh_token"},
    "token_type id_token": {"token_type": "urn:ietf:params:oauth:token-type:id_token"},
    "typ not a string": {"typ": ["Bearer"]},
}
FOR_US = {
    "no aud, our client_id": {"aud": None},
    "aud list with us": {"aud": ["another-api", CLIENT_ID]},
    "Keycloak access token": {"typ": "Bearer", "token_type": None},
    "token_type access_token": {"token_type": "access_token"},
    "RFC 9068 typ": {"typ": "at+jwt", "token_type": None},
    "no type at all": {"token_type": None},
}


async def test_introspection_answers_not_naming_an_access_token_for_us_are_refused(
    bearer_stack: StackMaker, api: aiohttp.ClientSession
) -> None:
    """RFC 7662 answers, bent by the dev provider's ``introspection_answer`` switch: an active
    answer opens the API only when it names us (aud, or without aud client_id) and says
    nothing that makes it another kind of token than an access token."""
    stack = await bearer_stack(**OPAQUE)
    state = stack.idp.state
    for cases, expected in ((NOT_FOR_US, 401), (FOR_US, 200)):
        for what, members in cases.items():
            state.faults.introspection_answer = members
            token = state.issue_access_token("bob", CLIENT_ID, "openid", 300)
            status, body, headers = await call(api, stack.url + "/api/x", token)
            assert status == expected, (what, body)
            if expected == 401:
                assert headers["WWW-Authenticate"] == INVALID_TOKEN, what
            else:
                assert seen(body)["x-forwarded-user"] == ["bob"], what
    assert state.introspect_calls == len(NOT_FOR_US) + len(FOR_US)


async def test_a_flood_of_unknown_tokens_reaches_the_provider_at_a_bounded_rate(
    bearer_stack: StackMaker, api: aiohttp.ClientSession
) -> None:
    """``provider.introspection_rate`` calls a second (bursts of one second's worth) for
    tokens not in the cache; beyond it 503 with Retry-After. Cached answers, good or bad,
    never wait on the limit."""
    stack = await bearer_stack(provider={"introspection_rate": 5}, **OPAQUE)
    state = stack.idp.state
    frozen = time.time()
    verifier_of(stack).clock = lambda: frozen
    good = state.issue_access_token("bob", CLIENT_ID, "openid", 300)
    assert (await call(api, stack.url + "/api/x", good))[0] == 200
    junk = [secrets.token_urlsafe(24) for _ in range(20)]
    answers = [await call(api, stack.url + "/api/x", token) for token in junk]
    assert [status for status, _, _ in answers] == [401] * 4 + [503] * 16
    for _, body, headers in answers[4:]:
        assert body["error"] == "introspection_busy"
        assert headers["Retry-After"] == "1"
    assert state.introspect_calls == 5
    # While the bucket is empty: the good token still passes, a refused one is still refused,
    # and neither costs a call.
    assert (await call(api, stack.url + "/api/x", good))[0] == 200
    assert (await call(api, stack.url + "/api/x", junk[0]))[0] == 401
    assert state.introspect_calls == 5
    # A second later there is room for five more.
    frozen += 1.0
    again = [(await call(api, stack.url + "/api/x", token))[0] for token in junk[4:10]]
    assert again == [401] * 5 + [503]
    assert state.introspect_calls == 10


async def test_junk_tokens_never_evict_good_cache_entries(
    bearer_stack: StackMaker, api: aiohttp.ClientSession
) -> None:
    """Refusals have a bounded cache of their own, so a flood of junk only evicts junk."""
    stack = await bearer_stack(**OPAQUE)
    state = stack.idp.state
    verifier = verifier_of(stack)
    verifier.max_entries = verifier.max_refused = 3
    good = state.issue_access_token("bob", CLIENT_ID, "openid", 300)
    assert (await call(api, stack.url + "/api/x", good))[0] == 200
    for _ in range(10):
        assert (await call(api, stack.url + "/api/x", secrets.token_urlsafe(24)))[0] == 401
    assert verifier.cached == 4  # the good answer and the three latest refusals
    assert (await call(api, stack.url + "/api/x", good))[0] == 200
    assert state.introspect_calls == 11  # the good token was not asked about again


async def test_email_rules_need_a_verified_email_in_the_token(
    bearer_stack: StackMaker, api: aiohttp.ClientSession
) -> None:
    stack = await bearer_stack()
    state = stack.idp.state
    at = {"typ": "at+jwt"}
    assert (await call(api, stack.url + "/api/staff", state.sign(at_claims(stack), at)))[0] == 200
    for flag in (None, False, "false"):
        token = state.sign(at_claims(stack, email_verified=flag), at)
        assert (await call(api, stack.url + "/api/staff", token))[0] == 403, flag


async def test_introspection_unavailable_is_503_and_not_cached(
    bearer_stack: StackMaker, api: aiohttp.ClientSession
) -> None:
    dead = f"http://127.0.0.1:{free_port()}/introspect"
    stack = await bearer_stack(provider={"introspection_endpoint": dead}, **OPAQUE)
    token = stack.idp.state.issue_access_token("bob", CLIENT_ID, "openid", 300)
    for _ in range(2):
        status, body, headers = await call(api, stack.url + "/api/x", token)
        assert status == 503, body
        assert headers["Retry-After"]
    assert verifier_of(stack).cached == 0


async def test_concurrent_requests_share_one_introspection(
    bearer_stack: StackMaker, api: aiohttp.ClientSession
) -> None:
    import asyncio

    stack = await bearer_stack(**OPAQUE)
    token = stack.idp.state.issue_access_token("bob", CLIENT_ID, "openid", 300)
    results = await asyncio.gather(*(call(api, stack.url + "/api/x", token) for _ in range(20)))
    assert {status for status, _, _ in results} == {200}
    assert stack.idp.state.introspect_calls == 1


# -- with the npm oidc-provider -----------------------------------------------------------


@pytest.mark.interop
async def test_opaque_token_from_oidc_provider(
    make_stack: StackMaker, echo: RunningEcho, api: aiohttp.ClientSession
) -> None:
    import base64
    import hashlib
    from urllib.parse import urlencode

    from tests.interop_idp import INSTALL_HINT, interop_available, interop_login, start_interop_idp

    if not interop_available():
        pytest.fail(f"interop OpenID provider is not installed: {INSTALL_HINT}")
    client_id, secret = "gw-bearer", "s3cret-bearer-xxxxxxxxxxxxxxxxxxxxxxxx"
    rp = f"http://127.0.0.1:{free_port()}"
    idp = await start_interop_idp({
        "clients": [{
            "client_id": client_id, "client_secret": secret,
            "token_endpoint_auth_method": "client_secret_basic",
            "redirect_uris": [rp + "/oauth2/callback"],
        }],
        "access_token_format": "opaque",
    })  # fmt: skip
    try:
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
            async with http.get(idp.issuer + "/.well-known/openid-configuration") as resp:
                meta = await resp.json()
            verifier = secrets.token_urlsafe(48)
            challenge = (
                base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
                .rstrip(b"=")
                .decode()
            )
            query = {
                "response_type": "code", "client_id": client_id,
                "redirect_uri": rp + "/oauth2/callback", "scope": "openid email profile",
                "state": secrets.token_urlsafe(12), "nonce": secrets.token_urlsafe(12),
                "code_challenge": challenge, "code_challenge_method": "S256",
            }  # fmt: skip
            result = await interop_login(
                http, f"{meta['authorization_endpoint']}?{urlencode(query)}", "alice",
                stop_at_origin=rp,
            )  # fmt: skip
            assert result.stopped, result.history
            async with http.post(
                meta["token_endpoint"],
                data={
                    "grant_type": "authorization_code",
                    "code": result.query["code"],
                    "redirect_uri": rp + "/oauth2/callback",
                    "code_verifier": verifier,
                },
                headers={"Authorization": aiohttp.encode_basic_auth(client_id, secret)},
            ) as resp:
                tokens = await resp.json()
                assert resp.status == 200, tokens
        token = tokens["access_token"]
        assert token.count(".") == 0  # opaque

        stack = await make_stack(
            echo=echo,
            routes=routes(echo),
            provider={"issuer": idp.issuer, "client_id": client_id, "client_secret": secret},
        )
        for _ in range(2):
            status, body, _ = await call(api, stack.url + "/api/items", token)
            assert status == 200, (body, idp.stderr_tail)
            got = seen(body)
            assert got["x-forwarded-user"] == ["alice"]
            assert got["authorization"] == [f"Bearer {token}"]
        assert verifier_of(stack).cached == 1
        assert (await call(api, stack.url + "/api/items", "made-up-opaque-token"))[0] == 401
        # The ID token is not an access token here either.
        status, _, _ = await call(api, stack.url + "/api/items", tokens["id_token"])
        assert status == 401
    finally:
        await idp.close()

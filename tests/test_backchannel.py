"""OpenID Connect Back-Channel Logout 1.0 receiver (SECURITY.md 20).

Logout tokens are forged with the dev provider's own keys (``state.sign``), so each one is
valid except for the single thing a case breaks.
"""

from __future__ import annotations

import json
import time
from typing import Any

import aiohttp
import pytest
import redis
from yarl import URL

from gateway.devidp import SESSION_COOKIE
from gateway.devidp.tokens import BACKCHANNEL_EVENT, id_token_claims
from tests.conftest import CLIENT_ID, RedisServer, Stack
from tests.support.browser import new_browser, session_keys
from tests.support.calls import call, login
from tests.support.logout import claims, logout_token

LOGOUT = "/oauth2/backchannel_logout"


def idp_sid(stack: Stack, http: aiohttp.ClientSession) -> str:
    """The provider's ``sid`` of the IdP session this browser holds."""
    cookie = http.cookie_jar.filter_cookies(URL(stack.idp.url))[SESSION_COOKIE].value
    return stack.idp.state.sessions[cookie].sid


async def post(stack: Stack, **kw: Any) -> tuple[int, dict[str, str], str]:
    async with aiohttp.ClientSession() as http:
        async with http.post(stack.url + LOGOUT, allow_redirects=False, **kw) as resp:
            return resp.status, dict(resp.headers), await resp.text()


async def test_a_logout_token_with_a_sid_ends_only_that_session(
    stack: Stack, browser: aiohttp.ClientSession, redis_server: RedisServer
) -> None:
    async with new_browser() as second:
        await login(browser, stack)
        await login(second, stack)
        assert len(session_keys(redis_server, stack)) == 2
        sid = idp_sid(stack, browser)
        assert sid != idp_sid(stack, second)

        status, headers, body = await post(
            stack, data={"logout_token": logout_token(stack, sid=sid)}
        )
        assert status == 200, body
        assert headers["Cache-Control"] == "no-store"
        assert (await call(browser, stack.url + "/api/x"))[0] == 401
        assert (await call(second, stack.url + "/x"))[0] == 200
        assert len(session_keys(redis_server, stack)) == 1


async def test_a_logout_token_with_only_a_sub_ends_every_session_of_that_user(
    stack: Stack, browser: aiohttp.ClientSession, redis_server: RedisServer
) -> None:
    async with new_browser() as second, new_browser() as bob:
        await login(browser, stack)
        await login(second, stack)
        await login(bob, stack, "bob")
        token = logout_token(stack, sub="alice")
        status, headers, _ = await post(stack, data={"logout_token": token})
        assert status == 200
        assert headers["Cache-Control"] == "no-store"
        assert (await call(browser, stack.url + "/api/x"))[0] == 401
        assert (await call(second, stack.url + "/api/x"))[0] == 401
        assert (await call(bob, stack.url + "/x"))[0] == 200
        assert len(session_keys(redis_server, stack)) == 1


async def test_a_sid_of_another_user_ends_nothing(
    stack: Stack, browser: aiohttp.ClientSession
) -> None:
    await login(browser, stack)
    token = logout_token(stack, sub="bob", sid=idp_sid(stack, browser))
    status, _, _ = await post(stack, data={"logout_token": token})
    assert status == 200
    assert (await call(browser, stack.url + "/x"))[0] == 200


async def test_logout_at_the_provider_ends_the_gateway_session(
    stack: Stack, browser: aiohttp.ClientSession, redis_server: RedisServer
) -> None:
    """The user signs out at the provider itself (another app's sign-out): the provider's
    back-channel logout reaches the gateway, which ends the session."""
    await login(browser, stack)
    async with browser.get(stack.idp.url + "/end_session") as resp:
        assert resp.status == 200
    assert len(stack.idp.state.backchannel_sent) == 1
    assert session_keys(redis_server, stack) == set()
    assert (await call(browser, stack.url + "/api/x"))[0] == 401


def bad_tokens(stack: Stack, sid: str) -> dict[str, str]:
    """Each breaks one rule of Back-Channel Logout 1.0 §2.6; every other claim is valid."""
    now = int(time.time())
    sign = stack.idp.state.sign
    good = logout_token(stack, sid=sid)
    head, payload, signature = good.split(".")
    flipped = signature[:10] + ("A" if signature[10] != "A" else "B") + signature[11:]
    id_token = id_token_claims(
        issuer=stack.idp.issuer, user=stack.idp.state.users["alice"], client_id=CLIENT_ID,
        now=now, ttl=300, auth_time=now, sid=sid, nonce="n-0123456789", access_token=None,
    )  # fmt: skip
    refreshed_id_token = {k: v for k, v in id_token.items() if k != "nonce"}
    return {
        "unknown signing key": sign(
            claims(stack, sid=sid), {"typ": "logout+jwt"}, key="unpublished"
        ),
        "bad signature": f"{head}.{payload}.{flipped}",
        "wrong iss": logout_token(stack, sid=sid, iss="http://127.0.0.1:1"),
        "wrong aud": logout_token(stack, sid=sid, aud="another-client"),
        "expired": logout_token(stack, sid=sid, iat=now - 600, exp=now - 300),
        "missing iat": logout_token(stack, sid=sid, iat=None),
        "missing jti": logout_token(stack, sid=sid, jti=None),
        "missing events": logout_token(stack, sid=sid, events=None),
        "events not an object": logout_token(stack, sid=sid, events=[BACKCHANNEL_EVENT]),
        "wrong event key": logout_token(
            stack, sid=sid, events={"http://schemas.openid.net/event/other": {}}
        ),
        "nonce present": logout_token(stack, sid=sid, nonce="abc"),
        "neither sub nor sid": logout_token(stack, sub=None),
        "an ID token": sign(id_token, {"typ": "JWT"}),
        "a refreshed ID token": sign(refreshed_id_token, {"typ": "JWT"}),
        "an access token type": sign(claims(stack, sid=sid), {"typ": "at+jwt"}),
        "not a JWT": "not-a-jwt",
        "alg none": f"eyJhbGciOiJub25lIn0.{payload}.",
    }


async def test_every_malformed_logout_token_is_refused_and_changes_nothing(
    stack: Stack, browser: aiohttp.ClientSession, redis_server: RedisServer
) -> None:
    await login(browser, stack)
    sid = idp_sid(stack, browser)
    for case, token in bad_tokens(stack, sid).items():
        status, headers, body = await post(stack, data={"logout_token": token})
        assert status == 400, (case, body)
        assert headers["Cache-Control"] == "no-store", case
    assert len(session_keys(redis_server, stack)) == 1
    assert (await call(browser, stack.url + "/x"))[0] == 200


async def test_a_replayed_logout_token_is_refused(
    stack: Stack, browser: aiohttp.ClientSession, redis_server: RedisServer
) -> None:
    """The same token again, after the user signed in anew: 400, and the new session lives."""
    now = int(time.time())
    token = logout_token(stack, sub="alice", iat=now - 120, exp=now + 60)
    status, _, body = await post(stack, data={"logout_token": token})
    assert (status, json.loads(body)) == (200, {"ended": 0})
    await login(browser, stack)
    for _ in range(2):
        status, _, body = await post(stack, data={"logout_token": token})
        assert status == 400 and "replayed" in body
    assert (await call(browser, stack.url + "/x"))[0] == 200
    assert len(session_keys(redis_server, stack)) == 1


async def test_a_logout_token_never_ends_a_session_begun_after_it_was_issued(
    stack: Stack, browser: aiohttp.ClientSession
) -> None:
    """A token's iat bounds what it ends (give or take a minute of clock skew), which makes
    processing it again harmless: the reason a retry may simply do the whole step again."""
    now = int(time.time())
    await login(browser, stack)
    old = logout_token(stack, sub="alice", iat=now - 120, exp=now + 60)
    status, _, body = await post(stack, data={"logout_token": old})
    assert (status, json.loads(body)) == (200, {"ended": 0})
    assert (await call(browser, stack.url + "/x"))[0] == 200
    # Issued within the skew allowance of the login: that session is ended.
    recent = logout_token(stack, sub="alice", iat=now - 30, exp=now + 60)
    status, _, body = await post(stack, data={"logout_token": recent})
    assert (status, json.loads(body)) == (200, {"ended": 1})
    assert (await call(browser, stack.url + "/x"))[0] == 401


@pytest.mark.parametrize(
    ("refused", "step"),
    [("smembers", "finding the sessions"), ("del", "ending them"), ("set", "recording the jti")],
)
async def test_a_store_failure_mid_logout_is_503_and_the_retry_ends_the_session(
    make_stack: Any,
    browser: aiohttp.ClientSession,
    own_redis: RedisServer,
    refused: str,
    step: str,
) -> None:
    """Back-Channel Logout §2.8: the provider retries after an error. Real Redis refuses one
    command (an ACL change on the running server) so the step fails exactly at ``step``;
    the retry must then end the session, not be refused as a replay of its own jti."""
    stack = await make_stack(redis_url=own_redis.url)
    await login(browser, stack)
    token = logout_token(stack, sid=idp_sid(stack, browser))
    admin = redis.Redis.from_url(own_redis.url)
    try:
        admin.execute_command("ACL", "SETUSER", "default", "-" + refused)
        status, headers, body = await post(stack, data={"logout_token": token})
        assert status == 503, (step, body)
        assert int(headers["Retry-After"]) > 0
        admin.execute_command("ACL", "SETUSER", "default", "+" + refused)
    finally:
        admin.close()
    status, _, body = await post(stack, data={"logout_token": token})
    assert status == 200, (step, body)
    assert (await call(browser, stack.url + "/x"))[0] == 401
    assert session_keys(own_redis, stack) == set()
    # Now that it succeeded, the jti is used up.
    assert (await post(stack, data={"logout_token": token}))[0] == 400


def claims_jti(token: str) -> str:
    import jwt

    return str(jwt.decode(token, options={"verify_signature": False})["jti"])


async def test_requests_that_are_not_a_logout_form_are_refused(
    stack: Stack, browser: aiohttp.ClientSession
) -> None:
    await login(browser, stack)
    token = logout_token(stack, sub="alice")
    assert (await post(stack, json={"logout_token": token}))[0] == 400
    assert (await post(stack, data={"token": token}))[0] == 400
    assert (await post(stack, data={"logout_token": ""}))[0] == 400
    assert (await post(stack, data=b"logout_token=" + b"A" * 20000,
                       headers={"Content-Type": "application/x-www-form-urlencoded"}))[0] == 400  # fmt: skip
    async with aiohttp.ClientSession() as http:
        async with http.get(stack.url + LOGOUT + "?logout_token=" + token) as resp:
            assert resp.status == 405
    assert (await call(browser, stack.url + "/x"))[0] == 200

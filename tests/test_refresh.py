"""Refresh driven by the access token's expiry, and what each refresh outcome does.

Real dev provider with 2-second access tokens and a 1-second ``refresh_skew``, real Redis.
SECURITY.md 19: a rotated refresh token is stored; ``invalid_grant`` ends the session; a
provider outage is a 503 once the token has expired, never a logout. The manager's refresh
decisions themselves (timing, single flight, backoff) are unit-tested on a fake clock in
tests/test_sessions_clock.py.
"""

from __future__ import annotations

import time
from typing import Any

import aiohttp
from yarl import URL

from tests.conftest import RedisServer
from tests.idp_client import http_login
from tests.support.browser import new_browser, session_keys
from tests.support.calls import bearer, call, login, upstream_headers
from tests.support.clock import SHORT, latest_access_token, sleep_until


async def test_refresh_replaces_the_token_and_stores_the_rotated_refresh_token(
    make_stack: Any, browser: aiohttp.ClientSession
) -> None:
    stack = await make_stack(**SHORT)
    state = stack.idp.state
    done = await login(browser, stack)
    first = latest_access_token(stack.idp)
    status, body = await call(browser, stack.url + "/x")
    assert status == 200
    assert bearer(body) == first
    assert state.token_calls["refresh_token"] == 0

    # Inside the skew window (access token has < 1 s left): the gateway refreshes first.
    await sleep_until(done + 1.2)
    status, body = await call(browser, stack.url + "/x")
    assert status == 200
    second = bearer(body)
    assert second != first
    assert second == latest_access_token(stack.idp)
    assert state.token_calls["refresh_token"] == 1
    done = time.time()

    # The next window refreshes again, with the rotated refresh token: the provider revokes
    # the whole family when a rotated-out token is presented, so success proves it was stored.
    await sleep_until(done + 1.2)
    status, body = await call(browser, stack.url + "/x")
    assert status == 200
    third = bearer(body)
    assert third not in (first, second)
    assert state.token_calls["refresh_token"] == 2
    records = list(state.refresh_tokens.values())
    assert [r.rotated for r in records] == [True, True, False]
    assert not any(g.revoked for g in state.grants.values())


async def test_invalid_grant_sends_a_navigation_back_through_login_to_the_same_url(
    make_stack: Any, browser: aiohttp.ClientSession, redis_server: RedisServer
) -> None:
    stack = await make_stack(**SHORT)
    done = await login(browser, stack)
    assert len(session_keys(redis_server, stack)) == 1
    faults = stack.idp.state.faults
    faults.token_error, faults.token_error_grant = "invalid_grant", "refresh_token"
    await sleep_until(done + 1.2)
    async with browser.get(stack.url + "/deep/page?x=1&y=2", allow_redirects=False) as resp:
        assert resp.status == 302
        location = URL(resp.headers["Location"])
        assert location.path == "/oauth2/start"
        assert location.query["rd"] == "/deep/page?x=1&y=2"
        assert resp.cookies["gw_test"].value == ""  # the dead session's cookie is cleared
    assert session_keys(redis_server, stack) == set()
    assert stack.idp.state.token_calls["refresh_token"] == 1

    # The transparent re-login lands on the very URL the user asked for.
    faults.token_error = faults.token_error_grant = None
    result = await http_login(browser, stack.url + str(location), "alice", "alice")
    assert result.status == 200
    assert result.url == stack.url + "/deep/page?x=1&y=2"
    assert len(session_keys(redis_server, stack)) == 1


async def test_a_grant_revoked_at_the_provider_ends_the_session_of_an_api_client(
    make_stack: Any, browser: aiohttp.ClientSession, redis_server: RedisServer
) -> None:
    stack = await make_stack(**SHORT)
    done = await login(browser, stack)
    for grant in stack.idp.state.grants.values():
        stack.idp.state.revoke_grant(grant.id)  # the provider answers invalid_grant from now on
    await sleep_until(done + 1.2)
    status, body = await call(browser, stack.url + "/api/items")
    assert status == 401
    assert body["error"] == "unauthenticated"
    assert "Bearer" in body["_headers"]["WWW-Authenticate"]
    assert session_keys(redis_server, stack) == set()
    status, _ = await call(browser, stack.url + "/api/items")
    assert status == 401
    assert stack.idp.state.token_calls["refresh_token"] == 1


async def test_provider_down_keeps_serving_until_expiry_then_503_and_recovers(
    make_stack: Any, browser: aiohttp.ClientSession, redis_server: RedisServer
) -> None:
    stack = await make_stack(**SHORT)
    done = await login(browser, stack)
    first = latest_access_token(stack.idp)
    faults = stack.idp.state.faults
    faults.token_status = 503

    # In the skew window, the token still valid: served with the old token.
    await sleep_until(done + 1.2)
    status, body = await call(browser, stack.url + "/x")
    assert status == 200
    assert bearer(body) == first
    async with browser.get(stack.url + "/x", allow_redirects=False) as resp:
        assert resp.status == 200
    assert stack.idp.state.token_calls["refresh_token"] >= 1

    # Expired and the provider still down: 503 with Retry-After, never a logout.
    await sleep_until(done + 2.3)
    status, body = await call(browser, stack.url + "/x")
    assert status == 503
    assert body["error"] == "provider_unavailable"
    assert int(body["_headers"]["Retry-After"]) > 0
    async with browser.get(stack.url + "/x", allow_redirects=False) as resp:
        assert resp.status == 503
        assert "Location" not in resp.headers
        assert int(resp.headers["Retry-After"]) > 0
        assert resp.content_type == "text/html"
        assert "gw_test" not in resp.cookies
    assert len(session_keys(redis_server, stack)) == 1

    # The provider is back: the next request refreshes and goes through.
    faults.token_status = None
    status, body = await call(browser, stack.url + "/x")
    assert status == 200
    assert bearer(body) == latest_access_token(stack.idp) != first


async def test_without_a_refresh_token_the_session_ends_when_the_access_token_does(
    make_stack: Any, browser: aiohttp.ClientSession
) -> None:
    stack = await make_stack(**SHORT)
    stack.idp.state.faults.no_refresh_token = True
    async with new_browser() as other:
        await login(browser, stack)
        done = await login(other, stack)

        await sleep_until(done + 1.2)  # in the skew window, still valid: nothing to refresh
        assert (await call(other, stack.url + "/x"))[0] == 200
        await sleep_until(done + 2.3)
        async with browser.get(stack.url + "/page?a=1", allow_redirects=False) as resp:
            assert resp.status == 302
            assert URL(resp.headers["Location"]).query["rd"] == "/page?a=1"
        status, body = await call(other, stack.url + "/x")
        assert status == 401
        assert body["error"] == "unauthenticated"
    assert stack.idp.state.token_calls["refresh_token"] == 0


async def test_changed_groups_take_effect_after_a_refresh(
    make_stack: Any, browser: aiohttp.ClientSession
) -> None:
    stack = await make_stack(**SHORT)
    done = await login(browser, stack, "bob")
    assert (await call(browser, stack.url + "/admin"))[0] == 403
    stack.idp.state.set_user_groups("bob", ["staff", "admins"])
    assert (await call(browser, stack.url + "/admin"))[0] == 403  # not before the refresh
    await sleep_until(done + 1.2)
    status, body = await call(browser, stack.url + "/admin")
    assert status == 200
    assert upstream_headers(body)["x-forwarded-groups"] == "staff,admins"
    async with browser.get(stack.url + "/oauth2/userinfo") as resp:
        assert (await resp.json())["groups"] == ["staff", "admins"]

"""An ended session stays ended whatever was in flight (issue: refresh resurrection).

A refresh already waiting on the provider when the session is ended must not write the
refreshed record back. The dev provider computes the refresh (rotating the refresh token) and
holds its answer (``Faults.refresh_hold``) while the session is ended by each of the four
paths: the sign-out POST, ``gateway sessions revoke``, back-channel logout, and ``invalid_grant``
met by a refresh on another gateway. After the held answer is released, the request that
started the refresh and every later one with the old cookie are refused, and Redis holds no
record. Real provider, real Redis, real gateways on loopback.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from yarl import URL

from gateway.admin import revoke_sessions
from tests.conftest import RedisServer, Stack
from tests.support.browser import session_keys
from tests.support.calls import API, login
from tests.support.clock import SHORT, sleep_until
from tests.support.logout import confirmation_form


@pytest.fixture
async def plain() -> AsyncIterator[aiohttp.ClientSession]:
    """A client without a cookie jar: each call sends the cookie it is given."""
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        yield http


async def with_cookie(http: aiohttp.ClientSession, url: str, cookie: str) -> int:
    async with http.get(url, headers={**API, "Cookie": f"gw_test={cookie}"}) as resp:
        await resp.read()
        return resp.status


async def until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


class HeldRefresh:
    """A logged-in browser whose next request starts a refresh the provider holds back."""

    def __init__(self, stack: Stack, browser: aiohttp.ClientSession) -> None:
        self.stack = stack
        self.browser = browser
        self.hold = asyncio.Event()
        self.cookie = ""
        self.request: asyncio.Task[int] | None = None

    async def start(self, plain: aiohttp.ClientSession) -> None:
        state = self.stack.idp.state
        done = await login(self.browser, self.stack)
        self.cookie = self.browser.cookie_jar.filter_cookies(URL(self.stack.url))["gw_test"].value
        assert await with_cookie(plain, self.stack.url + "/api/before", self.cookie) == 200
        state.faults.refresh_hold = self.hold
        await sleep_until(done + 1.2)  # the access token is now within refresh_skew of expiry
        self.request = asyncio.create_task(
            with_cookie(plain, self.stack.url + "/api/held", self.cookie)
        )
        # The provider has rotated the refresh token and holds its answer.
        await until(lambda: state.token_calls["refresh_token"] == 1)
        state.faults.refresh_hold = None  # later refresh calls are answered at once

    async def release(self) -> int:
        assert self.request is not None
        self.hold.set()
        return await self.request


async def assert_ended_for_good(
    held: HeldRefresh,
    plain: aiohttp.ClientSession,
    redis_server: RedisServer,
    stacks: list[Stack],
) -> None:
    assert await held.release() == 401
    for stack in stacks:
        assert await with_cookie(plain, stack.url + "/api/after", held.cookie) == 401
    assert session_keys(redis_server, held.stack) == set()
    assert redis_server.keys(held.stack.settings.session.key_prefix + "m:*") == []


EndPath = Callable[[HeldRefresh], Awaitable[Any]]


async def test_sign_out_while_a_refresh_is_in_flight_stays_signed_out(
    make_stack: Any,
    browser: aiohttp.ClientSession,
    plain: aiohttp.ClientSession,
    redis_server: RedisServer,
) -> None:
    stack = await make_stack(**SHORT)
    held = HeldRefresh(stack, browser)
    await held.start(plain)
    fields = await confirmation_form(browser, stack)
    async with browser.post(
        stack.url + "/oauth2/sign_out", data=fields, allow_redirects=False
    ) as resp:
        assert resp.status == 303
    await assert_ended_for_good(held, plain, redis_server, [stack])
    # The tokens the held refresh obtained were revoked too, not left alive at the provider.
    assert list(stack.idp.state.refresh_tokens)[-1] in stack.idp.state.revoked


async def test_sessions_revoke_while_a_refresh_is_in_flight_stays_revoked(
    make_stack: Any,
    browser: aiohttp.ClientSession,
    plain: aiohttp.ClientSession,
    redis_server: RedisServer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    stack = await make_stack(**SHORT)
    held = HeldRefresh(stack, browser)
    await held.start(plain)
    assert await revoke_sessions(stack.settings, "alice") == 0
    assert "revoked 1 session(s) of user alice" in capsys.readouterr().out
    await assert_ended_for_good(held, plain, redis_server, [stack])


async def test_back_channel_logout_while_a_refresh_is_in_flight_stays_logged_out(
    make_stack: Any,
    browser: aiohttp.ClientSession,
    plain: aiohttp.ClientSession,
    redis_server: RedisServer,
) -> None:
    stack = await make_stack(**SHORT)
    held = HeldRefresh(stack, browser)
    await held.start(plain)
    state = stack.idp.state
    (idp_session,) = state.sessions.values()
    await state.end_session(idp_session.sid)  # delivers the logout token to the gateway
    assert len(state.backchannel_sent) == 1
    await assert_ended_for_good(held, plain, redis_server, [stack])


async def test_invalid_grant_on_another_gateway_while_a_refresh_is_in_flight_ends_it(
    make_stack: Any,
    browser: aiohttp.ClientSession,
    plain: aiohttp.ClientSession,
    redis_server: RedisServer,
) -> None:
    """Two gateways share the store. The first one's refresh lock is lost (as on a Redis
    failover that did not replicate it), so the second refreshes too, presents the rotated-out
    refresh token, meets ``invalid_grant`` and ends the session; the first one's held answer
    must not bring it back."""
    first = await make_stack(**SHORT)
    session = {**SHORT["session"], "key_prefix": first.settings.session.key_prefix,
               "cookie_secrets": [s.get_secret_value() for s in
                                  first.settings.session.cookie_secrets]}  # fmt: skip
    second = await make_stack(idp=first.idp, echo=first.echo, session=session)
    held = HeldRefresh(first, browser)
    await held.start(plain)
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        assert await client.delete(*await client.keys(session["key_prefix"] + "l:*")) == 1
    finally:
        await client.aclose()
    assert await with_cookie(plain, second.url + "/api/other", held.cookie) == 401
    assert first.idp.state.token_calls["refresh_token"] == 2
    await assert_ended_for_good(held, plain, redis_server, [first, second])

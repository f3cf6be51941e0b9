"""Session lifetimes: sliding idle timeout, absolute ``max_lifetime``, the refresh token's own
lifetime (``refresh_expires_in``), and no Redis write on requests that change nothing.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import redis

from tests.conftest import RedisServer, Stack
from tests.support.browser import session_keys
from tests.support.calls import call, login
from tests.support.clock import sleep_until


def pttl_ms(server: RedisServer, stack: Stack) -> int:
    """Milliseconds left on the one stored session record of this stack."""
    (key,) = session_keys(server, stack)
    client = redis.Redis.from_url(server.url)
    try:
        return int(client.pttl(key))
    finally:
        client.close()


async def test_idle_timeout_slides_with_activity_and_ends_without_it(
    make_stack: Any, browser: aiohttp.ClientSession, redis_server: RedisServer
) -> None:
    stack = await make_stack(session={"idle_timeout": 2})
    done = await login(browser, stack)
    assert pttl_ms(redis_server, stack) <= 2000
    # Requests every half second for twice the idle timeout: each slides it along.
    while time.time() < done + 4:
        assert (await call(browser, stack.url + "/x"))[0] == 200
        await asyncio.sleep(0.5)
    assert (await call(browser, stack.url + "/x"))[0] == 200
    # No request for longer than the idle timeout: the session is gone.
    await asyncio.sleep(2.5)
    assert (await call(browser, stack.url + "/api/x"))[0] == 401
    assert session_keys(redis_server, stack) == set()


async def test_max_lifetime_ends_the_session_whatever_the_activity(
    make_stack: Any, browser: aiohttp.ClientSession, redis_server: RedisServer
) -> None:
    stack = await make_stack(session={"max_lifetime": 3})
    started = time.time()
    await login(browser, stack)
    assert pttl_ms(redis_server, stack) <= 3000
    while time.time() < started + 2:
        assert (await call(browser, stack.url + "/x"))[0] == 200
        await asyncio.sleep(0.3)
    await sleep_until(started + 3.2)
    assert (await call(browser, stack.url + "/api/x"))[0] == 401
    async with browser.get(stack.url + "/x", allow_redirects=False) as resp:
        assert resp.status == 302
        assert resp.headers["Location"].startswith("/oauth2/start")
    assert session_keys(redis_server, stack) == set()


async def test_a_session_never_outlives_its_refresh_token(
    make_stack: Any, browser: aiohttp.ClientSession, redis_server: RedisServer
) -> None:
    # The provider says the refresh token lives 3 s (refresh_expires_in); the gateway's own
    # limits (8 h idle, 7 d absolute) are far longer.
    stack = await make_stack(idp_config={"refresh_token_ttl": 3})
    started = time.time()
    await login(browser, stack)
    assert pttl_ms(redis_server, stack) <= 3000
    while time.time() < started + 2:
        assert (await call(browser, stack.url + "/x"))[0] == 200
        await asyncio.sleep(0.3)
    await sleep_until(started + 3.2)
    assert (await call(browser, stack.url + "/api/x"))[0] == 401
    assert session_keys(redis_server, stack) == set()


def command_calls(server: RedisServer) -> dict[str, int]:
    client = redis.Redis.from_url(server.url)
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


WRITES = {"set", "setex", "psetex", "pexpire", "expire", "pexpireat", "del", "unlink", "sadd",
          "srem", "eval", "evalsha", "hset", "getex", "getset"}  # fmt: skip


async def test_plain_requests_write_nothing_to_redis(
    make_stack: Any, browser: aiohttp.ClientSession, own_redis: RedisServer
) -> None:
    # Without the session cache (tests/test_session_cache.py counts the reads with it).
    stack = await make_stack(redis_url=own_redis.url, session={"cache_size": 0})
    await login(browser, stack)
    client = redis.Redis.from_url(own_redis.url)
    try:
        client.config_resetstat()
    finally:
        client.close()
    for i in range(20):
        status, _ = await call(browser, stack.url + f"/page/{i}")
        assert status == 200
    calls = command_calls(own_redis)
    writes = {name: n for name, n in calls.items() if name in WRITES}
    # The idle timeout slides at most once a minute: at most one PEXPIRE per stored key.
    assert writes.get("pexpire", 0) <= 2
    assert {k: v for k, v in writes.items() if k != "pexpire"} == {}
    assert calls.get("get", 0) == 20  # one store read per request

"""A healthy Redis never causes a 503 under load: store operations queue for a pool
connection (``session.redis_pool_size``, ``session.redis_pool_timeout``) instead of failing.

One gateway process (in this test's event loop), a real Redis, 1,000 requests in flight at
once with one session cookie. The pool is kept small so the queue is really used.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import aiohttp
from yarl import URL

from tests.support.calls import API, login


async def test_a_thousand_concurrent_requests_queue_for_the_pool_and_get_no_503(
    make_stack: Any, browser: aiohttp.ClientSession
) -> None:
    stack = await make_stack(session={"redis_pool_size": 4, "redis_pool_timeout": 30})
    await login(browser, stack)
    cookies = browser.cookie_jar.filter_cookies(URL(stack.url))
    connector = aiohttp.TCPConnector(limit=0)  # 1,000 connections really open at once
    async with aiohttp.ClientSession(connector=connector, cookies=cookies) as http:

        async def one(i: int) -> int:
            async with http.get(stack.url + f"/api/load/{i}", headers=API) as resp:
                await resp.read()
                return resp.status

        statuses = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(1000))), 120)
    assert Counter(statuses) == {200: 1000}

"""Delivery of back-channel logout tokens (OpenID Back-Channel Logout 1.0 §2.5).

Each token is POSTed as ``logout_token=...`` (form-encoded) to the client's
``backchannel_logout_uri``. Failures are logged without the token and otherwise ignored:
the user's logout at the provider does not depend on a relying party answering.
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp

log = logging.getLogger("gateway.devidp")
DELIVERY_TIMEOUT = 5.0


async def deliver_logout_tokens(
    http: aiohttp.ClientSession | None, deliveries: list[tuple[str, str]]
) -> None:
    """POST every ``(uri, logout_token)`` pair concurrently; wait for all of them."""
    if http is None:
        async with aiohttp.ClientSession() as own:
            await _deliver_all(own, deliveries)
    else:
        await _deliver_all(http, deliveries)


async def _deliver_all(http: aiohttp.ClientSession, deliveries: list[tuple[str, str]]) -> None:
    await asyncio.gather(*(_deliver(http, uri, token) for uri, token in deliveries))


async def _deliver(http: aiohttp.ClientSession, uri: str, token: str) -> None:
    timeout = aiohttp.ClientTimeout(total=DELIVERY_TIMEOUT)
    try:
        async with http.post(
            uri, data={"logout_token": token}, timeout=timeout, allow_redirects=False
        ) as resp:
            await resp.read()
            if resp.status != 200:
                log.warning("back-channel logout to %s answered %s", uri, resp.status)
    except (aiohttp.ClientError, TimeoutError) as exc:
        log.warning("back-channel logout to %s failed: %s", uri, type(exc).__name__)

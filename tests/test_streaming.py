"""WebSockets, server-sent events, large bodies and keep-alive through the FULL gateway
(issue 4 item 1): dev provider + echo upstream + gateway with its session store, and a
browser that really logged in. test_proxy.py covers the Forwarder alone; this proves the
gate in front of it passes the same traffic, with the session's identity attached.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import tracemalloc
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType

from gateway.echo import WS_CLOSE_CODES, RunningEcho, start_echo
from tests.conftest import Stack
from tests.support.browser import cookie_value, stored_session
from tests.support.calls import call, login

MB = 1024 * 1024
SPOOFED = {
    "X-Forwarded-User": "mallory",
    "X_Forwarded_User": "mallory",
    "X-Forwarded-Email": "mallory@evil.example",
    "X-Forwarded-Groups": "admins",
    "Authorization": "Bearer mallory-token",
    "X-Gateway-Assertion": "mallory-assertion",
}
HANDSHAKE = {
    "Connection": "Upgrade",
    "Upgrade": "websocket",
    "Sec-WebSocket-Version": "13",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
}


def values(headers: list[list[str]], name: str) -> list[str]:
    return [v for k, v in headers if k.lower() == name]


@pytest.fixture
async def echo() -> AsyncIterator[RunningEcho]:
    running = await start_echo()
    yield running
    await running.close()


@pytest.fixture
async def signed_in(make_stack: Any, echo: RunningEcho, browser: aiohttp.ClientSession) -> Stack:
    url = str(echo.url)
    stack: Stack = await make_stack(
        echo=echo,
        routes=[
            {"prefix": "/", "upstream": url},
            {"prefix": "/public", "upstream": url, "auth": "none"},
            {"prefix": "/nows", "upstream": url, "websockets": False},
        ],
    )
    await login(browser, stack)
    return stack


async def access_token(stack: Stack, browser: aiohttp.ClientSession) -> str:
    cookie = cookie_value(browser, stack)
    assert cookie is not None
    _, session = await stored_session(stack, cookie)
    return session.tokens.access_token


async def wait_for_close_code(echo: RunningEcho, code: int) -> None:
    for _ in range(100):
        if code in echo.app[WS_CLOSE_CODES]:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"the upstream never saw close code {code}")


# -- websockets -------------------------------------------------------------------------------


async def test_websocket_carries_the_session_identity_and_frames_both_ways(
    signed_in: Stack, browser: aiohttp.ClientSession, echo: RunningEcho
) -> None:
    token = await access_token(signed_in, browser)
    async with browser.ws_connect(
        signed_in.url + "/_echo/ws", headers=SPOOFED, protocols=("echo.v1",)
    ) as ws:
        assert ws.protocol == "echo.v1"
        hello = await ws.receive_json(timeout=5)
        seen = hello["headers"]
        # The handshake the upstream saw: the session's identity and bearer, nothing spoofed.
        assert values(seen, "x-forwarded-user") == ["alice"]
        assert values(seen, "x-forwarded-email") == ["alice@example.com"]
        assert values(seen, "x-forwarded-groups") == ["admins,staff"]
        assert values(seen, "authorization") == [f"Bearer {token}"]
        assert values(seen, "x_forwarded_user") == []
        assert values(seen, "x-gateway-assertion") == []
        assert "mallory" not in repr(seen)
        assert "gw_test" not in " ".join(values(seen, "cookie"))  # the session cookie stays here
        assert len(values(seen, "x-request-id")) == 1

        await ws.send_str("hello ✓")
        assert await ws.receive_str(timeout=5) == "hello ✓"
        blob = bytes(range(256)) * 64
        await ws.send_bytes(blob)
        assert await ws.receive_bytes(timeout=5) == blob
        for i in range(20):  # interleaved, in order
            await ws.send_str(f"m{i}")
        assert [await ws.receive_str(timeout=5) for _ in range(20)] == [f"m{i}" for i in range(20)]
        # The client closes: the upstream sees the same close code.
        await ws.close(code=4001, message=b"bye")
    await wait_for_close_code(echo, 4001)


async def test_the_upstream_closing_closes_the_client(
    signed_in: Stack, browser: aiohttp.ClientSession
) -> None:
    async with browser.ws_connect(signed_in.url + "/_echo/ws") as ws:
        await ws.receive_json(timeout=5)
        await ws.send_str("__close__ 4002 done")
        msg = await ws.receive(timeout=5)
        assert (msg.type, msg.data, msg.extra) == (WSMsgType.CLOSE, 4002, "done")
    assert ws.closed


async def test_an_unauthenticated_upgrade_gets_401_and_no_upgrade(signed_in: Stack) -> None:
    # Even with a navigation's Accept header: a WebSocket cannot follow a login redirect.
    for extra in ({}, {"Accept": "text/html", "Sec-Fetch-Mode": "navigate"}):
        async with aiohttp.ClientSession() as anon:
            with pytest.raises(aiohttp.WSServerHandshakeError) as err:
                await anon.ws_connect(signed_in.url + "/_echo/ws", headers=extra)
            assert err.value.status == 401
            async with anon.get(
                signed_in.url + "/_echo/ws", headers={**HANDSHAKE, **extra}
            ) as resp:
                assert resp.status == 401
                assert "Upgrade" not in resp.headers
                assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    # A forged or stale cookie is no session either.
    async with aiohttp.ClientSession(cookies={"gw_test": "forged"}) as forged:
        with pytest.raises(aiohttp.WSServerHandshakeError) as err:
            await forged.ws_connect(signed_in.url + "/_echo/ws")
        assert err.value.status == 401


async def test_websockets_disabled_on_a_route_is_400(
    signed_in: Stack, browser: aiohttp.ClientSession
) -> None:
    with pytest.raises(aiohttp.WSServerHandshakeError) as err:
        await browser.ws_connect(signed_in.url + "/nows/_echo/ws")
    assert err.value.status == 400
    # Plain requests on that route still pass.
    assert (await call(browser, signed_in.url + "/nows/x"))[0] == 200


# -- server-sent events -----------------------------------------------------------------------


async def test_server_sent_events_arrive_as_they_are_sent(
    signed_in: Stack, browser: aiohttp.ClientSession
) -> None:
    async with browser.get(
        signed_in.url + "/_echo/sse?n=5&interval=0.3", headers={"Accept": "text/event-stream"}
    ) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/event-stream"
        assert "X-Request-Id" in resp.headers  # stamped on streamed answers too
        first = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), timeout=10)
        first_at = time.monotonic()
        assert first == b"data: 0\n\n"
        # The rest is still being produced upstream: the stream has not ended.
        assert not resp.content.at_eof()
        rest = await resp.read()
        end_at = time.monotonic()
    assert rest == b"".join(f"data: {i}\n\n".encode() for i in range(1, 5))
    # The upstream sleeps 4 x 0.3 s after the first event; a buffering proxy would have
    # delivered the first event only at the end.
    assert end_at - first_at >= 1.0


# -- large bodies -----------------------------------------------------------------------------


async def test_a_200_mb_upload_streams_with_flat_memory(
    signed_in: Stack, browser: aiohttp.ClientSession
) -> None:
    chunk = bytes(range(256)) * 4096  # 1 MiB, the same object each time
    count = 200
    expected = hashlib.sha256()
    for _ in range(count):
        expected.update(chunk)

    async def body() -> AsyncIterator[bytes]:
        for _ in range(count):
            yield chunk

    tracemalloc.start()
    try:
        async with browser.post(
            signed_in.url + "/upload",
            data=body(),
            headers={"Accept": "application/json", "Content-Type": "application/octet-stream"},
        ) as resp:
            assert resp.status == 200, await resp.text()
            result = await resp.json()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result["body_length"] == count * MB
    assert result["body_sha256"] == expected.hexdigest()
    assert values(result["headers"], "x-forwarded-user") == ["alice"]
    assert peak < 64 * MB, f"peak {peak / MB:.0f} MB"


async def test_a_200_mb_download_streams_with_flat_memory(
    signed_in: Stack, browser: aiohttp.ClientSession
) -> None:
    size = 200 * MB
    pattern = bytes(range(256)) * 256
    expected = hashlib.sha256()
    for _ in range(size // len(pattern)):
        expected.update(pattern)
    digest = hashlib.sha256()
    length = 0
    tracemalloc.start()
    try:
        async with browser.get(signed_in.url + f"/_echo/download?bytes={size}") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Length"] == str(size)
            async for piece in resp.content.iter_chunked(256 * 1024):
                digest.update(piece)
                length += len(piece)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert length == size
    assert digest.hexdigest() == expected.hexdigest()
    assert peak < 64 * MB, f"peak {peak / MB:.0f} MB"


# -- keep-alive -------------------------------------------------------------------------------


async def test_sequential_requests_reuse_upstream_connections(
    signed_in: Stack, browser: aiohttp.ClientSession
) -> None:
    ports = []
    for i in range(20):
        status, body = await call(browser, signed_in.url + f"/k/{i}")
        assert status == 200
        ports.append(body["peer_port"])
    for i in range(5):
        status, body = await call(browser, signed_in.url + f"/public/k/{i}")
        assert status == 200
        ports.append(body["peer_port"])
    # One pooled connection carries them all (a new one per request would give 25 ports).
    assert len(set(ports)) <= 2, ports

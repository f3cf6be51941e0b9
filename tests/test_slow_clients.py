"""Slow and abusive clients (``server.header_timeout``, ``keepalive_timeout``,
``max_connections``), against the real server of ``gateway run`` (``gateway.server.Gateway``
on its own bound socket) in this process."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from gateway.config import validate
from gateway.echo import start_echo
from gateway.server import Gateway, bind_socket
from tests.conftest import gateway_config
from tests.support.ports import free_port

SLOW_CLIENTS = 200
HEAD = (
    b"GET /public/slow HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: slowloris\r\nAccept: */*\r\n\r\n"
)
BOUND = 20.0  # seconds: every wait in this file ends by itself

Start = Callable[..., Awaitable[str]]


@pytest.fixture
async def start_gateway() -> AsyncIterator[Start]:
    running: list[Any] = []

    async def start(**server: Any) -> str:
        echo = await start_echo()
        running.append(echo)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cfg = gateway_config(url, "http://127.0.0.1:1", str(echo.url), None, server=server)
        cfg["server"]["port"] = port
        settings = validate(cfg, env={})
        sock = bind_socket(settings)
        gateway = Gateway(settings, None)
        await gateway.start(sock)
        running.append((gateway, sock))
        return url

    yield start
    for item in reversed(running):
        if isinstance(item, tuple):
            await item[0].drain()
            item[1].close()
        else:
            await item.close()


async def _get(url: str) -> int:
    timeout = aiohttp.ClientTimeout(total=BOUND)
    async with aiohttp.ClientSession(timeout=timeout) as http, http.get(url) as resp:
        await resp.read()
        return resp.status


async def _closed_by_server(reader: asyncio.StreamReader) -> bool:
    """True once the server closed the connection (EOF or reset) without answering."""
    try:
        data = await asyncio.wait_for(reader.read(), BOUND)
    except ConnectionResetError:
        return True
    return data == b""


async def _trickle(writer: asyncio.StreamWriter, data: bytes, every: float) -> int:
    """Send ``data`` one byte at a time; return how many bytes went out before a failure."""
    sent = 0
    with contextlib.suppress(ConnectionError):
        for i in range(len(data)):
            if writer.is_closing():
                break
            writer.write(data[i : i + 1])
            await writer.drain()
            sent += 1
            await asyncio.sleep(every)
    return sent


async def test_slow_clients_are_cut_off_and_others_are_answered(start_gateway: Start) -> None:
    url = await start_gateway(header_timeout="1s", keepalive_timeout="30s")
    port = int(url.rsplit(":", 1)[1])
    conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(SLOW_CLIENTS)]
    # One byte every 0.3s: the whole head would take ~25s, far past the 1s header timeout.
    trickles = [asyncio.create_task(_trickle(w, HEAD, 0.3)) for _, w in conns]
    await asyncio.sleep(0.5)  # every slow client is connected and part-way through its head
    assert not any(t.done() for t in trickles)
    # A normal client is answered while the 200 slow ones hold their connections.
    assert await _get(url + "/public/normal") == 200
    closed = await asyncio.gather(*(_closed_by_server(r) for r, _ in conns))
    assert all(closed)
    sent = await asyncio.wait_for(asyncio.gather(*trickles), BOUND)
    assert max(sent) < len(HEAD)  # none of them ever completed its request head
    for _, w in conns:
        w.close()
    assert await _get(url + "/public/after") == 200


async def test_a_silent_connection_is_closed_after_the_header_timeout(
    start_gateway: Start,
) -> None:
    url = await start_gateway(header_timeout="1s", keepalive_timeout="30s")
    reader, writer = await asyncio.open_connection("127.0.0.1", int(url.rsplit(":", 1)[1]))
    assert await _closed_by_server(reader)
    writer.close()


async def test_keep_alive_waits_idle_then_times_the_next_head(start_gateway: Start) -> None:
    """Idle between requests is bounded by keepalive_timeout, not header_timeout; the next
    request's head, once begun, must be complete within header_timeout."""
    url = await start_gateway(header_timeout="1s", keepalive_timeout="30s")
    reader, writer = await asyncio.open_connection("127.0.0.1", int(url.rsplit(":", 1)[1]))
    request = b"GET /public/a HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    for _ in range(2):
        writer.write(request)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), BOUND)
        assert head.startswith(b"HTTP/1.1 200 ")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        await asyncio.wait_for(reader.readexactly(length), BOUND)
        await asyncio.sleep(1.5)  # idle longer than header_timeout: still open
    # Now a head that trickles in: cut off.
    sent = asyncio.create_task(_trickle(writer, HEAD, 0.3))
    assert await _closed_by_server(reader)
    assert await asyncio.wait_for(sent, BOUND) < len(HEAD)
    writer.close()


async def test_idle_keep_alive_connection_is_closed_after_keepalive_timeout(
    start_gateway: Start,
) -> None:
    url = await start_gateway(header_timeout="10s", keepalive_timeout="1s")
    reader, writer = await asyncio.open_connection("127.0.0.1", int(url.rsplit(":", 1)[1]))
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), BOUND)
    assert head.startswith(b"HTTP/1.1 200 ")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    await asyncio.wait_for(reader.readexactly(length), BOUND)
    assert await _closed_by_server(reader)
    writer.close()


async def test_connections_beyond_max_connections_are_closed(start_gateway: Start) -> None:
    url = await start_gateway(header_timeout="30s", max_connections=5)
    port = int(url.rsplit(":", 1)[1])
    held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(5)]
    await asyncio.sleep(0.2)  # the server has accepted all five
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert await _closed_by_server(reader)
    writer.close()
    for _, w in held:
        w.close()
    await asyncio.sleep(0.2)
    assert await _get(url + "/healthz") == 200


def test_timeouts_have_the_contract_defaults() -> None:
    cfg = gateway_config("http://127.0.0.1:1", "http://127.0.0.1:2", "http://127.0.0.1:3", None)
    server = validate(cfg, env={}).server
    assert (server.header_timeout, server.keepalive_timeout) == (10.0, 75.0)
    assert (server.shutdown_timeout, server.max_connections, server.reuse_port) == (
        25.0,
        4096,
        False,
    )


async def test_a_malformed_request_is_answered_without_echoing_what_it_sent(
    start_gateway: Start, caplog: pytest.LogCaptureFixture
) -> None:
    """aiohttp's own 400 quotes the refused header line (a cookie, a token) in its body and
    logs it with a traceback: the gateway's answers neither."""
    caplog.set_level(logging.INFO, logger="gateway.server")
    url = await start_gateway(max_header_size=1024)
    port = int(url.rsplit(":", 1)[1])
    secret = b"SECRET-COOKIE-VALUE-" + b"x" * 2000
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nCookie: __Host-gateway=" + secret)
        writer.write(b"\r\n\r\n")
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), BOUND)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ") or head.startswith(b"HTTP/1.0 400 ")
    assert body == b"400 Bad Request\n\nThe request could not be read.\n"
    assert b"SECRET" not in answer
    assert "SECRET" not in caplog.text
    assert "refused a malformed request from 127.0.0.1: LineTooLong (400)" in caplog.text

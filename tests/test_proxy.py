"""Forwarding through ``gateway.proxy`` to the echo upstream, over real loopback sockets.

A tiny aiohttp app stands in for the gateway: its catch-all handler builds a
``ProxyTarget`` (as the auth layer would) and calls ``Forwarder.forward``; a small
middleware turns ``GatewayError`` into its status, as the real error middleware does.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import resource
import socket
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestClient
from multidict import CIMultiDict
from yarl import URL

from gateway.echo import WS_CLOSE_CODES, RunningEcho, start_echo
from gateway.errors import GatewayError
from gateway.headers import OwnCookies, normalize
from gateway.proxy import BUFFER_LIMIT, Forwarder, ProxyTarget, make_upstream_client

MB = 1024 * 1024
GATEWAY_COOKIE = "__Host-gateway"
INJECT = {
    "X-Forwarded-User": "alice",
    "X-Forwarded-Email": "alice@example.com",
    "Authorization": "Bearer gateway-access-token",
    "X-Request-Id": "req-123",
}
STRIP = frozenset(
    {
        "x-forwarded-user",
        "x-forwarded-email",
        "x-forwarded-groups",
        "x-forwarded-preferred-username",
        "authorization",
        "x-gateway-assertion",
    }
)
SPOOFED = CIMultiDict(
    [
        ("X-Forwarded-User", "mallory"),
        ("x-forwarded-user", "mallory-2"),
        ("X-FORWARDED-USER", "mallory-3"),
        ("X_Forwarded_User", "mallory-4"),
        ("x_forwarded_email", "mallory@evil.example"),
        ("X-Forwarded-Groups", "admins"),
        ("X_FORWARDED_GROUPS", "admins"),
        ("Authorization", "Bearer client-chosen"),
        ("X-Gateway-Assertion", "forged.jwt.value"),
        ("Connection", "X-Forwarded-User, X-Hop-Custom, Authorization"),
        ("X-Hop-Custom", "1"),
        ("X-Kept", "yes"),
    ]
)

OPTIONS = web.AppKey("proxy_test_options", dict[str, Any])
FORWARDER = web.AppKey("proxy_test_forwarder", Forwarder)
# What ``Forwarder.forward`` handed back: (path, a whole web.Response?, already prepared?).
ANSWERS = web.AppKey("proxy_test_answers", list[tuple[str, bool, bool]])
ProxyFactory = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]


@web.middleware
async def errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except GatewayError as exc:
        # Like the real error middleware, an answer the gateway makes itself is logged.
        logging.getLogger("tests.errors").warning("answered %s", exc.status)
        return web.json_response({"error": exc.code}, status=exc.status)


async def proxy_handler(request: web.Request) -> web.StreamResponse:
    options = request.app[OPTIONS].copy()
    target = ProxyTarget(
        upstream=options.pop("upstream"),
        path=request.path,
        query_string=request.rel_url.raw_query_string,
        inject=options.pop("inject", INJECT),
        strip=STRIP,
        own_cookies=OwnCookies((GATEWAY_COOKIE,)),
        forwarded_for="203.0.113.7",
        forwarded_proto="https",
        forwarded_host="app.example.com",
        **options,
    )
    response = await request.app[FORWARDER].forward(request, target)
    request.app[ANSWERS].append(
        (request.path, isinstance(response, web.Response), response.prepared)
    )
    return response


@pytest.fixture
async def echo() -> AsyncIterator[RunningEcho]:
    running = await start_echo()
    yield running
    await running.close()


async def upstream_client(app: web.Application) -> AsyncIterator[None]:
    session = make_upstream_client()
    app[FORWARDER] = Forwarder(session)
    yield
    await session.close()


def proxy_app(**options: Any) -> web.Application:
    app = web.Application(middlewares=[errors])
    app[OPTIONS] = options
    app[ANSWERS] = []
    app.cleanup_ctx.append(upstream_client)
    app.router.add_route("*", "/{tail:.*}", proxy_handler)
    return app


@pytest.fixture
def make_proxy(aiohttp_client: Any, echo: RunningEcho) -> ProxyFactory:
    async def factory(**options: Any) -> TestClient[web.Request, web.Application]:
        options.setdefault("upstream", echo.url)
        client: TestClient[web.Request, web.Application] = await aiohttp_client(
            proxy_app(**options)
        )
        return client

    return factory


def received(body: dict[str, Any]) -> list[tuple[str, str]]:
    """The headers the upstream saw, names normalized the way the proxy compares them."""
    return [(normalize(name), value) for name, value in body["headers"]]


def values(body: dict[str, Any], name: str) -> list[str]:
    return [value for key, value in received(body) if key == name]


async def test_identity_headers_cannot_be_spoofed(make_proxy: ProxyFactory) -> None:
    client = await make_proxy()
    async with client.get("/whoami", headers=SPOOFED) as resp:
        assert resp.status == 200
        body = await resp.json()
    assert values(body, "x-forwarded-user") == ["alice"]
    assert values(body, "x-forwarded-email") == ["alice@example.com"]
    assert values(body, "authorization") == ["Bearer gateway-access-token"]
    assert values(body, "x-request-id") == ["req-123"]
    assert values(body, "x-forwarded-groups") == []
    assert values(body, "x-gateway-assertion") == []
    assert values(body, "x-hop-custom") == []  # named in Connection
    assert values(body, "connection") == []
    assert values(body, "x-kept") == ["yes"]
    # No other spelling of a gateway-owned name slipped through.
    raw_names = [name for name, _ in body["headers"]]
    assert not [n for n in raw_names if "_" in n]
    assert "mallory" not in repr(body["headers"])


async def test_connection_cannot_remove_injected_headers(make_proxy: ProxyFactory) -> None:
    client = await make_proxy()
    headers = {"Connection": "x-forwarded-user, x_forwarded_email, authorization, cookie"}
    async with client.get("/", headers={**headers, "Cookie": "a=1"}) as resp:
        body = await resp.json()
    assert values(body, "x-forwarded-user") == ["alice"]
    assert values(body, "x-forwarded-email") == ["alice@example.com"]
    assert values(body, "authorization") == ["Bearer gateway-access-token"]
    assert values(body, "cookie") == []  # the client may drop its own headers


async def test_forwarding_headers_are_replaced(make_proxy: ProxyFactory, echo: RunningEcho) -> None:
    client = await make_proxy()
    spoofed = {
        "X-Forwarded-For": "198.51.100.1",
        "X-Forwarded-Proto": "http",
        "X-Forwarded-Host": "evil.example",
        "X-Forwarded-Prefix": "/evil",
        "Forwarded": "for=198.51.100.1;host=evil.example",
        "X-Real-Ip": "198.51.100.1",
        "X-Original-Url": "/admin",
    }
    async with client.get("/", headers=spoofed) as resp:
        body = await resp.json()
    assert values(body, "x-forwarded-for") == ["203.0.113.7"]
    assert values(body, "x-forwarded-proto") == ["https"]
    assert values(body, "x-forwarded-host") == ["app.example.com"]
    for name in ("x-forwarded-prefix", "forwarded", "x-real-ip", "x-original-url"):
        assert values(body, name) == [], name
    assert values(body, "host") == [f"127.0.0.1:{echo.url.port}"]


async def test_preserve_host(make_proxy: ProxyFactory) -> None:
    client = await make_proxy(preserve_host=True)
    async with client.get("/", headers={"Host": "app.example.com"}) as resp:
        body = await resp.json()
    assert values(body, "host") == ["app.example.com"]


async def test_gateway_cookie_removed_others_kept(make_proxy: ProxyFactory) -> None:
    client = await make_proxy()
    cookie = f"theme=dark; {GATEWAY_COOKIE}=sealed-ticket; lang=en"
    async with client.get("/", headers={"Cookie": cookie}) as resp:
        body = await resp.json()
    assert values(body, "cookie") == ["theme=dark; lang=en"]
    async with client.get("/", headers={"Cookie": f"{GATEWAY_COOKIE}=sealed-ticket"}) as resp:
        body = await resp.json()
    assert values(body, "cookie") == []


async def test_path_encoded_once_and_query_verbatim(
    make_proxy: ProxyFactory, echo: RunningEcho
) -> None:
    client = await make_proxy()
    query = "q=a%26b&r=%2F&s=1+2&t&u=%E2%82%AC"
    target = URL(f"/a%20b/%E2%82%AC/100%25/x;y'(z)?{query}", encoded=True)
    async with client.get(target) as resp:
        body = await resp.json()
    assert body["path"] == "/a b/€/100%/x;y'(z)"
    assert body["raw_path"] == "/a%20b/%E2%82%AC/100%25/x;y'(z)"
    assert body["query"] == query
    based = await make_proxy(upstream=echo.url.with_path("/base/"))
    async with based.get(URL("/a%20b", encoded=True)) as resp:
        body = await resp.json()
    assert body["raw_path"] == "/base/a%20b"
    assert body["query"] == ""


async def test_body_method_status_and_head(make_proxy: ProxyFactory) -> None:
    client = await make_proxy()
    payload = b"x" * 1000
    async with client.post("/submit", data=payload, skip_auto_headers=["Accept-Encoding"]) as resp:
        body = await resp.json()
    assert body["method"] == "POST"
    assert body["body_sha256"] == hashlib.sha256(payload).hexdigest()
    assert values(body, "content-length") == ["1000"]
    assert values(body, "accept-encoding") == []  # nothing the client did not send
    headers = {"Content_Length": "5", "Transfer_Encoding": "identity"}
    async with client.post("/submit", data=payload, headers=headers) as resp:
        body = await resp.json()
    assert [name for name, _ in body["headers"] if "_" in name] == []
    assert body["body_length"] == 1000
    for code in (201, 404, 503):
        async with client.get(f"/_echo/status?code={code}") as resp:
            assert resp.status == code
            assert (await resp.json())["status"] == code
    async with client.get("/_echo/status?code=204") as resp:
        assert resp.status == 204
        assert await resp.read() == b""
    async with client.head("/_echo/download?bytes=1000") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Length"] == "1000"
        assert await resp.read() == b""


async def test_response_hop_by_hop_filtered(make_proxy: ProxyFactory) -> None:
    client = await make_proxy()
    async with client.get("/_echo/setheaders") as resp:
        assert resp.status == 200
        assert "X-Secret" not in resp.headers
        assert "Keep-Alive" not in resp.headers
        assert resp.headers.get("Connection", "keep-alive").lower() != "x-secret"
        assert resp.headers["X-Kept"] == "yes"
        assert await resp.text() == "ok"


async def test_html_view_masks_tokens(make_proxy: ProxyFactory) -> None:
    client = await make_proxy()
    async with client.get("/<b>?x=<i>", headers={"Accept": "text/html,*/*;q=0.8"}) as resp:
        page = await resp.text()
    assert "what the gateway sent me" in page
    assert "Bearer gateway-…" in page
    assert "gateway-access-token" not in page
    assert "<b>" not in page and "&lt;b&gt;" in page


async def test_server_sent_events_flush_as_they_come(make_proxy: ProxyFactory) -> None:
    client = await make_proxy()
    started = time.monotonic()
    async with client.get("/_echo/sse?n=2&interval=1") as resp:
        # The upstream sleeps a second before the second event: the first one must
        # arrive while it does, not when the stream ends.
        first = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), timeout=0.8)
        assert first == b"data: 0\n\n"
        assert time.monotonic() - started < 0.9
        assert not resp.content.at_eof()
        assert await resp.read() == b"data: 1\n\n"


def _max_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


async def test_large_upload_is_streamed(make_proxy: ProxyFactory) -> None:
    client = await make_proxy()
    chunk = bytes(range(256)) * 4096  # 1 MiB, the same object every time
    count = 200
    expected = hashlib.sha256()
    for _ in range(count):
        expected.update(chunk)

    async def body() -> AsyncIterator[bytes]:
        for _ in range(count):
            yield chunk

    rss_before = _max_rss()
    tracemalloc.start()
    try:
        async with client.put("/upload", data=body()) as resp:
            result = await resp.json()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result["body_length"] == count * MB
    assert result["body_sha256"] == expected.hexdigest()
    assert values(result, "transfer-encoding") == ["chunked"]
    assert peak < 64 * MB, f"peak {peak / MB:.0f} MB"
    assert _max_rss() - rss_before < 64 * MB


async def test_large_download_is_streamed(make_proxy: ProxyFactory) -> None:
    client = await make_proxy()
    size = 200 * MB
    pattern = bytes(range(256)) * 256
    expected = hashlib.sha256()
    for _ in range(size // len(pattern)):
        expected.update(pattern)
    digest = hashlib.sha256()
    length = 0
    rss_before = _max_rss()
    tracemalloc.start()
    try:
        async with client.get(f"/_echo/download?bytes={size}") as resp:
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
    assert _max_rss() - rss_before < 64 * MB


async def test_client_leaving_mid_download_is_quiet(
    make_proxy: ProxyFactory, caplog: pytest.LogCaptureFixture
) -> None:
    client = await make_proxy()
    with caplog.at_level(logging.WARNING):
        async with client.get(f"/_echo/download?bytes={100 * MB}") as resp:
            await resp.content.readexactly(MB)
            resp.close()
        await asyncio.sleep(0.2)
        async with client.get("/after") as resp:
            assert resp.status == 200
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_client_abandoning_upload_is_quiet(
    echo: RunningEcho, caplog: pytest.LogCaptureFixture
) -> None:
    # A plain AppRunner, as in production: the handler is not cancelled when the
    # client leaves (the test server would cancel it).
    runner = web.AppRunner(proxy_app(upstream=echo.url))
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        port = runner.addresses[0][1]
        with caplog.at_level(logging.WARNING):
            _reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"PUT /up HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n")
            writer.write(b"a" * MB)
            await writer.drain()
            await asyncio.sleep(0.1)
            writer.close()
            await writer.wait_closed()
            await asyncio.sleep(0.3)
    finally:
        await runner.cleanup()
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


@pytest.fixture
async def odd_upstream(aiohttp_server: Any, echo: RunningEcho) -> URL:
    """An upstream that misbehaves in ways the echo does not."""

    async def body_fails(
        request: web.Request, length: int, sent: int, stall: bool = False
    ) -> web.StreamResponse:
        """Announce ``length`` bytes, send ``sent``, then die (or stall)."""
        response = web.StreamResponse()
        response.content_length = length
        await response.prepare(request)
        await response.write(b"x" * sent)
        if stall:
            await asyncio.sleep(5)
        else:
            assert request.transport is not None
            request.transport.close()  # dies mid-body
        return response

    async def truncated(request: web.Request) -> web.StreamResponse:
        return await body_fails(request, 10 * MB, MB)

    async def short(request: web.Request) -> web.StreamResponse:
        return await body_fails(request, 1000, 10)

    async def stalls(request: web.Request) -> web.StreamResponse:
        return await body_fails(request, 1000, 10, stall=True)

    async def redirect(request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound(str(echo.url / "_echo" / "ws"))

    async def cookies(request: web.Request) -> web.StreamResponse:
        response = web.Response(text="ok")
        response.set_cookie(GATEWAY_COOKIE, "planted", path="/")
        response.set_cookie("theme", "dark")
        return response

    async def ws_cookies(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        ws.set_cookie(GATEWAY_COOKIE, "planted", path="/")
        ws.headers.add("Set-Cookie", "=__Host-gateway=planted")
        await ws.prepare(request)
        await ws.close()
        return ws

    app = web.Application()
    app.router.add_get("/truncated", truncated)
    app.router.add_get("/short", short)
    app.router.add_get("/stalls", stalls)
    app.router.add_get("/redirect", redirect)
    app.router.add_get("/cookies", cookies)
    app.router.add_get("/ws-cookies", ws_cookies)
    server = await aiohttp_server(app)
    url: URL = server.make_url("/")
    return url


async def test_upstream_failure_mid_body_closes_client_connection(
    make_proxy: ProxyFactory, odd_upstream: URL, caplog: pytest.LogCaptureFixture
) -> None:
    client = await make_proxy(upstream=odd_upstream)
    with caplog.at_level(logging.WARNING, logger="gateway.proxy"):
        async with client.get("/truncated?secret=q") as resp:
            assert resp.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await resp.read()
    warnings = [r for r in caplog.records if r.name == "gateway.proxy"]
    assert len(warnings) == 1
    assert warnings[0].exc_info is None
    assert "secret" not in warnings[0].getMessage()


async def test_small_answer_failing_mid_body_is_502_or_504_not_a_truncated_200(
    make_proxy: ProxyFactory, odd_upstream: URL, caplog: pytest.LogCaptureFixture
) -> None:
    """A small answer is read whole before its status line goes out, so an upstream that
    dies or stalls in its body gets the honest error page."""
    client = await make_proxy(upstream=odd_upstream, read_timeout=0.3)
    with caplog.at_level(logging.WARNING, logger="gateway.proxy"):
        async with client.get("/short?secret=q") as resp:
            assert resp.status == 502
            assert (await resp.json())["error"] == "bad_gateway"
        async with client.get("/stalls?secret=q") as resp:
            assert resp.status == 504
            assert (await resp.json())["error"] == "gateway_timeout"
    warnings = [r for r in caplog.records if r.name == "gateway.proxy"]
    assert [w.levelno for w in warnings] == [logging.WARNING, logging.WARNING]
    assert all("secret" not in w.getMessage() for w in warnings)


async def test_small_answers_go_whole_and_others_stream(make_proxy: ProxyFactory) -> None:
    """An answer with a Content-Length up to BUFFER_LIMIT becomes one unprepared
    web.Response (written whole by the server); a larger or unknown length, HEAD and 204
    stream. The header rules hold on both ways."""
    client = await make_proxy()
    async with client.get(f"/_echo/download?bytes={BUFFER_LIMIT}") as resp:
        assert resp.headers["Content-Length"] == str(BUFFER_LIMIT)
        assert len(await resp.read()) == BUFFER_LIMIT
    async with client.get(f"/_echo/download?bytes={BUFFER_LIMIT + 1}") as resp:
        assert len(await resp.read()) == BUFFER_LIMIT + 1
    async with client.head("/_echo/download?bytes=1000") as resp:
        assert resp.headers["Content-Length"] == "1000"
    async with client.get("/_echo/status?code=204") as resp:
        assert resp.status == 204
    async with client.get("/_echo/sse?n=1&interval=0") as resp:
        assert "Content-Length" not in resp.headers
        await resp.read()
    async with client.get("/_echo/setheaders") as resp:
        assert "X-Secret" not in resp.headers and "Keep-Alive" not in resp.headers
        assert resp.headers["X-Kept"] == "yes"
        assert "Transfer-Encoding" not in resp.headers
        assert await resp.text() == "ok"
    assert client.app is not None
    assert client.app[ANSWERS] == [
        ("/_echo/download", True, False),
        ("/_echo/download", False, True),
        ("/_echo/download", False, True),
        ("/_echo/status", False, True),
        ("/_echo/sse", False, True),
        ("/_echo/setheaders", True, False),
    ]


async def test_plain_requests_carry_no_trace_hooks(make_proxy: ProxyFactory) -> None:
    """Trace hooks (refusing WebSocket redirects) live on a session of their own: a session
    with hooks builds their objects and fires their signals on every request."""
    client = await make_proxy()
    async with client.get("/plain") as resp:
        assert resp.status == 200
    assert client.app is not None
    forwarder = client.app[FORWARDER]
    assert forwarder._client.trace_configs == []
    assert forwarder._ws_client is None


async def test_redirects_pass_to_the_client_and_are_never_followed(
    make_proxy: ProxyFactory, odd_upstream: URL
) -> None:
    client = await make_proxy(upstream=odd_upstream)
    async with client.get("/redirect", allow_redirects=False) as resp:
        assert resp.status == 302
        assert resp.headers["Location"].endswith("/_echo/ws")
    # A WebSocket handshake that the upstream redirects elsewhere is refused.
    with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
        async with client.ws_connect("/redirect"):
            pass
    assert caught.value.status == 502


async def test_upstream_cannot_set_the_gateway_cookie(
    make_proxy: ProxyFactory, odd_upstream: URL
) -> None:
    client = await make_proxy(upstream=odd_upstream)
    async with client.get("/cookies") as resp:
        set_cookies = resp.headers.getall("Set-Cookie")
    assert [c.split("=")[0] for c in set_cookies] == ["theme"]


async def test_upstream_websocket_handshake_cannot_set_the_gateway_cookie(
    make_proxy: ProxyFactory, odd_upstream: URL
) -> None:
    """The client's 101 is the gateway's own: nothing of the upstream's handshake answer."""
    client = await make_proxy(upstream=odd_upstream)
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    writer.write(
        b"GET /ws-cookies HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    writer.close()
    assert head.startswith(b"HTTP/1.1 101 ")
    assert b"set-cookie" not in head.lower()


async def test_upstream_down_is_502(make_proxy: ProxyFactory) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = await make_proxy(upstream=URL(f"http://127.0.0.1:{port}"))
    async with client.get("/") as resp:
        assert resp.status == 502
        assert (await resp.json())["error"] == "bad_gateway"


async def test_slow_upstream_is_504(make_proxy: ProxyFactory) -> None:
    client = await make_proxy(read_timeout=0.3)
    started = time.monotonic()
    async with client.get("/_echo/slow?delay=1") as resp:
        assert resp.status == 504
        assert (await resp.json())["error"] == "gateway_timeout"
    assert time.monotonic() - started < 0.9


async def test_websocket_relay(make_proxy: ProxyFactory, echo: RunningEcho) -> None:
    client = await make_proxy()
    spoofed = SPOOFED.copy()
    spoofed["Connection"] = "Upgrade, X-Forwarded-User, X-Hop-Custom"
    async with client.ws_connect(
        "/_echo/ws", headers=spoofed, protocols=("nope", "echo.v2"), autoping=False
    ) as ws:
        assert ws.protocol == "echo.v2"
        hello = await ws.receive_json(timeout=5)
        assert hello["protocol"] == "echo.v2"
        assert values(hello, "x-forwarded-user") == ["alice"]
        assert values(hello, "authorization") == ["Bearer gateway-access-token"]
        assert values(hello, "x-forwarded-for") == ["203.0.113.7"]
        assert values(hello, "x-gateway-assertion") == []
        assert values(hello, "x-hop-custom") == []
        assert "mallory" not in repr(hello["headers"])
        await ws.send_str("hello ✓")
        assert await ws.receive_str(timeout=5) == "hello ✓"
        await ws.send_bytes(b"\x00\x01\xff")
        assert await ws.receive_bytes(timeout=5) == b"\x00\x01\xff"
        await ws.ping(b"are you there")
        pong = await ws.receive(timeout=5)
        assert (pong.type, pong.data) == (WSMsgType.PONG, b"are you there")
        await ws.close(code=4001, message=b"done")
    for _ in range(50):
        if 4001 in echo.app[WS_CLOSE_CODES]:
            break
        await asyncio.sleep(0.02)
    assert 4001 in echo.app[WS_CLOSE_CODES]


async def test_websocket_upstream_close_reaches_client(make_proxy: ProxyFactory) -> None:
    client = await make_proxy()
    async with client.ws_connect("/_echo/ws") as ws:
        await ws.receive_json(timeout=5)
        await ws.send_str("__close__ 4002 bye")
        msg = await ws.receive(timeout=5)
        assert (msg.type, msg.data, msg.extra) == (WSMsgType.CLOSE, 4002, "bye")


async def test_websocket_upstream_down_is_502(make_proxy: ProxyFactory) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = await make_proxy(upstream=URL(f"http://127.0.0.1:{port}"))
    async with client.get(
        "/_echo/ws",
        headers={
            "Connection": "Upgrade",
            "Upgrade": "websocket",
            "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        },
    ) as resp:
        assert resp.status == 502


async def test_websockets_disabled_is_400(make_proxy: ProxyFactory) -> None:
    client = await make_proxy(websockets=False)
    async with client.get(
        "/_echo/ws",
        headers={
            "Connection": "Upgrade",
            "Upgrade": "websocket",
            "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        },
    ) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"] == "bad_request"

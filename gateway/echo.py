"""The demo and test upstream: an application that shows what the gateway sent it.

Owns the echo server used by ``gateway demo`` and the proxy tests. Any path and
method answers with the request it received (JSON for programs, an HTML table for a
browser), and a few ``/_echo/*`` paths produce the awkward traffic a proxy must carry:
server-sent events, WebSockets, large downloads, slow answers, arbitrary statuses and
hop-by-hop response headers. It binds to loopback only.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import html
import ipaddress
from collections import deque
from dataclasses import dataclass, field

from aiohttp import WSMsgType, web
from yarl import URL

__all__ = ["WS_CLOSE_CODES", "RunningEcho", "create_echo_app", "start_echo"]

# Close codes the WebSocket echo saw from its clients, newest last (for tests).
WS_CLOSE_CODES = web.AppKey("echo_ws_close_codes", deque[int | None])

_PATTERN = bytes(range(256)) * 256  # 64 KiB, the download chunk
_HIGHLIGHT_PREFIX = "x-forwarded-"
# Never show a whole credential on a demo screen; the JSON form is for tests.
_MASKED = frozenset({"authorization", "x-gateway-assertion"})
_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Echo upstream</title>
<style>body{{font-family:system-ui,sans-serif;margin:2rem}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.3rem .6rem;text-align:left;font-family:monospace}}
tr.hl{{background:#fff3bf}}</style></head><body>
<h1>Echo upstream — what the gateway sent me</h1>
<table><tr><th>method</th><td>{method}</td></tr><tr><th>path</th><td>{path}</td></tr>
<tr><th>query</th><td>{query}</td></tr></table>
<h2>Headers</h2><table><tr><th>name</th><th>value</th></tr>{rows}</table>
<p>{length} body bytes, sha256 {sha}</p></body></html>
"""


def _prefers_html(accept: str) -> bool:
    """True when ``Accept`` ranks text/html at least as high as JSON (RFC 9110 §12.5.1)."""
    html_q = json_q = 0.0
    for part in accept.split(","):
        media, _, params = part.partition(";")
        q = 1.0
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        media = media.strip().lower()
        if media == "text/html":
            html_q = max(html_q, q)
        elif media in ("application/json", "application/*", "*/*"):
            json_q = max(json_q, q)
    return html_q > 0 and html_q >= json_q


def _mask(name: str, value: str) -> str:
    if name.lower() not in _MASKED:
        return value
    scheme, sep, credential = value.partition(" ")
    if sep and scheme.lower() == "bearer":
        return f"Bearer {credential[:8]}…"
    if sep:
        return f"{scheme} …"
    return f"{value[:8]}…"


def _raw_headers(request: web.Request) -> list[list[str]]:
    # raw_headers keeps the original spelling and every duplicate.
    return [
        [name.decode("latin-1"), value.decode("utf-8", "replace")]
        for name, value in request.raw_headers
    ]


async def echo(request: web.Request) -> web.Response:
    digest = hashlib.sha256()
    length = 0
    # Hashed as it arrives and never stored, so huge uploads cost no memory here.
    try:
        async for chunk in request.content.iter_chunked(64 * 1024):
            digest.update(chunk)
            length += len(chunk)
    except ConnectionError:  # the sender gave up mid-body; nobody reads an answer
        return web.Response(status=400, text="incomplete body")
    headers = _raw_headers(request)
    if _prefers_html(request.headers.get("Accept", "")):
        rows = "".join(
            "<tr{cls}><td>{name}</td><td>{value}</td></tr>".format(
                cls=' class="hl"'
                if name.lower().startswith(_HIGHLIGHT_PREFIX) or name.lower() in _MASKED
                else "",
                name=html.escape(name),
                value=html.escape(_mask(name, value)),
            )
            for name, value in headers
        )
        page = _PAGE.format(
            method=html.escape(request.method),
            path=html.escape(request.path),
            query=html.escape(request.rel_url.raw_query_string),
            rows=rows,
            length=length,
            sha=digest.hexdigest(),
        )
        return web.Response(text=page, content_type="text/html")
    return web.json_response(
        {
            "method": request.method,
            "path": request.path,
            "raw_path": request.raw_path.partition("?")[0],
            "query": request.rel_url.raw_query_string,
            "headers": headers,
            "body_sha256": digest.hexdigest(),
            "body_length": length,
            # The sender's source port: tests see whether the proxy reuses its connections.
            "peer_port": (request.transport.get_extra_info("peername") or ("", 0))[1]
            if request.transport is not None
            else 0,
        }
    )


def _number(request: web.Request, name: str, default: float, high: float) -> float:
    try:
        value = float(request.query.get(name, default))
    except ValueError:
        raise web.HTTPBadRequest(text=f"bad {name}") from None
    if not 0 <= value <= high:
        raise web.HTTPBadRequest(text=f"{name} out of range")
    return value


async def sse(request: web.Request) -> web.StreamResponse:
    count = int(_number(request, "n", 3, 10_000))
    interval = _number(request, "interval", 0.5, 60)
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    with contextlib.suppress(ConnectionError):  # the reader may leave early
        for i in range(count):
            await response.write(f"data: {i}\n\n".encode())
            if i < count - 1:
                await asyncio.sleep(interval)
        await response.write_eof()
    return response


async def websocket(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(protocols=("echo.v1", "echo.v2"))
    await ws.prepare(request)
    await ws.send_json({"headers": _raw_headers(request), "protocol": ws.ws_protocol})
    async for msg in ws:
        if msg.type is WSMsgType.TEXT:
            # "__close__ <code> [reason]" asks the echo to close first.
            if msg.data.startswith("__close__"):
                _, _, rest = msg.data.partition(" ")
                code, _, reason = rest.partition(" ")
                await ws.close(code=int(code or 1000), message=reason.encode())
                break
            await ws.send_str(msg.data)
        elif msg.type is WSMsgType.BINARY:
            await ws.send_bytes(msg.data)
    request.app[WS_CLOSE_CODES].append(ws.close_code)
    return ws


async def download(request: web.Request) -> web.StreamResponse:
    remaining = int(_number(request, "bytes", 0, 1 << 40))
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    response.content_length = remaining
    await response.prepare(request)
    if request.method == "HEAD":  # RFC 9110 §9.3.2: the headers of a GET, no content
        return response
    with contextlib.suppress(ConnectionError):  # the reader may leave early
        while remaining > 0:
            chunk = _PATTERN if remaining >= len(_PATTERN) else _PATTERN[:remaining]
            await response.write(chunk)
            remaining -= len(chunk)
        await response.write_eof()
    return response


async def slow(request: web.Request) -> web.Response:
    delay = _number(request, "delay", 1, 300)
    await asyncio.sleep(delay)
    return web.json_response({"slept": delay})


async def status(request: web.Request) -> web.Response:
    code = int(_number(request, "code", 200, 599))
    if code < 200:
        raise web.HTTPBadRequest(text="code must be 200-599")
    if code in (204, 304):
        return web.Response(status=code)
    return web.json_response({"status": code}, status=code)


async def set_headers(request: web.Request) -> web.Response:
    # RFC 9110 §7.6.1: X-Secret is hop-by-hop because Connection names it.
    return web.Response(
        text="ok",
        headers={
            "Connection": "X-Secret",
            "X-Secret": "1",
            "Keep-Alive": "timeout=5",
            "X-Kept": "yes",
        },
    )


def create_echo_app() -> web.Application:
    app = web.Application()
    app[WS_CLOSE_CODES] = deque(maxlen=100)
    for path, handler in (
        ("/_echo/sse", sse),
        ("/_echo/ws", websocket),
        ("/_echo/download", download),
        ("/_echo/slow", slow),
        ("/_echo/status", status),
        ("/_echo/setheaders", set_headers),
    ):
        app.router.add_route("*", path, handler)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


@dataclass(frozen=True)
class RunningEcho:
    """A started echo server; ``close()`` stops it."""

    url: URL
    app: web.Application
    _runner: web.AppRunner = field(repr=False)

    async def close(self) -> None:
        await self._runner.cleanup()


async def start_echo(host: str = "127.0.0.1", port: int = 0) -> RunningEcho:
    """Start the echo server on a loopback address (port 0 picks a free one)."""
    if host != "localhost" and not ipaddress.ip_address(host).is_loopback:
        raise ValueError("the echo upstream binds to loopback only")
    app = create_echo_app()
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        bound = runner.addresses[0]
    except BaseException:
        await runner.cleanup()
        raise
    return RunningEcho(URL.build(scheme="http", host=bound[0], port=bound[1]), app, runner)

"""Forwarding a request the caller has already admitted to its upstream.

Owns the wire side of proxying: the upstream URL, the header rules (via
``gateway.headers``), streaming bodies both ways without buffering, WebSocket
relaying, and turning transport failures into ``UpstreamError`` (502) and
``UpstreamTimeout`` (504). It never decides who may pass: the caller hands it a
``ProxyTarget`` with the path, identity headers and forwarding values already chosen.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import ssl
from collections.abc import Mapping
from typing import NamedTuple
from urllib.parse import quote

import aiohttp
from aiohttp import WSMsgType, web
from multidict import CIMultiDict
from prometheus_client import Gauge
from yarl import URL

from gateway.errors import BadRequest, MethodNotAllowed, UpstreamError, UpstreamTimeout
from gateway.headers import OwnCookies, client_headers, is_websocket_upgrade, upstream_headers
from gateway.logs import WarnLimiter, transport_cause
from gateway.tracing import Tracing

__all__ = ["Forwarder", "ProxyTarget", "make_upstream_client"]

log = logging.getLogger(__name__)

# RFC 3986 §3.3 pchar minus "%": the decoded path is re-encoded exactly once.
_PATH_SAFE = "/:@!$&'()*+,;=-._~"
# aiohttp would otherwise add these itself; the upstream must see only what the
# client sent (an added Accept-Encoding would hand the client a body it cannot decode,
# since responses pass through with auto_decompress=False).
_SKIP_AUTO_HEADERS = frozenset({"Accept", "Accept-Encoding", "User-Agent", "Content-Type"})
# RFC 9110 §6.4.1: these answers never carry content.
_NO_BODY_STATUS = frozenset({204, 304})
# RFC 6455 §7.4.1: 1005, 1006 and 1015 must never be sent in a Close frame.
_UNSENDABLE_CLOSE = {1005: 1000, 1006: 1011, 1015: 1011}
_WS_CLOSE_TIMEOUT = 5.0
# An upstream answer with a Content-Length up to this is read whole and answered in one
# write (status line, headers and body), like a plain aiohttp proxy; a larger or unknown
# length streams chunk by chunk with back-pressure. It bounds what a client that does not
# read can make a connection hold: about what the streamed relay's transport buffer holds
# before it waits for the client anyway.
BUFFER_LIMIT = 64 * 1024


class ProxyTarget(NamedTuple):
    """Everything the caller decided about one forwarded request.

    Made once per request: a named tuple (immutable, like the frozen dataclass it was,
    and built in less than half the time: a frozen dataclass sets each of its 14 fields
    through ``object.__setattr__``).
    """

    upstream: URL
    path: str
    query_string: str
    inject: Mapping[str, str]
    strip: frozenset[str]
    own_cookies: OwnCookies
    forwarded_for: str
    forwarded_proto: str
    forwarded_host: str
    preserve_host: bool = False
    connect_timeout: float = 5.0
    read_timeout: float = 60.0
    websockets: bool = True
    ws_max_msg_size: int = 4 * 1024 * 1024


@functools.lru_cache(maxsize=256)
def _upstream_base(upstream: URL) -> tuple[str, str, str]:
    authority = upstream.host_port_subcomponent
    if authority is None:
        raise ValueError("upstream URL needs a host")
    return upstream.scheme, authority, upstream.raw_path.rstrip("/")


def upstream_url(target: ProxyTarget) -> URL:
    """The upstream URL, built already encoded so yarl does not re-normalize it."""
    scheme, authority, base = _upstream_base(target.upstream)
    return URL.build(
        scheme=scheme,
        authority=authority,
        path=base + quote(target.path, safe=_PATH_SAFE),
        query_string=target.query_string,
        encoded=True,
    )


@functools.lru_cache(maxsize=64)
def _timeout(connect: float, read: float) -> aiohttp.ClientTimeout:
    # ``connect`` covers waiting for a pooled connection as well as the TCP/TLS
    # handshake; ``sock_read`` bounds the gap between bytes, not the whole body, so
    # long downloads and event streams live as long as data keeps coming.
    return aiohttp.ClientTimeout(total=None, connect=connect, sock_read=read)


class _RedirectRefused(aiohttp.ClientError):
    """The upstream answered a WebSocket handshake with a redirect."""


async def _refuse_redirect(
    session: aiohttp.ClientSession, ctx: object, params: aiohttp.TraceRequestRedirectParams
) -> None:
    # ws_connect always follows redirects; following one would carry the identity
    # headers to wherever the upstream points (SECURITY 18).
    raise _RedirectRefused("upstream redirected")


def make_upstream_client(
    *, ca_file: str | None = None, verify_tls: bool = True, limit: int = 256
) -> aiohttp.ClientSession:
    """The shared upstream session: keep-alive pool, no cookie jar, no decompression.

    Call it inside the running loop (a ``cleanup_ctx``); the caller closes it.
    """
    tls: ssl.SSLContext | bool = verify_tls
    if verify_tls and ca_file is not None:
        tls = ssl.create_default_context(cafile=ca_file)
    connector = aiohttp.TCPConnector(limit=limit, ssl=tls, keepalive_timeout=4.0)
    return _client(connector, connector_owner=True)


def _client(
    connector: aiohttp.BaseConnector,
    *,
    connector_owner: bool,
    trace_configs: list[aiohttp.TraceConfig] | None = None,
) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=connector,
        connector_owner=connector_owner,
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        skip_auto_headers=_SKIP_AUTO_HEADERS,
        timeout=_timeout(5.0, 60.0),
        trace_configs=trace_configs,
        trust_env=False,
    )


def _websocket_client(client: aiohttp.ClientSession) -> aiohttp.ClientSession:
    """A session over ``client``'s connection pool whose redirects are refused.

    ``ws_connect`` always follows redirects, and only a trace hook can stop it; a session
    with trace hooks builds their objects and fires their signals on every request, so the
    plain requests go through ``client``, which has none. This one closes with ``client``
    (it does not own the pool).
    """
    assert client.connector is not None
    trace = aiohttp.TraceConfig()
    trace.on_request_redirect.append(_refuse_redirect)
    return _client(client.connector, connector_owner=False, trace_configs=[trace])


class Forwarder:
    """Sends admitted requests upstream over one shared client session."""

    def __init__(
        self,
        client: aiohttp.ClientSession,
        ws_open: Gauge | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self._client = client
        self._ws_client: aiohttp.ClientSession | None = None  # made at the first WebSocket
        self._tracing = tracing or Tracing()
        self._ws_open = ws_open  # the gateway_websockets_open gauge, when metrics are on
        self._warn = WarnLimiter(log)  # one WARNING per upstream and cause per 10 s

    def _failed(self, target: ProxyTarget, exc: BaseException, status: int) -> None:
        """Log why an upstream gave no answer (rate-limited; no path, query or header)."""
        where = _upstream_base(target.upstream)[1]
        cause = transport_cause(exc)
        self._warn.warn(
            f"upstream {where} {cause}",
            "upstream %s failed: %s (answered %d)",
            where,
            cause,
            status,
            upstream=where,
            status=status,
        )

    def _answered(self, target: ProxyTarget) -> None:
        where = _upstream_base(target.upstream)[1]
        self._warn.ok(f"upstream {where} ", "upstream %s answers again", where)

    async def forward(self, request: web.Request, target: ProxyTarget) -> web.StreamResponse:
        if request.method == "CONNECT":
            # A tunnel would escape every header rule below.
            raise MethodNotAllowed()
        if request.method == "GET" and is_websocket_upgrade(request.headers):
            if not target.websockets:
                raise BadRequest("WebSockets are not enabled on this route")
            return await self._websocket(request, target)
        has_body = request.body_exists
        if not self._tracing.enabled:
            return await self._forward(request, target, has_body)
        scheme, where, _ = _upstream_base(target.upstream)
        with self._tracing.span(
            f"upstream {request.method}", "client", {"server.address": where, "url.scheme": scheme}
        ) as span:
            response = await self._forward(request, target, has_body)
            if span is not None:
                span.set_attribute("http.response.status_code", response.status)
            return response

    async def _forward(
        self, request: web.Request, target: ProxyTarget, has_body: bool
    ) -> web.StreamResponse:
        headers = _headers(request, target, has_body=has_body)
        self._tracing.inject(headers)  # W3C traceparent of the upstream span (when tracing)
        try:
            upstream = await self._client.request(
                request.method,
                upstream_url(target),
                headers=headers,
                # Streamed as it arrives: chunked unless the client sent a length.
                data=request.content if has_body else None,
                skip_auto_headers=_SKIP_AUTO_HEADERS,
                allow_redirects=False,
                timeout=_timeout(target.connect_timeout, target.read_timeout),
            )
            # Read before the status line is sent: an upstream that fails mid-body then
            # gets an honest 502/504, not a truncated 200.
            body = await _read_whole(request, upstream)
        except TimeoutError as exc:
            self._failed(target, exc, 504)
            raise UpstreamTimeout() from exc
        except (aiohttp.ClientError, OSError) as exc:
            if request.transport is None or request.transport.is_closing():
                # The client abandoned its upload: nobody is left to answer, and the
                # upstream is not at fault. 499 is nginx's "client closed request".
                return web.Response(status=499)
            self._failed(target, exc, 502)
            raise UpstreamError() from exc
        self._answered(target)
        if body is not None:
            # One write: status line, headers and body (a plain aiohttp proxy's answer).
            headers = client_headers(upstream.headers, target.own_cookies)
            return web.Response(
                status=upstream.status, reason=upstream.reason, headers=headers, body=body
            )
        async with upstream:
            return await _relay(request, upstream, target.own_cookies)

    async def _websocket(self, request: web.Request, target: ProxyTarget) -> web.StreamResponse:
        protocols = request.headers.getall("Sec-WebSocket-Protocol", ())
        offered = [p.strip() for value in protocols for p in value.split(",") if p.strip()]
        # Offering the client's own list keeps the probe from logging a mismatch.
        if not web.WebSocketResponse(protocols=offered).can_prepare(request).ok:
            raise BadRequest("Invalid WebSocket handshake.")
        # Upstream first: a client must not see 101 for a connection that cannot exist.
        if self._ws_client is None:
            self._ws_client = _websocket_client(self._client)
        try:
            async with asyncio.timeout(target.connect_timeout + target.read_timeout):
                upstream = await self._ws_client.ws_connect(
                    upstream_url(target),
                    headers=_headers(request, target, has_body=False, websocket=True),
                    protocols=offered,
                    autoping=False,
                    max_msg_size=target.ws_max_msg_size,
                    timeout=aiohttp.ClientWSTimeout(ws_close=_WS_CLOSE_TIMEOUT),
                )
        except TimeoutError as exc:
            self._failed(target, exc, 504)
            raise UpstreamTimeout() from exc
        except (aiohttp.ClientError, OSError) as exc:
            self._failed(target, exc, 502)
            raise UpstreamError() from exc
        self._answered(target)
        client = web.WebSocketResponse(
            protocols=(upstream.protocol,) if upstream.protocol else (),
            autoping=False,
            max_msg_size=target.ws_max_msg_size,
            timeout=_WS_CLOSE_TIMEOUT,
        )
        try:
            await client.prepare(request)
            with self._ws_open.track_inprogress() if self._ws_open else contextlib.nullcontext():
                await _relay_websocket(client, upstream)
        finally:
            # Also reached when the server cancels the handler because the client's
            # connection dropped right after its Close frame: pass its code on.
            await upstream.close(code=_sendable(client.close_code))
        return client


def _headers(
    request: web.Request, target: ProxyTarget, *, has_body: bool, websocket: bool = False
) -> CIMultiDict[str]:
    return upstream_headers(
        request.headers,
        strip=target.strip,
        inject=target.inject,
        own_cookies=target.own_cookies,
        forwarded_for=target.forwarded_for,
        forwarded_proto=target.forwarded_proto,
        forwarded_host=target.forwarded_host,
        host=request.headers.get("Host") if target.preserve_host else None,
        keep_content_length=has_body,
        websocket=websocket,
    )


def _buffered(request: web.Request, upstream: aiohttp.ClientResponse) -> bool:
    """Whether the answer is read whole and sent in one write (``BUFFER_LIMIT``): a body
    of a known, small length. Unknown lengths (event streams, chunked), large bodies and
    the answers that carry no body (HEAD, 204, 304) stream as before."""
    length = upstream.content_length
    return (
        length is not None
        and length <= BUFFER_LIMIT
        and request.method != "HEAD"
        and upstream.status not in _NO_BODY_STATUS
        and "Transfer-Encoding" not in upstream.headers
    )


async def _read_whole(request: web.Request, upstream: aiohttp.ClientResponse) -> bytes | None:
    """The body of a ``_buffered`` answer (the connection goes back to the pool), else None."""
    if not _buffered(request, upstream):
        return None
    async with upstream:
        return await upstream.read()


async def _relay(
    request: web.Request, upstream: aiohttp.ClientResponse, own_cookies: OwnCookies
) -> web.StreamResponse:
    response = web.StreamResponse(
        status=upstream.status,
        reason=upstream.reason,
        headers=client_headers(upstream.headers, own_cookies),
    )
    try:
        await response.prepare(request)
    except ConnectionError:
        upstream.close()  # the client left before the headers went out
        return response
    if request.method == "HEAD" or upstream.status in _NO_BODY_STATUS:
        return response
    try:
        # Each chunk is written as it arrives so event streams and long polls flush
        # immediately; write() waits for the client, which is the back-pressure that
        # keeps memory flat whatever the body size.
        async for chunk in upstream.content.iter_any():
            try:
                await response.write(chunk)
            except ConnectionError:
                # The client went away: stop reading and drop the upstream
                # connection rather than pool a half-read one.
                upstream.close()
                return response
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        # The status line is already sent, so the only honest signal left is an
        # incomplete message (RFC 9112 §8): close the client connection.
        log.warning(
            "upstream failed mid-response: %s %s (%s)",
            request.method,
            request.path,
            type(exc).__name__,
        )
        upstream.close()
        if request.transport is not None:
            request.transport.close()
    return response


_WebSocket = web.WebSocketResponse | aiohttp.ClientWebSocketResponse


async def _pump(source: _WebSocket, sink: _WebSocket) -> bytes:
    """Copy frames one way until ``source`` closes; return its close reason.

    Each send waits for the sink, so a slow side slows the other instead of filling a
    queue. Pings and pongs travel end to end (autoping is off on both legs).
    """
    with contextlib.suppress(ConnectionError):
        while True:
            msg = await source.receive()
            if msg.type is WSMsgType.TEXT:
                await sink.send_str(msg.data)
            elif msg.type is WSMsgType.BINARY:
                await sink.send_bytes(msg.data)
            elif msg.type is WSMsgType.PING:
                await sink.ping(msg.data)
            elif msg.type is WSMsgType.PONG:
                await sink.pong(msg.data)
            elif msg.type is WSMsgType.CLOSE:
                # RFC 6455 §5.5: a control frame body is at most 125 bytes.
                reason = str(msg.extra or "").encode()[:123]
                return reason.decode(errors="ignore").encode()
            else:  # CLOSING, CLOSED, ERROR
                return b""
    return b""


async def _relay_websocket(
    client: web.WebSocketResponse, upstream: aiohttp.ClientWebSocketResponse
) -> None:
    to_upstream = asyncio.create_task(_pump(client, upstream))
    to_client = asyncio.create_task(_pump(upstream, client))
    try:
        done, _ = await asyncio.wait((to_upstream, to_client), return_when=asyncio.FIRST_COMPLETED)
        # Whichever side closed first, the other is closed with the same code.
        if to_upstream in done:
            code = _sendable(client.close_code)
            await upstream.close(code=code, message=to_upstream.result())
        else:
            code = _sendable(upstream.close_code)
            await client.close(code=code, message=to_client.result())
        await asyncio.wait((to_upstream, to_client), timeout=_WS_CLOSE_TIMEOUT)
    finally:
        for task in (to_upstream, to_client):
            task.cancel()
        await asyncio.gather(to_upstream, to_client, return_exceptions=True)


def _sendable(code: int | None) -> int:
    return 1000 if code is None else _UNSENDABLE_CLOSE.get(code, code)

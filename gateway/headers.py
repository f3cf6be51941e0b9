"""Which headers cross the gateway, in both directions.

Owns the header rules of forwarding: hop-by-hop removal (RFC 9110 §7.6.1), the
headers the gateway decides itself (Host, X-Forwarded-*, identity headers), the
gateway's own cookies, and the WebSocket handshake headers that the client library
regenerates. Pure functions over multidicts: no I/O, no aiohttp.web.

Every comparison uses one normalization, lowercase with ``_`` mapped to ``-``,
because several servers (CGI/WSGI environ, nginx with underscores_in_headers, PHP)
fold ``X_Forwarded_User`` and ``X-Forwarded-User`` into the same variable
(CVE-2025-64484): a client must not smuggle an identity header past the strip list
by spelling it differently.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from multidict import CIMultiDict, CIMultiDictProxy

__all__ = [
    "HOP_BY_HOP",
    "client_headers",
    "connection_tokens",
    "is_websocket_upgrade",
    "normalize",
    "upstream_headers",
]

# RFC 9110 §7.6.1 (plus Keep-Alive and Proxy-Connection from RFC 2068 practice, and
# the proxy authentication pair that RFC 9110 §11.7 scopes to the next hop).
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authenticate",
        "proxy-authorization",
    }
)

# Request headers the gateway decides itself: Host (set from the upstream URL or
# preserved explicitly), Content-Length (kept only when the body passes as-is),
# Cookie (filtered separately), forwarding metadata the caller already computed from
# trusted proxies (RFC 7239 Forwarded, X-Real-Ip, every X-Forwarded-* below), path
# overrides that would let the client change what the upstream serves after the
# route decision (X-Original-Url, X-Rewrite-Url), and Expect, which the gateway's own
# server already answered with 100 Continue (RFC 9110 §10.1.1).
_REQUEST_DECIDED = HOP_BY_HOP | {
    "host",
    "content-length",
    "cookie",
    "forwarded",
    "x-real-ip",
    "x-original-url",
    "x-rewrite-url",
    "expect",
}
_FORWARDED_PREFIX = "x-forwarded-"

# RFC 6455 §4.1: the client library generates its own key, version, extension offer
# and protocol list for the upstream leg; the client's copies belong to the other leg.
_WS_HANDSHAKE = frozenset(
    {
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-protocol",
        "sec-websocket-extensions",
        "sec-websocket-accept",
    }
)
_REQUEST_DECIDED_WS = _REQUEST_DECIDED | _WS_HANDSHAKE


def normalize(name: str) -> str:
    """The one spelling every header comparison uses."""
    name = name.lower()
    return name.replace("_", "-") if "_" in name else name


def connection_tokens(values: Iterable[str]) -> frozenset[str]:
    """Header names listed in ``Connection`` (RFC 9110 §7.6.1), normalized."""
    tokens = {normalize(t.strip()) for value in values for t in value.split(",")}
    tokens.discard("")
    return frozenset(tokens)


def is_websocket_upgrade(headers: CIMultiDictProxy[str]) -> bool:
    """RFC 6455 §4.1: ``Connection`` lists ``upgrade`` and ``Upgrade`` names websocket."""
    upgrade = headers.get("Upgrade")
    if upgrade is None or "websocket" not in {t.strip().lower() for t in upgrade.split(",")}:
        return False
    return "upgrade" in connection_tokens(headers.getall("Connection", ()))


def _filter_cookies(values: list[str], drop: frozenset[str]) -> str | None:
    """Remove the gateway's cookies; one ``Cookie`` line as RFC 6265 §5.4 sends it."""
    kept = [
        pair
        for value in values
        for raw in value.split(";")
        if (pair := raw.strip()) and pair.partition("=")[0].strip() not in drop
    ]
    return "; ".join(kept) or None


def upstream_headers(
    headers: CIMultiDictProxy[str],
    *,
    strip: frozenset[str],
    inject: Mapping[str, str],
    strip_cookies: frozenset[str],
    forwarded_for: str,
    forwarded_proto: str,
    forwarded_host: str,
    host: str | None,
    keep_content_length: bool,
    websocket: bool = False,
) -> CIMultiDict[str]:
    """The request headers to send upstream.

    Order matters: the client's copies of everything the gateway decides are removed
    first (whatever their spelling, duplicates included), then the gateway's values
    are set, so a name the client lists in ``Connection`` can remove its own headers
    but never the gateway's.
    """
    decided = _REQUEST_DECIDED_WS if websocket else _REQUEST_DECIDED
    listed = connection_tokens(headers.getall("Connection", ()))
    injected = {normalize(name) for name in inject}
    out: CIMultiDict[str] = CIMultiDict()
    cookies: list[str] = []
    for name, value in headers.items():
        norm = normalize(name)
        if (
            norm in decided
            or norm in strip
            or norm in injected
            or norm in listed
            or norm.startswith(_FORWARDED_PREFIX)
        ):
            if norm == "cookie" and norm not in listed:
                cookies.append(value)
            elif keep_content_length and name.lower() == "content-length":
                # Exact spelling only: a CGI-style server would read Content_Length
                # as the length too, next to chunked framing (request smuggling).
                out.add(name, value)
            continue
        out.add(name, value)
    if cookies:
        cookie = _filter_cookies(cookies, strip_cookies) if strip_cookies else "; ".join(cookies)
        if cookie is not None:
            out["Cookie"] = cookie
    if host is not None:
        out["Host"] = host
    if forwarded_for:
        out["X-Forwarded-For"] = forwarded_for
    if forwarded_proto:
        out["X-Forwarded-Proto"] = forwarded_proto
    if forwarded_host:
        out["X-Forwarded-Host"] = forwarded_host
    for name, value in inject.items():
        out[name] = value
    return out


def client_headers(
    headers: CIMultiDictProxy[str], strip_cookies: frozenset[str]
) -> CIMultiDict[str]:
    """The upstream's response headers to pass to the client.

    Hop-by-hop headers and the names the upstream lists in ``Connection`` stop here
    (RFC 9110 §7.6.1). A ``Set-Cookie`` for one of the gateway's own cookies is
    dropped too: an upstream must not overwrite or fixate the gateway's session.
    """
    listed = connection_tokens(headers.getall("Connection", ()))
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        norm = normalize(name)
        if norm in HOP_BY_HOP or norm in listed:
            continue
        if (
            strip_cookies
            and norm == "set-cookie"
            and value.partition("=")[0].strip() in strip_cookies
        ):
            continue
        out.add(name, value)
    return out

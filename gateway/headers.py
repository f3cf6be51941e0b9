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

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from multidict import CIMultiDict, CIMultiDictProxy

from gateway.kept import Kept

__all__ = [
    "HOP_BY_HOP",
    "OwnCookies",
    "client_headers",
    "connection_tokens",
    "encode_value",
    "is_websocket_upgrade",
    "normalize",
    "set_cookie_name",
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
# Whole name spaces the client never speaks in: forwarding metadata (believed only from
# trusted proxies, then recomputed), the forward-auth answers the gateway itself emits
# (oauth2-proxy's X-Auth-Request-*), the original-request names a front proxy sets
# (X-Original-URI/-Method/-URL), and the gateway's own X-Gateway-* headers.
_DECIDED_PREFIXES = ("x-forwarded-", "x-auth-request-", "x-original-", "x-gateway-")

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


_NONE: frozenset[str] = frozenset()


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


# Chrome ends a cookie line at the first of these (RFC 6265bis §5.6 leaves it to the agent).
_COOKIE_TERMINATORS = ("\x00", "\r", "\n")
_COOKIE_PREFIXES = ("__host-", "__secure-")


def _cookie_key(name: str) -> str:
    """The spelling cookie names are compared in: trimmed, lowercase, without the
    ``__Host-``/``__Secure-`` prefixes (rfc6265bis matches those case-insensitively)."""
    key = name.strip().lower()
    while key.startswith(_COOKIE_PREFIXES):
        key = key.removeprefix("__host-").removeprefix("__secure-").strip()
    return key


@dataclass(frozen=True, slots=True)
class OwnCookies:
    """The gateway's cookie names: exact names and name prefixes (login-state cookies).

    A name matches in any case, with or without a ``__Host-``/``__Secure-`` prefix and with
    whitespace around it: over-matching only costs an upstream a cookie it must not share a
    name with anyway, while under-matching lets it plant the gateway's session.
    """

    names: tuple[str, ...] = ()
    prefixes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", tuple(_cookie_key(n) for n in self.names))
        # An empty prefix would match every name: it stands for no prefix at all.
        prefixes = tuple(key for p in self.prefixes if (key := _cookie_key(p)))
        object.__setattr__(self, "prefixes", prefixes)

    def matches(self, name: str) -> bool:
        key = _cookie_key(name)
        return key in self.names or key.startswith(self.prefixes)


def set_cookie_name(value: str) -> str:
    """The name a browser stores for this ``Set-Cookie`` value, as the server will read it
    back from ``Cookie``.

    RFC 6265bis §5.6: the name-value pair ends at the first ``;``; without ``=``, or starting
    with ``=``, the cookie is nameless and the browser sends back just its value, which a
    server then parses as ``name=value``: ``=__Host-s=x`` comes back as ``__Host-s=x``.
    """
    for stop in _COOKIE_TERMINATORS:
        value = value.partition(stop)[0]
    pair = value.partition(";")[0]
    name, eq, rest = pair.partition("=")
    if not eq or not name.strip():
        # Nameless: the value is what comes back; its own "name=" part is the name read.
        return (rest if eq else pair).partition("=")[0]
    return name


def _filter_cookies(values: list[str], own: OwnCookies) -> str | None:
    """Remove the gateway's cookies; one ``Cookie`` line as RFC 6265 §5.4 sends it."""
    kept = [
        pair
        for value in values
        for raw in value.split(";")
        if (pair := raw.strip()) and not own.matches(pair.partition("=")[0])
    ]
    return "; ".join(kept) or None


# Header-value encoding of claims (docs/security.md): UTF-8, then every byte outside
# printable ASCII, every "%", and (in a list item) every "," percent-encoded, as are
# spaces at either end (a parser would trim them). An upstream decodes with any
# percent-decoder (urllib.parse.unquote); a value without those characters is unchanged.
_PRINTABLE = frozenset(range(0x20, 0x7F)) - {ord("%")}
# Printable ASCII without "%", not starting or ending with a space: sent as it is.
_PLAIN = re.compile(r"[!-$&-~](?:[ -$&-~]*[!-$&-~])?")


def encode_value(text: str, *, list_item: bool = False) -> str:
    """``text`` as a valid, unambiguous header value (see the note above)."""
    if _PLAIN.fullmatch(text) and not (list_item and "," in text):
        return text
    raw = text.encode("utf-8", "surrogatepass")
    last = len(raw) - 1
    out: list[str] = []
    for i, byte in enumerate(raw):
        if (
            byte not in _PRINTABLE
            or (list_item and byte == 0x2C)
            or (byte == 0x20 and (i == 0 or i == last))
        ):
            out.append(f"%{byte:02X}")
        else:
            out.append(chr(byte))
    return "".join(out)


# What ``upstream_headers`` works out once for the few header sets it is called with (a
# route's strip sets, the names a route injects): bounded, emptied when full.
_KEPT = 64
_removed_sets: Kept[tuple[frozenset[str], bool], frozenset[str]] = Kept(_KEPT)
_injected_names: Kept[tuple[str, ...], frozenset[str]] = Kept(_KEPT)


def _removed(strip: frozenset[str], websocket: bool) -> frozenset[str]:
    """The names always removed from a request: the decided ones and ``strip``."""
    key = (strip, websocket)
    found = _removed_sets.get(key)
    if found is None:
        decided = _REQUEST_DECIDED_WS if websocket else _REQUEST_DECIDED
        found = _removed_sets.keep(key, decided | strip)
    return found


def _normalized_names(names: tuple[str, ...]) -> frozenset[str]:
    found = _injected_names.get(names)
    if found is None:
        found = _injected_names.keep(names, frozenset(normalize(n) for n in names))
    return found


def upstream_headers(
    headers: CIMultiDictProxy[str],
    *,
    strip: frozenset[str],
    inject: Mapping[str, str],
    own_cookies: OwnCookies,
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
    removed = _removed(strip, websocket)
    connection = headers.getall("Connection", ())
    listed = connection_tokens(connection) if connection else _NONE
    injected = _normalized_names(tuple(inject)) if inject else _NONE
    out: CIMultiDict[str] = CIMultiDict()
    cookies: list[str] = []
    for name, value in headers.items():
        norm = name.lower()  # normalize(), inlined: it runs for every header
        if "_" in norm:
            norm = norm.replace("_", "-")
        if (
            norm in removed
            or norm in injected
            or norm in listed
            or norm.startswith(_DECIDED_PREFIXES)
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
        cookie = _filter_cookies(cookies, own_cookies)
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


def client_headers(headers: CIMultiDictProxy[str], own_cookies: OwnCookies) -> CIMultiDict[str]:
    """The upstream's response headers to pass to the client.

    Hop-by-hop headers and the names the upstream lists in ``Connection`` stop here
    (RFC 9110 §7.6.1). Every ``Set-Cookie`` for one of the gateway's own cookies is
    dropped too, whatever the request carried: an upstream must not overwrite or fixate
    the gateway's session (login CSRF), in any spelling a browser would store.
    """
    connection = headers.getall("Connection", ())
    listed = connection_tokens(connection) if connection else _NONE
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        norm = name.lower()  # normalize(), inlined: it runs for every header
        if "_" in norm:
            norm = norm.replace("_", "-")
        if norm in HOP_BY_HOP or norm in listed:
            continue
        if norm == "set-cookie" and own_cookies.matches(set_cookie_name(value)):
            continue
        out.add(name, value)
    return out

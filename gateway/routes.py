"""Routes compiled once: each configured route becomes a ``CompiledRoute`` that owns
everything the hot path needs about it (upstream URL, assertion audience, forwarder,
timeouts, header rules, identity-header mapping).

``app.py`` builds one ``Routes`` per application start (so again on every reload, which
builds a new application) and hangs it on the app under ``keys.ROUTES``; nothing that
depends only on the configuration is rebuilt per request.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from yarl import URL

from gateway.assertion import AssertionSigner, audience_for
from gateway.config import DEFAULT_IDENTITY_HEADERS, RouteSettings, Settings
from gateway.cookies import CookiePolicy
from gateway.headers import OwnCookies, encode_value
from gateway.kept import Kept
from gateway.policy import Route, RouteTable
from gateway.proxy import Forwarder, ProxyTarget
from gateway.session import Identity

ASSERTION_HEADER = "X-Gateway-Assertion"
# Identity the gateway emits elsewhere (forward-auth answers, oauth2-proxy's names) and
# the original-request headers it trusts from a proxy: never taken from a client. The
# prefixes X-Forwarded-*, X-Auth-Request-*, X-Original-* and X-Gateway-* are stripped
# whole in ``gateway.headers``; these names are listed too so the set says it all.
EMITTED_ELSEWHERE = (
    "X-Auth-Request-User",
    "X-Auth-Request-Email",
    "X-Auth-Request-Groups",
    "X-Auth-Request-Preferred-Username",
    "X-Auth-Request-Access-Token",
    "X-Gateway-Login",
    "X-Original-URI",
    "X-Original-Method",
    "X-Forwarded-Uri",
    "X-Forwarded-Method",
    "X-Forwarded-Access-Token",
)
# A header longer than this would make a common upstream refuse every request of the user
# (nginx's large_client_header_buffers is 8k, Node's whole head 16k).
MAX_CLAIM_HEADER = 8192
# Identities whose headers a route keeps (``CompiledRoute.identity``), about a session cache.
_IDENTITIES_KEPT = 4096
log = logging.getLogger("gateway.gate")


def header_key(name: str) -> str:
    """How header names are compared for stripping: lowercase, '_' read as '-' (CVE-2025-64484)."""
    return name.lower().replace("_", "-")


def protected_header_names(settings: Settings) -> frozenset[str]:
    """Every identity header any route sets, the defaults, and the assertion header."""
    names: set[str] = {header_key(n) for n in DEFAULT_IDENTITY_HEADERS}
    names.add(header_key(ASSERTION_HEADER))
    names.update(header_key(n) for n in EMITTED_ELSEWHERE)
    for route in settings.routes:
        names.update(header_key(n) for n in route.identity_headers)
    return frozenset(names)


class _Unusable(ValueError):
    """A claim that has no header spelling (an object, a nested list)."""


def _scalar(value: Any, *, list_item: bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return encode_value(str(value), list_item=list_item)
    raise _Unusable(type(value).__name__)


def claim_value(value: Any) -> str | None:
    """A claim as a header value (docs/security.md): scalars percent-encoded where needed,
    lists joined with "," after each item's own "," is encoded. None when absent; raises
    ``_Unusable`` for values without a header spelling."""
    if value is None:
        return None
    if isinstance(value, list | tuple):
        return ",".join(_scalar(v, list_item=True) for v in value)
    return _scalar(value, list_item=False)


def identity_headers(mapping: Mapping[str, str], identity: Identity) -> dict[str, str]:
    """The headers for ``mapping`` (header -> claim). A claim that cannot be sent is left
    out and logged by name (never its value): it can never break the user's requests."""
    out: dict[str, str] = {}
    for header, claim in mapping.items():
        try:
            value = claim_value(identity.claim(claim))
        except _Unusable as exc:
            log.warning("claim %s not sent in %s: a %s has no header form", claim, header, exc)
            continue
        if value is None:
            continue
        if len(value) > MAX_CLAIM_HEADER:
            log.warning("claim %s not sent in %s: longer than %d", claim, header, MAX_CLAIM_HEADER)
            continue
        out[header] = value
    return out


_PEERS_KEPT = 4096


class Trust:
    """``server.trusted_proxies`` and the public URL: whose forwarding headers to believe."""

    def __init__(self, settings: Settings) -> None:
        self.trusted = tuple(settings.server.trusted_proxies)
        public = URL(settings.server.public_url)
        self.public_host = public.raw_authority
        self.public_proto = public.scheme
        # peer address text -> trusted: the answer for the peers seen (a front proxy's few
        # addresses, every client's when there is none), emptied when it holds
        # ``_PEERS_KEPT``. Built with the app: a reload's new list starts a new table.
        self._peers: Kept[str, bool] = Kept(_PEERS_KEPT)

    def is_trusted(self, peer: str | None) -> bool:
        """Whether the peer address is one of ``server.trusted_proxies``."""
        if not peer or not self.trusted:
            return False
        known = self._peers.get(peer)
        if known is None:
            try:
                ip = ipaddress.ip_address(peer)
            except ValueError:
                known = False
            else:
                known = any(ip in net for net in self.trusted)
            self._peers.keep(peer, known)
        return known

    def forwarded(self, request: web.Request) -> tuple[str, str, str]:
        """X-Forwarded-For/-Proto/-Host: believed only from trusted proxies (SECURITY.md 16)."""
        peer = request.remote or ""
        if self.is_trusted(peer):
            prior = ", ".join(request.headers.getall("X-Forwarded-For", []))
            xff = f"{prior}, {peer}" if prior else peer
            proto = (
                request.headers.get("X-Forwarded-Proto", self.public_proto).split(",")[0].strip()
            )
            host = request.headers.get("X-Forwarded-Host", self.public_host).split(",")[0].strip()
            return xff, proto or self.public_proto, host or self.public_host
        return peer, self.public_proto, self.public_host


@dataclass(frozen=True, slots=True)
class CompiledRoute:
    """One configured route, with everything the hot path needs decided once."""

    route: Route
    upstream: URL
    audience: str  # of this route's ``X-Gateway-Assertion``
    forwarder: Forwarder
    # Stripped from the client's request; ``strip_with_auth`` also drops its Authorization
    # (when the gateway sets it: ``pass_access_token`` or a bearer client's own token).
    strip: frozenset[str]
    strip_with_auth: frozenset[str]
    own_cookies: OwnCookies
    identity_headers: Mapping[str, str]
    connect_timeout: float
    read_timeout: float
    # id(identity) -> (the Identity, its headers): see ``identity``.
    _identities: Kept[int, tuple[Identity, dict[str, str]]] = field(
        default_factory=lambda: Kept(_IDENTITIES_KEPT), init=False, repr=False, compare=False
    )

    @property
    def settings(self) -> RouteSettings:
        return self.route.settings

    @property
    def prefix(self) -> str:
        return self.route.prefix

    @property
    def public(self) -> bool:
        return self.route.public

    def identity(self, identity: Identity) -> dict[str, str]:
        """This route's identity headers for ``identity`` (a copy: the caller adds to it).

        Kept per ``Identity`` object, which is immutable: a session from the session cache
        brings the same object until it is evicted, refreshed or read again, which brings a
        new one (and so new headers). The entry holds the object, so its id is not reused
        while kept; the table is emptied when it reaches ``_IDENTITIES_KEPT``.
        """
        kept = self._identities.get(id(identity))
        if kept is None or kept[0] is not identity:
            made = identity_headers(self.identity_headers, identity)
            kept = self._identities.keep(id(identity), (identity, made))
        return dict(kept[1])

    def assertion(self, signer: AssertionSigner, identity: Identity, session_id: str | None) -> str:
        """``X-Gateway-Assertion`` for this route (reused for a few seconds per session)."""
        return signer.assertion(identity, self.audience, session_id)

    def target(
        self,
        request: web.Request,
        path: str,
        inject: dict[str, str],
        strip: frozenset[str],
        forwarded: tuple[str, str, str],
    ) -> ProxyTarget:
        xff, proto, host = forwarded
        rs = self.route.settings
        return ProxyTarget(
            upstream=self.upstream,
            path=path,
            # The raw query, byte for byte: yarl's ``query_string`` is percent-decoded, and
            # re-sent "encoded" it would put spaces (even CR/LF) into the request line.
            query_string=request.rel_url.raw_query_string,
            inject=inject,
            strip=strip,
            own_cookies=self.own_cookies,
            forwarded_for=xff,
            forwarded_proto=proto,
            forwarded_host=host,
            preserve_host=rs.preserve_host,
            connect_timeout=self.connect_timeout,
            read_timeout=self.read_timeout,
            websockets=rs.websockets,
        )


class Routes:
    """The compiled route table: ``match`` gives the ``CompiledRoute`` for a normalized path
    (longest prefix, see ``policy.RouteTable``), ``trust`` the trusted-proxy rules."""

    def __init__(
        self,
        settings: Settings,
        forwarder_for: Callable[[RouteSettings], Forwarder],
    ) -> None:
        self.table = RouteTable(
            settings.routes, case_insensitive=settings.server.case_insensitive_routes
        )
        self.trust = Trust(settings)
        strip = protected_header_names(settings)
        own_cookies = CookiePolicy.from_settings(settings.session).own
        by_route = {
            route.index: CompiledRoute(
                route=route,
                upstream=URL(route.settings.upstream),
                audience=audience_for(route.settings.upstream),
                forwarder=forwarder_for(route.settings),
                strip=strip,
                strip_with_auth=strip | {"authorization"},
                own_cookies=own_cookies,
                identity_headers=dict(route.settings.identity_headers),
                connect_timeout=route.settings.timeouts.connect,
                read_timeout=route.settings.timeouts.read,
            )
            for route in self.table.routes
        }
        # The table's own order (longest prefix first); ``match`` answers with these.
        self.compiled: Sequence[CompiledRoute] = tuple(by_route[r.index] for r in self.table.routes)
        self._by_route = by_route  # private: the table's Route -> its compiled form

    def key(self, path: str) -> str:
        """The folded spelling of ``path`` that own-endpoint checks compare too."""
        return self.table.key(path)

    def match(self, path: str) -> CompiledRoute | None:
        """The route serving ``path``; raises ``PathRejected`` for an ambiguous spelling."""
        route = self.table.match(path)
        return None if route is None else self._by_route[route.index]

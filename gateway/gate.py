"""The gate: every request that is not the gateway's own endpoint passes through here.

normalized path → route → (public: forward) | cookie → session → refresh → policy → forward
with identity. Unauthenticated navigations go to login; API calls get 401 JSON.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from typing import Any

from aiohttp import web
from yarl import URL

from gateway import keys
from gateway.assertion import audience_for
from gateway.bearer import admit, bearer_token
from gateway.config import DEFAULT_IDENTITY_HEADERS, Settings
from gateway.errors import BadRequest, Forbidden, NotFound, Unauthenticated
from gateway.headers import is_websocket_upgrade
from gateway.login import start_url
from gateway.pages import wants_html
from gateway.policy import PathRejected, Route, check_requirements, normalize_path
from gateway.proxy import ProxyTarget
from gateway.session import Identity, Session
from gateway.sessions import SessionEnded

ASSERTION_HEADER = "X-Gateway-Assertion"


def header_key(name: str) -> str:
    """How header names are compared for stripping: lowercase, '_' read as '-' (CVE-2025-64484)."""
    return name.lower().replace("_", "-")


def protected_header_names(settings: Settings) -> frozenset[str]:
    """Every identity header any route sets, the defaults, and the assertion header."""
    names: set[str] = {header_key(n) for n in DEFAULT_IDENTITY_HEADERS}
    names.add(header_key(ASSERTION_HEADER))
    names.add("x-forwarded-access-token")
    for route in settings.routes:
        names.update(header_key(n) for n in route.identity_headers)
    return frozenset(names)


def claim_value(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def identity_headers(mapping: Mapping[str, str], identity: Identity) -> dict[str, str]:
    out: dict[str, str] = {}
    for header, claim in mapping.items():
        value = claim_value(identity.claim(claim))
        if value is not None:
            # Header values cannot carry CR/LF; claims never smuggle extra headers.
            out[header] = value.replace("\r", " ").replace("\n", " ")
    return out


class Gate:
    """Holds what is computed once at start-up; ``handle`` is the hot path."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.strip = protected_header_names(settings)
        self.strip_with_auth = self.strip | {"authorization"}
        self.trusted = tuple(settings.server.trusted_proxies)
        public = URL(settings.server.public_url)
        self.public_host = public.raw_authority
        self.public_proto = public.scheme
        self.upstreams = [URL(r.upstream) for r in settings.routes]
        self.audiences = [audience_for(r.upstream) for r in settings.routes]

    def is_trusted(self, peer: str | None) -> bool:
        """Whether the peer address is one of ``server.trusted_proxies``."""
        if not peer or not self.trusted:
            return False
        try:
            ip = ipaddress.ip_address(peer)
        except ValueError:
            return False
        return any(ip in net for net in self.trusted)

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

    async def handle(self, request: web.Request) -> web.StreamResponse:
        app = request.app
        try:
            path = normalize_path(request.raw_path)
        except PathRejected as exc:
            raise BadRequest(str(exc)) from None
        if path == "/oauth2" or path.startswith("/oauth2/"):
            # The gateway's own prefix: an endpoint with the wrong method, another spelling
            # (//oauth2/start) or an unknown one is never the upstream's business.
            raise NotFound()
        route = app[keys.ROUTES].match(path)
        if route is None:
            raise NotFound()
        request[keys.ROUTE_LABEL] = route.settings.prefix
        if route.public:
            return await self._forward(request, route, path, {}, self.strip, None)
        session = await self.authorized_session(request, route)
        if session is None:
            # A bearer client is one that came without a session, not one whose ended.
            if route.settings.accept_bearer and not request.get(keys.CLEAR_SESSION):
                token = bearer_token(request.headers)
                if token is not None:
                    return await self._bearer(request, route, path, token)
            raise self.unauthenticated(request, route, path)
        inject = self.inject_for(route, session)
        if route.settings.assertion:
            inject[ASSERTION_HEADER] = self.assertion(
                request, route, session.identity, session.session_id
            )
        strip = self.strip_with_auth if route.settings.pass_access_token else self.strip
        return await self._forward(request, route, path, inject, strip, self._own_cookies(request))

    async def authorized_session(self, request: web.Request, route: Route) -> Session | None:
        """The request's session, refreshed and allowed by the route's ``require``.

        None when there is no session, or when it just ended (then the answer clears the
        cookie, see ``keys.CLEAR_SESSION``); Forbidden when the route's policy refuses it.
        """
        app = request.app
        sessions = app[keys.SESSIONS]
        loaded = await sessions.open(request.cookies.get(app[keys.COOKIES].name))
        if loaded is None:
            return None
        try:
            session = await sessions.fresh(loaded)
        except SessionEnded:
            request[keys.CLEAR_SESSION] = True
            return None
        decision = check_requirements(route.settings, session.identity, session.tokens.scope)
        if not decision.allowed:
            raise Forbidden()
        if session is loaded.session:
            await sessions.touch(loaded)
        return session

    async def _bearer(
        self, request: web.Request, route: Route, path: str, token: str
    ) -> web.StreamResponse:
        """An API client with its own token (``accept_bearer``): no session is created; the
        upstream gets the identity from the token and the client's token as Authorization."""
        principal = await admit(request.app[keys.BEARER], route, token)
        inject = identity_headers(route.settings.identity_headers, principal.identity)
        inject["Authorization"] = f"Bearer {token}"
        if route.settings.assertion:
            inject[ASSERTION_HEADER] = self.assertion(request, route, principal.identity, None)
        return await self._forward(request, route, path, inject, self.strip_with_auth, None)

    def assertion(
        self, request: web.Request, route: Route, identity: Identity, session_id: str | None
    ) -> str:
        """``X-Gateway-Assertion`` for this route (reused for a few seconds per session)."""
        signer = request.app[keys.ASSERTION]
        return signer.assertion(identity, self.audiences[route.index], session_id)

    def inject_for(self, route: Route, session: Session) -> dict[str, str]:
        inject = identity_headers(route.settings.identity_headers, session.identity)
        if route.settings.pass_access_token:
            inject["Authorization"] = f"Bearer {session.tokens.access_token}"
        return inject

    def _own_cookies(self, request: web.Request) -> Iterable[str]:
        cookies = request.app[keys.COOKIES]
        return [name for name in request.cookies if cookies.is_own(name)]

    async def _forward(
        self,
        request: web.Request,
        route: Route,
        path: str,
        inject: dict[str, str],
        strip: frozenset[str],
        own_cookies: Iterable[str] | None,
    ) -> web.StreamResponse:
        rs = route.settings
        if own_cookies is None:
            own_cookies = self._own_cookies(request) if request.cookies else ()
        xff, proto, host = self.forwarded(request)
        rid = request.get(keys.REQUEST_ID)
        if rid is not None:  # the client's own X-Request-Id (any spelling) is replaced
            inject = {**inject, "X-Request-Id": rid}
        target = ProxyTarget(
            upstream=self.upstreams[route.index],
            path=path,
            # The raw query, byte for byte: yarl's ``query_string`` is percent-decoded, and
            # re-sent "encoded" it would put spaces (even CR/LF) into the request line.
            query_string=request.rel_url.raw_query_string,
            inject=inject,
            strip=strip,
            strip_cookies=frozenset(own_cookies),
            forwarded_for=xff,
            forwarded_proto=proto,
            forwarded_host=host,
            preserve_host=rs.preserve_host,
            connect_timeout=rs.timeouts.connect,
            read_timeout=rs.timeouts.read,
            websockets=rs.websockets,
        )
        return await request.app[keys.FORWARDERS][route.index].forward(request, target)

    @staticmethod
    def wants_login(request: web.Request, route: Route, method: str) -> bool:
        """Send this unauthenticated request to login (else 401): ``login`` routes for any
        GET/HEAD, ``auto`` routes for browser navigations."""
        mode = route.settings.on_unauthenticated
        readable = method in ("GET", "HEAD")
        return readable and (mode == "login" or (mode == "auto" and wants_html(request)))

    def unauthenticated(self, request: web.Request, route: Route, path: str) -> Exception:
        if is_websocket_upgrade(request.headers):
            # A WebSocket client cannot follow a login redirect (RFC 6455 §4.1): plain 401.
            return Unauthenticated(headers={"WWW-Authenticate": 'Bearer realm="gateway"'})
        if self.wants_login(request, route, request.method):
            query = request.rel_url.raw_query_string
            return web.HTTPFound(start_url(path, query), headers={"Cache-Control": "no-store"})
        return Unauthenticated(headers={"WWW-Authenticate": 'Bearer realm="gateway"'})

"""The gate: every request that is not the gateway's own endpoint passes through here.

normalized path → route → (public: forward) | cookie → session → refresh → policy → forward
with identity. Unauthenticated navigations go to login; API calls get 401 JSON.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Mapping
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler
from yarl import URL

from gateway import keys
from gateway.assertion import audience_for
from gateway.bearer import admit, bearer_token
from gateway.config import DEFAULT_IDENTITY_HEADERS, Settings
from gateway.cookies import CookiePolicy
from gateway.errors import BadRequest, Forbidden, NotFound, Unauthenticated
from gateway.headers import encode_value, is_websocket_upgrade
from gateway.login import start_url
from gateway.pages import wants_html
from gateway.policy import PathRejected, Route, check_requirements, normalize_path
from gateway.proxy import ProxyTarget
from gateway.session import Identity, Session
from gateway.sessions import SessionEnded

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
log = logging.getLogger(__name__)


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


class Gate:
    """Holds what is computed once at start-up; ``handle`` is the hot path."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.strip = protected_header_names(settings)
        self.strip_with_auth = self.strip | {"authorization"}
        self.own_cookies = CookiePolicy.from_settings(settings.session).own
        self.trusted = tuple(settings.server.trusted_proxies)
        public = URL(settings.server.public_url)
        self.public_host = public.raw_authority
        self.public_proto = public.scheme
        self.upstreams = [URL(r.upstream) for r in settings.routes]
        self.audiences = [audience_for(r.upstream) for r in settings.routes]
        # The gateway's own endpoints (``own``), by exact path and by path prefix.
        self.own_paths: set[str] = set()
        self.own_prefixes: list[str] = ["/oauth2/"]

    def own(self, path: str, handler: Handler, *, prefix: bool = False) -> Handler:
        """Register ``path`` as an own endpoint; the returned handler answers only requests
        whose raw path is exactly ``path`` (or starts with it, for a ``prefix``).

        aiohttp's router matches the percent-decoded path, so ``/oauth2/%61uth`` would reach
        forward-auth while a front proxy that hides ``/oauth2/auth`` by its literal path lets
        it through: such spellings are 404, like every other spelling the gate normalizes
        onto an own endpoint.
        """
        (self.own_prefixes.append if prefix else self.own_paths.add)(path)

        async def canonical_only(request: web.Request) -> web.StreamResponse:
            raw = request.raw_path.partition("?")[0]
            if not (raw.startswith(path) if prefix else raw == path):
                raise NotFound()
            return await handler(request)

        return canonical_only

    def is_own_path(self, path: str) -> bool:
        """Whether a normalized path (or its folded route spelling) names an own endpoint."""
        return (
            path in self.own_paths
            or path + "/" in self.own_prefixes
            or any(path.startswith(p) for p in self.own_prefixes)
        )

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
        routes = app[keys.ROUTES]
        if self.is_own_path(path) or self.is_own_path(routes.key(path)):
            # The gateway's own paths: an endpoint with the wrong method, another spelling
            # (//oauth2/start, /%6detrics, /oauth2./auth) or an unknown one under /oauth2/
            # is never the upstream's business.
            raise NotFound()
        try:
            route = routes.match(path)
        except PathRejected as exc:
            raise BadRequest(str(exc)) from None
        if route is None:
            raise NotFound()
        request[keys.ROUTE_LABEL] = route.settings.prefix
        if route.public:
            return await self._forward(request, route, path, {}, self.strip)
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
        return await self._forward(request, route, path, inject, strip)

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
        return await self._forward(request, route, path, inject, self.strip_with_auth)

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

    async def _forward(
        self,
        request: web.Request,
        route: Route,
        path: str,
        inject: dict[str, str],
        strip: frozenset[str],
    ) -> web.StreamResponse:
        rs = route.settings
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
            own_cookies=self.own_cookies,
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
            return_to = path + ("?" + query if query else "")
            return web.HTTPFound(start_url(return_to), headers={"Cache-Control": "no-store"})
        return Unauthenticated(headers={"WWW-Authenticate": 'Bearer realm="gateway"'})

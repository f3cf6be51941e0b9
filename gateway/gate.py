"""The gate: every request that is not the gateway's own endpoint passes through here.

normalized path → compiled route → (public: forward) | ``auth.authenticate`` (session →
refresh → policy, or a bearer token) → forward with identity. Unauthenticated navigations
go to login; API calls get 401 JSON.
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler

from gateway import keys, paths
from gateway.auth import authenticate, unauthenticated
from gateway.errors import BadRequest, NotFound
from gateway.kept import Kept
from gateway.policy import PathRejected, normalize_path
from gateway.principal import Principal
from gateway.routes import (
    ASSERTION_HEADER,
    EMITTED_ELSEWHERE,
    MAX_CLAIM_HEADER,
    CompiledRoute,
    Routes,
    identity_headers,
)

# Re-exported: tests and tools name these through the gate.
__all__ = ["ASSERTION_HEADER", "EMITTED_ELSEWHERE", "MAX_CLAIM_HEADER", "Gate", "identity_headers"]

# Raw paths whose route the gate remembers (``Gate.resolve``); emptied when full.
RESOLVED_KEPT = 1024


class Gate:
    """The catch-all handler, and the registry of the gateway's own endpoint paths."""

    def __init__(self) -> None:
        # The gateway's own endpoints (``own``), by exact path and by path prefix.
        self.own_paths: set[str] = set()
        self.own_prefixes: list[str] = [paths.OWN_PREFIX]
        # raw path (before "?") -> (normalized path, route): see ``resolve``.
        self._resolved: Kept[str, tuple[str, CompiledRoute]] = Kept(RESOLVED_KEPT)

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

    def resolve(self, raw_path: str, routes: Routes) -> tuple[str, CompiledRoute]:
        """The normalized path and the route of a request's raw path (query included or
        not); raises ``BadRequest`` (an ambiguous spelling) or ``NotFound`` (an own
        endpoint's path, or no route).

        The answer depends on nothing but the raw path's bytes before "?" and this app's
        own endpoints and routes, fixed once it serves (a reload builds a new app, so a new
        gate). So the paths that reached a route are remembered, keyed by exactly those
        bytes; refused paths are worked out every time. The table holds at most
        ``RESOLVED_KEPT`` paths (each at most ``MAX_PATH`` long) and is emptied when full.
        """
        key = raw_path.partition("?")[0]
        kept = self._resolved.get(key)
        if kept is not None:
            return kept
        try:
            path = normalize_path(key)
        except PathRejected as exc:
            raise BadRequest(str(exc)) from None
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
        return self._resolved.keep(key, (path, route))

    async def handle(self, request: web.Request) -> web.StreamResponse:
        app = request.app
        path, route = self.resolve(request.raw_path, app[keys.ROUTES])
        request[keys.ROUTE_LABEL] = route.prefix
        if route.public:
            return await self._forward(request, route, path, {}, route.strip)
        principal = await authenticate(request, route)
        if principal is None:
            raise unauthenticated(request, route, path)
        inject = route.identity(principal.identity)
        token = principal.token_for(route.settings)
        if token is not None:
            inject["Authorization"] = f"Bearer {token}"
        if route.settings.assertion:
            signer = app[keys.ASSERTION]
            inject[ASSERTION_HEADER] = route.assertion(
                signer, principal.identity, principal.session_id
            )
        return await self._forward(request, route, path, inject, _strip_for(route, principal))

    async def _forward(
        self,
        request: web.Request,
        route: CompiledRoute,
        path: str,
        inject: dict[str, str],
        strip: frozenset[str],
    ) -> web.StreamResponse:
        rid = request.get(keys.REQUEST_ID)
        if rid is not None:  # the client's own X-Request-Id (any spelling) is replaced
            inject = {**inject, "X-Request-Id": rid}
        forwarded = request.app[keys.ROUTES].trust.forwarded(request)
        target = route.target(request, path, inject, strip, forwarded)
        return await route.forwarder.forward(request, target)


def _strip_for(route: CompiledRoute, principal: Principal) -> frozenset[str]:
    """A bearer client's Authorization is replaced (by its own token); a session's only on
    ``pass_access_token`` routes, else the client's Authorization passes through."""
    if principal.via == "bearer" or route.settings.pass_access_token:
        return route.strip_with_auth
    return route.strip

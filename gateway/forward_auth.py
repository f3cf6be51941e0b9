"""Forward-auth: ``/oauth2/auth`` tells a proxy in front of an application (nginx
``auth_request``, Traefik ForwardAuth, Envoy ``ext_authz`` HTTP) whether a request may pass.

The route is decided from the original request, which only a trusted proxy
(``server.trusted_proxies``) may describe (SECURITY.md 16): its URI from ``X-Forwarded-Uri``
(Traefik, oauth2-proxy convention), ``X-Original-URI`` (nginx convention) or the path after
``/oauth2/auth`` (Envoy's ``path_prefix``), its method from ``X-Forwarded-Method`` or
``X-Original-Method``. From anyone else those are ignored and the route for ``/`` decides.
The URI is normalized exactly as the gate normalizes a request path (SECURITY.md 17).

Answers (``Cache-Control: no-store`` on every one):

- 200: may pass. A public route answers without identity. Otherwise the response headers
  carry the route's identity headers, the oauth2-proxy compatible ``X-Auth-Request-User``,
  ``-Email``, ``-Groups`` and ``-Preferred-Username``, and, to a trusted caller only, on a
  route with ``pass_access_token``, ``Authorization: Bearer <access token>`` (a bearer
  client's own token on ``accept_bearer`` routes), and ``X-Gateway-Assertion`` on routes
  with ``assertion: true``. The proxy copies them onto the upstream request (nginx
  ``auth_request_set``, Traefik ``authResponseHeaders``).
- 401 with ``WWW-Authenticate: Bearer``: no session (or the session ended). When the original
  request is one the gate would send to login (a browser navigation, or any GET on an
  ``on_unauthenticated: login`` route), ``X-Gateway-Login`` holds the sign-in URL with the
  original URI as ``rd``; with ``?login=redirect`` the answer is that 302 itself, for proxies
  that hand the auth server's answer to the client (Traefik).
- 403: the route policy refuses this user, or no route serves the path.
- 400: a path the gateway refuses to judge (ambiguous encodings); 503: store or provider down.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from aiohttp import web

from gateway import keys, paths
from gateway.auth import authenticate, wants_login
from gateway.config import Settings
from gateway.errors import BadRequest, Forbidden, Unauthenticated
from gateway.pages import NO_STORE, redirect
from gateway.paths import start_url_for
from gateway.policy import PathRejected, normalize_path
from gateway.principal import Principal
from gateway.routes import ASSERTION_HEADER, CompiledRoute, identity_headers

PREFIX = paths.AUTH
ORIGINAL_URI_HEADERS = ("X-Forwarded-Uri", "X-Original-URI")
ORIGINAL_METHOD_HEADERS = ("X-Forwarded-Method", "X-Original-Method")
LOGIN_HEADER = "X-Gateway-Login"
# Extension: the names oauth2-proxy's set_xauthrequest uses, so existing nginx snippets work.
AUTH_REQUEST_HEADERS = {
    "X-Auth-Request-User": "sub",
    "X-Auth-Request-Email": "email",
    "X-Auth-Request-Groups": "groups",
    "X-Auth-Request-Preferred-Username": "preferred_username",
}
_METHOD = re.compile(r"[A-Z]{1,20}")


@dataclass(frozen=True, slots=True)
class Original:
    """The request the proxy is asking about."""

    path: str  # normalized
    query: str
    method: str

    @property
    def uri(self) -> str:
        return self.path + ("?" + self.query if self.query else "")


class ForwardAuth:
    """The ``/oauth2/auth`` handler; holds what is computed once from the settings."""

    def __init__(self, settings: Settings) -> None:
        self.public_url = settings.server.public_url

    def original(self, request: web.Request, trusted: bool) -> Original:
        """The original URI and method; believed only from a trusted proxy."""
        raw, method = "/", request.method
        if trusted:
            named = next((v for h in ORIGINAL_URI_HEADERS if (v := request.headers.get(h))), None)
            if named is not None:
                raw = named.strip()
            elif "tail" in request.match_info:
                if not request.raw_path.startswith(PREFIX + "/"):
                    raise BadRequest("The forward-auth path is malformed.")
                raw = request.raw_path[len(PREFIX) :]
            for header in ORIGINAL_METHOD_HEADERS:
                value = request.headers.get(header, "").strip().upper()
                if _METHOD.fullmatch(value):
                    method = value
                    break
        if raw.lower().startswith(("http://", "https://")):
            # An absolute-form request line (RFC 9112 §3.2.2) as nginx's $request_uri keeps
            # it: the proxy serves its path, so its path decides.
            parts = urlsplit(raw)
            raw = (parts.path or "/") + ("?" + parts.query if parts.query else "")
        path, _, query = raw.partition("?")
        try:
            normalized = normalize_path(path)
        except PathRejected as exc:
            raise BadRequest(str(exc)) from None
        return Original(normalized, query.split("#", 1)[0], method)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        # The same steps as the gate (trusted peers, authentication and policy, login or
        # 401, the assertion), so forward-auth answers as a proxied request would be treated.
        app = request.app
        routes = app[keys.ROUTES]
        trusted = routes.trust.is_trusted(request.remote)
        original = self.original(request, trusted)
        try:
            route = routes.match(original.path)
        except PathRejected as exc:
            raise BadRequest(str(exc)) from None
        if route is None:
            # Not 404: a proxy reads anything but 2xx/401/403 as its own failure (nginx: 500).
            raise Forbidden("No route serves this path.")
        if route.public:
            return web.Response(status=200, headers=NO_STORE)
        principal = await authenticate(request, route)
        if principal is None:
            return self._unauthenticated(request, route, original)
        return self._allow(request, route, principal, trusted)

    def _allow(
        self, request: web.Request, route: CompiledRoute, principal: Principal, trusted: bool
    ) -> web.StreamResponse:
        identity = principal.identity
        headers = dict(NO_STORE)
        headers.update(identity_headers(AUTH_REQUEST_HEADERS, identity))
        headers.update(route.identity(identity))
        token = principal.token_for(route.settings)
        if token is not None and trusted:
            # Only a trusted proxy gets the token: anything else asking is, or may be, the
            # browser itself, and tokens never reach the browser (SECURITY.md 11).
            headers["Authorization"] = f"Bearer {token}"
        if route.settings.assertion and trusted:
            signer = request.app[keys.ASSERTION]
            headers[ASSERTION_HEADER] = route.assertion(signer, identity, principal.session_id)
        return web.Response(status=200, headers=headers)

    def _unauthenticated(
        self, request: web.Request, route: CompiledRoute, original: Original
    ) -> web.StreamResponse:
        """401, naming the sign-in URL when the gate would send this request to login."""
        login = wants_login(request, route, original.method)
        headers = {"WWW-Authenticate": 'Bearer realm="gateway"', "Cache-Control": "no-store"}
        if login:
            target = self.public_url + start_url_for(original.path, original.query)
            if request.query.get("login") == "redirect" and "tail" not in request.match_info:
                return redirect(target)
            headers[LOGIN_HEADER] = target
        raise Unauthenticated(headers=headers)

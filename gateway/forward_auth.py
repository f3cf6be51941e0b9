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

from gateway import keys
from gateway.bearer import admit, bearer_token
from gateway.config import Settings
from gateway.errors import BadRequest, Forbidden, Unauthenticated
from gateway.gate import ASSERTION_HEADER, Gate, identity_headers
from gateway.login import start_url
from gateway.pages import NO_STORE, redirect
from gateway.policy import PathRejected, Route, normalize_path
from gateway.session import Identity

PREFIX = "/oauth2/auth"
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

    def __init__(self, settings: Settings, gate: Gate) -> None:
        self.public_url = settings.server.public_url
        # The gate's own decisions (trusted peers, session and policy, login or 401, the
        # assertion), so forward-auth answers exactly as a proxied request would be treated.
        self.gate = gate

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
        app = request.app
        trusted = self.gate.is_trusted(request.remote)
        original = self.original(request, trusted)
        route = app[keys.ROUTES].match(original.path)
        if route is None:
            # Not 404: a proxy reads anything but 2xx/401/403 as its own failure (nginx: 500).
            raise Forbidden("No route serves this path.")
        if route.public:
            return web.Response(status=200, headers=NO_STORE)
        session = await self.gate.authorized_session(request, route)
        if session is None:
            if route.settings.accept_bearer and not request.get(keys.CLEAR_SESSION):
                token = bearer_token(request.headers)
                if token is not None:
                    principal = await admit(app[keys.BEARER], route, token)
                    return self._allow(request, route, principal.identity, token, None, trusted)
            return self._unauthenticated(request, route, original)
        token = session.tokens.access_token if route.settings.pass_access_token else None
        return self._allow(request, route, session.identity, token, session.session_id, trusted)

    def _allow(
        self,
        request: web.Request,
        route: Route,
        identity: Identity,
        token: str | None,
        session_id: str | None,
        trusted: bool,
    ) -> web.StreamResponse:
        headers = dict(NO_STORE)
        headers.update(identity_headers(AUTH_REQUEST_HEADERS, identity))
        headers.update(identity_headers(route.settings.identity_headers, identity))
        if token is not None and trusted:
            # Only a trusted proxy gets the token: anything else asking is, or may be, the
            # browser itself, and tokens never reach the browser (SECURITY.md 11).
            headers["Authorization"] = f"Bearer {token}"
        if route.settings.assertion and trusted:
            headers[ASSERTION_HEADER] = self.gate.assertion(request, route, identity, session_id)
        return web.Response(status=200, headers=headers)

    def _unauthenticated(
        self, request: web.Request, route: Route, original: Original
    ) -> web.StreamResponse:
        """401, naming the sign-in URL when the gate would send this request to login."""
        login = self.gate.wants_login(request, route, original.method)
        headers = {"WWW-Authenticate": 'Bearer realm="gateway"', "Cache-Control": "no-store"}
        if login:
            target = self.public_url + start_url(original.path, original.query)
            if request.query.get("login") == "redirect" and "tail" not in request.match_info:
                return redirect(target)
            headers[LOGIN_HEADER] = target
        raise Unauthenticated(headers=headers)

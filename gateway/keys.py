"""Typed ``web.AppKey``s: how the web-layer modules share the objects ``app.py`` builds."""

from __future__ import annotations

from aiohttp import web

from gateway.assertion import ASSERTION as ASSERTION
from gateway.bearer import BearerVerifier
from gateway.config import Settings
from gateway.cookies import CookiePolicy
from gateway.crypto import KeyRing
from gateway.metrics import METRICS as METRICS
from gateway.oidc import ProviderClient
from gateway.pages import Pages
from gateway.principal import Principal
from gateway.providers import Providers
from gateway.routes import Routes
from gateway.session import Identity
from gateway.sessions import SessionManager
from gateway.store import SessionStore
from gateway.tracing import Tracing

SETTINGS = web.AppKey("settings", Settings)
RING = web.AppKey("ring", KeyRing)
COOKIES = web.AppKey("cookies", CookiePolicy)
STORE = web.AppKey("store", SessionStore)
# Every configured provider, by id and by issuer.
PROVIDERS = web.AppKey("providers", Providers)
# Only with a single provider (``provider:``): its client and bearer verifier, for tests
# and tools. The gateway itself always goes through PROVIDERS.
PROVIDER = web.AppKey("provider", ProviderClient)
SESSIONS = web.AppKey("sessions", SessionManager)
# The compiled routes (built when the app starts; again on every reload).
ROUTES = web.AppKey("routes", Routes)
BEARER = web.AppKey("bearer", BearerVerifier)  # with a single provider only, see PROVIDER
PAGES = web.AppKey("pages", Pages)
TRACING = web.AppKey("tracing", Tracing)
# ASSERTION and METRICS are defined next to their handlers and re-exported here.

# Per-request values.
REQUEST_ID = web.RequestKey("request_id", str)
CLEAR_SESSION = web.RequestKey("clear_session_cookie", bool)
# The matched route's prefix: the ``route`` label of metrics and the access log.
ROUTE_LABEL = web.RequestKey("route_label", str)
# perf_counter() when the response headers went out (latency = time to headers).
HEADERS_AT = web.RequestKey("headers_at", float)
# Who the request is from (a session or a bearer token): the access log's ``sub``, and the
# 403 page's "signed in as".
IDENTITY = web.RequestKey("identity", Identity)
# Who the request is from, worked out once by ``gateway.auth.authenticate``.
PRINCIPAL = web.RequestKey("principal", Principal)

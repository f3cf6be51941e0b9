"""``create_app(settings)``: the only place where the gateway's objects are built and wired.

Long-lived objects (the provider's HTTP client, the session store, the upstream clients) are
created in ``cleanup_ctx`` and hung on the app under typed ``web.AppKey``s.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import suppress

import aiohttp
from aiohttp import web

from gateway import keys, login, logout
from gateway.assertion import ASSERTION, AssertionSigner, jwks_handler
from gateway.bearer import BearerVerifier
from gateway.config import Settings
from gateway.cookies import CookiePolicy
from gateway.crypto import KeyRing, decode_secret
from gateway.errors import ProviderTransportError, StoreError
from gateway.forward_auth import ForwardAuth
from gateway.gate import Gate
from gateway.metrics import METRICS, Metrics, main_port_metrics, metrics_listener
from gateway.middleware import access_log, errors, hide_server_version, on_response_prepare
from gateway.oidc import ProviderClient
from gateway.oidc.client import make_provider_http
from gateway.pages import NO_STORE
from gateway.policy import RouteTable
from gateway.proxy import Forwarder, make_upstream_client
from gateway.sessions import SessionManager
from gateway.store import SessionStore, open_store

log = logging.getLogger("gateway")
STORE_FACTORY: web.AppKey[Callable[[], SessionStore]] = web.AppKey("store_factory")
# True when the store and metrics belong to the caller (``gateway run`` keeps them across
# reloads): the app then neither closes the store nor starts the metrics_listen listener.
SHARED = web.AppKey("shared", bool)


def create_app(
    settings: Settings,
    *,
    store: SessionStore | None = None,
    metrics: Metrics | None = None,
    shared: bool = False,
) -> web.Application:
    hide_server_version()
    app = web.Application(
        middlewares=[access_log, errors],
        handler_args={"max_field_size": settings.server.max_header_size},
        client_max_size=1024 * 1024,
    )
    app[keys.SETTINGS] = settings
    app[keys.RING] = KeyRing(
        [decode_secret(s.get_secret_value()) for s in settings.session.cookie_secrets]
    )
    app[keys.COOKIES] = CookiePolicy.from_settings(settings.session)
    app[keys.ROUTES] = RouteTable(
        settings.routes, case_insensitive=settings.server.case_insensitive_routes
    )
    app[METRICS] = metrics if metrics is not None else Metrics()
    app[SHARED] = shared
    app[ASSERTION] = AssertionSigner.from_settings(settings)
    app.on_response_prepare.append(on_response_prepare)
    app[STORE_FACTORY] = (
        (lambda: store) if store is not None else (lambda: open_store(settings.session))
    )
    app.cleanup_ctx.append(_store_ctx)
    app.cleanup_ctx.append(_provider_ctx)
    app.cleanup_ctx.append(_upstream_ctx)
    if not shared:
        app.cleanup_ctx.append(metrics_listener(settings))

    gate = Gate(settings)
    # ``gate.own``: an own endpoint answers only its canonical spelling (aiohttp's router
    # matches the decoded path; the gate's one normalization decides every other spelling).
    own = gate.own
    app.router.add_get("/oauth2/start", own("/oauth2/start", login.start))
    app.router.add_get("/oauth2/callback", own("/oauth2/callback", login.callback))
    app.router.add_get("/oauth2/userinfo", own("/oauth2/userinfo", login.userinfo))
    forward_auth = ForwardAuth(settings, gate)
    app.router.add_route("*", "/oauth2/auth", own("/oauth2/auth", forward_auth.handle))
    # Envoy path_prefix: the original path follows, in any spelling.
    tail = own("/oauth2/auth/", forward_auth.handle, prefix=True)
    app.router.add_route("*", "/oauth2/auth/{tail:.*}", tail)
    app.router.add_route("*", "/oauth2/sign_out", own("/oauth2/sign_out", logout.sign_out))
    app.router.add_get(logout.SIGNED_OUT_PATH, own(logout.SIGNED_OUT_PATH, logout.signed_out))
    backchannel = own("/oauth2/backchannel_logout", logout.backchannel_logout)
    app.router.add_route("*", "/oauth2/backchannel_logout", backchannel)
    if not settings.observability.metrics_listen:
        app.router.add_get("/metrics", own("/metrics", main_port_metrics(settings)))
    app.router.add_get("/.well-known/jwks.json", own("/.well-known/jwks.json", jwks_handler))
    app.router.add_get("/healthz", own("/healthz", healthz))
    app.router.add_get("/readyz", own("/readyz", readyz))
    app.router.add_route("*", "/{tail:.*}", gate.handle)
    return app


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    store = app[STORE_FACTORY]()
    app[keys.STORE] = store
    yield
    if not app[SHARED]:
        await store.close()


async def _provider_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[keys.SETTINGS]
    http = make_provider_http(settings.provider)
    provider = ProviderClient(settings.provider, settings.redirect_uri, http)
    app[keys.PROVIDER] = provider
    app[keys.SESSIONS] = SessionManager(settings.session, app[keys.STORE], app[keys.RING], provider)
    app[keys.SESSIONS].on_refresh = app[METRICS].refreshed
    app[keys.BEARER] = BearerVerifier(provider, settings.provider)
    try:
        await provider.load()
    except ProviderTransportError as exc:
        # Start anyway: /readyz says 503 and logins retry discovery until the provider answers.
        log.warning("provider metadata not loaded at start-up: %s", exc)
    yield
    await http.close()


async def _upstream_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[keys.SETTINGS]
    clients: dict[tuple[bool, str | None], aiohttp.ClientSession] = {}
    forwarders: dict[int, Forwarder] = {}
    for index, route in enumerate(settings.routes):
        tls = (route.tls_verify, route.tls_ca_file)
        if tls not in clients:
            clients[tls] = make_upstream_client(
                ca_file=route.tls_ca_file, verify_tls=route.tls_verify
            )
        forwarders[index] = Forwarder(clients[tls], ws_open=app[METRICS].websockets)
    app[keys.FORWARDERS] = forwarders
    yield
    for client in clients.values():
        await client.close()


async def healthz(request: web.Request) -> web.StreamResponse:
    return web.json_response({"status": "ok"}, headers=NO_STORE)


async def readyz(request: web.Request) -> web.StreamResponse:
    """200 when the session store answers and the provider's metadata is loaded, else 503."""
    checks: dict[str, str] = {}
    try:
        await asyncio.wait_for(request.app[keys.STORE].ping(), 2.0)
        checks["store"] = "ok"
    except (StoreError, TimeoutError):
        checks["store"] = "unavailable"
    provider = request.app[keys.PROVIDER]
    if not provider.loaded:
        with suppress(ProviderTransportError):
            await provider.metadata()
    checks["provider"] = "ok" if provider.loaded else "metadata not loaded"
    ok = all(v == "ok" for v in checks.values())
    return web.json_response(
        {"status": "ready" if ok else "not ready", "checks": checks},
        status=200 if ok else 503,
        headers=NO_STORE,
    )

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

from gateway import keys, login, logout, paths
from gateway.assertion import ASSERTION, AssertionSigner, jwks_handler
from gateway.config import RouteSettings, Settings
from gateway.cookies import CookiePolicy
from gateway.crypto import KeyRing, decode_secret
from gateway.errors import ProviderTransportError, StoreError
from gateway.forward_auth import ForwardAuth
from gateway.gate import Gate
from gateway.metrics import METRICS, Metrics, main_port_metrics, metrics_listener
from gateway.middleware import access_log, errors, hide_server_version, on_response_prepare
from gateway.oidc import ProviderClient
from gateway.oidc.client import make_provider_http
from gateway.pages import NO_STORE, Pages
from gateway.providers import Providers, mixup_risk
from gateway.proxy import Forwarder, make_upstream_client
from gateway.routes import Routes
from gateway.sessions import SessionManager
from gateway.store import SessionStore, open_store
from gateway.tracing import Tracing

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
    tracing = Tracing.from_settings(settings.observability.tracing)
    app = web.Application(
        middlewares=[tracing.middleware(), access_log, errors]
        if tracing.enabled
        else [access_log, errors],
        handler_args={"max_field_size": settings.server.max_header_size},
        client_max_size=1024 * 1024,
    )
    app[keys.SETTINGS] = settings
    app[keys.RING] = KeyRing(
        [decode_secret(s.get_secret_value()) for s in settings.session.cookie_secrets]
    )
    app[keys.COOKIES] = CookiePolicy.from_settings(settings.session)
    app[keys.PAGES] = Pages(settings.pages)
    app[keys.TRACING] = tracing
    app.on_cleanup.append(lambda app: app[keys.TRACING].shutdown())
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

    gate = Gate()
    # ``gate.own``: an own endpoint answers only its canonical spelling (aiohttp's router
    # matches the decoded path; the gate's one normalization decides every other spelling).
    own = gate.own
    app.router.add_get(paths.START, own(paths.START, login.start))
    app.router.add_get(paths.CALLBACK, own(paths.CALLBACK, login.callback))
    app.router.add_get(paths.USERINFO, own(paths.USERINFO, login.userinfo))
    forward_auth = ForwardAuth(settings)
    app.router.add_route("*", paths.AUTH, own(paths.AUTH, forward_auth.handle))
    # Envoy path_prefix: the original path follows, in any spelling.
    tail = own(paths.AUTH + "/", forward_auth.handle, prefix=True)
    app.router.add_route("*", paths.AUTH + "/{tail:.*}", tail)
    app.router.add_route("*", paths.SIGN_OUT, own(paths.SIGN_OUT, logout.sign_out))
    app.router.add_get(paths.SIGNED_OUT, own(paths.SIGNED_OUT, logout.signed_out))
    backchannel = own(paths.BACKCHANNEL_LOGOUT, logout.backchannel_logout)
    app.router.add_route("*", paths.BACKCHANNEL_LOGOUT, backchannel)
    if not settings.observability.metrics_listen:
        app.router.add_get(paths.METRICS, own(paths.METRICS, main_port_metrics(settings)))
    app.router.add_get(paths.JWKS, own(paths.JWKS, jwks_handler))
    app.router.add_get(paths.HEALTHZ, own(paths.HEALTHZ, healthz))
    app.router.add_get(paths.READYZ, own(paths.READYZ, readyz))
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
    refs = settings.provider_refs
    https = [make_provider_http(ref.settings) for ref in refs]
    clients = [
        ProviderClient(ref.settings, settings.redirect_uri, http)
        for ref, http in zip(refs, https, strict=True)
    ]
    providers = Providers.of(refs, clients)
    app[keys.PROVIDERS] = providers
    for client in clients:
        client.tracing = app[keys.TRACING]
    if settings.providers is None:
        [only] = providers
        app[keys.PROVIDER] = only.client
        assert only.bearer is not None
        app[keys.BEARER] = only.bearer
    app[keys.SESSIONS] = SessionManager(
        settings.session, app[keys.STORE], app[keys.RING], providers
    )
    app[keys.SESSIONS].on_refresh = app[METRICS].refreshed
    for p in providers:
        try:
            meta = await p.client.load()
        except ProviderTransportError as exc:
            # Start anyway: /readyz names it (503 unless another provider is loaded) and
            # logins retry discovery until it answers.
            which = "" if settings.providers is None else f" ({p.id})"
            log.warning("provider metadata not loaded at start-up%s: %s", which, exc)
            continue
        if settings.providers is not None and (risk := mixup_risk(p.client.settings, meta)):
            log.warning("provider %s %s", p.id, risk)
    yield
    for http in https:
        await http.close()


async def _upstream_ctx(app: web.Application) -> AsyncIterator[None]:
    """Compile the routes (``keys.ROUTES``): one upstream client per TLS setting, one
    forwarder per route. Runs once per application start, so again on every reload."""
    settings = app[keys.SETTINGS]
    clients: dict[tuple[bool, str | None], aiohttp.ClientSession] = {}

    def forwarder_for(route: RouteSettings) -> Forwarder:
        tls = (route.tls_verify, route.tls_ca_file)
        if tls not in clients:
            clients[tls] = make_upstream_client(
                ca_file=route.tls_ca_file, verify_tls=route.tls_verify
            )
        return Forwarder(clients[tls], ws_open=app[METRICS].websockets, tracing=app[keys.TRACING])

    app[keys.ROUTES] = Routes(settings, forwarder_for)
    yield
    for client in clients.values():
        await client.close()


async def healthz(request: web.Request) -> web.StreamResponse:
    return web.json_response({"status": "ok"}, headers=NO_STORE)


async def readyz(request: web.Request) -> web.StreamResponse:
    """200 when the session store answers and the provider's metadata is loaded, else 503.

    With several providers, one whose metadata is not loaded is named in ``checks`` but
    the process stays ready while another one's is loaded: the other providers' users are
    served and sign in as before, and one provider's outage must not take every replica out
    of its load balancer (or keep new ones from starting).
    """
    checks: dict[str, str] = {}
    try:
        await asyncio.wait_for(request.app[keys.STORE].ping(), 2.0)
        checks["store"] = "ok"
    except (StoreError, TimeoutError):
        checks["store"] = "unavailable"
    several = request.app[keys.SETTINGS].providers is not None
    loaded = []
    for p in request.app[keys.PROVIDERS]:
        if not p.client.loaded:
            with suppress(ProviderTransportError):
                await p.client.metadata()
        loaded.append(p.client.loaded)
        name = f"provider:{p.id}" if several else "provider"
        checks[name] = "ok" if p.client.loaded else "metadata not loaded"
    ok = checks["store"] == "ok" and (any(loaded) if several else all(loaded))
    return web.json_response(
        {"status": "ready" if ok else "not ready", "checks": checks},
        status=200 if ok else 503,
        headers=NO_STORE,
    )

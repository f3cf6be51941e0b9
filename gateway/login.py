"""The login flow: ``/oauth2/start`` and ``/oauth2/callback``, plus ``/oauth2/userinfo``.

Authorization code with PKCE S256, state and nonce (RFC 9700 §2.1, OIDC Core §3.1). The
callback is a thin handler over ``completion.complete_login``, which checks the response
and starts the session.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Sequence
from urllib.parse import quote, urlsplit

from aiohttp import web

from gateway import keys, paths
from gateway.auth import authenticate
from gateway.completion import complete_login
from gateway.config import RouteSettings
from gateway.crypto import random_token
from gateway.errors import (
    BadRequest,
    GatewayError,
    LoginFlowError,
    OAuthError,
    ProviderDenied,
    ProviderRefused,
    ProviderUnavailable,
    Unauthenticated,
)
from gateway.flow import LoginState, flow_cookie, slot_for
from gateway.oidc.par import ParUnavailable
from gateway.pages import NO_STORE, Action, denied_response, pages_of, redirect
from gateway.paths import start_url as start_url
from gateway.policy import PathRejected, normalize_path
from gateway.providers import Provider
from gateway.redirects import safe_redirect, same_origin_path

log = logging.getLogger("gateway.login")
_NO_PAR = (
    "Signing in is not possible right now: the identity provider does not accept the "
    "pushed authorization requests this site requires."
)


async def start(request: web.Request) -> web.StreamResponse:
    """Begin a login; ``rd`` is where to land afterwards (same origin or allowlisted),
    ``provider`` the provider to sign in with (else the route's only one, or a chooser)."""
    settings = request.app[keys.SETTINGS]
    q = request.query
    if len(q.getall("provider", ())) > 1:
        raise BadRequest("The sign-in link names more than one provider.")
    rd = q.get("rd")
    return_to = "/"
    if rd is not None:
        ok = safe_redirect(rd, settings.server.public_url, settings.logout.allowed_redirects)
        if ok is None:
            raise BadRequest("The rd parameter is not a path on this site.")
        return_to = same_origin_path(ok, settings.server.public_url)
    allowed = request.app[keys.PROVIDERS].allowed(_route_settings(request, return_to))
    wanted = q.get("provider")
    if wanted is not None:
        chosen = next((p for p in allowed if p.id == wanted), None)
        if chosen is None:
            raise BadRequest("There is no sign-in with that provider for this page.")
    elif len(allowed) == 1:
        chosen = allowed[0]
    else:
        return _chooser(request, allowed, rd)
    return await begin_login(request, return_to, chosen)


def _route_settings(request: web.Request, return_to: str) -> RouteSettings | None:
    """The route a return path lands on (None: another, allowlisted, origin)."""
    if not return_to.startswith("/") or return_to.startswith("//"):
        return None
    try:
        path = normalize_path(urlsplit(return_to).path or "/")
        route = request.app[keys.ROUTES].match(path)
    except PathRejected:
        raise BadRequest("The rd parameter is not a path on this site.") from None
    return None if route is None else route.settings


def _chooser(
    request: web.Request, allowed: Sequence[Provider], rd: str | None
) -> web.StreamResponse:
    """The page that lets the user pick a provider: one link per allowed provider, in
    config order, each back to /oauth2/start with that provider and the same ``rd``."""
    suffix = "" if rd is None else "&rd=" + quote(rd, safe="/")
    choices = [
        Action(f"{paths.START}?provider={quote(p.id)}{suffix}", p.display_name) for p in allowed
    ]
    return pages_of(request).render(
        "choose.html", "Sign in", message="Choose how to sign in.", choices=choices
    )


async def begin_login(request: web.Request, return_to: str, chosen: Provider) -> web.StreamResponse:
    """302 to the chosen provider with a fresh state, nonce and PKCE challenge in a flow
    cookie that names that provider."""
    provider = chosen.client
    cookies = request.app[keys.COOKIES]
    settings = request.app[keys.SETTINGS]
    meta = await provider.metadata()
    now = time.time()
    # Cap the flows in progress so a burst of parallel logins never grows the Cookie
    # header past a server's limit (SECURITY.md 10). Flow cookies live in a fixed set of
    # ``max_login_flows`` slots: a new flow takes a free slot, else the oldest one, so
    # even requests sent in parallel (which cannot see each other's cookies) overwrite
    # each other instead of piling up. The slot is a function of the state, so the
    # callback finds the cookie without trying each; a fresh state is drawn until it
    # falls in the chosen slot (about ``max_login_flows`` draws).
    slots = settings.session.max_login_flows
    used = {
        i: _stamp(v)
        for i in range(slots)
        if (v := request.cookies.get(flow_cookie(cookies.login_prefix, i))) is not None
    }
    free = [i for i in range(slots) if i not in used]
    target = secrets.choice(free) if free else min(used, key=lambda i: used[i])
    state = random_token(32)
    while slot_for(state, slots) != target:
        state = random_token(32)
    flow, challenge = LoginState.new(return_to, now, state, chosen.id)
    try:
        location = await provider.authorization_redirect(meta, flow.state, flow.nonce, challenge)
    except ParUnavailable as exc:
        log.warning("sign-in cannot start: %s", exc)
        raise ProviderUnavailable(_NO_PAR) from None
    except OAuthError as exc:
        log.warning("pushed authorization request refused: %s", exc.error)
        raise ProviderRefused() from None
    resp = redirect(location)
    value = f"{int(now)}.{flow.seal(request.app[keys.RING])}"
    cookies.set(
        resp,
        flow_cookie(cookies.login_prefix, target),
        value,
        int(settings.session.login_timeout),
    )
    return resp


def _stamp(value: str) -> int:
    head = value.split(".", 1)[0]
    # ASCII digits only: str.isdigit() is also true for "²" or "❼", which int() refuses.
    return int(head) if head.isascii() and head.isdigit() and len(head) < 12 else 0


# The way on from a page that refuses a sign-in response.
_START_AGAIN = (paths.START, "Start signing in again")


async def callback(request: web.Request) -> web.StreamResponse:
    """The redirect_uri. Every answer is no-store and no-referrer (SECURITY.md 8)."""
    try:
        done = await complete_login(request)
    except ProviderDenied as exc:
        log.info("sign-in refused by the provider: %s", exc.error, extra={"error": exc.error})
        resp = denied_page(request, exc)
        resp.headers.update(NO_STORE)
        return resp
    except LoginFlowError as exc:
        log.info("sign-in callback refused: %s", exc.message, extra={"reason": exc.message})
        exc.link = _START_AGAIN
        raise
    except GatewayError as exc:
        if exc.status == 400:
            exc.link = _START_AGAIN
        raise
    except web.HTTPException as exc:
        exc.headers.update(NO_STORE)
        raise
    app = request.app
    cookies = app[keys.COOKIES]
    resp = redirect(done.return_to)
    cookies.clear(resp, done.flow_cookie)
    max_age = int(app[keys.SETTINGS].session.max_lifetime)
    cookies.set(resp, cookies.name, done.ticket.to_cookie(app[keys.RING]), max_age)
    resp.headers.update(NO_STORE)
    return resp


async def userinfo(request: web.Request) -> web.StreamResponse:
    """The signed-in user's identity claims as JSON; never a token.

    With ``providers:``, also ``provider`` (its id) and ``iss`` (its issuer), which win over
    a provider's claims of those names: a ``sub`` is unique only per issuer, so an app that
    keys users on this answer needs them. A single ``provider:`` answers as it always has.
    """
    principal = await authenticate(request, None)
    if principal is None:
        raise Unauthenticated(headers={"WWW-Authenticate": 'Bearer realm="gateway"'})
    ident = principal.identity
    body = {"sub": ident.sub, **ident.claims}
    if request.app[keys.SETTINGS].providers is not None:
        body["provider"] = ident.provider
        body["iss"] = ident.issuer
    return web.json_response(body, headers=NO_STORE)


def denied_page(request: web.Request, exc: ProviderDenied) -> web.Response:
    """SECURITY.md 7: a clear page, no loop, nothing echoed unescaped."""
    what = {
        "access_denied": "You declined the request, so you are not signed in.",
        "login_required": "The identity provider needs you to sign in first.",
        "consent_required": "The identity provider needs your consent first.",
        "interaction_required": "The identity provider needs you to interact with it first.",
    }.get(exc.error, "The identity provider did not sign you in.")
    return denied_response(request, exc.error, what)

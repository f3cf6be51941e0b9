"""The login flow: ``/oauth2/start`` and ``/oauth2/callback``, plus ``/oauth2/userinfo``.

Authorization code with PKCE S256, state and nonce (RFC 9700 §2.1, OIDC Core §3.1). The
callback is a thin handler over ``completion.complete_login``, which checks the response
and starts the session.
"""

from __future__ import annotations

import logging
import secrets
import time

from aiohttp import web

from gateway import keys, paths
from gateway.auth import authenticate
from gateway.completion import complete_login
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
from gateway.pages import NO_STORE, denied_response, redirect
from gateway.paths import start_url as start_url
from gateway.redirects import safe_redirect, same_origin_path

log = logging.getLogger("gateway.login")
_NO_PAR = (
    "Signing in is not possible right now: the identity provider does not accept the "
    "pushed authorization requests this site requires."
)


async def start(request: web.Request) -> web.StreamResponse:
    """Begin a login; ``rd`` is where to land afterwards (same origin or allowlisted)."""
    settings = request.app[keys.SETTINGS]
    rd = request.query.get("rd")
    return_to = "/"
    if rd is not None:
        ok = safe_redirect(rd, settings.server.public_url, settings.logout.allowed_redirects)
        if ok is None:
            raise BadRequest("The rd parameter is not a path on this site.")
        return_to = same_origin_path(ok, settings.server.public_url)
    return await begin_login(request, return_to)


async def begin_login(request: web.Request, return_to: str) -> web.StreamResponse:
    """302 to the provider with a fresh state, nonce and PKCE challenge in a flow cookie."""
    provider = request.app[keys.PROVIDER]
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
    flow, challenge = LoginState.new(return_to, now, state)
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
    """The signed-in user's identity claims as JSON; never a token."""
    principal = await authenticate(request, None)
    if principal is None:
        raise Unauthenticated(headers={"WWW-Authenticate": 'Bearer realm="gateway"'})
    ident = principal.identity
    body = {"sub": ident.sub, **ident.claims}
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

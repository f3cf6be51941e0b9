"""The authentication step: ``authenticate(request, route)`` works out who a request is
from, once, and keeps the answer on the request (``keys.PRINCIPAL``).

    session cookie → session (refreshed when due) → route policy    → Principal(via="session")
    no session, route accepts bearer tokens → verified token + policy → Principal(via="bearer")
    neither                                                            → None

The gate, forward-auth, userinfo and sign-out all ask it; ``open_session`` is the one place
the session cookie is opened (at most once per request). Failures are exceptions the error
middleware answers: ``Forbidden`` (policy), ``Unauthenticated`` (a bad bearer token), 503
(store or provider down). A browser session wins over a bearer token, and a session that
just ended (``keys.CLEAR_SESSION``) is not replaced by one.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from aiohttp import web

from gateway import keys
from gateway.bearer import InvalidToken, admit, bearer_token
from gateway.errors import Forbidden, Unauthenticated
from gateway.headers import is_websocket_upgrade
from gateway.pages import wants_html
from gateway.paths import start_url_for
from gateway.policy import check_requirements
from gateway.principal import Principal
from gateway.routes import CompiledRoute
from gateway.session import Session
from gateway.sessions import Loaded, SessionEnded

__all__ = ["Principal", "authenticate", "open_session", "unauthenticated", "wants_login"]


@dataclass(frozen=True, slots=True)
class _Opened:
    loaded: Loaded | None


@dataclass(frozen=True, slots=True)
class _Authenticated:
    principal: Principal | None


_OPENED = web.RequestKey("opened_session", _Opened)
_AUTHENTICATED = web.RequestKey("authenticated", _Authenticated)


async def open_session(request: web.Request) -> Loaded | None:
    """The request's session as stored (not refreshed), or None: the one place the session
    cookie is opened, once per request however many steps ask."""
    opened = request.get(_OPENED)
    if opened is None:
        app = request.app
        with app[keys.TRACING].span("session.load"):
            loaded = await app[keys.SESSIONS].open(app[keys.COOKIES].session_value(request))
        opened = _Opened(loaded)
        request[_OPENED] = opened
    return opened.loaded


async def authenticate(request: web.Request, route: CompiledRoute | None) -> Principal | None:
    """Who the request is from, for ``route`` (None: one of the gateway's own endpoints,
    which reads the session as stored: no refresh, no route policy, no bearer tokens).

    Runs once per request; later calls return the first answer.
    """
    done = request.get(_AUTHENTICATED)
    if done is None:
        done = _Authenticated(await _authenticate(request, route))
        request[_AUTHENTICATED] = done
        if done.principal is not None:
            request[keys.PRINCIPAL] = done.principal
    return done.principal


async def _authenticate(request: web.Request, route: CompiledRoute | None) -> Principal | None:
    loaded = await open_session(request)
    if route is None:
        if loaded is None:
            return None
        return _from_session(loaded, loaded.session)
    providers = request.app[keys.PROVIDERS]
    # A session of a provider the route does not allow counts as none here (login with
    # an allowed one, or 401); it stays valid for the routes that do allow it.
    if loaded is not None and providers.allows(route.settings, loaded.session.identity.provider):
        principal = await _session_principal(request, route, loaded)
        if principal is not None:
            return principal
    # A bearer client is one that came without a session, not one whose ended.
    if route.settings.accept_bearer and not request.get(keys.CLEAR_SESSION):
        token = bearer_token(request.headers)
        if token is not None:
            chosen = providers.bearer_for(route.settings, token)
            if chosen is None or chosen.bearer is None:
                raise InvalidToken()
            admitted = await admit(chosen.bearer, route.route, token)
            identity = replace(admitted.identity, provider=chosen.id, issuer=chosen.issuer)
            request[keys.IDENTITY] = identity
            return Principal(identity, admitted.scopes, token, "bearer")
    return None


async def _session_principal(
    request: web.Request, route: CompiledRoute, loaded: Loaded
) -> Principal | None:
    """The session refreshed and allowed by the route's ``require``; None when it just
    ended (the answer then clears the cookie, see ``keys.CLEAR_SESSION``)."""
    app = request.app
    sessions = app[keys.SESSIONS]
    try:
        with app[keys.TRACING].span("session.refresh"):  # a provider call only when one is due
            session = await sessions.fresh(loaded)
    except SessionEnded:
        request[keys.CLEAR_SESSION] = True
        return None
    request[keys.IDENTITY] = session.identity
    decision = check_requirements(route.settings, session.identity, session.tokens.scope)
    if not decision.allowed:
        raise Forbidden()
    if session is loaded.session:
        await sessions.touch(loaded)
    return _from_session(loaded, session)


def _from_session(loaded: Loaded, session: Session) -> Principal:
    tokens = session.tokens
    return Principal(
        session.identity, tokens.scope, tokens.access_token, "session", session, loaded.ticket
    )


def wants_login(request: web.Request, route: CompiledRoute, method: str) -> bool:
    """Send this unauthenticated request to login (else 401): ``login`` routes for any
    GET/HEAD, ``auto`` routes for browser navigations."""
    mode = route.settings.on_unauthenticated
    readable = method in ("GET", "HEAD")
    return readable and (mode == "login" or (mode == "auto" and wants_html(request)))


def unauthenticated(request: web.Request, route: CompiledRoute, path: str) -> Exception:
    """The answer to a request to ``route`` with no principal: login or 401."""
    if is_websocket_upgrade(request.headers):
        # A WebSocket client cannot follow a login redirect (RFC 6455 §4.1): plain 401.
        return Unauthenticated(headers={"WWW-Authenticate": 'Bearer realm="gateway"'})
    if wants_login(request, route, request.method):
        login = start_url_for(path, request.rel_url.raw_query_string)
        return web.HTTPFound(login, headers={"Cache-Control": "no-store"})
    return Unauthenticated(headers={"WWW-Authenticate": 'Bearer realm="gateway"'})

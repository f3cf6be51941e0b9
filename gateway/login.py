"""The login flow: ``/oauth2/start`` and ``/oauth2/callback``, plus ``/oauth2/userinfo``.

Authorization code with PKCE S256, state and nonce (RFC 9700 §2.1, OIDC Core §3.1). The
callback checks, in order: the login-state cookie bound to ``state`` (single-use), the RFC
9207 ``iss`` parameter, a provider ``error``, then exchanges the code with the verifier and
validates the ID token with the nonce. Only then is anything written to the store.
"""

from __future__ import annotations

import html
import logging
import re
import secrets
import time

from aiohttp import web

from gateway import keys
from gateway.crypto import OpenError, random_token, sha256_b64u
from gateway.errors import (
    BadRequest,
    LoginFlowError,
    OAuthError,
    ProviderDenied,
    ProviderTransportError,
    ProviderUnavailable,
    StoreError,
    StoreUnavailable,
    TokenValidationError,
    Unauthenticated,
)
from gateway.flow import LoginState, flow_id_for
from gateway.pages import NO_STORE, page, redirect
from gateway.redirects import safe_redirect, same_origin_path
from gateway.sessions import identity_from, tokens_from

log = logging.getLogger("gateway.login")
_STATE_RE = re.compile(r"^[A-Za-z0-9_-]{20,128}$")
_MAX_PARAM = 4096
_OAUTH_ERROR_RE = re.compile(r"^[\x20-\x21\x23-\x5B\x5D-\x7E]{1,64}$")  # RFC 6749 §4.1.2.1


def start_url(path: str, query: str = "") -> str:
    """The sign-in URL for a request to ``path`` (normalized, so decoded) with its raw
    ``query``. The path is percent-encoded again, so that ``rd`` names a URL (``/a%20b``,
    ``/a%3Fb``) that /oauth2/start accepts and that leads back to this very path."""
    from urllib.parse import quote

    target = quote(path, safe="/:@!$&'()*+,;=~") + ("?" + query if query else "")
    return "/oauth2/start?rd=" + quote(target, safe="/")


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
    try:
        meta = await provider.metadata()
    except ProviderTransportError:
        raise ProviderUnavailable() from None
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
        if (v := request.cookies.get(_flow_cookie(cookies.login_prefix, i))) is not None
    }
    free = [i for i in range(slots) if i not in used]
    target = secrets.choice(free) if free else min(used, key=lambda i: used[i])
    state = random_token(32)
    while _slot_for(state, slots) != target:
        state = random_token(32)
    flow, challenge = LoginState.new(return_to, now, state)
    resp = redirect(provider.authorization_url(meta, flow.state, flow.nonce, challenge))
    value = f"{int(now)}.{flow.seal(request.app[keys.RING])}"
    cookies.set(
        resp,
        _flow_cookie(cookies.login_prefix, target),
        value,
        int(settings.session.login_timeout),
    )
    return resp


def _slot_for(state: str, slots: int) -> int:
    """Which login-state cookie slot a flow's state belongs to."""
    return flow_id_for(state).encode()[0] % slots


def _flow_cookie(prefix: str, slot: int) -> str:
    return f"{prefix}{slot}"


def _stamp(value: str) -> int:
    head = value.split(".", 1)[0]
    # ASCII digits only: str.isdigit() is also true for "²" or "❼", which int() refuses.
    return int(head) if head.isascii() and head.isdigit() and len(head) < 12 else 0


async def callback(request: web.Request) -> web.StreamResponse:
    """The redirect_uri. Every answer is no-store and no-referrer (SECURITY.md 8)."""
    try:
        resp = await _callback(request)
    except web.HTTPException as exc:
        exc.headers.update(NO_STORE)
        raise
    resp.headers.update(NO_STORE)
    return resp


async def _callback(request: web.Request) -> web.StreamResponse:
    app = request.app
    settings, cookies, provider = app[keys.SETTINGS], app[keys.COOKIES], app[keys.PROVIDER]
    q = request.query
    if any(len(v) > _MAX_PARAM for v in q.values()) or any(len(q.getall(k)) > 1 for k in q):
        raise LoginFlowError("The sign-in response was malformed.")
    state = q.get("state", "")
    if not _STATE_RE.match(state):
        raise LoginFlowError("The sign-in response has no valid state. Please start again.")
    cookie_name = _flow_cookie(
        cookies.login_prefix, _slot_for(state, settings.session.max_login_flows)
    )
    raw = request.cookies.get(cookie_name)
    if raw is None or "." not in raw:
        raise LoginFlowError(
            "This sign-in link has expired or was already used. Please start again."
        )
    try:
        flow = LoginState.open(raw.split(".", 1)[1], state, app[keys.RING])
    except OpenError:
        raise LoginFlowError("The sign-in state did not match. Please start again.") from None
    if flow.created_at + settings.session.login_timeout < time.time():
        raise LoginFlowError("The sign-in took too long. Please start again.")
    try:
        meta = await provider.metadata()
    except ProviderTransportError:
        raise ProviderUnavailable() from None

    # RFC 9207 §2.4: the iss parameter must name our issuer when present, and be present
    # when the provider says it sends it.
    iss = q.get("iss")
    if iss is not None and iss != meta.issuer:
        raise LoginFlowError("The sign-in response came from an unexpected issuer.")
    if iss is None and meta.iss_parameter_supported:
        raise LoginFlowError("The sign-in response did not name its issuer.")

    error = q.get("error")
    if error is not None:
        err = error if _OAUTH_ERROR_RE.match(error) else "invalid_response"
        raise ProviderDenied(err, q.get("error_description"))
    code = q.get("code")
    if not code:
        raise LoginFlowError("The sign-in response has no authorization code.")

    # Single use across every replica: the first callback with this state claims it.
    try:
        first = await app[keys.STORE].claim_once(
            "state:" + sha256_b64u(state), settings.session.login_timeout
        )
    except StoreError:
        raise StoreUnavailable() from None
    if not first:
        raise LoginFlowError("This sign-in response was already used. Please start again.")

    try:
        token_resp = await provider.exchange_code(code, flow.verifier)
    except OAuthError as exc:
        log.info("code exchange refused: %s", exc.error)
        raise LoginFlowError() from None
    except ProviderTransportError as exc:
        log.warning("code exchange failed: %s", exc)
        raise ProviderUnavailable() from None

    id_claims: dict[str, object] = {}
    if token_resp.id_token:
        try:
            id_claims = await provider.validator.validate_id_token(
                token_resp.id_token, nonce=flow.nonce
            )
        except TokenValidationError as exc:
            log.warning("ID token rejected at login: %s", exc.reason)
            raise LoginFlowError() from None
        except ProviderTransportError:
            raise ProviderUnavailable() from None
    elif "openid" in provider.settings.scopes:
        log.warning("the provider returned no ID token for an openid request")
        raise LoginFlowError()
    userinfo = await provider.userinfo(token_resp.access_token)
    identity = identity_from(dict(id_claims), userinfo)
    if not identity.sub:
        raise LoginFlowError("The provider did not say who you are.")
    now = time.time()
    tokens = tokens_from(token_resp, now)
    sid = id_claims.get("sid")
    sessions = app[keys.SESSIONS]
    previous = await sessions.open(request.cookies.get(cookies.name))
    ticket, _ = await sessions.create(identity, tokens, sid if isinstance(sid, str) else None)
    if previous is not None:
        await sessions.destroy(previous.ticket)
    log.info("login", extra={"sub": identity.sub})

    resp = redirect(flow.return_to or "/")
    cookies.clear(resp, cookie_name)
    cookies.set(
        resp, cookies.name, ticket.to_cookie(app[keys.RING]), int(settings.session.max_lifetime)
    )
    return resp


async def userinfo(request: web.Request) -> web.StreamResponse:
    """The signed-in user's identity claims as JSON; never a token."""
    sessions = request.app[keys.SESSIONS]
    loaded = await sessions.open(request.cookies.get(request.app[keys.COOKIES].name))
    if loaded is None:
        raise Unauthenticated(headers={"WWW-Authenticate": 'Bearer realm="gateway"'})
    ident = loaded.session.identity
    body = {"sub": ident.sub, **ident.claims}
    return web.json_response(body, headers=NO_STORE)


def denied_page(exc: ProviderDenied) -> web.Response:
    """SECURITY.md 7: a clear page, no loop, nothing echoed unescaped."""
    what = {
        "access_denied": "You declined the request, so you are not signed in.",
        "login_required": "The identity provider needs you to sign in first.",
        "consent_required": "The identity provider needs your consent first.",
        "interaction_required": "The identity provider needs you to interact with it first.",
    }.get(exc.error, "The identity provider did not sign you in.")
    body = (
        f"<p>{html.escape(what)}</p>"
        f"<p class=code>error: {html.escape(exc.error)}</p>"
        '<p><a href="/oauth2/start">Try signing in again</a></p>'
    )
    return page("Not signed in", body, 400)

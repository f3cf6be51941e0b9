"""Ending sessions: ``/oauth2/sign_out``, ``/oauth2/signed_out``, ``/oauth2/backchannel_logout``.

Sign-out is a POST with a CSRF check (SECURITY.md 14); a GET only shows a confirmation form.
It revokes the tokens (RFC 7009), deletes the session, and sends the browser to the
provider's end_session_endpoint (RP-Initiated Logout 1.0) which returns it to
``/oauth2/signed_out`` with the state we gave it. Back-channel logout follows OIDC
Back-Channel Logout 1.0 §2.5-2.8.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time

from aiohttp import web

from gateway import keys, paths
from gateway.auth import authenticate
from gateway.crypto import OpenError, b64u_encode, constant_time_equal, random_token
from gateway.errors import (
    BadRequest,
    Forbidden,
    MethodNotAllowed,
    ProviderTransportError,
    TokenValidationError,
)
from gateway.pages import NO_STORE, Action, pages_of, redirect
from gateway.principal import Principal
from gateway.providers import unverified_issuer
from gateway.redirects import safe_redirect
from gateway.session import Session, Ticket
from gateway.store.base import per_provider

log = logging.getLogger("gateway.logout")
_LOGOUT_PURPOSE = b"gateway-logout-state"
SIGNED_OUT_PATH = paths.SIGNED_OUT
CLOCK_SKEW = 60.0  # between the provider's clock (a logout token's iat) and ours


def csrf_token(ticket: Ticket) -> str:
    """Bound to the session's own key: only a page that can read our HTML knows it."""
    return b64u_encode(hmac.new(ticket.key, b"gateway-sign-out", hashlib.sha256).digest())[:32]


def _target(request: web.Request, rd: str | None) -> str:
    settings = request.app[keys.SETTINGS]
    own, allowed = settings.server.public_url, settings.logout.allowed_redirects
    for candidate in (rd, settings.logout.post_logout_redirect):
        if candidate:
            ok = safe_redirect(candidate, own, allowed)
            if ok is not None:
                return ok
    return "/"


def _same_origin(request: web.Request) -> bool:
    """Origin / Sec-Fetch-Site say the POST came from our own pages (or a direct navigation)."""
    own = request.app[keys.SETTINGS].server.public_url.lower()
    origin = request.headers.get("Origin")
    if origin is not None and origin.lower() != own:
        return False
    site = request.headers.get("Sec-Fetch-Site")
    return site is None or site in ("same-origin", "none")


async def sign_out(request: web.Request) -> web.StreamResponse:
    cookies = request.app[keys.COOKIES]
    principal = await authenticate(request, None)
    if request.method in ("GET", "HEAD"):
        return _confirm_page(request, principal)
    if request.method != "POST":
        raise MethodNotAllowed(headers={"Allow": "GET, HEAD, POST"})
    try:
        form = await request.post()
    except ValueError:  # e.g. multipart without its boundary, or bytes that are not UTF-8
        raise BadRequest("The sign-out form was malformed.") from None
    rd = form.get("rd")
    target = _target(request, rd if isinstance(rd, str) else None)
    if principal is None or principal.ticket is None or principal.session is None:
        resp = redirect(target, 303)
        cookies.clear(resp, cookies.name)
        return resp
    token = form.get("csrf")
    if (
        not _same_origin(request)
        or not isinstance(token, str)
        or not constant_time_equal(token, csrf_token(principal.ticket))
    ):
        raise Forbidden("The sign-out request did not come from this site.")
    return await end_session(request, principal.ticket, principal.session, target)


async def end_session(
    request: web.Request, ticket: Ticket, session: Session, target: str
) -> web.StreamResponse:
    app = request.app
    sessions, cookies = app[keys.SESSIONS], app[keys.COOKIES]
    # The session's own provider revokes its tokens and ends its session there.
    own = app[keys.PROVIDERS].get(session.identity.provider)
    provider = own.client if own is not None else None
    tokens = session.tokens
    await sessions.destroy(ticket)
    meta = None
    if provider is not None:
        try:
            meta = await provider.metadata()
        except ProviderTransportError:
            meta = None
    if provider is not None and meta is not None:
        # RFC 7009 §2: revoking the refresh token ends the grant; the access token too.
        if tokens.refresh_token:
            await provider.revoke(tokens.refresh_token, "refresh_token")
        await provider.revoke(tokens.access_token, "access_token")
    log.info("sign-out", extra={"sub": session.identity.sub})
    app[keys.METRICS].logouts.labels(kind="sign_out").inc()
    state = random_token(24)
    payload = json.dumps({"state": state, "target": target, "at": time.time()}).encode()
    sealed = app[keys.RING].seal_text(payload, _LOGOUT_PURPOSE)
    settings = app[keys.SETTINGS]
    post_logout = settings.server.public_url + SIGNED_OUT_PATH
    url = None
    if provider is not None and meta is not None:
        hint = tokens.id_token if settings.logout.id_token_hint else None
        url = provider.end_session_url(meta, hint, post_logout, state)
    resp = redirect(url or f"{SIGNED_OUT_PATH}?state={state}", 303)
    cookies.clear(resp, cookies.name)
    cookies.set(resp, cookies.logout_name, sealed, 600)
    return resp


def _confirm_page(request: web.Request, principal: Principal | None) -> web.StreamResponse:
    settings = request.app[keys.SETTINGS]
    rd = request.query.get("rd", "")
    if safe_redirect(rd, settings.server.public_url, settings.logout.allowed_redirects) is None:
        rd = ""
    pages = pages_of(request)
    if principal is None or principal.ticket is None:
        return pages.render(
            "signed_out.html",
            "You are not signed in",
            message="There is no session to sign out of.",
            actions=[Action("/", "Continue", primary=True)],
        )
    identity = principal.identity
    who = identity.email or identity.sub
    sign_out = Action(
        paths.SIGN_OUT,
        "Sign out",
        primary=True,
        method="post",
        fields=(("csrf", csrf_token(principal.ticket)), ("rd", rd)),
    )
    # Cancel goes back where the user came from (rd, checked above), else home.
    cancel = Action(rd or "/", "Cancel")
    # Under the default no-referrer policy browsers send `Origin: null` with the form's POST
    # (Fetch §3.1 "serializing a request origin"), which _same_origin must refuse; same-origin
    # lets the real Origin through and still sends no referrer to other sites.
    return pages.render(
        "sign_out.html",
        "Sign out?",
        headers={"Referrer-Policy": "same-origin"},
        user=who,
        message="You will be signed out of this site on this device.",
        actions=[sign_out, cancel],
    )


async def signed_out(request: web.Request) -> web.StreamResponse:
    """Where the provider returns the browser after end_session (post_logout_redirect_uri).

    A GET any site can trigger, so it changes nothing: the session cookie was cleared by the
    sign-out POST that ended the session, and the sign-out state cookie is consumed only by
    the round trip that carries its state.
    """
    cookies = request.app[keys.COOKIES]
    name = cookies.logout_name
    target, matched = "/", False
    raw = request.cookies.get(name)
    state = request.query.get("state", "")
    if raw:
        try:
            data = json.loads(request.app[keys.RING].open_text(raw, _LOGOUT_PURPOSE))
            if state and constant_time_equal(str(data.get("state", "")), state):
                target, matched = str(data.get("target") or "/"), True
        except (OpenError, ValueError, AttributeError):
            pass
    resp = pages_of(request).render(
        "signed_out.html",
        "Signed out",
        message="You have been signed out.",
        actions=[Action(target, "Continue", primary=True)],
    )
    if matched:
        cookies.clear(resp, name)
    return resp


async def backchannel_logout(request: web.Request) -> web.StreamResponse:
    """OIDC Back-Channel Logout 1.0: end the sessions of a ``sid``, or of a ``sub``."""
    app = request.app
    store = app[keys.STORE]
    if request.method != "POST":
        # §2.5: the logout token arrives by POST only; never fall through to the proxy.
        raise MethodNotAllowed(headers={"Allow": "POST"})
    if request.content_type != "application/x-www-form-urlencoded":
        raise BadRequest("expected a form with logout_token")
    try:
        form = await request.post()
    except ValueError:  # bytes that are not UTF-8
        raise BadRequest("expected a form with logout_token") from None
    token = form.get("logout_token")
    if not isinstance(token, str) or not token:
        raise BadRequest("logout_token is required")
    # The token's iss, read unverified, only picks the provider whose keys and issuer
    # then validate it in full; an issuer no configured provider has is refused.
    provider = app[keys.PROVIDERS].by_issuer(unverified_issuer(token))
    if provider is None:
        log.info("back-channel logout token rejected: no provider has its issuer")
        raise BadRequest("invalid logout_token")
    try:
        await provider.client.metadata()
        claims = await provider.client.validator.validate_logout_token(token)
    except TokenValidationError as exc:
        log.info("back-channel logout token rejected: %s", exc.reason)
        raise BadRequest("invalid logout_token") from None
    # (The provider's keys could not be loaded: ProviderTransportError, a 503, so the
    # provider retries, §2.8.)
    # Safe to retry (§2.8: a provider retries after an error): the sessions are ended first,
    # and the jti is recorded as used only once they are. A store failure anywhere is a 503
    # that leaves nothing recorded, so the provider's retry does the whole step again.
    # Ending is idempotent: a logout token ends only sessions that began before it was
    # issued (iat, give or take the usual clock skew), so processing it again, even as a
    # replay, never ends a session started later.
    # Only that provider's sessions: a sub or sid is unique per issuer only.
    pid = provider.id
    metas = await (
        store.keys_for_sid(claims.sid, pid)
        if claims.sid
        else store.keys_for_user(claims.sub or "", pid)
    )
    metas = [
        m for m in metas
        if m.provider == pid
        and (not claims.sid or not claims.sub or m.sub == claims.sub)
        and m.created_at <= claims.iat + CLOCK_SKEW
    ]  # fmt: skip
    for meta in metas:
        await store.delete(meta.key)
    ttl = max(300.0, claims.exp - time.time() + 120)
    # The jti is unique per issuer: another provider's token may reuse it.
    first = await store.claim_once("jti:" + per_provider(pid, claims.jti), ttl)
    if not first:
        raise BadRequest("logout_token replayed")
    log.info("back-channel logout ended %d session(s)", len(metas))
    app[keys.METRICS].logouts.labels(kind="backchannel").inc(len(metas))
    return web.json_response({"ended": len(metas)}, headers=NO_STORE)

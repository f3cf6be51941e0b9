"""Completing a sign-in at the redirect_uri: ``complete_login(request)``.

The checks run in order: the login-state cookie bound to ``state`` (single-use), the RFC
9207 ``iss`` parameter, a provider ``error``, then the code is exchanged with the verifier
and the ID token validated with the nonce. Only then is anything written to the store.
``login.callback`` is the thin handler over this; failures are exceptions the error
middleware answers (``LoginFlowError`` 400, ``ProviderDenied``, 503 for store/provider).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass

from aiohttp import web
from multidict import MultiMapping

from gateway import keys
from gateway.auth import open_session
from gateway.crypto import OpenError, sha256_b64u
from gateway.errors import LoginFlowError, OAuthError, ProviderDenied, TokenValidationError
from gateway.flow import LoginState, flow_cookie, slot_for
from gateway.oidc.metadata import ProviderMetadata
from gateway.providers import Provider
from gateway.session import Identity, Ticket, Tokens
from gateway.sessions import identity_from, tokens_from

log = logging.getLogger("gateway.login")
_STATE_RE = re.compile(r"^[A-Za-z0-9_-]{20,128}$")
_MAX_PARAM = 4096
_OAUTH_ERROR_RE = re.compile(r"^[\x20-\x21\x23-\x5B\x5D-\x7E]{1,64}$")  # RFC 6749 §4.1.2.1


@dataclass(frozen=True, slots=True)
class Completed:
    """A finished sign-in: the new session's ticket, where to go, the flow cookie to clear."""

    ticket: Ticket
    return_to: str
    flow_cookie: str


async def complete_login(request: web.Request) -> Completed:
    """Check the authorization response, exchange the code, and start the session."""
    app = request.app
    state, cookie_name, flow = _flow(request)
    providers = app[keys.PROVIDERS]
    chosen = providers.get(flow.provider)
    if chosen is None:  # removed from the config since this sign-in began
        raise LoginFlowError("This sign-in can no longer be completed. Please start again.")
    meta = await chosen.client.metadata()
    code = _authorization_code(request.query, meta, strict_iss=len(providers) > 1)
    # Single use across every replica: the first callback with this state claims it.
    settings = app[keys.SETTINGS]
    if not await app[keys.STORE].claim_once(
        "state:" + sha256_b64u(state), settings.session.login_timeout
    ):
        raise LoginFlowError("This sign-in response was already used. Please start again.")
    identity, tokens, sid = await _exchange(chosen, meta, code, flow)
    sessions = app[keys.SESSIONS]
    previous = await open_session(request)
    ticket, _ = await sessions.create(identity, tokens, sid)
    if previous is not None:
        await sessions.destroy(previous.ticket)
    log.info("login", extra={"sub": identity.sub, "provider": chosen.id})
    return Completed(ticket, flow.return_to or "/", cookie_name)


def _flow(request: web.Request) -> tuple[str, str, LoginState]:
    """The response's state, its login-state cookie's name, and the flow that cookie holds."""
    app = request.app
    settings, cookies = app[keys.SETTINGS], app[keys.COOKIES]
    q = request.query
    if any(len(v) > _MAX_PARAM for v in q.values()) or any(len(q.getall(k)) > 1 for k in q):
        raise LoginFlowError("The sign-in response was malformed.")
    state = q.get("state", "")
    if not _STATE_RE.match(state):
        raise LoginFlowError("The sign-in response has no valid state. Please start again.")
    cookie_name = flow_cookie(
        cookies.login_prefix, slot_for(state, settings.session.max_login_flows)
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
    return state, cookie_name, flow


def _authorization_code(
    q: MultiMapping[str], meta: ProviderMetadata, *, strict_iss: bool = False
) -> str:
    """The code of an authorization response that names the chosen provider's issuer and
    is no error.

    RFC 9207 §2.4: the iss parameter must name the issuer when present, and be present when
    the provider says it sends it. An error response accepts nothing, so one without iss is
    still shown as the provider's error (the missing iss is logged); one naming another
    issuer is refused as such (a mix-up attempt, RFC 9700 §4.4: the code is never redeemed).
    ``strict_iss`` (several providers): a missing iss is refused for errors too.
    """
    iss = q.get("iss")
    if iss is not None and iss != meta.issuer:
        log.warning("sign-in response names another issuer than the chosen provider's")
        raise LoginFlowError("The sign-in response came from an unexpected issuer.")
    if strict_iss and iss is None and meta.iss_parameter_supported:
        raise LoginFlowError("The sign-in response did not name its issuer.")
    error = q.get("error")
    if error is not None:
        err = error if _OAUTH_ERROR_RE.match(error) else "invalid_response"
        if iss is None and meta.iss_parameter_supported:
            log.warning(
                "the provider's error response did not name its issuer (RFC 9207)",
                extra={"error": err},
            )
        raise ProviderDenied(err, q.get("error_description"))
    if iss is None and meta.iss_parameter_supported:
        raise LoginFlowError("The sign-in response did not name its issuer.")
    code = q.get("code")
    if not code:
        raise LoginFlowError("The sign-in response has no authorization code.")
    return code


async def _exchange(
    chosen: Provider, meta: ProviderMetadata, code: str, flow: LoginState
) -> tuple[Identity, Tokens, str | None]:
    """Exchange the code at the chosen provider only; the identity (ID token + userinfo,
    validated against that provider), tokens and provider sid."""
    provider = chosen.client
    try:
        token_resp = await provider.exchange_code(code, flow.verifier)
    except OAuthError as exc:
        log.info("code exchange refused: %s", exc.error)
        raise LoginFlowError() from None
    id_claims: Mapping[str, object] = {}
    if token_resp.id_token:
        try:
            id_claims = await provider.validator.validate_id_token(
                token_resp.id_token, nonce=flow.nonce
            )
        except TokenValidationError as exc:
            log.warning("ID token rejected at login: %s", exc.reason)
            raise LoginFlowError() from None
    elif "openid" in provider.scopes(meta):
        log.warning("the provider returned no ID token for an openid request")
        raise LoginFlowError()
    userinfo = await provider.userinfo(token_resp.access_token)
    identity = identity_from(dict(id_claims), userinfo, chosen.id, meta.issuer)
    if not identity.sub:
        raise LoginFlowError("The provider did not say who you are.")
    sid = id_claims.get("sid")
    return identity, tokens_from(token_resp, time.time()), sid if isinstance(sid, str) else None

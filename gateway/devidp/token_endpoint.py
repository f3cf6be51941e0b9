"""``POST /token``: the authorization-code grant with PKCE and the refresh-token grant.

Codes are single-use; a replayed code revokes what it produced (RFC 6749 §4.1.2).
Rotated refresh tokens are single-use; reuse revokes the family (RFC 9700 §4.14.2).
The token fault switches are applied here, after the call is counted.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
from typing import Any

from aiohttp import web

from .config import ClientRegistration
from .keys import b64url
from .oauth import NO_STORE, authenticate_client, error_answer, json_answer, read_form
from .records import Grant, OAuthError
from .state import STATE_KEY, IdpState
from .tokens import encode_id_token, id_token_claims

# RFC 7636 §4.1: 43-128 characters from the unreserved set.
VERIFIER = re.compile(r"[A-Za-z0-9._~-]{43,128}")


async def token(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    try:
        form = await read_form(request)
    except OAuthError as err:
        return error_answer(err)
    grant_type = form.get("grant_type", "")
    state.token_calls[grant_type] += 1
    injected = await _injected_fault(state, grant_type)
    if injected is not None:
        return injected
    hold = state.faults.refresh_hold if grant_type == "refresh_token" else None
    try:
        client = authenticate_client(state, request.headers, form)
        if grant_type == "authorization_code":
            body = exchange_code(state, client, form)
        elif grant_type == "refresh_token":
            body = refresh(state, client, form)
        else:
            raise OAuthError("unsupported_grant_type", "use authorization_code or refresh_token")
    except OAuthError as err:
        return error_answer(err)
    if hold is not None:
        await hold.wait()
    return json_answer(body)


async def _injected_fault(state: IdpState, grant_type: str) -> web.Response | None:
    """``token_delay`` always; ``token_status``/``token_error`` for ``token_error_grant``."""
    faults = state.faults
    if faults.token_delay > 0:
        await asyncio.sleep(faults.token_delay)
    if faults.token_error_grant not in (None, grant_type):
        return None
    if faults.token_status is not None:
        return web.Response(status=faults.token_status, text="injected failure", headers=NO_STORE)
    if faults.token_error is not None:
        status = {"server_error": 500, "invalid_client": 401}.get(faults.token_error, 400)
        return error_answer(OAuthError(faults.token_error, "injected failure", status))
    return None


def _pkce_ok(verifier: str, challenge: str) -> bool:
    """RFC 7636 §4.6: BASE64URL(SHA256(verifier)) == challenge."""
    if not VERIFIER.fullmatch(verifier):
        return False
    computed = b64url(hashlib.sha256(verifier.encode("ascii")).digest())
    return hmac.compare_digest(computed, challenge)


def exchange_code(
    state: IdpState, client: ClientRegistration, form: dict[str, str]
) -> dict[str, Any]:
    record = state.codes.get(form.get("code", ""))
    if record is None:
        raise OAuthError("invalid_grant", "unknown authorization code")
    if record.used:
        state.revoke_grant(record.grant_id)
        raise OAuthError("invalid_grant", "authorization code already used")
    record.used = True
    if record.client_id != client.client_id:
        raise OAuthError("invalid_grant", "code was issued to another client")
    if record.expires <= state.now():
        raise OAuthError("invalid_grant", "authorization code expired")
    if form.get("redirect_uri") != record.redirect_uri:
        raise OAuthError("invalid_grant", "redirect_uri does not match the authorization request")
    if not _pkce_ok(form.get("code_verifier", ""), record.code_challenge):
        raise OAuthError("invalid_grant", "PKCE verification failed")
    grant = state.grants[record.grant_id]
    session = state.session_by_sid(grant.sid)
    if session is not None:
        session.clients.add(client.client_id)
    return issue_tokens(state, grant, grant.scope, nonce=record.nonce, code_grant=True)


def refresh(state: IdpState, client: ClientRegistration, form: dict[str, str]) -> dict[str, Any]:
    record = state.refresh_tokens.get(form.get("refresh_token", ""))
    if record is None:
        raise OAuthError("invalid_grant", "unknown refresh token")
    grant = state.grants[record.grant_id]
    if grant.client_id != client.client_id:
        raise OAuthError("invalid_grant", "refresh token was issued to another client")
    if record.rotated:
        state.revoke_grant(grant.id)
        raise OAuthError("invalid_grant", "refresh token was already used")
    if record.revoked or grant.revoked:
        raise OAuthError("invalid_grant", "refresh token revoked")
    if record.expires <= state.now():
        raise OAuthError("invalid_grant", "refresh token expired")
    scope = grant.scope
    if "scope" in form:
        requested = tuple(form["scope"].split())
        if not requested or not set(requested) <= set(grant.scope):
            raise OAuthError("invalid_scope", "scope exceeds the original grant")
        scope = tuple(s for s in grant.scope if s in requested)
    rotate = state.cfg.rotate_refresh_tokens and not state.faults.no_refresh_token
    if rotate:
        record.rotated = True
    return issue_tokens(state, grant, scope, nonce=None, code_grant=False, new_refresh=rotate)


def issue_tokens(
    state: IdpState,
    grant: Grant,
    scope: tuple[str, ...],
    *,
    nonce: str | None,
    code_grant: bool,
    new_refresh: bool = True,
) -> dict[str, Any]:
    """The token response (RFC 6749 §5.1, OIDC Core §3.1.3.3) from the user's current data."""
    user = state.users.get(grant.sub)
    if user is None:
        raise OAuthError("invalid_grant", "the user no longer exists")
    cfg = state.cfg
    access = state.issue_access_token(
        grant.sub, grant.client_id, scope, cfg.access_token_ttl, grant_id=grant.id
    )
    body: dict[str, Any] = {
        "access_token": access,
        "token_type": "Bearer",
        "expires_in": cfg.access_token_ttl,
        "scope": " ".join(scope),
    }
    if "openid" in scope:
        now = state.now()
        claims = id_token_claims(
            issuer=state.issuer,
            user=user,
            client_id=grant.client_id,
            now=now,
            ttl=cfg.id_token_ttl,
            auth_time=grant.auth_time,
            sid=grant.sid,
            nonce=nonce,
            access_token=access,
        )
        body["id_token"] = encode_id_token(
            state.keys, state.faults, claims, now=now, code_grant=code_grant
        )
    if new_refresh and not state.faults.no_refresh_token:
        body["refresh_token"] = state.issue_refresh_token(grant)
        body["refresh_expires_in"] = cfg.refresh_token_ttl
    return body

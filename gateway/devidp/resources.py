"""Metadata and token-consuming endpoints: discovery (OIDC Discovery 1.0 §3), JWKS,
userinfo (OIDC Core §5.3), revocation (RFC 7009) and introspection (RFC 7662).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from . import pages
from .config import AUTH_METHODS, KNOWN_SCOPES
from .oauth import authenticate_client, error_answer, json_answer, read_form
from .records import AccessRecord, OAuthError
from .state import STATE_KEY, IdpState
from .tokens import scoped_claims, user_claims

CLAIMS = (
    "sub", "iss", "aud", "exp", "iat", "auth_time", "nonce", "sid", "azp", "at_hash",
    "email", "email_verified", "name", "preferred_username", "groups",
)  # fmt: skip


async def discovery(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    base = state.issuer
    metadata: dict[str, Any] = {
        "issuer": base,
        "authorization_endpoint": f"{base}/authorize",
        "token_endpoint": f"{base}/token",
        "userinfo_endpoint": f"{base}/userinfo",
        "jwks_uri": f"{base}/jwks",
        "revocation_endpoint": f"{base}/revoke",
        "introspection_endpoint": f"{base}/introspect",
        "end_session_endpoint": f"{base}/end_session",
        "response_types_supported": ["code"],
        "response_modes_supported": ["query"],
        "grant_types_supported": ["authorization_code", "refresh_token"],
        "code_challenge_methods_supported": ["S256"],
        "id_token_signing_alg_values_supported": [state.cfg.signing_alg],
        "token_endpoint_auth_methods_supported": list(AUTH_METHODS),
        "revocation_endpoint_auth_methods_supported": list(AUTH_METHODS),
        "introspection_endpoint_auth_methods_supported": list(AUTH_METHODS),
        "scopes_supported": list(KNOWN_SCOPES),
        "claims_supported": list(CLAIMS),
        "subject_types_supported": ["public"],
        "prompt_values_supported": ["none", "login", "consent"],
        "authorization_response_iss_parameter_supported": True,
        "backchannel_logout_supported": True,
        "backchannel_logout_session_supported": True,
    }
    return web.json_response(metadata)


async def index(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    return pages.index_page(state.issuer, state.users.values())


async def jwks(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    state.jwks_calls += 1
    return web.json_response(state.keys.jwks())


def _invalid_token(description: str) -> web.Response:
    resp = json_answer({"error": "invalid_token", "error_description": description}, 401)
    resp.headers["WWW-Authenticate"] = 'Bearer error="invalid_token"'
    return resp


async def userinfo(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    state.userinfo_calls += 1
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    presented = value.strip() if scheme.lower() == "bearer" else ""
    if not presented and "Authorization" not in request.headers and request.method == "POST":
        # RFC 6750 §2.2: the form-encoded body parameter
        posted = (await request.post()).get("access_token")
        presented = posted if isinstance(posted, str) else ""
    record = state.active_access_token(presented) if presented else None
    user = state.users.get(record.sub) if record else None
    if record is None or user is None:
        return _invalid_token("the access token is not valid")
    if "openid" not in record.scope:
        resp = json_answer({"error": "insufficient_scope"}, 403)
        resp.headers["WWW-Authenticate"] = 'Bearer error="insufficient_scope", scope="openid"'
        return resp
    return json_answer(scoped_claims(user, record.scope))


async def revoke(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    try:
        form = await read_form(request)
        client = authenticate_client(state, request.headers, form)
        if not form.get("token"):
            raise OAuthError("invalid_request", "token is required")
    except OAuthError as err:
        return error_answer(err)
    # RFC 7009 §2.2: 200 whether or not the token was known.
    state.revoke_token(form["token"], client.client_id)
    return web.Response(status=200, headers={"Cache-Control": "no-store"})


async def introspect(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    state.introspect_calls += 1
    try:
        form = await read_form(request)
        client = authenticate_client(state, request.headers, form)
        if not form.get("token"):
            raise OAuthError("invalid_request", "token is required")
    except OAuthError as err:
        return error_answer(err)
    token = form["token"]
    record = state.active_access_token(token)
    if record is not None:
        return json_answer(_describe(state, record, "Bearer"))
    refresh = _active_refresh(state, token, client.client_id)
    if refresh is not None:
        return json_answer(_describe(state, refresh, "refresh_token"))
    return json_answer({"active": False})


def _active_refresh(state: IdpState, token: str, client_id: str) -> AccessRecord | None:
    """A live refresh token of this client, shaped like an access record."""
    found = state.refresh_tokens.get(token)
    if found is None or found.rotated or found.revoked or found.expires <= state.now():
        return None
    grant = state.grants[found.grant_id]
    if grant.revoked or grant.client_id != client_id:
        return None
    iat = found.expires - state.cfg.refresh_token_ttl
    return AccessRecord("", grant.sub, client_id, grant.scope, iat, found.expires, grant.id)


def _describe(state: IdpState, record: AccessRecord, token_type: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "active": True,
        "scope": " ".join(record.scope),
        "client_id": record.client_id,
        "sub": record.sub,
        "exp": record.exp,
        "iat": record.iat,
        "iss": state.issuer,
        "aud": record.client_id,
        "token_type": token_type,
    }
    if record.jti:
        body["jti"] = record.jti
    user = state.users.get(record.sub)
    if user is not None:
        claims = user_claims(user)
        body["email"] = claims["email"]
        body["email_verified"] = claims["email_verified"]
        body["groups"] = claims["groups"]
    for name, value in state.faults.introspection_answer.items():
        if value is None:
            body.pop(name, None)
        else:
            body[name] = value
    return body

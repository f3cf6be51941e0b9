"""``private_key_jwt`` client authentication (RFC 7523 §3, OIDC Core §9) for the provider.

A client registered with ``token_endpoint_auth_method="private_key_jwt"`` and an inline JWK
Set (``ClientRegistration.jwks``) authenticates with a JWT it signed: the signature must
verify with a registered key (found by ``kid``), ``iss`` and ``sub`` must be the client_id,
``aud`` the issuer (or, as RFC 7523 §3 and RFC 9126 §2 allow, the token endpoint URL or
that of the endpoint called), ``exp`` must lie ahead (and not too far), and a ``jti`` is accepted once. Every
accepted assertion is recorded (``state.client_assertions``) so tests can read what a
client sent.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import jwt
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from .config import ClientRegistration
from .records import OAuthError
from .state import IdpState

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ALGS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256")
MAX_LIFETIME = 300  # an assertion valid for longer than this is refused
# Endpoints whose URL is also an acceptable ``aud`` (RFC 7523 §3: the token endpoint; RFC
# 9126 §2: the PAR endpoint; like oidc-provider, the endpoint called, too).
_ENDPOINTS = ("token", "par", "revoke", "introspect")


def _refuse(description: str) -> OAuthError:
    return OAuthError("invalid_client", description, 401)


def _public_key(jwk: Mapping[str, Any]) -> Any:
    text = json.dumps(dict(jwk))
    if jwk.get("kty") == "RSA":
        return RSAAlgorithm.from_jwk(text)
    if jwk.get("kty") == "EC":
        return ECAlgorithm.from_jwk(text)
    raise _refuse("unsupported registered key type")


def authenticate(state: IdpState, form: Mapping[str, str]) -> ClientRegistration:
    """The client whose assertion this form carries; ``invalid_client`` (401) otherwise."""
    if form.get("client_assertion_type") != ASSERTION_TYPE:
        raise _refuse("unsupported client_assertion_type")
    token = form.get("client_assertion", "")
    try:
        header = jwt.get_unverified_header(token)
        unverified = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        raise _refuse("malformed client_assertion") from None
    client_id = unverified.get("iss")
    client = state.clients.get(client_id) if isinstance(client_id, str) else None
    if client is None or client.token_endpoint_auth_method != "private_key_jwt":
        raise _refuse("client authentication failed")
    if form.get("client_id", client.client_id) != client.client_id:
        raise _refuse("client_id mismatch")
    alg = header.get("alg")
    if alg not in ALGS:
        raise _refuse("unsupported client assertion alg")
    keys = [
        k
        for k in (client.jwks or {}).get("keys", [])
        if k.get("kid") == header.get("kid") and k.get("alg", alg) == alg
    ]
    if not keys:
        raise _refuse("no registered key matches the client assertion's kid")
    issuer = state.issuer
    try:
        claims = jwt.decode(
            token,
            _public_key(keys[0]),
            algorithms=[alg],
            audience=[issuer, *(f"{issuer}/{path}" for path in _ENDPOINTS)],
            issuer=client.client_id,
            # The provider's own (injectable) clock judges exp, below.
            options={"require": ["exp", "jti", "sub"], "verify_exp": False, "verify_iat": False},
        )
    except jwt.PyJWTError as exc:
        raise _refuse(f"client assertion rejected: {type(exc).__name__}") from None
    now = state.now()
    exp = claims["exp"]
    if not isinstance(exp, int) or exp <= now or exp > now + MAX_LIFETIME:
        raise _refuse("client assertion expired or valid for too long")
    if claims["sub"] != client.client_id:
        raise _refuse("sub must be the client_id")
    jti = claims["jti"]
    seen = state.client_assertion_jtis
    for old in [j for j, until in seen.items() if until <= now]:
        del seen[old]
    if not isinstance(jti, str) or not jti or jti in seen:
        raise _refuse("client assertion jti was already used")
    seen[jti] = exp
    state.client_assertions.append({"header": dict(header), "claims": dict(claims)})
    return client

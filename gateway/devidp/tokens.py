"""Claims of the tokens the provider issues, and the ID-token fault switches.

ID tokens follow OIDC Core §2 and §3.1.3.6, access tokens RFC 9068 (``typ: at+jwt``),
logout tokens OIDC Back-Channel Logout 1.0 §2.4 (``typ: logout+jwt``).
"""

from __future__ import annotations

import hashlib
from typing import Any

from .config import DemoUser, Faults
from .keys import KeyRing, b64url, corrupt_signature, hs256_with, unsigned

BACKCHANNEL_EVENT = "http://schemas.openid.net/event/backchannel-logout"
LOGOUT_TOKEN_TTL = 120


def user_claims(user: DemoUser) -> dict[str, Any]:
    """Identity claims of a user as they are now (so a refresh sees changed groups)."""
    return {
        "email": user.email,
        "email_verified": user.email_verified,
        "name": user.name,
        "preferred_username": user.preferred_username or user.username,
        "groups": list(user.groups),
    }


def scoped_claims(user: DemoUser, scope: tuple[str, ...]) -> dict[str, Any]:
    """Userinfo claims released for ``scope`` (OIDC Core §5.4); ``groups`` with profile/groups."""
    claims: dict[str, Any] = {"sub": user.sub}
    everything = user_claims(user)
    if "email" in scope:
        claims["email"] = everything["email"]
        claims["email_verified"] = everything["email_verified"]
    if "profile" in scope:
        claims["name"] = everything["name"]
        claims["preferred_username"] = everything["preferred_username"]
    if "profile" in scope or "groups" in scope:
        claims["groups"] = everything["groups"]
    return claims


def at_hash(access_token: str) -> str:
    """Left half of SHA-256 of the access token (OIDC Core §3.1.3.6; RS256 and ES256 alike)."""
    return b64url(hashlib.sha256(access_token.encode("ascii")).digest()[:16])


def id_token_claims(
    *,
    issuer: str,
    user: DemoUser,
    client_id: str,
    now: int,
    ttl: int,
    auth_time: int,
    sid: str,
    nonce: str | None,
    access_token: str | None,
) -> dict[str, Any]:
    claims: dict[str, Any] = {
        "iss": issuer,
        "sub": user.sub,
        "aud": client_id,
        "azp": client_id,
        "exp": now + ttl,
        "iat": now,
        "auth_time": auth_time,
        "sid": sid,
        **user_claims(user),
    }
    if nonce is not None:
        claims["nonce"] = nonce
    if access_token is not None:
        claims["at_hash"] = at_hash(access_token)
    return claims


def encode_id_token(
    keys: KeyRing, faults: Faults, claims: dict[str, Any], *, now: int, code_grant: bool
) -> str:
    """Sign an ID token, bending it as the fault switches say.

    The nonce switches act on ID tokens of the authorization-code grant only: refreshed
    ID tokens carry no nonce (OIDC Core §12.2).
    """
    claims = dict(claims)
    if faults.id_token_iss is not None:
        claims["iss"] = faults.id_token_iss
    if faults.id_token_aud is not None:
        claims["aud"] = list(faults.id_token_aud)
    if faults.id_token_azp is not None:
        claims["azp"] = faults.id_token_azp
    if code_grant and faults.omit_nonce:
        claims.pop("nonce", None)
    elif code_grant and faults.id_token_nonce is not None:
        claims["nonce"] = faults.id_token_nonce
    if faults.id_token_exp_offset is not None:
        claims["exp"] = now + faults.id_token_exp_offset
    if faults.id_token_iat_offset is not None:
        claims["iat"] = now + faults.id_token_iat_offset
    headers: dict[str, Any] = {"kid": keys.current.kid, "typ": "JWT"}
    if faults.alg_none:
        return unsigned(claims, headers)
    if faults.hs256_with_public_key:
        return hs256_with(keys.current.public_pem(), claims, headers)
    token = keys.sign(claims, key="unpublished" if faults.unknown_kid else "current")
    return corrupt_signature(token) if faults.bad_signature else token


def access_token_claims(
    *,
    issuer: str,
    user: DemoUser | None,
    sub: str,
    client_id: str,
    scope: tuple[str, ...],
    now: int,
    ttl: int,
    jti: str,
) -> dict[str, Any]:
    """RFC 9068 §2.2 claims plus the user's email (and whether it is verified) and groups."""
    claims: dict[str, Any] = {
        "iss": issuer,
        "sub": sub,
        "aud": client_id,
        "client_id": client_id,
        "scope": " ".join(scope),
        "exp": now + ttl,
        "iat": now,
        "jti": jti,
    }
    if user is not None:
        claims["email"] = user.email
        claims["email_verified"] = user.email_verified
        claims["groups"] = list(user.groups)
    return claims


def logout_token_claims(
    *, issuer: str, client_id: str, sub: str, sid: str, now: int, jti: str
) -> dict[str, Any]:
    """A logout token (Back-Channel Logout 1.0 §2.4): never a nonce."""
    return {
        "iss": issuer,
        "aud": client_id,
        "iat": now,
        "exp": now + LOGOUT_TOKEN_TTL,
        "jti": jti,
        "sub": sub,
        "sid": sid,
        "events": {BACKCHANNEL_EVENT: {}},
    }

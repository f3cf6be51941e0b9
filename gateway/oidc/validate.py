"""JWT validation: ID tokens (OIDC Core §3.1.3.7), logout tokens (Back-Channel Logout §2.6),
and API clients' JWT access tokens (RFC 9068).

Every failure raises ``TokenValidationError`` with a reason that is safe to log (never the
token). Only asymmetric algorithms the provider advertises are accepted: ``none`` and HS*
(which could be signed with the public key) never are.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jwt

from gateway.crypto import constant_time_equal
from gateway.errors import TokenValidationError
from gateway.oidc.jwks import JwksCache
from gateway.oidc.metadata import ASYMMETRIC_ALGS

LEEWAY = 60.0
MAX_IAT_AGE = 3600.0
LOGOUT_EVENT = "http://schemas.openid.net/event/backchannel-logout"


@dataclass(frozen=True, slots=True)
class LogoutClaims:
    sub: str | None
    sid: str | None
    jti: str
    exp: float
    iat: float


class IdTokenValidator:
    def __init__(
        self,
        jwks: JwksCache,
        client_id: str,
        issuer: Callable[[], str],
        algorithms: Callable[[], tuple[str, ...]],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._jwks = jwks
        self._client_id = client_id
        self._issuer = issuer
        self._algs = algorithms
        self._clock = clock

    async def _verify(
        self,
        token: str,
        audience: list[str] | None,
        required: list[str],
        max_iat_age: float | None = MAX_IAT_AGE,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        if not isinstance(token, str) or len(token) > 16384 or token.count(".") != 2:
            raise TokenValidationError("not a compact JWS")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise TokenValidationError("unreadable JWT header") from None
        alg = header.get("alg")
        if alg not in ASYMMETRIC_ALGS or alg not in self._algs():
            raise TokenValidationError("signing algorithm not accepted")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise TokenValidationError("bad kid")
        key = await self._jwks.key_for(kid, alg)
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key.key,
                algorithms=[alg],
                audience=audience,
                issuer=self._issuer(),
                leeway=LEEWAY,
                options={
                    "require": required,
                    "verify_aud": audience is not None,
                    "verify_iat": True,
                },
            )
        except jwt.ExpiredSignatureError:
            raise TokenValidationError("expired") from None
        except jwt.InvalidAudienceError:
            raise TokenValidationError("wrong audience") from None
        except jwt.InvalidIssuerError:
            raise TokenValidationError("wrong issuer") from None
        except jwt.InvalidSignatureError:
            raise TokenValidationError("bad signature") from None
        except jwt.MissingRequiredClaimError as exc:
            raise TokenValidationError(f"missing claim {exc.claim}") from None
        except jwt.PyJWTError as exc:
            raise TokenValidationError(type(exc).__name__) from None
        iat = claims.get("iat")
        if iat is not None:
            if not isinstance(iat, int | float):
                raise TokenValidationError("bad iat")
            now = self._clock()
            if iat > now + LEEWAY or (max_iat_age is not None and iat < now - max_iat_age):
                raise TokenValidationError("iat too far from now")
        return header, claims

    async def validate_id_token(
        self, token: str, *, nonce: str | None, expect_sub: str | None = None
    ) -> dict[str, Any]:
        """Validate an ID token from the token endpoint; ``nonce`` is required at login."""
        _, claims = await self._verify(
            token, [self._client_id], ["iss", "sub", "aud", "exp", "iat"]
        )
        aud = claims["aud"]
        auds = [aud] if isinstance(aud, str) else list(aud)
        # OIDC Core §3.1.3.7 (3): reject audiences we do not trust; azp must name us.
        if any(a != self._client_id for a in auds):
            raise TokenValidationError("untrusted extra audience")
        azp = claims.get("azp")
        if azp is not None and azp != self._client_id:
            raise TokenValidationError("azp is not this client")
        if not isinstance(claims.get("sub"), str) or not claims["sub"]:
            raise TokenValidationError("bad sub")
        if nonce is not None:
            got = claims.get("nonce")
            if not isinstance(got, str) or not constant_time_equal(got, nonce):
                raise TokenValidationError("nonce mismatch")
        if expect_sub is not None and claims["sub"] != expect_sub:
            # OIDC Core §12.2: a refreshed ID token names the same subject.
            raise TokenValidationError("sub changed on refresh")
        return claims

    async def validate_logout_token(self, token: str) -> LogoutClaims:
        """OIDC Back-Channel Logout 1.0 §2.6."""
        header, claims = await self._verify(
            token, [self._client_id], ["iss", "aud", "iat", "exp", "jti"]
        )
        typ = header.get("typ")
        if typ is not None and str(typ).lower() not in (
            "logout+jwt",
            "application/logout+jwt",
            "jwt",
        ):
            raise TokenValidationError("wrong typ for a logout token")
        events = claims.get("events")
        if not isinstance(events, dict) or not isinstance(events.get(LOGOUT_EVENT), dict):
            raise TokenValidationError("no back-channel logout event")
        if "nonce" in claims:
            raise TokenValidationError("a logout token must not carry a nonce")
        sub, sid = claims.get("sub"), claims.get("sid")
        if (sub is not None and not isinstance(sub, str)) or (
            sid is not None and not isinstance(sid, str)
        ):
            raise TokenValidationError("bad sub or sid")
        if not sub and not sid:
            raise TokenValidationError("neither sub nor sid")
        jti = claims["jti"]
        if not isinstance(jti, str) or not jti or len(jti) > 256:
            raise TokenValidationError("bad jti")
        return LogoutClaims(
            sub=sub or None, sid=sid or None, jti=jti, exp=float(claims["exp"]),
            iat=float(claims["iat"]),
        )  # fmt: skip

    async def validate_access_token(self, token: str, audiences: list[str]) -> dict[str, Any]:
        """An API client's own JWT access token (RFC 9068 §4): iss, aud, exp, nbf, allowlisted alg."""
        # No iat age limit: an access token lives until its exp, however long ago it was issued.
        header, claims = await self._verify(
            token, audiences, ["iss", "sub", "aud", "exp"], max_iat_age=None
        )
        typ = str(header.get("typ", "")).lower()
        if typ in ("logout+jwt", "application/logout+jwt"):
            raise TokenValidationError("not an access token")
        if "nonce" in claims and "scope" not in claims and "scp" not in claims:
            raise TokenValidationError("an ID token is not an access token")
        return claims

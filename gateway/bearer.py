"""Bearer clients: API callers that present their own access token on ``accept_bearer`` routes.

Owns reading ``Authorization: Bearer`` (RFC 6750 §2.1), validating a JWT access token
against the provider's JWKS (RFC 9068 §4) or an opaque one by introspection (RFC 7662),
the introspection caches and their rate limit, turning the token's claims into an
``Identity`` and scopes, and the route policy check for such a caller. Nothing here
creates a session or writes to the session store: every request stands on its own token.

Failures are RFC 6750 §3 answers: ``invalid_token`` (401) for any token we do not accept,
``invalid_request`` (400) for a malformed ``Authorization``, ``insufficient_scope`` (403)
when the route needs scopes the token lacks. The reason a token was refused is logged,
never the token.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import jwt
from multidict import MultiMapping

from gateway.config import ProviderSettings
from gateway.errors import (
    BadRequest,
    Forbidden,
    GatewayError,
    ProviderTransportError,
    TokenValidationError,
    Unauthenticated,
)
from gateway.oidc import ProviderClient
from gateway.policy import Route, check_requirements
from gateway.session import Identity

log = logging.getLogger("gateway.bearer")

MAX_TOKEN_LENGTH = 16384
CACHE_TTL = 60.0  # an active introspection answer is reused at most this long
NEGATIVE_TTL = 5.0  # a refusal is remembered briefly, so a flood of bad tokens stays cheap
CACHE_ENTRIES = 10_000  # active answers; refusals have a bounded cache of their own
REFUSED_ENTRIES = 10_000
LEEWAY = 60.0

# RFC 6750 §2.1: b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
# A compact JWS (RFC 7515 §7.1): three base64url parts; an empty signature (alg none)
# still counts, so such a token is refused as a JWT rather than sent to introspection.
_COMPACT_JWS = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
# Header ``typ`` values an access token may carry (RFC 9068 §2.1 says at+jwt; many
# providers still send JWT). Anything else, e.g. logout+jwt, is another kind of token.
_ACCESS_TYP = frozenset({"", "jwt", "at+jwt", "application/at+jwt"})
# Claims only ID tokens (OIDC Core §2, §3.1.3.6) or logout / security event tokens
# (Back-Channel Logout §2.4, RFC 8417) carry: such a token is never an access token.
_NOT_ACCESS_CLAIMS = ("nonce", "at_hash", "c_hash", "s_hash", "events")
# Keycloak-style ``typ`` claim: only "Bearer" names an access token.
_ACCESS_TYP_CLAIM = frozenset({"bearer", "at+jwt"})
# ``token_type`` (RFC 7662 §2.2) and Keycloak-style ``typ`` values of an introspection
# answer that name an access token; an answer with neither member is taken as one. Any other
# value (refresh_token, Refresh, Offline, ID, Logout...) is another kind of token.
_ACCESS_TOKEN_TYPES = frozenset(
    {"bearer", "access_token", "urn:ietf:params:oauth:token-type:access_token", "at+jwt",
     "application/at+jwt"}
)  # fmt: skip
# What is protocol, not identity: never offered to identity headers or policy as a claim.
_NOT_IDENTITY = frozenset(
    {"iss", "aud", "exp", "iat", "nbf", "jti", "nonce", "at_hash", "c_hash", "s_hash", "azp",
     "sid", "auth_time", "acr", "amr", "typ", "scope", "scp", "client_id", "active",
     "token_type", "cnf", "events", "sub", "username"}
)  # fmt: skip
_REALM = 'Bearer realm="gateway"'
_V = TypeVar("_V")


def looks_like_jwt(token: str) -> bool:
    """A compact JWS (a JWT access token, RFC 9068), not an opaque token."""
    return _COMPACT_JWS.fullmatch(token) is not None


class InvalidToken(Unauthenticated):
    """RFC 6750 §3.1 ``invalid_token``: expired, revoked, malformed or not ours."""

    code = "invalid_token"
    public_message = "The bearer token is not valid."

    def __init__(self) -> None:
        super().__init__(headers={"WWW-Authenticate": f'{_REALM}, error="invalid_token"'})


class InvalidRequest(BadRequest):
    """RFC 6750 §3.1 ``invalid_request``: the Authorization header cannot be read."""

    code = "invalid_request"
    public_message = "Send exactly one Authorization header."

    def __init__(self) -> None:
        super().__init__(headers={"WWW-Authenticate": f'{_REALM}, error="invalid_request"'})


class IntrospectionBusy(GatewayError):
    """More new opaque tokens than ``provider.introspection_rate`` allows: not checked now.

    503, not 401: the token may well be good, and a client told it is invalid would fetch
    a new one and come back with yet another unknown token.
    """

    status = 503
    code = "introspection_busy"
    public_message = "Too many new tokens to check right now. Please retry shortly."

    def __init__(self, retry_after: float) -> None:
        super().__init__(headers={"Retry-After": str(max(1, math.ceil(retry_after)))})


@dataclass(frozen=True, slots=True)
class BearerPrincipal:
    """Who a bearer token speaks for, and what it may do."""

    identity: Identity
    scopes: tuple[str, ...]
    expires_at: float | None
    source: str  # "jwt" | "introspection"


def bearer_token(headers: MultiMapping[str]) -> str | None:
    """The token of ``Authorization: Bearer <token>``, or None when there is no Bearer header.

    Another scheme (Basic...) is not ours to judge: None. Two Authorization headers are
    ambiguous (400); a Bearer value that is not a b64token is an invalid token (401).
    """
    values = headers.getall("Authorization", [])
    if not values:
        return None
    if len(values) > 1:
        raise InvalidRequest()
    scheme, _, value = values[0].strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    token = value.strip()
    if not token or len(token) > MAX_TOKEN_LENGTH or not _B64TOKEN.fullmatch(token):
        raise InvalidToken()
    return token


def scopes_of(claims: Mapping[str, Any]) -> tuple[str, ...]:
    """Scopes from ``scope`` (RFC 9068 §2.2.3, RFC 7662: space-separated) or ``scp`` (a list)."""
    for name in ("scope", "scp"):
        value = claims.get(name)
        if isinstance(value, str):
            return tuple(value.split())
        if isinstance(value, list):
            return tuple(str(s) for s in value if isinstance(s, str))
    return ()


def identity_of(claims: Mapping[str, Any]) -> Identity:
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub:
        raise TokenValidationError("no subject")
    return Identity(sub=sub, claims={k: v for k, v in claims.items() if k not in _NOT_IDENTITY})


def _audiences(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [a for a in value if isinstance(a, str)]
    return []


@dataclass(slots=True)
class _Cached:
    until: float
    principal: BearerPrincipal


@dataclass(slots=True)
class _TokenBucket:
    """At most ``rate`` takes a second on average, bursts up to ``rate`` (one second's worth)."""

    rate: float
    level: float
    stamp: float

    def take(self, now: float) -> float:
        """0 when a call may go now, else the seconds until one may."""
        capacity = max(1.0, self.rate)
        self.level = min(capacity, self.level + max(0.0, now - self.stamp) * self.rate)
        self.stamp = now
        if self.level >= 1.0:
            self.level -= 1.0
            return 0.0
        return (1.0 - self.level) / self.rate


class BearerVerifier:
    """Validates bearer tokens; one per app. ``clock`` is injectable for tests."""

    def __init__(
        self,
        provider: ProviderClient,
        settings: ProviderSettings,
        clock: Callable[[], float] = time.time,
        *,
        cache_ttl: float = CACHE_TTL,
        negative_ttl: float = NEGATIVE_TTL,
        max_entries: int = CACHE_ENTRIES,
        max_refused: int = REFUSED_ENTRIES,
    ) -> None:
        self.provider = provider
        self.audiences = list(settings.bearer_audiences) or [settings.client_id]
        self.clock = clock
        self.cache_ttl = cache_ttl
        self.negative_ttl = negative_ttl
        self.max_entries = max_entries
        self.max_refused = max_refused
        # Keyed by SHA-256 of the token: a dump of this process never yields a usable token.
        # Two caches, so a flood of junk tokens only ever evicts other refusals.
        self._good: OrderedDict[str, _Cached] = OrderedDict()
        self._refused: OrderedDict[str, float] = OrderedDict()  # key -> until
        self._inflight: dict[str, asyncio.Future[BearerPrincipal | None]] = {}
        rate = settings.introspection_rate
        self._bucket = _TokenBucket(rate, max(1.0, rate), clock())
        self._busy_logged = 0.0

    async def verify(self, token: str) -> BearerPrincipal:
        """The principal of a token; raise InvalidToken (401), or IntrospectionBusy
        or ProviderTransportError (503, see the error middleware)."""
        meta = await self.provider.metadata()
        if _COMPACT_JWS.fullmatch(token):
            return await self._jwt(token)
        return await self._introspected(token, meta.issuer)

    # -- JWT access tokens (RFC 9068) ------------------------------------------------------

    async def _jwt(self, token: str) -> BearerPrincipal:
        try:
            claims = await self.provider.validator.validate_access_token(token, self.audiences)
            header = jwt.get_unverified_header(token)
            _require_access_token(header, claims)
            identity = identity_of(claims)
        except TokenValidationError as exc:
            log.info("bearer token refused: %s", exc.reason)
            raise InvalidToken() from None
        except ProviderTransportError as exc:
            # The JWKS could not be fetched: the token may be fine, we cannot tell.
            log.warning("bearer token not checked: %s", exc)
            raise
        except jwt.PyJWTError:
            raise InvalidToken() from None
        exp = claims.get("exp")
        return BearerPrincipal(
            identity, scopes_of(claims), float(exp) if isinstance(exp, int | float) else None, "jwt"
        )

    # -- opaque tokens (RFC 7662) ----------------------------------------------------------

    async def _introspected(self, token: str, issuer: str) -> BearerPrincipal:
        key = hashlib.sha256(token.encode("utf-8")).hexdigest()
        now = self.clock()
        hit = self._good.get(key)
        if hit is not None and hit.until > now:
            self._good.move_to_end(key)
            return hit.principal
        refused_until = self._refused.get(key)
        if refused_until is not None and refused_until > now:
            raise InvalidToken()
        pending = self._inflight.get(key)
        if pending is None:
            wait = self._bucket.take(now)
            if wait > 0:
                # A flood of unknown tokens: the provider is spared; the cached ones still work.
                if now - self._busy_logged >= 1.0:
                    self._busy_logged = now
                    log.warning("token introspection rate limit reached; answering 503")
                raise IntrospectionBusy(wait)
            # Single flight: a burst of requests with one new token costs one introspection.
            pending = asyncio.get_running_loop().create_future()
            self._inflight[key] = pending
            try:
                pending.set_result(await self._introspect(key, token, issuer))
            except BaseException as exc:
                pending.set_exception(exc)
                pending.exception()  # retrieved here; every waiter re-raises it
            finally:
                del self._inflight[key]
        principal = await asyncio.shield(pending)
        if principal is None:
            raise InvalidToken()
        return principal

    async def _introspect(self, key: str, token: str, issuer: str) -> BearerPrincipal | None:
        try:
            data = await self.provider.introspect(token)
        except ProviderTransportError as exc:
            # Not cached: the next request asks again (503 now, RFC 7662 §4 leaves it to us).
            log.warning("token introspection unavailable: %s", exc)
            raise
        now = self.clock()
        try:
            principal = self._from_introspection(data, issuer, now)
        except TokenValidationError as exc:
            log.info("bearer token refused by introspection: %s", exc.reason)
            principal = None
        if principal is None:
            self._good.pop(key, None)
            _remember(self._refused, key, now + self.negative_ttl, self.max_refused)
        else:
            until = now + self.cache_ttl
            if principal.expires_at is not None:
                until = min(until, principal.expires_at)  # never beyond the token's exp
            self._refused.pop(key, None)
            _remember(self._good, key, _Cached(until, principal), self.max_entries)
        return principal

    def _from_introspection(self, data: dict[str, Any], issuer: str, now: float) -> BearerPrincipal:
        """RFC 7662 §2.2: only ``active: true`` counts; then the same checks as for a JWT."""
        if data.get("active") is not True:
            raise TokenValidationError("not active")
        for name in ("token_type", "typ"):
            # e.g. token_type refresh_token, or Keycloak's "typ": "Refresh" / "ID" / "Logout"
            kind = data.get(name)
            if kind is not None and (
                not isinstance(kind, str) or kind.lower() not in _ACCESS_TOKEN_TYPES
            ):
                raise TokenValidationError(f"not an access token ({name})")
        exp = data.get("exp")
        if exp is not None and (not _is_number(exp) or exp <= now):
            raise TokenValidationError("expired")
        nbf = data.get("nbf")
        if nbf is not None and (not _is_number(nbf) or nbf > now + LEEWAY):
            raise TokenValidationError("not yet valid")
        iss = data.get("iss")
        if iss is not None and issuer and iss != issuer:
            raise TokenValidationError("wrong issuer")
        # The token must be meant for us: its audience names us, or (providers that omit
        # aud for opaque tokens) it was issued to a client we accept. Otherwise any token
        # of any client at the provider would open this API (a confused deputy). An answer
        # that names neither cannot show that, so it is refused too.
        if "aud" in data:
            if not set(_audiences(data["aud"])) & set(self.audiences):
                raise TokenValidationError("wrong audience")
        elif "client_id" not in data:
            raise TokenValidationError("names neither aud nor client_id")
        elif data["client_id"] not in self.audiences:
            raise TokenValidationError("issued to another client")
        if "cnf" in data:
            # Sender-constrained (DPoP RFC 9449 §7.1, mTLS RFC 8705): we cannot check the proof.
            raise TokenValidationError("sender-constrained token")
        return BearerPrincipal(
            identity_of(data), scopes_of(data), float(exp) if exp is not None else None,
            "introspection",
        )  # fmt: skip

    @property
    def cached(self) -> int:
        """Introspection answers held, active and refused."""
        return len(self._good) + len(self._refused)


def _remember(cache: OrderedDict[str, _V], key: str, value: _V, limit: int) -> None:
    """Least recently used goes first once ``cache`` holds more than ``limit`` entries."""
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > limit:
        cache.popitem(last=False)


def _is_number(value: Any) -> bool:
    # Python's JSON parser reads NaN and Infinity: an exp of NaN compares as never expired.
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, int) and not isinstance(value, bool)


def _require_access_token(header: Mapping[str, Any], claims: Mapping[str, Any]) -> None:
    """Refuse ID tokens, logout tokens and other JWTs signed by the same provider.

    They carry our client id as ``aud`` and a valid signature, so only their type tells
    them apart (RFC 8725 §3.11, RFC 9068 §4).
    """
    typ = header.get("typ", "")
    if not isinstance(typ, str) or typ.lower() not in _ACCESS_TYP:
        raise TokenValidationError("not an access token (typ)")
    for name in _NOT_ACCESS_CLAIMS:
        if name in claims:
            raise TokenValidationError("not an access token (carries " + name + ")")
    typ_claim = claims.get("typ")
    if isinstance(typ_claim, str) and typ_claim.lower() not in _ACCESS_TYP_CLAIM:
        raise TokenValidationError("not an access token (typ claim)")
    if "cnf" in claims:
        raise TokenValidationError("sender-constrained token")


async def admit(verifier: BearerVerifier, route: Route, token: str) -> BearerPrincipal:
    """Verify ``token`` and apply ``route``'s policy: 401, 403, 503, or the principal."""
    principal = await verifier.verify(token)
    decision = check_requirements(route.settings, principal.identity, principal.scopes)
    if not decision.allowed:
        headers: dict[str, str] = {}
        if decision.reason == "missing scope":
            # RFC 6750 §3.1: tell the client which scope it needs.
            wanted = " ".join(route.settings.require.scopes).replace('"', "")
            headers["WWW-Authenticate"] = f'{_REALM}, error="insufficient_scope", scope="{wanted}"'
        log.info("bearer client refused by route policy: %s", decision.reason)
        raise Forbidden(headers=headers)
    return principal

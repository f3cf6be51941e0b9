"""Signed identity assertions: the ``X-Gateway-Assertion`` JWT and the JWKS that verifies it.

On routes with ``assertion: true`` the upstream receives a compact JWS (RFC 7515), ES256
(RFC 7518 §3.4) with ``kid`` and ``typ: JWT`` in the header and the claims
``iss`` (``assertion.issuer``, default ``server.public_url``), ``aud`` (the route's
upstream URL as configured, without a trailing ``/``: the recipient that verifies it, so
two routes to one service share one audience), ``sub``, ``email`` (when known), ``groups``,
``provider`` (the provider id) and ``provider_iss`` (its issuer), ``iat``, ``exp``
(``assertion.ttl``, at most 60 s) and ``jti``.

The first configured key signs; every configured key is published at
``/.well-known/jwks.json`` so a new key can be added (published) before it signs and an old
one kept until its last assertion expired. ``kid`` is the key's RFC 7638 thumbprint, the
same in every replica. With no key configured while a route asks for assertions, an
ephemeral P-256 key is generated at start-up (it changes on every restart and differs
between replicas, which is logged as a warning).

Signing costs tens of microseconds, so an assertion is reused for the same session,
audience and identity for a few seconds (never more than a quarter of its lifetime).
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from jwt.algorithms import ECAlgorithm

from gateway.config import Settings
from gateway.crypto import b64u_encode
from gateway.session import Identity

__all__ = ["ASSERTION", "AssertionKey", "AssertionSigner", "audience_for", "jwks_handler"]

log = logging.getLogger("gateway.assertion")
ALGORITHM = "ES256"
# A cached assertion is handed out for at most this long (and at most a quarter of its
# lifetime), so the upstream always receives one with most of its minute left.
MAX_REUSE = 5.0
_CACHE_LIMIT = 10_000


@dataclass(frozen=True)
class AssertionKey:
    """One P-256 key: the private half signs, the public JWK is published."""

    kid: str
    private: ec.EllipticCurvePrivateKey
    public_jwk: dict[str, str]

    @classmethod
    def from_private(cls, private: ec.EllipticCurvePrivateKey) -> AssertionKey:
        if not isinstance(private.curve, ec.SECP256R1):
            raise ValueError("ES256 needs a P-256 key")
        jwk: dict[str, str] = ECAlgorithm.to_jwk(private.public_key(), as_dict=True)
        public = {k: jwk[k] for k in ("kty", "crv", "x", "y")}
        kid = thumbprint(public)
        return cls(kid, private, {**public, "kid": kid, "use": "sig", "alg": ALGORITHM})

    @classmethod
    def from_pem(cls, pem: str) -> AssertionKey:
        private = load_pem_private_key(pem.encode(), password=None)
        if not isinstance(private, ec.EllipticCurvePrivateKey):
            raise ValueError("ES256 needs an EC private key")
        return cls.from_private(private)

    @classmethod
    def generate(cls) -> AssertionKey:
        return cls.from_private(ec.generate_private_key(ec.SECP256R1()))


def thumbprint(public_jwk: dict[str, str]) -> str:
    """RFC 7638 §3.2: SHA-256 over the required members, sorted, without whitespace."""
    required = {k: public_jwk[k] for k in ("crv", "kty", "x", "y")}
    canonical = json.dumps(required, separators=(",", ":"), sort_keys=True)
    return b64u_encode(hashlib.sha256(canonical.encode()).digest())


def audience_for(upstream: str) -> str:
    """The ``aud`` of a route's assertions: its upstream URL without a trailing slash."""
    return upstream.rstrip("/")


@dataclass(frozen=True, slots=True)
class _Cached:
    identity: Identity
    token: str
    reuse_until: float


class AssertionSigner:
    """Signs assertions with the first key; publishes every key."""

    def __init__(
        self,
        keys: Sequence[AssertionKey],
        issuer: str,
        ttl: float = 60.0,
        *,
        ephemeral: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.keys = tuple(keys)
        self.issuer = issuer
        self.ttl = int(max(1, min(60, ttl)))  # RFC 7519 §2 NumericDate: whole seconds here
        self.reuse = min(MAX_REUSE, self.ttl / 4)
        self.ephemeral = ephemeral
        self.clock = clock
        self._cache: dict[tuple[str, str], _Cached] = {}
        self._jwks = json.dumps({"keys": [k.public_jwk for k in self.keys]}).encode()

    @classmethod
    def from_settings(cls, settings: Settings) -> AssertionSigner:
        cfg = settings.assertion
        keys = [AssertionKey.from_pem(k.get_secret_value()) for k in cfg.signing_keys]
        ephemeral = False
        if not keys and any(route.assertion for route in settings.routes):
            keys = [AssertionKey.generate()]
            ephemeral = True
            log.warning(
                "assertion.signing_keys is empty: X-Gateway-Assertion is signed with an "
                "ephemeral key that changes on every restart; configure a key for "
                "upstreams that cache the JWKS and for every deployment with more than "
                "one gateway replica"
            )
        return cls(keys, cfg.issuer or settings.server.public_url, cfg.ttl, ephemeral=ephemeral)

    @property
    def jwks_body(self) -> bytes:
        return self._jwks

    def jwks(self) -> dict[str, Any]:
        return {"keys": [dict(k.public_jwk) for k in self.keys]}

    def sign(self, identity: Identity, audience: str) -> str:
        """A fresh assertion (no cache)."""
        if not self.keys:
            raise RuntimeError("no assertion signing key")
        key = self.keys[0]
        now = int(self.clock())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": audience,
            "sub": identity.sub,
            "groups": list(identity.groups),
            "iat": now,
            "exp": now + self.ttl,
            "jti": secrets.token_urlsafe(16),
        }
        if identity.email is not None:
            claims["email"] = identity.email
        # Who vouches for the user (its own iss stays the gateway's): a sub is unique only
        # per provider.
        claims["provider"] = identity.provider
        if identity.issuer:
            claims["provider_iss"] = identity.issuer
        return jwt.encode(
            claims, key.private, algorithm=ALGORITHM, headers={"kid": key.kid, "typ": "JWT"}
        )

    def assertion(self, identity: Identity, audience: str, session_id: str | None) -> str:
        """The assertion for this identity and audience, reused for a few seconds per session.

        The cached one is handed out only while the session's identity is unchanged (a
        refresh that changed the groups signs a new one at once).
        """
        if session_id is None:
            return self.sign(identity, audience)
        now = self.clock()
        cache_key = (session_id, audience)
        hit = self._cache.get(cache_key)
        if hit is not None and hit.reuse_until > now and hit.identity == identity:
            return hit.token
        token = self.sign(identity, audience)
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache = {k: v for k, v in self._cache.items() if v.reuse_until > now}
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
        self._cache[cache_key] = _Cached(identity, token, now + self.reuse)
        return token

    def forget(self, session_id: str) -> None:
        """Drop a session's cached assertions (at sign-out; they expire soon anyway)."""
        for cache_key in [k for k in self._cache if k[0] == session_id]:
            del self._cache[cache_key]


ASSERTION = web.AppKey("assertion", AssertionSigner)
# Upstreams cache the key set; five minutes lets a newly added key spread well before the
# operator moves it to the front of signing_keys.
JWKS_HEADERS = {"Cache-Control": "public, max-age=300", "Content-Type": "application/json"}


async def jwks_handler(request: web.Request) -> web.StreamResponse:
    """``/.well-known/jwks.json``: RFC 7517 §5 key set of every configured assertion key."""
    return web.Response(body=request.app[ASSERTION].jwks_body, headers=JWKS_HEADERS)

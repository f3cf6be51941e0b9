"""Client authentication with a private key: ``private_key_jwt`` (RFC 7523 §2.2, OIDC Core §9).

Every call to the token, revocation, introspection and pushed-authorization endpoints
carries a fresh client assertion: a JWT signed with the provider's first configured client
key, with ``iss`` = ``sub`` = client_id, ``aud`` = the provider's issuer (RFC 7523 §3 point
3; RFC 9126 §2 and the OAuth 2.0 Security BCP recommend the issuer over an endpoint URL),
a unique ``jti``, ``iat`` and an ``exp`` 60 seconds ahead (RFC 7523 §3 points 4 and 7).
Each key's ``kid`` is its RFC 7638 thumbprint, the same in every replica, and travels in the
assertion's header so the provider picks the right registered key.

Everything hangs off one provider's settings: nothing here is global, so several providers
each get their own ``ClientAssertions``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding, load_pem_private_key
from cryptography.x509 import load_pem_x509_certificate
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from gateway.config import CLIENT_KEY_ALGS, ProviderSettings, public_key_der
from gateway.crypto import b64u_encode

__all__ = [
    "ASSERTION_TYPE",
    "LIFETIME",
    "ClientAssertions",
    "ClientKey",
    "audience",
    "jwk_thumbprint",
]

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
LIFETIME = 60  # seconds between iat and exp
_REQUIRED = {"RSA": ("e", "kty", "n"), "EC": ("crv", "kty", "x", "y")}

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def jwk_thumbprint(public_jwk: dict[str, Any]) -> str:
    """RFC 7638 §3.2: SHA-256 over the required members, sorted, without whitespace."""
    required = {k: public_jwk[k] for k in _REQUIRED[public_jwk["kty"]]}
    canonical = json.dumps(required, separators=(",", ":"), sort_keys=True)
    return b64u_encode(hashlib.sha256(canonical.encode()).digest())


def audience(mode: str, *, issuer: str, token_endpoint: str, endpoint: str) -> str:
    """The assertion's ``aud`` (``client_assertion_audience``): the issuer by default (RFC
    7523 §3 point 3; a provider configured without one: its token endpoint), the token
    endpoint URL (OIDC Core §9 "SHOULD", Microsoft Entra ID), or the URL of the endpoint
    being called (Okta)."""
    if mode == "endpoint" and endpoint:
        return endpoint
    if mode == "token_endpoint":
        return token_endpoint
    return issuer or token_endpoint


@dataclass(frozen=True)
class ClientKey:
    """One client key: the private half signs assertions, the public JWK is registered.

    ``x5t`` holds the header members naming the key's certificate (``x5t#S256`` and
    ``x5t``, RFC 7515 §4.1.7-8) when one is configured, as Microsoft Entra ID needs.
    """

    kid: str
    alg: str
    private: PrivateKey
    public_jwk: dict[str, Any]
    x5t: dict[str, str] | None = None

    def with_certificate(self, pem: str) -> ClientKey:
        """This key with its X.509 certificate: thumbprints in the header, x5c in the JWK."""
        der = load_pem_x509_certificate(pem.encode()).public_bytes(Encoding.DER)
        x5t = {
            "x5t#S256": b64u_encode(hashlib.sha256(der).digest()),
            # SHA-1 only names the certificate here (RFC 7515 §4.1.7), as Entra ID reads it.
            "x5t": b64u_encode(hashlib.sha1(der, usedforsecurity=False).digest()),
        }
        jwk = {**self.public_jwk, "x5c": [base64.b64encode(der).decode()], **x5t}
        return replace(self, public_jwk=jwk, x5t=x5t)

    @classmethod
    def from_pem(cls, pem: str, alg: str | None = None) -> ClientKey:
        """``alg`` None: RS256 for an RSA key, ES256 for an EC P-256 key."""
        private = load_pem_private_key(pem.encode(), password=None)
        if isinstance(private, rsa.RSAPrivateKey):
            kind, jwk = "RSA", RSAAlgorithm.to_jwk(private.public_key(), as_dict=True)
        elif isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(
            private.curve, ec.SECP256R1
        ):
            kind, jwk = "EC", ECAlgorithm.to_jwk(private.public_key(), as_dict=True)
        else:
            raise ValueError("a client key must be RSA or EC P-256")
        alg = alg or CLIENT_KEY_ALGS[kind][0]
        if alg not in CLIENT_KEY_ALGS[kind]:
            raise ValueError(f"{alg} does not fit an {kind} key")
        public = {k: jwk[k] for k in _REQUIRED[kind]}  # public members only, never d/p/q/...
        kid = jwk_thumbprint(public)
        return cls(kid, alg, private, {**public, "kid": kid, "alg": alg, "use": "sig"})


class ClientAssertions:
    """Signs client assertions with the first key; publishes every key (rotation)."""

    def __init__(
        self,
        client_id: str,
        keys: Sequence[ClientKey],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not keys:
            raise ValueError("private_key_jwt needs at least one key")
        self.client_id = client_id
        self.keys = tuple(keys)
        self.clock = clock

    @classmethod
    def from_settings(
        cls, settings: ProviderSettings, *, clock: Callable[[], float] = time.time
    ) -> ClientAssertions | None:
        """The provider's signer, or None unless it authenticates with private_key_jwt."""
        if settings.effective_auth_method != "private_key_jwt" or not settings.client_private_key:
            return None
        certs = {public_key_der(c): c for c in settings.client_certificate or ()}
        keys = []
        for secret in settings.client_private_key:
            pem = secret.get_secret_value()
            key = ClientKey.from_pem(pem, settings.client_signing_alg)
            cert = certs.get(public_key_der(pem))
            keys.append(key if cert is None else key.with_certificate(cert))
        return cls(settings.client_id, keys, clock=clock)

    def sign(self, audience: str) -> str:
        """A fresh assertion (new ``jti`` every time: providers refuse a replayed one)."""
        key = self.keys[0]
        now = int(self.clock())
        claims = {
            "iss": self.client_id,
            "sub": self.client_id,
            "aud": audience,
            "jti": secrets.token_urlsafe(24),
            "iat": now,
            "exp": now + LIFETIME,
        }
        headers: dict[str, Any] = {"kid": key.kid}
        if key.x5t is not None:
            # Certificate credentials (Entra ID) name the certificate and want nbf.
            headers.update(key.x5t)
            claims["nbf"] = now
        return jwt.encode(claims, key.private, algorithm=key.alg, headers=headers)

    def form(self, audience: str) -> dict[str, str]:
        """The form members that authenticate one request (RFC 7523 §2.2)."""
        return {"client_assertion_type": ASSERTION_TYPE, "client_assertion": self.sign(audience)}

    def jwks(self) -> dict[str, Any]:
        """RFC 7517 §5 JWK Set of every key's public half, to register at the provider."""
        return {"keys": [dict(k.public_jwk) for k in self.keys]}

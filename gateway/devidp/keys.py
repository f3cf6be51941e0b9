"""Signing keys of the provider: generation, the published JWKS, rotation, signing, verifying.

The ring holds the published keys (newest signs) and one "pending" key that is not in
the JWKS yet. Signing with the pending key produces a token whose ``kid`` a relying
party cannot find until :meth:`KeyRing.rotate` publishes it (OIDC Core §10.1.1).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
from typing import Any, Literal

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
KeyChoice = Literal["current", "unpublished"]
KEEP_PUBLISHED = 3


def b64url(data: bytes) -> str:
    """Base64url without padding (RFC 7515 §2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


@dataclass(frozen=True)
class SigningKey:
    """One private key with its ``kid`` and JWS algorithm."""

    kid: str
    alg: str
    private: PrivateKey

    @classmethod
    def generate(cls, alg: str) -> SigningKey:
        private: PrivateKey
        if alg == "RS256":
            private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        elif alg == "ES256":
            private = ec.generate_private_key(ec.SECP256R1())
        else:
            raise ValueError(f"unsupported signing algorithm {alg!r}")
        return cls(kid=secrets.token_urlsafe(12), alg=alg, private=private)

    def public_jwk(self) -> dict[str, Any]:
        public = self.private.public_key()
        if isinstance(public, rsa.RSAPublicKey):
            jwk = RSAAlgorithm.to_jwk(public, as_dict=True)
        else:
            jwk = ECAlgorithm.to_jwk(public, as_dict=True)
        return {**jwk, "kid": self.kid, "use": "sig", "alg": self.alg}

    def public_pem(self) -> bytes:
        """SubjectPublicKeyInfo PEM of the public key (what an HS256 confusion attack uses)."""
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


class KeyRing:
    """Published keys (the last one signs) plus a pending key not yet published."""

    def __init__(self, alg: str) -> None:
        self.alg = alg
        self._published: list[SigningKey] = [SigningKey.generate(alg)]
        self._pending: SigningKey | None = None  # made on first use: key generation is slow

    @property
    def current(self) -> SigningKey:
        return self._published[-1]

    @property
    def pending(self) -> SigningKey:
        if self._pending is None:
            self._pending = SigningKey.generate(self.alg)
        return self._pending

    def rotate(self) -> SigningKey:
        """Publish the pending key and sign with it from now on; keep the previous ones."""
        self._published.append(self.pending)
        self._published = self._published[-KEEP_PUBLISHED:]
        self._pending = None
        return self.current

    def jwks(self) -> dict[str, Any]:
        return {"keys": [key.public_jwk() for key in reversed(self._published)]}

    def published(self, kid: str) -> SigningKey | None:
        return next((key for key in self._published if key.kid == kid), None)

    def sign(
        self,
        claims: dict[str, Any],
        headers: dict[str, Any] | None = None,
        *,
        key: KeyChoice = "current",
    ) -> str:
        """A JWS over ``claims``; ``headers`` may override ``typ`` or add fields."""
        signer = self.current if key == "current" else self.pending
        merged: dict[str, Any] = {"kid": signer.kid, "typ": "JWT"}
        merged.update(headers or {})
        return jwt.encode(claims, signer.private, algorithm=signer.alg, headers=merged)

    def verify(
        self,
        token: str,
        *,
        issuer: str,
        audience: str | None = None,
        verify_exp: bool = True,
        typ: str | None = None,
    ) -> dict[str, Any]:
        """Claims of a token signed by one of our published keys; raises ``jwt.PyJWTError``."""
        header = jwt.get_unverified_header(token)
        found = self.published(str(header.get("kid", "")))
        if found is None:
            raise jwt.InvalidKeyError("unknown kid")
        if typ is not None and str(header.get("typ", "")).lower() != typ:
            raise jwt.InvalidTokenError("unexpected typ")
        options = {"verify_exp": verify_exp, "verify_aud": audience is not None}
        claims: dict[str, Any] = jwt.decode(
            token,
            found.private.public_key(),
            algorithms=[found.alg],
            issuer=issuer,
            audience=audience,
            options=options,  # type: ignore[arg-type]
            leeway=5,
        )
        return claims


def unsigned(claims: dict[str, Any], headers: dict[str, Any]) -> str:
    """A JWT with ``alg: none`` and an empty signature (RFC 7519 §6.1)."""
    head = {**headers, "alg": "none"}
    return f"{_segment(head)}.{_segment(claims)}."


def hs256_with(secret: bytes, claims: dict[str, Any], headers: dict[str, Any]) -> str:
    """An HS256 JWT keyed with ``secret`` (done by hand: pyjwt rightly refuses a PEM key)."""
    head = {**headers, "alg": "HS256"}
    signing_input = f"{_segment(head)}.{_segment(claims)}"
    mac = hmac.new(secret, signing_input.encode("ascii"), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(mac)}"


def corrupt_signature(token: str) -> str:
    """The same token with the first bytes of its signature flipped."""
    head, payload, sig = token.split(".")
    raw = bytearray(base64.urlsafe_b64decode(sig + "=" * (-len(sig) % 4)))
    for i in range(min(4, len(raw))):
        raw[i] ^= 0xFF
    return f"{head}.{payload}.{b64url(bytes(raw))}"


def _segment(obj: dict[str, Any]) -> str:
    return b64url(json.dumps(obj, separators=(",", ":")).encode("utf-8"))

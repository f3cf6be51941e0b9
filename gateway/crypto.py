"""Cryptographic primitives: AEAD seal/open with a key ring, random ids, PKCE S256, comparisons.

Knows nothing about HTTP. Every sealed value is bound to a *purpose* (associated data), so a
login-state cookie can never be replayed as a session cookie and vice versa.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

_VERSION = b"\x01"
_NONCE_LEN = 12
# Sealed values longer than this are refused before any work is spent on them (SECURITY.md 13).
MAX_SEALED_LEN = 4096


def b64u_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64u_decode(text: str) -> bytes:
    """Decode unpadded base64url; raise ValueError on anything else."""
    if _B64U.fullmatch(text) is None:
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# One C-level check of the whole text (ASCII letters and digits, "-" and "_", no padding, at
# least one character); the decoder then sees only the URL alphabet.
_B64U = re.compile(r"[A-Za-z0-9_-]+")


def random_token(nbytes: int = 32) -> str:
    """An unguessable URL-safe string (256 bits by default)."""
    return b64u_encode(secrets.token_bytes(nbytes))


def sha256_b64u(text: str) -> str:
    return b64u_encode(hashlib.sha256(text.encode("ascii", "strict")).digest())


def pkce_pair() -> tuple[str, str]:
    """A fresh (verifier, S256 challenge) pair; RFC 7636 §4.1-4.2, 43-character challenge."""
    verifier = random_token(32)  # 43 characters of the unreserved set
    return verifier, sha256_b64u(verifier)


def constant_time_equal(a: str | bytes, b: str | bytes) -> bool:
    a_b = a.encode() if isinstance(a, str) else a
    b_b = b.encode() if isinstance(b, str) else b
    return hmac.compare_digest(a_b, b_b)


class OpenError(Exception):
    """The sealed value is malformed, tampered with, or sealed under a key we do not hold."""


class Aead:
    """AES-256-GCM under one key; output is version || nonce || ciphertext+tag."""

    def __init__(self, key: bytes):
        if len(key) != 32:
            raise ValueError("AEAD keys are 32 bytes")
        self._aead = AESGCM(key)

    def seal(self, plaintext: bytes, purpose: bytes) -> bytes:
        nonce = secrets.token_bytes(_NONCE_LEN)
        return _VERSION + nonce + self._aead.encrypt(nonce, plaintext, _VERSION + purpose)

    def open(self, sealed: bytes, purpose: bytes) -> bytes:
        if len(sealed) < 1 + _NONCE_LEN + 16 or sealed[:1] != _VERSION:
            raise OpenError("malformed")
        nonce = sealed[1 : 1 + _NONCE_LEN]
        try:
            return self._aead.decrypt(nonce, sealed[1 + _NONCE_LEN :], _VERSION + purpose)
        except InvalidTag:
            raise OpenError("authentication failed") from None


class KeyRing:
    """The first key seals; every key opens (cookie-secret rotation without logging anyone out)."""

    def __init__(self, keys: Sequence[bytes]):
        if not keys:
            raise ValueError("a key ring needs at least one key")
        self._aeads = [Aead(k) for k in keys]

    def seal_text(self, plaintext: bytes, purpose: bytes) -> str:
        return b64u_encode(self._aeads[0].seal(plaintext, purpose))

    def open_text(self, text: str, purpose: bytes) -> bytes:
        if len(text) > MAX_SEALED_LEN:
            raise OpenError("too long")
        try:
            sealed = b64u_decode(text)
        except ValueError:
            raise OpenError("malformed") from None
        for aead in self._aeads:
            try:
                return aead.open(sealed, purpose)
            except OpenError:
                continue
        raise OpenError("no key opens it")


def decode_secret(text: str) -> bytes:
    """A configured cookie secret (base64, standard or URL alphabet) as raw bytes."""
    return base64.urlsafe_b64decode(
        text.replace("+", "-").replace("/", "_") + "=" * (-len(text) % 4)
    )


def new_secret() -> str:
    """A fresh cookie secret for ``gateway gen-secret``."""
    return base64.urlsafe_b64encode(secrets.token_bytes(32)).decode("ascii")

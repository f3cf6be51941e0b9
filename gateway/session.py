"""The session model: ``Tokens``, ``Identity``, ``Session``, and the ticket in the cookie.

No I/O. The cookie holds a *ticket* (session id + per-session key) sealed under the cookie
key ring; the store holds the session sealed under the per-session key, at a key derived from
the session id alone, so neither a stolen Redis dump nor a stolen cookie secret alone yields a
token.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from gateway.config import DEFAULT_PROVIDER_ID
from gateway.crypto import Aead, KeyRing, OpenError, b64u_decode, b64u_encode

SESSION_PURPOSE = b"gateway-session-ticket"
_RECORD_PURPOSE = b"gateway-session-record"
_ID_LEN = 16
_KEY_LEN = 32


@dataclass(frozen=True, slots=True)
class Tokens:
    access_token: str
    token_type: str = "Bearer"
    refresh_token: str | None = None
    id_token: str | None = None
    expires_at: float | None = None
    refresh_expires_at: float | None = None
    scope: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Identity:
    sub: str
    claims: dict[str, Any] = field(default_factory=dict)
    # Who vouches for it: the provider id (``default`` for a single ``provider:``, and for
    # sessions stored before there could be several) and that provider's issuer. A ``sub``
    # is unique only per issuer.
    provider: str = DEFAULT_PROVIDER_ID
    issuer: str = ""

    def claim(self, name: str) -> Any:
        """A claim for identity headers; ``sub`` and the pseudo-claims ``provider`` and
        ``iss`` (which win over a provider's claims of those names)."""
        if name == "sub":
            return self.sub
        if name == "provider":
            return self.provider
        if name == "iss":
            return self.issuer or None
        return self.claims.get(name)

    @property
    def email(self) -> str | None:
        v = self.claims.get("email")
        return v if isinstance(v, str) else None

    @property
    def groups(self) -> tuple[str, ...]:
        v = self.claims.get("groups")
        if isinstance(v, str):
            return (v,)
        if isinstance(v, list):
            return tuple(str(g) for g in v)
        return ()


@dataclass(frozen=True, slots=True)
class Session:
    """What the gateway knows about one signed-in browser."""

    session_id: str  # hex of the random id, never sent anywhere
    identity: Identity
    tokens: Tokens
    created_at: float
    expires_at: float  # absolute lifetime end
    provider_sid: str | None = None
    refreshed_at: float | None = None
    version: int = 1

    def needs_refresh(self, now: float, skew: float) -> bool:
        exp = self.tokens.expires_at
        return exp is not None and exp - skew <= now

    def access_token_valid(self, now: float) -> bool:
        exp = self.tokens.expires_at
        return exp is None or exp > now

    def ttl(self, now: float, idle_timeout: float) -> float:
        """Seconds the stored record lives: min(idle timeout, time left to the absolute end)."""
        limit = self.expires_at
        if self.tokens.refresh_expires_at is not None and self.tokens.refresh_token:
            limit = min(limit, self.tokens.refresh_expires_at)
        return max(0.0, min(idle_timeout, limit - now))

    def with_tokens(self, tokens: Tokens, identity: Identity, now: float) -> Session:
        return replace(
            self, tokens=tokens, identity=identity, refreshed_at=now, version=self.version + 1
        )

    def to_json(self) -> bytes:
        data = asdict(self)
        if self.identity.provider == DEFAULT_PROVIDER_ID:
            # The record as before there could be several providers, so a replica still on
            # the previous version reads it (rolling upgrade); the issuer is filled in again
            # from the config when read (``SessionManager``).
            del data["identity"]["provider"], data["identity"]["issuer"]
        return json.dumps(data, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Session:
        data = json.loads(raw)
        ident = data.pop("identity")
        toks = data.pop("tokens")
        toks["scope"] = tuple(toks.get("scope") or ())
        return cls(identity=Identity(**ident), tokens=Tokens(**toks), **data)


@dataclass(frozen=True, slots=True)
class Ticket:
    """The session id and its per-session key: what the cookie carries, sealed."""

    session_id: bytes
    key: bytes
    # ``store_key``, worked out once per ticket (it is asked for several times a request).
    _store_key: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        digest = hashlib.sha256(b"gateway-store-key\x00" + self.session_id).hexdigest()
        object.__setattr__(self, "_store_key", digest)

    @classmethod
    def new(cls) -> Ticket:
        return cls(secrets.token_bytes(_ID_LEN), secrets.token_bytes(_KEY_LEN))

    @property
    def id_hex(self) -> str:
        return self.session_id.hex()

    @property
    def store_key(self) -> str:
        """Where the record lives: a hash of the id, so store keys cannot be turned into cookies."""
        return self._store_key

    def to_cookie(self, ring: KeyRing) -> str:
        return ring.seal_text(self.session_id + self.key, SESSION_PURPOSE)

    @classmethod
    def from_cookie(cls, value: str, ring: KeyRing) -> Ticket:
        """Open a cookie value; raise OpenError for anything not sealed by us."""
        raw = ring.open_text(value, SESSION_PURPOSE)
        if len(raw) != _ID_LEN + _KEY_LEN:
            raise OpenError("bad ticket length")
        return cls(raw[:_ID_LEN], raw[_ID_LEN:])

    def seal_record(self, session: Session) -> bytes:
        return Aead(self.key).seal(session.to_json(), _RECORD_PURPOSE + self.session_id)

    def open_record(self, sealed: bytes) -> Session:
        raw = Aead(self.key).open(sealed, _RECORD_PURPOSE + self.session_id)
        return Session.from_json(raw)


def encode_id(raw: bytes) -> str:
    return b64u_encode(raw)


def decode_id(text: str) -> bytes:
    return b64u_decode(text)

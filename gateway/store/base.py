"""The ``SessionStore`` protocol that every store implements, and the factory from settings.

Stores hold opaque sealed bytes under opaque keys; they never see a cookie or a token in the
clear. Beside each record they keep a small plaintext ``SessionMeta`` (sub, provider sid,
times, provider id) and indexes from (provider, ``sub``) and (provider, ``sid``) to keys, so
back-channel logout and ``gateway sessions`` find sessions without decrypting them.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import asdict, dataclass
from typing import Protocol

from gateway.config import DEFAULT_PROVIDER_ID, SessionSettings


def per_provider(provider: str, name: str) -> str:
    """``name`` in ``provider``'s own namespace of store names (indexes, replay caches): a
    sub, sid or jti is unique only per issuer. Provider ``default`` keeps the bare name, the
    layout single-provider deployments have always had; the others get ``<id>:<name>``."""
    return name if provider == DEFAULT_PROVIDER_ID else f"{provider}:{name}"


@dataclass(frozen=True, slots=True)
class SessionMeta:
    key: str
    sub: str
    provider_sid: str | None
    created_at: float
    expires_at: float
    # The session's provider id; the indexes key on (provider, sub) and (provider, sid).
    provider: str = DEFAULT_PROVIDER_ID

    def to_json(self) -> str:
        data = asdict(self)
        if self.provider == DEFAULT_PROVIDER_ID:
            # Written as before: a replica still on the previous version reads it (rolling
            # upgrade of a single-provider deployment).
            del data["provider"]
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> SessionMeta:
        return cls(**json.loads(raw))


class InvalidationListener(Protocol):
    """Told by a store's invalidation feed (``watch_invalidations``, Redis only) which
    records were deleted or rewritten by any process, and whether the feed can be trusted."""

    def invalidate(self, key: str) -> None: ...

    def set_trusted(self, trusted: bool) -> None: ...


class SessionStore(Protocol):
    """Every method raises ``gateway.errors.StoreError`` when the backend does not answer."""

    async def load(self, key: str) -> bytes | None: ...

    async def save(self, meta: SessionMeta, sealed: bytes, ttl: float) -> None:
        """Write a record unconditionally: only for a brand-new session under a new key."""
        ...

    async def replace(self, meta: SessionMeta, sealed: bytes, ttl: float, expected: bytes) -> bool:
        """Write over an existing record only if it is still ``expected`` (as ``load`` gave it).

        One atomic compare-and-set: False, and nothing written, when the record was deleted
        (sign-out, revocation, back-channel logout, a refused grant) or rewritten meanwhile,
        so an ended session can never be brought back by a write that was in flight.
        """
        ...

    async def touch(self, key: str, ttl: float) -> None: ...

    async def delete(self, key: str) -> None: ...

    async def keys_for_user(
        self, sub: str, provider: str = DEFAULT_PROVIDER_ID
    ) -> list[SessionMeta]:
        """The sessions of the user ``sub`` at ``provider`` (a sub is unique per issuer only)."""
        ...

    async def keys_for_sid(
        self, sid: str, provider: str = DEFAULT_PROVIDER_ID
    ) -> list[SessionMeta]:
        """The sessions of the provider session ``sid`` at ``provider``."""
        ...

    def all_sessions(self) -> AsyncIterator[SessionMeta]: ...

    def lock(self, name: str, ttl: float, wait: float) -> AbstractAsyncContextManager[bool]:
        """Hold a lock shared by every gateway process; yields False when not won within wait."""
        ...

    async def claim_once(self, name: str, ttl: float) -> bool:
        """True the first time ``name`` is claimed within ``ttl`` (replay caches)."""
        ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...


def open_store(settings: SessionSettings) -> SessionStore:
    from gateway.store.memory import MemoryStore
    from gateway.store.redis import RedisOptions, RedisStore

    if settings.store == "memory":
        return MemoryStore()
    options = RedisOptions(
        pool_size=settings.redis_pool_size,
        pool_timeout=settings.redis_pool_timeout,
        socket_timeout=settings.redis_socket_timeout,
        connect_timeout=settings.redis_connect_timeout,
        ca_file=settings.redis_ca_file,
    )
    return RedisStore.from_url(
        settings.redis_url.get_secret_value(), prefix=settings.key_prefix, options=options
    )

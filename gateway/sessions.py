"""Session lifecycle: cookie → ticket → stored session, creation, idle touch, refresh, removal.

The hot path is one store GET, or none at all on a hit of the per-process session cache
(``gateway.session_cache``; trusted only while the store's invalidation feed is live). Refresh is the slow path: single-flight per session inside a
process, and a store lock across processes; whoever wins re-reads the session under the lock
and refreshes only if it still needs it, then saves the rotated refresh token before
releasing the lock, so no other replica can ever present the old one (SECURITY.md 19).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from gateway.config import DEFAULT_PROVIDER_ID, SessionSettings
from gateway.crypto import KeyRing, OpenError
from gateway.errors import (
    OAuthError,
    ProviderTransportError,
    ProviderUnavailable,
    StoreError,
    StoreUnavailable,
    TokenValidationError,
)
from gateway.kept import Kept
from gateway.oidc import ProviderClient, TokenResponse
from gateway.providers import Providers
from gateway.session import Identity, Session, Ticket, Tokens
from gateway.session_cache import SessionCache
from gateway.store import SessionMeta, SessionStore

log = logging.getLogger("gateway.session")
TOUCH_INTERVAL = 60.0
# After a failed refresh, requests whose access token is still valid do not retry for this long.
RETRY_BACKOFF = 5.0
# OAuth errors from a refresh that mean the grant is gone for good (RFC 6749 §5.2).
_GRANT_GONE = frozenset({"invalid_grant", "unauthorized_client", "invalid_scope"})
_PROTOCOL_CLAIMS = frozenset(
    {"iss", "aud", "exp", "iat", "nbf", "nonce", "at_hash", "c_hash", "azp", "jti", "sid",
     "auth_time", "acr", "amr", "typ", "s_hash"}
)  # fmt: skip


class SessionEnded(Exception):
    """The session is gone (expired, revoked, grant refused): the browser must log in again."""


@dataclass(frozen=True, slots=True)
class Loaded:
    ticket: Ticket
    session: Session


def identity_from(
    id_claims: dict[str, Any],
    userinfo: dict[str, Any] | None,
    provider: str = DEFAULT_PROVIDER_ID,
    issuer: str = "",
) -> Identity:
    """Identity claims from the ID token, completed by userinfo (same ``sub`` only), as
    vouched for by ``provider`` (its id) whose issuer is ``issuer``."""
    claims = {k: v for k, v in id_claims.items() if k not in _PROTOCOL_CLAIMS}
    sub = str(id_claims.get("sub") or "")
    if userinfo and (not sub or userinfo.get("sub") == sub):
        claims.update({k: v for k, v in userinfo.items() if k not in _PROTOCOL_CLAIMS})
        sub = sub or str(userinfo.get("sub") or userinfo.get("id") or "")
    claims.pop("sub", None)
    return Identity(sub=sub, claims=claims, provider=provider, issuer=issuer)


def tokens_from(resp: TokenResponse, now: float, previous: Tokens | None = None) -> Tokens:
    return Tokens(
        access_token=resp.access_token,
        token_type=resp.token_type,
        # A provider that does not rotate refresh tokens keeps the old one valid.
        refresh_token=resp.refresh_token or (previous.refresh_token if previous else None),
        id_token=resp.id_token or (previous.id_token if previous else None),
        expires_at=now + resp.expires_in if resp.expires_in is not None else None,
        refresh_expires_at=(
            now + resp.refresh_expires_in
            if resp.refresh_expires_in
            else (previous.refresh_expires_at if previous and not resp.refresh_token else None)
        ),
        scope=resp.scope if resp.scope is not None else (previous.scope if previous else ()),
    )


class SessionManager:
    def __init__(
        self,
        settings: SessionSettings,
        store: SessionStore,
        ring: KeyRing,
        provider: Providers | ProviderClient | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.store = store
        self.ring = ring
        # Every configured provider (a bare client is a single provider, ``default``):
        # refresh asks each session's own.
        if isinstance(provider, ProviderClient):
            provider = Providers.single(provider)
        self.providers = provider if provider is not None else Providers(())
        self.clock = clock
        self._touched: dict[str, float] = {}
        self._inflight: dict[str, asyncio.Task[Session]] = {}
        self._failed: dict[str, float] = {}  # store key -> no new refresh attempt before
        # Slide the idle timeout at most once a minute, and often enough for short timeouts.
        self._touch_interval = min(TOUCH_INTERVAL, settings.idle_timeout / 10)
        # Told the outcome of every refresh call: "success", "failure" (session kept) or
        # "ended" (grant refused); app.py points it at the metrics.
        self.on_refresh: Callable[[str], None] = lambda result: None
        # The session cache, when on and the store has an invalidation feed (Redis); the
        # feed is started by the first open (it needs the running loop).
        self.cache: SessionCache | None = None
        self._watch: Callable[[SessionCache], None] | None = getattr(
            store, "watch_invalidations", None
        )
        if settings.cache_size > 0 and self._watch is not None:
            self.cache = SessionCache(settings.cache_size, settings.cache_ttl, clock)
        # cookie -> the ticket it opened to (see ``open``): as many as the cache holds.
        self._tickets: Kept[str, Ticket] = Kept(settings.cache_size)

    @property
    def provider(self) -> ProviderClient:
        """The provider of a single-provider setup (for tests and tools). The gateway never
        uses it: it asks for each session's own provider."""
        if len(self.providers) != 1:
            raise LookupError("several providers: use providers.get(id)")
        [only] = self.providers
        return only.client

    # -- load / save -----------------------------------------------------------------------

    async def open(self, cookie_value: str | None) -> Loaded | None:
        """The session a cookie points at, or None for any bad, unknown or expired cookie."""
        if not cookie_value:
            return None
        cache = self.cache
        ticket = self._tickets.get(cookie_value)
        if ticket is None:
            try:
                ticket = Ticket.from_cookie(cookie_value, self.ring)
            except OpenError:
                return None
            if cache is not None:
                # A repeat request then costs a dictionary lookup, not base64, AES-GCM and
                # SHA-256. A cookie opens to the same ticket under the same key ring whatever
                # the session's state, so this decides nothing about the session; only
                # cookies this gateway sealed get in.
                self._tickets.keep(cookie_value, ticket)
        if cache is None:
            session = await self._read(ticket)
            return Loaded(ticket, session) if session else None
        if self._watch is not None:
            self._watch(cache)
            self._watch = None
        key = ticket.store_key  # worked out once, when the ticket was made
        session = cache.get(key, ticket)
        if session is not None:
            return Loaded(ticket, session)
        generation = cache.generation
        session = await self._read(ticket)
        if session is None:
            return None
        # Never past the record's own end in the store (lifetime, refresh-token expiry), nor
        # half the idle timeout: a record read just now may lapse by itself later.
        now = self.clock()
        idle = self.settings.idle_timeout
        cache.put(key, ticket, session, generation, now + min(session.ttl(now, idle), idle / 2))
        return Loaded(ticket, session)

    async def _read(self, ticket: Ticket) -> Session | None:
        found = await self._read_record(ticket)
        return found[0] if found else None

    async def _read_record(self, ticket: Ticket) -> tuple[Session, bytes] | None:
        """The live session and the stored bytes it came from (for a conditional write)."""
        try:
            raw = await self.store.load(ticket.store_key)
        except StoreError:
            raise StoreUnavailable() from None
        if raw is None:
            return None
        try:
            session = ticket.open_record(raw)
        except (OpenError, ValueError, TypeError, KeyError):
            return None
        if session.expires_at <= self.clock():
            return None
        if not session.identity.issuer:
            # Stored before sessions named their issuer: the provider's (for ``iss``).
            provider = self.providers.get(session.identity.provider)
            if provider is not None and provider.issuer:
                identity = replace(session.identity, issuer=provider.issuer)
                session = replace(session, identity=identity)
        return session, raw

    async def save(
        self, ticket: Ticket, session: Session, *, expected: bytes | None = None
    ) -> bool:
        """Store ``session``. With ``expected`` (the bytes it was read from), only if the
        record is still exactly that: False when it was ended or rewritten meanwhile."""
        now = self.clock()
        ttl = session.ttl(now, self.settings.idle_timeout)
        if ttl <= 0:
            raise SessionEnded()
        meta = SessionMeta(
            key=ticket.store_key,
            sub=session.identity.sub,
            provider_sid=session.provider_sid,
            created_at=session.created_at,
            expires_at=session.expires_at,
            provider=session.identity.provider,
        )
        sealed = ticket.seal_record(session)
        try:
            if expected is None:
                await self.store.save(meta, sealed, ttl)
            elif not await self.store.replace(meta, sealed, ttl, expected):
                return False
        except StoreError:
            raise StoreUnavailable() from None
        finally:
            if self.cache is not None:
                self.cache.invalidate(ticket.store_key)
        self._touched[ticket.store_key] = now
        return True

    async def create(
        self, identity: Identity, tokens: Tokens, provider_sid: str | None
    ) -> tuple[Ticket, Session]:
        """A brand-new session under a brand-new id (SECURITY.md 12: no fixation)."""
        now = self.clock()
        ticket = Ticket.new()
        session = Session(
            session_id=ticket.id_hex,
            identity=identity,
            tokens=tokens,
            created_at=now,
            expires_at=now + self.settings.max_lifetime,
            provider_sid=provider_sid,
        )
        await self.save(ticket, session)
        return ticket, session

    async def touch(self, loaded: Loaded) -> None:
        """Slide the idle timeout, writing at most once a minute per session and process."""
        now = self.clock()
        key = loaded.ticket.store_key
        if now - self._touched.get(key, 0.0) < self._touch_interval:
            return
        if len(self._touched) > 100_000:
            self._touched.clear()
        self._touched[key] = now
        ttl = loaded.session.ttl(now, self.settings.idle_timeout)
        try:
            await self.store.touch(key, ttl)
        except StoreError:
            log.warning("could not extend a session's idle timeout: store unavailable")

    async def destroy(self, ticket: Ticket) -> None:
        self._touched.pop(ticket.store_key, None)
        if self.cache is not None:
            self.cache.invalidate(ticket.store_key)
        try:
            await self.store.delete(ticket.store_key)
        except StoreError:
            raise StoreUnavailable() from None

    # -- refresh ---------------------------------------------------------------------------

    async def fresh(self, loaded: Loaded) -> Session:
        """The session with an access token good for at least ``refresh_skew``.

        Raises SessionEnded (log in again) or ProviderUnavailable (503, the session is kept).
        """
        session = loaded.session
        now = self.clock()
        if not session.needs_refresh(now, self.settings.refresh_skew):
            return session
        key = loaded.ticket.store_key
        if not session.tokens.refresh_token:
            if session.access_token_valid(now):
                return session
            # Nothing can renew it: the session is over (the browser logs in again).
            await self._drop(loaded.ticket)
            raise SessionEnded()
        if session.access_token_valid(now) and self._failed.get(key, 0.0) > now:
            # The provider failed a moment ago; serve with the still-valid token rather
            # than make every request wait for another failing call.
            return session
        provider = self.providers.get(session.identity.provider)
        if provider is None:
            # Its provider is no longer configured: nobody can renew it (not deleted, the
            # provider may come back with the next config).
            raise SessionEnded()
        task = self._inflight.get(key)
        if task is None:
            # A task of its own, so a client that goes away mid-refresh does not cancel the
            # refresh that every other request of this session is waiting for.
            task = asyncio.create_task(self._refresh_locked(loaded.ticket, provider.client))
            self._inflight[key] = task
            task.add_done_callback(lambda t: self._settled(key, t))
        return await asyncio.shield(task)

    def _settled(self, key: str, task: asyncio.Task[Session]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # retrieved here; every waiter re-raises it through the shield

    async def _refresh_locked(self, ticket: Ticket, provider: ProviderClient) -> Session:
        # The lock outlives the slowest refresh (token call, JWKS, userinfo each bounded by
        # the provider timeout): were it to expire mid-refresh, another replica could present
        # the refresh token being rotated, and the provider would revoke the whole family.
        # Waiters give up sooner (one provider call's worth) and serve what they can.
        hold = 3 * provider.settings.timeout + 5.0
        wait = provider.settings.timeout + 5.0
        try:
            async with self.store.lock("refresh:" + ticket.store_key, ttl=hold, wait=wait) as won:
                found = await self._read_record(ticket)
                if found is None:
                    raise SessionEnded()
                current, raw = found
                now = self.clock()
                if not current.needs_refresh(now, self.settings.refresh_skew):
                    return current  # another process refreshed it while we waited
                if not won:
                    return self._keep_or_fail(ticket, current, now)
                return await self._refresh(ticket, current, raw, provider)
        except StoreError:
            raise StoreUnavailable() from None

    def _keep_or_fail(self, ticket: Ticket, session: Session, now: float) -> Session:
        """The provider could not refresh: keep serving while the access token lasts."""
        if len(self._failed) > 10_000:
            self._failed = {k: v for k, v in self._failed.items() if v > now}
        self._failed[ticket.store_key] = now + min(RETRY_BACKOFF, self.settings.refresh_skew / 4)
        if session.access_token_valid(now):
            return session
        raise ProviderUnavailable()

    async def _refresh(
        self, ticket: Ticket, session: Session, raw: bytes, provider: ProviderClient
    ) -> Session:
        """Refresh at ``provider``: the session's own (refresh tokens never go elsewhere)."""
        refresh_token = session.tokens.refresh_token
        if not refresh_token:
            raise SessionEnded()
        try:
            resp = await provider.refresh(refresh_token)
        except OAuthError as exc:
            if exc.error in _GRANT_GONE:
                log.info("refresh refused (%s): session ended", exc.error)
                self.on_refresh("ended")
                await self._drop(ticket)
                raise SessionEnded() from None
            log.warning("refresh failed with %s; keeping the session", exc.error)
            self.on_refresh("failure")
            return self._keep_or_fail(ticket, session, self.clock())
        except ProviderTransportError as exc:
            log.warning("refresh failed: %s; keeping the session", exc)
            self.on_refresh("failure")
            return self._keep_or_fail(ticket, session, self.clock())
        now = self.clock()
        id_claims: dict[str, Any] = {}
        tokens = tokens_from(resp, now, session.tokens)
        if resp.id_token:
            try:
                id_claims = await provider.validator.validate_id_token(
                    resp.id_token, nonce=None, expect_sub=session.identity.sub
                )
            except TokenValidationError as exc:
                log.warning("refreshed ID token rejected: %s", exc.reason)
                self.on_refresh("ended")
                await self._drop(ticket)
                raise SessionEnded() from None
            except ProviderTransportError as exc:
                # The keys could not be fetched just now. The provider has already rotated
                # the refresh token, so the new tokens must be kept; the identity is not
                # updated from an ID token we could not verify.
                log.warning("refreshed ID token not verified (%s); identity kept", exc)
                tokens = replace(tokens, id_token=session.tokens.id_token)
        userinfo = await provider.userinfo(resp.access_token)  # None without an endpoint
        identity = session.identity
        if id_claims or userinfo:
            base = {"sub": session.identity.sub, **session.identity.claims, **id_claims}
            identity = identity_from(base, userinfo, identity.provider, identity.issuer)
        updated = session.with_tokens(tokens, identity, now)
        # Saved before the lock is released: no replica can present the rotated-out token.
        # Only over the record this refresh started from: a session ended while the provider
        # answered (sign-out, revocation, back-channel logout, a refused grant elsewhere)
        # stays ended, and the tokens just obtained are revoked rather than kept.
        if not await self.save(ticket, updated, expected=raw):
            return await self._lost_race(ticket, tokens, provider)
        self._failed.pop(ticket.store_key, None)
        self.on_refresh("success")
        return updated

    async def _lost_race(self, ticket: Ticket, tokens: Tokens, provider: ProviderClient) -> Session:
        current = await self._read(ticket)
        if current is not None:
            # Rewritten by another process meanwhile (its lock had expired): use its record.
            # Our tokens are not revoked: at many providers that would end its grant too.
            self.on_refresh("success")
            return current
        log.info("session ended while its refresh was in flight; refreshed tokens dropped")
        if tokens.refresh_token:
            await provider.revoke(tokens.refresh_token, "refresh_token")
        self.on_refresh("ended")
        raise SessionEnded()

    async def _drop(self, ticket: Ticket) -> None:
        try:
            await self.destroy(ticket)
        except StoreUnavailable:
            log.warning("could not delete an ended session: store unavailable")

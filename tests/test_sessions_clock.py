"""``SessionManager``'s refresh and lifetime decisions against an injected fake clock.

No real waiting: the manager and its memory store share a ``FakeClock``; the real dev provider
(real HTTP, real time) issues the tokens, and the manager judges their expiry by its own clock
from the token response's ``expires_in`` / ``refresh_expires_in``. The end-to-end versions
through a real gateway and Redis are in tests/test_lifetimes.py and tests/test_refresh.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest

from gateway.config import ProviderSettings, SessionSettings
from gateway.crypto import KeyRing, decode_secret, new_secret
from gateway.devidp import ClientRegistration, DevIdpConfig, RunningIdp, demo_users, start_devidp
from gateway.devidp.records import Grant
from gateway.errors import ProviderUnavailable
from gateway.oidc import ProviderClient
from gateway.session import Identity, Session, Ticket
from gateway.sessions import Loaded, SessionEnded, SessionManager, tokens_from
from gateway.store import MemoryStore
from tests.conftest import CLIENT_ID, CLIENT_SECRET
from tests.support.clock import FakeClock

SCOPES = ("openid", "email", "profile", "offline_access")


class CountingStore(MemoryStore):
    """The memory store, remembering every idle-timeout extension (key, ttl)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        super().__init__(clock)
        self.touches: list[tuple[str, float]] = []

    async def touch(self, key: str, ttl: float) -> None:
        self.touches.append((key, ttl))
        await super().touch(key, ttl)


@dataclass
class Rig:
    idp: RunningIdp
    clock: FakeClock
    store: CountingStore
    manager: SessionManager
    outcomes: list[str] = field(default_factory=list)

    @property
    def refresh_calls(self) -> int:
        return int(self.idp.state.token_calls["refresh_token"])

    async def sign_in(self, user: str = "alice") -> str:
        """A new session from a real token response of the provider; its cookie value."""
        state = self.idp.state
        grant = Grant(
            id="grant-" + str(len(state.grants)),
            client_id=CLIENT_ID,
            sub=user,
            scope=SCOPES,
            sid="sid-1",
            auth_time=int(time.time()),
        )
        state.grants[grant.id] = grant
        # A refresh grant stands in for the code exchange: same token response shape.
        resp = await self.manager.provider.refresh(state.issue_refresh_token(grant))
        state.token_calls.clear()
        tokens = tokens_from(resp, self.clock())
        ticket, _ = await self.manager.create(Identity(sub=user), tokens, "sid-1")
        self.store.touches.clear()
        return ticket.to_cookie(self.manager.ring)

    async def open(self, cookie: str) -> Loaded | None:
        return await self.manager.open(cookie)

    async def request(self, cookie: str) -> Session | None:
        """What a request does with the session: open, make fresh, slide the idle timeout."""
        loaded = await self.manager.open(cookie)
        if loaded is None:
            return None
        session = await self.manager.fresh(loaded)
        await self.manager.touch(Loaded(loaded.ticket, session))
        return session


@asynccontextmanager
async def rig(idp_config: dict[str, Any] | None = None, **session: Any) -> AsyncIterator[Rig]:
    idp = await start_devidp(
        DevIdpConfig(
            users=demo_users(),
            clients=[
                ClientRegistration(
                    client_id=CLIENT_ID,
                    client_secret=CLIENT_SECRET,
                    redirect_uris=("http://127.0.0.1:1/oauth2/callback",),
                )
            ],
            **(idp_config or {}),
        )
    )
    clock = FakeClock()
    store = CountingStore(clock)
    settings = SessionSettings.model_validate(
        {"store": "memory", "cookie_secrets": [new_secret()], **session}
    )
    ring = KeyRing([decode_secret(s.get_secret_value()) for s in settings.cookie_secrets])
    try:
        async with aiohttp.ClientSession() as http:
            provider = ProviderClient(
                ProviderSettings.model_validate(
                    {"issuer": idp.url, "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}
                ),
                "http://127.0.0.1:1/oauth2/callback",
                http,
            )
            manager = SessionManager(settings, store, ring, provider, clock=clock)
            assert manager.cache is None  # the memory store has no invalidation feed
            made = Rig(idp, clock, store, manager)
            manager.on_refresh = made.outcomes.append
            yield made
    finally:
        await idp.runner.cleanup()


def ticket_of(r: Rig, cookie: str) -> Ticket:
    return Ticket.from_cookie(cookie, r.manager.ring)


# -- refresh -------------------------------------------------------------------------------


async def test_refresh_happens_once_less_than_the_skew_is_left_and_not_before() -> None:
    # 300 s access tokens, 60 s skew: the refresh is due at 240 s, not a moment before.
    async with rig({"access_token_ttl": 300}, refresh_skew=60) as r:
        cookie = await r.sign_in()
        started = r.clock()
        first = await r.request(cookie)
        assert first is not None
        assert first.tokens.expires_at == started + 300
        r.clock.advance(239.5)
        same = await r.request(cookie)
        assert same is not None and same.tokens == first.tokens
        assert r.refresh_calls == 0

        r.clock.advance(0.5)  # exactly expires_at - skew
        second = await r.request(cookie)
        assert second is not None
        assert second.tokens.access_token != first.tokens.access_token
        assert second.tokens.refresh_token != first.tokens.refresh_token  # rotated
        assert second.tokens.expires_at == r.clock() + 300
        assert second.refreshed_at == r.clock()
        assert r.refresh_calls == 1
        assert r.outcomes == ["success"]

        # The refreshed token is stored: the next request uses it and refreshes nothing.
        r.clock.advance(239.5)
        again = await r.request(cookie)
        assert again is not None and again.tokens == second.tokens
        assert r.refresh_calls == 1


async def test_the_rotated_refresh_token_is_stored_and_used_for_the_next_refresh() -> None:
    # The provider revokes the whole family when a rotated-out token is presented: a second
    # refresh that succeeds proves the first one stored the rotated token.
    async with rig({"access_token_ttl": 300}, refresh_skew=60) as r:
        cookie = await r.sign_in()
        for _ in range(2):
            r.clock.advance(240)
            assert (await r.request(cookie)) is not None
        assert r.refresh_calls == 2
        assert r.outcomes == ["success", "success"]
        state = r.idp.state
        assert [t.rotated for t in state.refresh_tokens.values()] == [True, True, True, False]
        assert not any(g.revoked for g in state.grants.values())


async def test_concurrent_requests_in_one_process_refresh_once() -> None:
    async with rig({"access_token_ttl": 300}, refresh_skew=60) as r:
        cookie = await r.sign_in()
        r.idp.state.faults.token_delay = 0.2  # the provider is slow: the requests overlap
        r.clock.advance(240)
        answers = await asyncio.gather(*(r.request(cookie) for _ in range(30)))
        assert r.refresh_calls == 1
        assert r.outcomes == ["success"]
        tokens = {a.tokens.access_token for a in answers if a is not None}
        assert tokens == {list(r.idp.state.access_tokens)[-1]}
        assert len([a for a in answers if a is not None]) == 30


async def test_changed_groups_reach_the_identity_at_the_next_refresh() -> None:
    async with rig({"access_token_ttl": 300}, refresh_skew=60) as r:
        cookie = await r.sign_in("bob")
        r.idp.state.set_user_groups("bob", ["staff", "admins"])
        r.clock.advance(239.5)
        before = await r.request(cookie)
        assert before is not None and "admins" not in before.identity.groups
        r.clock.advance(0.5)
        after = await r.request(cookie)
        assert after is not None
        assert after.identity.sub == "bob"
        assert after.identity.groups == ("staff", "admins")


async def test_a_provider_outage_serves_while_the_token_is_valid_then_fails_with_503() -> None:
    async with rig({"access_token_ttl": 300}, refresh_skew=60) as r:
        cookie = await r.sign_in()
        first = await r.request(cookie)
        assert first is not None
        r.idp.state.faults.token_status = 503

        r.clock.advance(240)
        served = await r.request(cookie)
        assert served is not None and served.tokens == first.tokens
        assert r.refresh_calls == 1
        assert r.outcomes == ["failure"]
        # Within the retry backoff (min(5 s, skew/4)) no request calls the provider again.
        r.clock.advance(4.5)
        assert (await r.request(cookie)) == served
        assert r.refresh_calls == 1
        r.clock.advance(0.5)
        assert (await r.request(cookie)) == served
        assert r.refresh_calls == 2

        # Expired, the provider still down: 503, and the session is kept.
        r.clock.advance(55)  # exactly expires_at
        with pytest.raises(ProviderUnavailable) as failed:
            await r.request(cookie)
        assert failed.value.status == 503
        assert failed.value.code == "provider_unavailable"
        assert r.refresh_calls == 3
        assert (await r.open(cookie)) is not None

        # The provider is back: the next request refreshes.
        r.idp.state.faults.token_status = None
        back = await r.request(cookie)
        assert back is not None and back.tokens.access_token != first.tokens.access_token
        assert back.tokens.expires_at == r.clock() + 300
        assert r.outcomes == ["failure", "failure", "failure", "success"]


async def test_without_a_refresh_token_the_session_is_over_at_expiry() -> None:
    async with rig({"access_token_ttl": 300}, refresh_skew=60) as r:
        r.idp.state.faults.no_refresh_token = True
        cookie = await r.sign_in()
        first = await r.request(cookie)
        assert first is not None and first.tokens.refresh_token is None
        r.clock.advance(299.5)  # in the skew window, still valid: nothing to refresh
        assert (await r.request(cookie)) == first
        r.clock.advance(0.5)
        with pytest.raises(SessionEnded):
            await r.request(cookie)
        assert (await r.open(cookie)) is None  # dropped from the store
        assert r.refresh_calls == 0


# -- lifetimes -----------------------------------------------------------------------------


async def test_an_idle_session_ends_after_the_idle_timeout() -> None:
    async with rig(idle_timeout=600) as r:
        cookie = await r.sign_in()
        r.clock.advance(599.5)
        assert (await r.open(cookie)) is not None  # opening alone slides nothing
        r.clock.advance(0.5)
        assert (await r.open(cookie)) is None


async def test_a_touched_session_slides_its_idle_timeout() -> None:
    async with rig({"access_token_ttl": 3600}, idle_timeout=600) as r:
        cookie = await r.sign_in()
        started = r.clock()
        # A request every 500 s for over three idle timeouts: each one slides it along.
        for _ in range(4):
            r.clock.advance(500)
            assert (await r.request(cookie)) is not None
        assert r.clock() == started + 2000
        r.clock.advance(599.5)
        assert (await r.open(cookie)) is not None
        r.clock.advance(0.5)
        assert (await r.open(cookie)) is None


async def test_max_lifetime_ends_a_session_even_when_used() -> None:
    # 300 s access tokens: the session is refreshed along the way too.
    async with rig({"access_token_ttl": 300}, idle_timeout=600, max_lifetime=3600) as r:
        cookie = await r.sign_in()
        for _ in range(17):
            r.clock.advance(200)
            assert (await r.request(cookie)) is not None
        assert r.refresh_calls >= 8
        # Last request at 3400 s: the record is kept only to the absolute end.
        assert r.store.touches[-1][1] == 200
        r.clock.advance(199.5)
        assert (await r.request(cookie)) is not None
        r.clock.advance(0.5)
        assert (await r.open(cookie)) is None


async def test_a_session_never_outlives_its_refresh_token() -> None:
    # The refresh token lives 1000 s; the gateway's own limits (8 h idle, 7 d) are longer.
    async with rig({"access_token_ttl": 3600, "refresh_token_ttl": 1000}) as r:
        cookie = await r.sign_in()
        session = await r.request(cookie)
        assert session is not None
        assert session.tokens.refresh_expires_at == r.clock() + 1000
        for _ in range(4):
            r.clock.advance(200)
            assert (await r.request(cookie)) is not None
        assert r.store.touches[-1][1] == 200  # the extension stops at the token's end
        r.clock.advance(199.5)
        assert (await r.request(cookie)) is not None
        r.clock.advance(0.5)
        assert (await r.open(cookie)) is None
        assert r.refresh_calls == 0


@pytest.mark.parametrize(("idle", "interval"), [(28800.0, 60.0), (300.0, 30.0)])
async def test_the_touch_writes_at_most_once_per_interval(idle: float, interval: float) -> None:
    # min(60 s, idle/10) between two store expiry extensions of one session.
    async with rig({"access_token_ttl": 86400}, idle_timeout=idle) as r:
        cookie = await r.sign_in()  # the save counts as the first write
        key = ticket_of(r, cookie).store_key
        for _ in range(5):
            assert (await r.request(cookie)) is not None
        r.clock.advance(interval - 0.5)
        assert (await r.request(cookie)) is not None
        assert r.store.touches == []
        r.clock.advance(0.5)
        for _ in range(5):
            assert (await r.request(cookie)) is not None
        assert r.store.touches == [(key, idle)]
        r.clock.advance(interval - 0.5)
        assert (await r.request(cookie)) is not None
        assert len(r.store.touches) == 1
        r.clock.advance(0.5)
        assert (await r.request(cookie)) is not None
        assert r.store.touches == [(key, idle), (key, idle)]

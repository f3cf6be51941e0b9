"""The per-process session cache (gateway/session_cache.py) across replicas on a real Redis.

Two ``SessionManager`` objects, each with a store of its own on the same redis-server, play
two gateway replicas. Store GETs are counted with ``INFO commandstats`` on a redis-server of
the test's own.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis

from gateway import keys
from gateway.config import SessionSettings
from gateway.crypto import KeyRing, decode_secret, new_secret
from gateway.devidp.tokens import BACKCHANNEL_EVENT
from gateway.errors import StoreUnavailable
from gateway.session import Identity, Ticket, Tokens
from gateway.sessions import SessionManager
from gateway.store import MemoryStore, RedisStore, open_store
from tests import topology
from tests.conftest import CLIENT_ID, RedisServer, Stack
from tests.idp_client import FormParser, http_login

BOUND = 0.1  # an ended session is refused by every replica within this many seconds


def gets(server: RedisServer) -> int:
    client = redis.Redis.from_url(server.url)
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    return int(stats.get("cmdstat_get", {}).get("calls", 0))


class Replicas:
    """Session managers sharing one Redis, prefix and cookie secret, like gateway replicas."""

    def __init__(self, url: str, **session: Any) -> None:
        self.settings = SessionSettings(
            store="redis",
            redis_url=url,
            key_prefix=f"c{time.monotonic_ns()}:",
            cookie_secrets=[new_secret()],
            **session,
        )
        self.ring = KeyRing(
            [decode_secret(s.get_secret_value()) for s in self.settings.cookie_secrets]
        )
        self.managers: list[SessionManager] = []

    def replica(self, clock: Callable[[], float] = time.time) -> SessionManager:
        manager = SessionManager(
            self.settings,
            open_store(self.settings),
            self.ring,
            None,
            clock=clock,  # type: ignore[arg-type]
        )
        self.managers.append(manager)
        return manager

    async def close(self) -> None:
        for manager in self.managers:
            await manager.store.close()


@pytest.fixture
async def replicas(own_redis: RedisServer) -> AsyncIterator[Callable[..., Replicas]]:
    made: list[Replicas] = []

    def make(**session: Any) -> Replicas:
        made.append(Replicas(own_redis.url, **session))
        return made[-1]

    yield make
    for group in made:
        await group.close()


async def sign_in(manager: SessionManager, ring: KeyRing, sub: str = "alice") -> str:
    tokens = Tokens("at", refresh_token="rt", expires_at=time.time() + 3600)
    ticket, _ = await manager.create(Identity(sub, {"name": sub}), tokens, "sid-" + sub)
    return ticket.to_cookie(ring)


async def trusted(manager: SessionManager) -> None:
    """Until the replica's invalidation feed is confirmed (bounded)."""
    assert manager.cache is not None
    for _ in range(500):
        if manager.cache.trusted:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the invalidation feed was never confirmed")


async def cached(manager: SessionManager, cookie: str) -> None:
    """Open once (starts the feed), wait for it, and open again to fill the cache."""
    assert await manager.open(cookie) is not None
    await trusted(manager)
    assert await manager.open(cookie) is not None
    assert manager.cache is not None and len(manager.cache) == 1


async def refused_within_bound(manager: SessionManager, cookie: str) -> None:
    deadline = time.monotonic() + BOUND
    loaded = await manager.open(cookie)
    while loaded is not None and time.monotonic() < deadline:
        await asyncio.sleep(0.005)
        loaded = await manager.open(cookie)
    assert loaded is None


async def test_a_cache_hit_costs_no_store_round_trip(replicas: Any, own_redis: RedisServer) -> None:
    group = replicas()
    a = group.replica()
    cookie = await sign_in(a, group.ring)
    await cached(a, cookie)
    before = gets(own_redis)
    for _ in range(20):
        loaded = await a.open(cookie)
        assert loaded is not None and loaded.session.identity.sub == "alice"
    assert gets(own_redis) == before


async def test_cache_size_0_reads_the_store_on_every_request(
    replicas: Any, own_redis: RedisServer
) -> None:
    group = replicas(cache_size=0)
    a = group.replica()
    cookie = await sign_in(a, group.ring)
    assert a.cache is None
    before = gets(own_redis)
    for _ in range(20):
        assert await a.open(cookie) is not None
    assert gets(own_redis) == before + 20


async def test_a_repeat_cookie_is_opened_once_and_only_beside_the_cache(
    replicas: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the cache on, what a cookie opens to is remembered (no AES-GCM per request); it
    decides nothing about the session (an ended one is refused all the same); a cookie that
    does not open is never remembered; with ``cache_size: 0`` every request opens its cookie."""
    opened: list[str] = []
    real = Ticket.from_cookie.__func__  # type: ignore[attr-defined]

    def counted(cls: type[Ticket], value: str, ring: KeyRing) -> Ticket:
        opened.append(value)
        return real(cls, value, ring)  # type: ignore[no-any-return]

    monkeypatch.setattr(Ticket, "from_cookie", classmethod(counted))
    group = replicas()
    a = group.replica()
    cookie = await sign_in(a, group.ring)
    for _ in range(5):
        loaded = await a.open(cookie)
        assert loaded is not None
    assert opened == [cookie]
    forged = cookie[:-4] + ("AAAA" if not cookie.endswith("AAAA") else "BBBB")
    for _ in range(2):
        assert await a.open(forged) is None
    assert opened == [cookie, forged, forged]
    await a.destroy(loaded.ticket)
    await refused_within_bound(a, cookie)
    off = replicas(cache_size=0)
    b = off.replica()
    cookie_b = await sign_in(b, off.ring)
    opened.clear()
    for _ in range(3):
        assert await b.open(cookie_b) is not None
    assert opened == [cookie_b] * 3


async def test_the_memory_store_is_not_cached() -> None:
    settings = SessionSettings(store="memory", cookie_secrets=[new_secret()])
    ring = KeyRing([decode_secret(s.get_secret_value()) for s in settings.cookie_secrets])
    manager = SessionManager(settings, MemoryStore(), ring, None)  # type: ignore[arg-type]
    assert manager.cache is None
    cookie = await sign_in(manager, ring)
    assert await manager.open(cookie) is not None


async def test_the_cache_holds_at_most_cache_size_sessions(replicas: Any) -> None:
    group = replicas(cache_size=3)
    a = group.replica()
    cookies = [await sign_in(a, group.ring, f"user{i}") for i in range(5)]
    await a.open(cookies[0])
    await trusted(a)
    for cookie in cookies:
        assert await a.open(cookie) is not None
    assert a.cache is not None and len(a.cache) == 3


async def test_signed_out_on_replica_a_is_refused_on_replica_b_within_100_ms(
    replicas: Any, own_redis: RedisServer
) -> None:
    group = replicas()
    a, b = group.replica(), group.replica()
    cookie = await sign_in(a, group.ring)
    await cached(b, cookie)
    before = gets(own_redis)
    assert await b.open(cookie) is not None
    assert gets(own_redis) == before  # served from B's cache
    loaded = await a.open(cookie)
    assert loaded is not None
    await a.destroy(loaded.ticket)  # sign-out (and invalid_grant, via _drop)
    await refused_within_bound(b, cookie)


async def test_a_store_delete_from_anywhere_evicts_the_session_everywhere(
    replicas: Any, own_redis: RedisServer
) -> None:
    """``gateway sessions revoke`` and back-channel logout delete through the store alone."""
    group = replicas()
    b = group.replica()
    alice = await sign_in(b, group.ring, "alice")
    bob = await sign_in(b, group.ring, "bob")
    await cached(b, alice)
    assert await b.open(bob) is not None
    elsewhere = RedisStore.from_url(own_redis.url, prefix=group.settings.key_prefix)
    try:
        # As `gateway sessions revoke --user alice` does.
        for meta in await elsewhere.keys_for_user("alice"):
            await elsewhere.delete(meta.key)
        await refused_within_bound(b, alice)
        # As back-channel logout does (by the provider's sid).
        for meta in await elsewhere.keys_for_sid("sid-bob"):
            await elsewhere.delete(meta.key)
        await refused_within_bound(b, bob)
    finally:
        await elsewhere.close()


async def test_a_refresh_on_replica_a_replaces_the_session_cached_on_replica_b(
    replicas: Any,
) -> None:
    group = replicas()
    a, b = group.replica(), group.replica()
    cookie = await sign_in(a, group.ring)
    await cached(b, cookie)
    loaded = await a.open(cookie)
    assert loaded is not None
    raw = await a.store.load(loaded.ticket.store_key)
    assert raw is not None
    rotated = Tokens("at-2", refresh_token="rt-2", expires_at=time.time() + 3600)
    # What a refresh saves: a compare-and-set over the record it read.
    updated = loaded.session.with_tokens(rotated, loaded.session.identity, time.time())
    assert await a.save(loaded.ticket, updated, expected=raw)
    deadline = time.monotonic() + BOUND
    seen = await b.open(cookie)
    while (
        seen is not None
        and seen.session.tokens.refresh_token == "rt"
        and (time.monotonic() < deadline)
    ):
        await asyncio.sleep(0.005)
        seen = await b.open(cookie)
    assert seen is not None and seen.session.tokens.refresh_token == "rt-2"


async def test_a_cached_session_lives_at_most_the_cache_ttl(
    replicas: Any, own_redis: RedisServer
) -> None:
    now = [time.time()]
    group = replicas(cache_ttl="5s")
    b = group.replica(clock=lambda: now[0])
    cookie = await sign_in(b, group.ring)
    await cached(b, cookie)
    before = gets(own_redis)
    now[0] += 4.0
    assert await b.open(cookie) is not None
    assert gets(own_redis) == before  # still cached
    now[0] += 2.0  # past the cache TTL: read again from the store
    assert await b.open(cookie) is not None
    assert gets(own_redis) == before + 1


async def test_a_cached_session_never_outlives_its_lifetime(replicas: Any) -> None:
    now = [time.time()]
    group = replicas(max_lifetime="1h", cache_ttl="60s", idle_timeout="8h")
    b = group.replica(clock=lambda: now[0])
    cookie = await sign_in(b, group.ring)
    await cached(b, cookie)
    assert b.cache is not None and len(b.cache) == 1
    now[0] += 3600.0  # the lifetime ends before the cache entry would
    assert await b.open(cookie) is None
    assert len(b.cache) == 0


async def test_a_killed_pubsub_connection_flushes_the_cache_before_it_is_trusted_again(
    replicas: Any, own_redis: RedisServer
) -> None:
    group = replicas()
    b = group.replica()
    cookie = await sign_in(b, group.ring)
    await cached(b, cookie)
    client = redis.Redis.from_url(own_redis.url)
    try:
        assert client.client_kill_filter(_type="pubsub") >= 1
    finally:
        client.close()
    before = gets(own_redis)
    # The loss is seen at once; the feed subscribes again and the cache starts empty.
    assert b.cache is not None
    for _ in range(500):
        if b.cache.trusted and len(b.cache) == 0:
            break
        await asyncio.sleep(0.01)
    assert b.cache.trusted and len(b.cache) == 0
    assert await b.open(cookie) is not None
    assert gets(own_redis) == before + 1
    assert await b.open(cookie) is not None
    assert gets(own_redis) == before + 1  # cached again


async def test_while_the_channel_is_down_every_request_reads_the_store(
    replicas: Any, own_redis: RedisServer
) -> None:
    group = replicas()
    b = group.replica()
    cookie = await sign_in(b, group.ring)
    await cached(b, cookie)
    client = redis.Redis.from_url(own_redis.url)
    try:
        # No channel may be used: Redis drops the subscription and refuses a new one.
        client.execute_command("ACL", "SETUSER", "default", "resetchannels")
        assert b.cache is not None
        for _ in range(500):
            if not b.cache.trusted:
                break
            await asyncio.sleep(0.01)
        before = gets(own_redis)
        for _ in range(10):
            assert await b.open(cookie) is not None
            await asyncio.sleep(0.02)
        assert gets(own_redis) == before + 10
        assert not b.cache.trusted
    finally:
        client.execute_command("ACL", "SETUSER", "default", "allchannels")
        client.close()
    await trusted(b)
    assert await b.open(cookie) is not None
    before = gets(own_redis)
    assert await b.open(cookie) is not None
    assert gets(own_redis) == before


# -- two gateway replicas (real apps, one Redis, one provider) -----------------------------


async def two_gateways(make_stack: Any, own_redis: RedisServer, **session: Any) -> list[Stack]:
    a = await make_stack(redis_url=own_redis.url, session=session)
    shared = {
        "key_prefix": a.settings.session.key_prefix,
        "cookie_secrets": [a.settings.session.cookie_secrets[0].get_secret_value()],
        **session,
    }
    b = await make_stack(redis_url=own_redis.url, idp=a.idp, echo=a.echo, session=shared)
    return [a, b]


async def status(stack: Stack, cookie: str) -> int:
    """An API call to ``stack`` with this session cookie alone."""
    headers = {"Accept": "application/json", "Cookie": f"gw_test={cookie}"}
    async with aiohttp.ClientSession() as http:
        async with http.get(stack.url + "/api/x", headers=headers, allow_redirects=False) as r:
            return r.status


async def signed_in(browser: aiohttp.ClientSession, a: Stack, b: Stack) -> str:
    """Sign in on A; return the cookie, once B serves it from its cache."""
    result = await http_login(browser, a.url + "/", "alice", "alice")
    assert result.status == 200
    cookie = next(c.value for c in browser.cookie_jar if c.key == "gw_test")
    assert await status(b, cookie) == 200
    await trusted(b.app[keys.SESSIONS])
    assert await status(b, cookie) == 200
    assert len(b.app[keys.SESSIONS].cache or ()) == 1
    return cookie


async def refused_by(stack: Stack, cookie: str) -> None:
    deadline = time.monotonic() + BOUND
    code = await status(stack, cookie)
    while code == 200 and time.monotonic() < deadline:
        await asyncio.sleep(0.005)
        code = await status(stack, cookie)
    assert code == 401


async def test_replica_b_serves_repeat_requests_without_reading_redis(
    make_stack: Any, browser: aiohttp.ClientSession, own_redis: RedisServer
) -> None:
    a, b = await two_gateways(make_stack, own_redis)
    cookie = await signed_in(browser, a, b)
    before = gets(own_redis)
    for _ in range(20):
        assert await status(b, cookie) == 200
    assert gets(own_redis) == before


async def test_without_the_cache_every_request_reads_redis_once(
    make_stack: Any, browser: aiohttp.ClientSession, own_redis: RedisServer
) -> None:
    a, b = await two_gateways(make_stack, own_redis, cache_size=0)
    result = await http_login(browser, a.url + "/", "alice", "alice")
    assert result.status == 200
    cookie = next(c.value for c in browser.cookie_jar if c.key == "gw_test")
    before = gets(own_redis)
    for _ in range(20):
        assert await status(b, cookie) == 200
    assert gets(own_redis) == before + 20


async def test_sign_out_on_replica_a_is_refused_by_replica_b_within_100_ms(
    make_stack: Any, browser: aiohttp.ClientSession, own_redis: RedisServer
) -> None:
    a, b = await two_gateways(make_stack, own_redis)
    cookie = await signed_in(browser, a, b)
    async with browser.get(a.url + "/oauth2/sign_out") as resp:
        parser = FormParser()
        parser.feed(await resp.text())
    fields = {name: value for _, name, value in parser.forms[0].fields}
    async with browser.post(a.url + "/oauth2/sign_out", data=fields, allow_redirects=False) as r:
        assert r.status == 303
    await refused_by(b, cookie)


async def test_back_channel_logout_at_replica_a_is_refused_by_replica_b_within_100_ms(
    make_stack: Any, browser: aiohttp.ClientSession, own_redis: RedisServer
) -> None:
    a, b = await two_gateways(make_stack, own_redis)
    cookie = await signed_in(browser, a, b)
    now = int(time.time())
    claims = {"iss": a.idp.issuer, "aud": CLIENT_ID, "iat": now, "exp": now + 120,
              "jti": uuid.uuid4().hex, "sub": "alice", "events": {BACKCHANNEL_EVENT: {}}}  # fmt: skip
    token = a.idp.state.sign(claims, headers={"typ": "logout+jwt"})
    async with aiohttp.ClientSession() as http:
        url = a.url + "/oauth2/backchannel_logout"
        async with http.post(url, data={"logout_token": token}) as resp:
            assert resp.status == 200
    await refused_by(b, cookie)


# -- Sentinel and Cluster (marker ``topology``) ----------------------------------------------


async def revoked_across(url: str) -> None:
    """Replica B caches a session; replica A signs it out; B refuses it within the bound."""
    group = Replicas(url)
    try:
        a, b = group.replica(), group.replica()
        cookie = await sign_in(a, group.ring)
        await cached(b, cookie)
        loaded = await a.open(cookie)
        assert loaded is not None
        await a.destroy(loaded.ticket)
        await refused_within_bound(b, cookie)
    finally:
        await group.close()


@pytest.mark.topology
async def test_the_cache_is_invalidated_through_sentinel(tmp_path: Path) -> None:
    topo = await asyncio.to_thread(topology.start_sentinel_set, tmp_path / "redis")
    try:
        await revoked_across(topo.url)
    finally:
        topo.close()


@pytest.mark.topology
async def test_the_cache_is_invalidated_across_a_cluster(tmp_path: Path) -> None:
    topo = await asyncio.to_thread(topology.start_cluster, tmp_path / "redis")
    try:
        await revoked_across(topo.url)
    finally:
        topo.close()


async def test_a_stopped_redis_is_never_answered_from_the_cache(
    replicas: Any, own_redis: RedisServer
) -> None:
    group = replicas()
    b = group.replica()
    cookie = await sign_in(b, group.ring)
    await cached(b, cookie)
    own_redis.stop()
    await asyncio.sleep(0.05)  # the closed connection is seen, not retried behind our back
    assert b.cache is not None and not b.cache.trusted
    with pytest.raises(StoreUnavailable):
        await b.open(cookie)

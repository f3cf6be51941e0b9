"""One contract suite for every ``SessionStore`` (oauth2-proxy's ``RunSessionStoreTests``):
records, TTLs, indexes, locks and replay claims behave alike in memory and in Redis.

The memory store runs on an injected clock that the tests move forward; Redis runs on real
time with short TTLs, and every expiry is awaited by polling, never by asserting a timing.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest

from gateway.errors import StoreError
from gateway.store import MemoryStore, RedisStore, SessionMeta, SessionStore
from tests.conftest import RedisServer
from tests.support.ports import free_port

SHORT = 0.3  # seconds: a TTL meant to run out during the test
LONG = 60.0  # seconds: a TTL meant to outlive the test


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class StoreEnv:
    store: SessionStore
    kind: str
    clock: FakeClock | None

    async def elapse(self, seconds: float) -> None:
        """Let time pass: move the fake clock, or wait on the real one."""
        if self.clock is not None:
            self.clock.now += seconds
            await asyncio.sleep(0.06)  # let lock waiters re-check
        else:
            await asyncio.sleep(seconds)

    async def until(self, check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
        """Poll ``check`` until it holds, moving time forward in SHORT steps."""
        deadline = time.monotonic() + timeout
        while not await check():
            assert time.monotonic() < deadline, "condition not reached in time"
            await self.elapse(SHORT / 3)


@pytest.fixture(params=["memory", "redis"])
async def env(request: pytest.FixtureRequest) -> AsyncIterator[StoreEnv]:
    if request.param == "memory":
        clock = FakeClock()
        result = StoreEnv(MemoryStore(clock=clock), "memory", clock)
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        store = RedisStore.from_url(server.url, prefix=f"t{uuid.uuid4().hex[:10]}:")
        result = StoreEnv(store, "redis", None)
    try:
        yield result
    finally:
        await result.store.close()


def meta(sub: str = "alice", sid: str | None = "sid-1", key: str | None = None) -> SessionMeta:
    return SessionMeta(
        key=key or uuid.uuid4().hex,
        sub=sub,
        provider_sid=sid,
        created_at=1_700_000_000.0,
        expires_at=1_700_086_400.0,
    )


def keys(metas: list[SessionMeta]) -> set[str]:
    return {m.key for m in metas}


# -- records -------------------------------------------------------------------------------------


async def test_save_load_delete(env: StoreEnv) -> None:
    store = env.store
    m = meta()
    assert await store.load(m.key) is None
    await store.save(m, b"sealed-bytes\x00\xff", LONG)
    assert await store.load(m.key) == b"sealed-bytes\x00\xff"
    await store.save(m, b"replaced", LONG)
    assert await store.load(m.key) == b"replaced"
    await store.delete(m.key)
    assert await store.load(m.key) is None
    assert await store.keys_for_user("alice") == []
    assert await store.keys_for_sid("sid-1") == []
    await store.delete(m.key)  # deleting twice is harmless
    await store.delete("never-saved")


async def test_records_are_separate(env: StoreEnv) -> None:
    a, b = meta(), meta()
    await env.store.save(a, b"A", LONG)
    await env.store.save(b, b"B", LONG)
    await env.store.delete(a.key)
    assert await env.store.load(a.key) is None
    assert await env.store.load(b.key) == b"B"


async def test_ttl_expiry(env: StoreEnv) -> None:
    m = meta()
    await env.store.save(m, b"x", SHORT)

    async def gone() -> bool:
        return await env.store.load(m.key) is None

    await env.until(gone)
    assert await env.store.keys_for_user(m.sub) == []


async def test_touch_extends(env: StoreEnv) -> None:
    m = meta()
    await env.store.save(m, b"x", 1.0)
    await env.store.touch(m.key, LONG)
    await env.elapse(1.5)
    assert await env.store.load(m.key) == b"x"
    assert keys(await env.store.keys_for_user(m.sub)) == {m.key}


async def test_touch_shortens_and_ignores_missing(env: StoreEnv) -> None:
    m = meta()
    await env.store.save(m, b"x", LONG)
    await env.store.touch(m.key, SHORT)

    async def gone() -> bool:
        return await env.store.load(m.key) is None

    await env.until(gone)
    await env.store.touch("never-saved", LONG)
    assert await env.store.load("never-saved") is None


# -- indexes ------------------------------------------------------------------------------------


async def test_keys_for_user_and_sid(env: StoreEnv) -> None:
    store = env.store
    a1 = meta("alice", "sid-a")
    a2 = meta("alice", "sid-b")
    b1 = meta("bob", "sid-a")
    n1 = meta("carol", None)
    for m in (a1, a2, b1, n1):
        await store.save(m, b"x", LONG)
    assert keys(await store.keys_for_user("alice")) == {a1.key, a2.key}
    assert keys(await store.keys_for_user("bob")) == {b1.key}
    assert keys(await store.keys_for_user("carol")) == {n1.key}
    assert await store.keys_for_user("nobody") == []
    assert keys(await store.keys_for_sid("sid-a")) == {a1.key, b1.key}
    assert keys(await store.keys_for_sid("sid-b")) == {a2.key}
    assert await store.keys_for_sid("sid-none") == []
    [found] = await store.keys_for_user("bob")
    assert found == b1  # the whole meta comes back
    await store.delete(a1.key)
    assert keys(await store.keys_for_user("alice")) == {a2.key}
    assert keys(await store.keys_for_sid("sid-a")) == {b1.key}


async def test_expired_sessions_vanish_from_indexes(env: StoreEnv) -> None:
    store = env.store
    keep = meta("alice", "sid-x")
    lapse = meta("alice", "sid-x")
    await store.save(keep, b"x", LONG)
    await store.save(lapse, b"x", SHORT)

    async def pruned() -> bool:
        return keys(await store.keys_for_user("alice")) == {keep.key}

    await env.until(pruned)
    assert keys(await store.keys_for_sid("sid-x")) == {keep.key}
    assert keys([m async for m in store.all_sessions()]) == {keep.key}


async def test_all_sessions(env: StoreEnv) -> None:
    saved = [meta(f"user{i}", f"sid{i % 3}") for i in range(25)]
    for m in saved:
        await env.store.save(m, b"x", LONG)
    seen = [m async for m in env.store.all_sessions()]
    assert keys(seen) == keys(saved)
    assert len(seen) == len(saved)
    assert {m.sub for m in seen} == {f"user{i}" for i in range(25)}


async def test_keys_with_odd_characters(env: StoreEnv) -> None:
    m = meta(sub="ünï cøde:*?[x]", sid="sid with spaces/and:colons")
    await env.store.save(m, b"x", LONG)
    assert keys(await env.store.keys_for_user(m.sub)) == {m.key}
    assert keys(await env.store.keys_for_sid("sid with spaces/and:colons")) == {m.key}
    assert await env.store.keys_for_user("*") == []


# -- locks -------------------------------------------------------------------------------------


async def test_lock_mutual_exclusion(env: StoreEnv) -> None:
    events: list[tuple[str, int]] = []

    async def worker(i: int) -> bool:
        async with env.store.lock("refresh:k", ttl=LONG, wait=LONG) as won:
            events.append(("enter", i))
            await asyncio.sleep(0.05)
            events.append(("exit", i))
            return won

    results = await asyncio.gather(*(worker(i) for i in range(4)))
    assert results == [True] * 4
    for n in range(0, len(events), 2):
        assert events[n][0] == "enter"
        assert events[n + 1] == ("exit", events[n][1])


async def test_lock_waiter_gets_it_after_release(env: StoreEnv) -> None:
    held = asyncio.Event()
    release = asyncio.Event()

    async def holder() -> None:
        async with env.store.lock("n", ttl=LONG, wait=1.0) as won:
            assert won
            held.set()
            await release.wait()

    task = asyncio.create_task(holder())
    await held.wait()

    async def waiter() -> bool:
        async with env.store.lock("n", ttl=LONG, wait=LONG) as won:
            return won

    waiting = asyncio.create_task(waiter())
    await asyncio.sleep(0.1)
    assert not waiting.done()
    release.set()
    assert await waiting is True
    await task


async def test_lock_wait_timeout_yields_false(env: StoreEnv) -> None:
    async with env.store.lock("busy", ttl=LONG, wait=1.0) as first:
        assert first
        async with env.store.lock("busy", ttl=LONG, wait=0.2) as second:
            assert second is False
        async with env.store.lock("busy", ttl=LONG, wait=0) as third:
            assert third is False
        async with env.store.lock("other-name", ttl=LONG, wait=0) as other:
            assert other is True
    async with env.store.lock("busy", ttl=LONG, wait=0) as after:
        assert after is True


async def test_lock_expires_by_itself(env: StoreEnv) -> None:
    async with env.store.lock("stuck", ttl=SHORT, wait=1.0) as first:
        assert first

        async def take() -> bool:
            async with env.store.lock("stuck", ttl=LONG, wait=LONG) as won:
                return won

        taker = asyncio.create_task(take())
        while not taker.done():
            await env.elapse(SHORT / 3)
        assert taker.result() is True
        second_holder = asyncio.Event()
        let_go = asyncio.Event()

        async def hold_again() -> None:
            async with env.store.lock("stuck", ttl=LONG, wait=LONG) as won:
                assert won
                second_holder.set()
                await let_go.wait()

        again = asyncio.create_task(hold_again())
        await second_holder.wait()
    # ``first`` released here; the lock held by hold_again must survive that release.
    async with env.store.lock("stuck", ttl=LONG, wait=0) as fourth:
        assert fourth is False
    let_go.set()
    await again


# -- replay claims --------------------------------------------------------------------------------


async def test_claim_once(env: StoreEnv) -> None:
    assert await env.store.claim_once("jti:abc", LONG) is True
    assert await env.store.claim_once("jti:abc", LONG) is False
    assert await env.store.claim_once("jti:def", LONG) is True


async def test_claim_once_again_after_ttl(env: StoreEnv) -> None:
    assert await env.store.claim_once("jti:short", SHORT) is True

    async def claimed_again() -> bool:
        return await env.store.claim_once("jti:short", LONG)

    await env.until(claimed_again)
    assert await env.store.claim_once("jti:short", LONG) is False


async def test_ping(env: StoreEnv, redis_server: RedisServer) -> None:
    """A live store answers ping; Redis really is asked (the server counts the PING)."""
    if env.kind == "memory":
        assert await env.store.ping() is None
        return
    before = _pings(redis_server)
    assert await env.store.ping() is None
    assert _pings(redis_server) > before


def _pings(server: RedisServer) -> int:
    import redis

    client = redis.Redis.from_url(server.url)
    try:
        stats = client.info("commandstats").get("cmdstat_ping", {})
        return int(stats.get("calls", 0))
    finally:
        client.close()


# -- Redis specifics -----------------------------------------------------------------------------


async def test_prefixes_keep_stores_apart(redis_server: RedisServer) -> None:
    one = RedisStore.from_url(redis_server.url, prefix=f"a{uuid.uuid4().hex[:8]}:")
    two = RedisStore.from_url(redis_server.url, prefix=f"b{uuid.uuid4().hex[:8]}:")
    try:
        m = meta()
        await one.save(m, b"x", LONG)
        assert await two.load(m.key) is None
        assert await two.keys_for_user(m.sub) == []
        assert [x async for x in two.all_sessions()] == []
    finally:
        await one.close()
        await two.close()


async def test_redis_holds_only_sealed_bytes_and_meta(redis_server: RedisServer) -> None:
    prefix = f"d{uuid.uuid4().hex[:8]}:"
    store = RedisStore.from_url(redis_server.url, prefix=prefix)
    try:
        m = meta(sub="alice@example.com")
        await store.save(m, b"opaque", LONG)
        names = redis_server.keys(prefix + "*")
        assert all(b"alice@example.com" not in n for n in names)  # indexes hash the sub
        assert (prefix + "s:" + m.key).encode() in names
    finally:
        await store.close()


async def test_redis_down_raises_store_error_then_recovers(own_redis: RedisServer) -> None:
    store = RedisStore.from_url(own_redis.url, prefix="down:")
    try:
        m = meta()
        await store.save(m, b"x", LONG)
        own_redis.stop()
        with pytest.raises(StoreError):
            await store.ping()
        with pytest.raises(StoreError):
            await store.load(m.key)
        with pytest.raises(StoreError):
            await store.save(meta(), b"y", LONG)
        with pytest.raises(StoreError):
            await store.touch(m.key, LONG)
        with pytest.raises(StoreError):
            await store.delete(m.key)
        with pytest.raises(StoreError):
            await store.keys_for_user(m.sub)
        with pytest.raises(StoreError):
            await store.keys_for_sid("sid-1")
        with pytest.raises(StoreError):
            _ = [x async for x in store.all_sessions()]
        with pytest.raises(StoreError):
            async with store.lock("n", ttl=LONG, wait=0.1):
                pass
        with pytest.raises(StoreError):
            await store.claim_once("jti:x", LONG)
        own_redis.start()
        await store.ping()
        await store.save(m, b"back", LONG)
        assert await store.load(m.key) == b"back"
        async with store.lock("n", ttl=LONG, wait=1.0) as won:
            assert won
    finally:
        await store.close()


async def test_redis_closed_port_raises_store_error() -> None:
    store = RedisStore.from_url(f"redis://127.0.0.1:{free_port()}/0", prefix="closed:")
    try:
        with pytest.raises(StoreError):
            await store.ping()
        with pytest.raises(StoreError):
            await store.load("k")
    finally:
        await store.close()


@pytest.mark.parametrize(
    "url",
    [
        "redis+sentinel://127.0.0.1:26379",
        "redis+sentinel://127.0.0.1:26379/",
        "redis+sentinel://127.0.0.1:notaport/mymaster",
        "redis+sentinel://127.0.0.1:26379/mymaster/notadb",
    ],
)
def test_sentinel_url_errors_are_value_errors(url: str) -> None:
    with pytest.raises(ValueError):
        RedisStore.from_url(url)


async def test_sentinel_without_sentinels_raises_store_error() -> None:
    store = RedisStore.from_url(f"redis+sentinel://:pw@127.0.0.1:{free_port()}/mymaster/2")
    try:
        with pytest.raises(StoreError):
            await store.ping()
    finally:
        await store.close()


# -- conditional writes --------------------------------------------------------------------------


async def test_replace_writes_only_over_the_record_that_was_read(env: StoreEnv) -> None:
    store = env.store
    m = meta()
    await store.save(m, b"v1", LONG)
    assert await store.replace(m, b"v2", LONG, expected=b"v1") is True
    assert await store.load(m.key) == b"v2"
    # Rewritten meanwhile (the reader saw v1): nothing written.
    assert await store.replace(m, b"v3", LONG, expected=b"v1") is False
    assert await store.load(m.key) == b"v2"
    assert keys(await store.keys_for_user("alice")) == {m.key}


async def test_replace_never_brings_back_a_deleted_record(env: StoreEnv) -> None:
    store = env.store
    m = meta()
    await store.save(m, b"v1", LONG)
    await store.delete(m.key)
    assert await store.replace(m, b"v2", LONG, expected=b"v1") is False
    assert await store.load(m.key) is None
    assert await store.keys_for_user("alice") == []
    assert await store.keys_for_sid("sid-1") == []
    assert [s async for s in store.all_sessions()] == []
    assert await store.replace(meta(), b"new", LONG, expected=b"") is False  # never saved


async def test_replace_sets_the_new_ttl(env: StoreEnv) -> None:
    m = meta()
    await env.store.save(m, b"v1", LONG)
    assert await env.store.replace(m, b"v2", SHORT, expected=b"v1") is True

    async def gone() -> bool:
        return await env.store.load(m.key) is None

    await env.until(gone)
    assert await env.store.keys_for_user(m.sub) == []


# -- URLs ----------------------------------------------------------------------------------------


def test_store_urls_name_several_hosts_and_never_show_a_password() -> None:
    from gateway.store.redis import _hosts, redact

    assert _hosts("u:p%40w@h1:7001,h2:7002, [::1]:7003,h4", 6379) == [
        ("h1", 7001), ("h2", 7002), ("::1", 7003), ("h4", 6379)
    ]  # fmt: skip
    assert redact("redis+cluster://user:pa:ss@h1:1,h2:2 failed") == (
        "redis+cluster://user:***@h1:1,h2:2 failed"
    )
    assert redact("redis://:secret@h:6379/0") == "redis://:***@h:6379/0"
    assert redact("redis://h:6379/0") == "redis://h:6379/0"
    with pytest.raises(ValueError):
        RedisStore.from_url("redis+sentinel://h1:26379,h2:26379")  # no service name


def test_pool_and_timeout_settings() -> None:
    from gateway.config import ConfigError, validate
    from tests.conftest import gateway_config

    cfg = gateway_config("http://127.0.0.1:1", "http://127.0.0.1:2", "http://127.0.0.1:3", None)
    cfg["session"].update(redis_pool_size=8, redis_pool_timeout="1500ms",
                          redis_socket_timeout=1, redis_ca_file="/etc/ssl/ca.pem")  # fmt: skip
    session = validate(cfg, env={}).session
    assert (session.redis_pool_size, session.redis_pool_timeout) == (8, 1.5)
    assert (session.redis_socket_timeout, session.redis_connect_timeout) == (1.0, 2.0)
    assert session.redis_ca_file == "/etc/ssl/ca.pem"
    for key, bad in (("redis_pool_size", 0), ("redis_socket_timeout", 0)):
        broken = gateway_config("http://127.0.0.1:1", "http://127.0.0.1:2", "http://x:3", None)
        broken["session"][key] = bad
        with pytest.raises(ConfigError) as err:
            validate(broken, env={})
        assert key in str(err.value)

"""Redis session store (``redis.asyncio`` with a connection pool): standalone, Sentinel, Cluster.

Layout, all under the configured prefix (default ``gw:``):

- ``s:<key>``   the sealed session record, TTL = min(idle, absolute end)
- ``m:<key>``   its plaintext ``SessionMeta`` (sub, provider sid, times), same TTL
- ``u:<sub>`` / ``p:<sid>``  sets of keys; members whose record has expired are pruned
  whenever an index is read, so the indexes stay consistent with expiry
- ``l:<name>``  cross-process locks (SET NX PX, released by compare-and-delete)
- ``o:<name>``  replay caches (SET NX PX)
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import RedisError

from gateway.errors import StoreError
from gateway.store.base import SessionMeta

_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""
_TIMEOUTS: dict[str, Any] = {"socket_timeout": 2.0, "socket_connect_timeout": 2.0}
# Indexes outlive any session they point at; they are pruned on read.
_INDEX_TTL_MS = 30 * 86400 * 1000


def _h(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:40]


class RedisStore:
    def __init__(self, client: Any, prefix: str = "gw:", cluster: bool = False) -> None:
        self._r = client
        self._p = prefix
        self._cluster = cluster
        self._release = client.register_script(_RELEASE)

    @classmethod
    def from_url(cls, url: str, prefix: str = "gw:") -> RedisStore:
        parts = urlsplit(url)
        scheme = parts.scheme
        if scheme == "redis+sentinel":
            return cls(_sentinel_client(url), prefix)
        if scheme in ("redis+cluster", "rediss+cluster"):
            tls = scheme.startswith("rediss")
            real = url.replace(scheme + "://", ("rediss" if tls else "redis") + "://", 1)
            return cls(RedisCluster.from_url(real, **_TIMEOUTS), prefix, cluster=True)
        client = aioredis.Redis.from_url(url, health_check_interval=10, **_TIMEOUTS)
        return cls(client, prefix)

    # -- records ---------------------------------------------------------------------------

    async def load(self, key: str) -> bytes | None:
        try:
            value: bytes | None = await self._r.get(self._p + "s:" + key)
        except RedisError as exc:
            raise StoreError(type(exc).__name__) from None
        return value

    async def save(self, meta: SessionMeta, sealed: bytes, ttl: float) -> None:
        ms = max(1, int(ttl * 1000))
        p = self._p
        try:
            pipe = self._r.pipeline(transaction=not self._cluster)
            pipe.set(p + "s:" + meta.key, sealed, px=ms)
            pipe.set(p + "m:" + meta.key, meta.to_json(), px=ms)
            pipe.sadd(p + "u:" + _h(meta.sub), meta.key)
            pipe.pexpire(p + "u:" + _h(meta.sub), _INDEX_TTL_MS)
            if meta.provider_sid:
                pipe.sadd(p + "p:" + _h(meta.provider_sid), meta.key)
                pipe.pexpire(p + "p:" + _h(meta.provider_sid), _INDEX_TTL_MS)
            await pipe.execute()
        except RedisError as exc:
            raise StoreError(type(exc).__name__) from None

    async def touch(self, key: str, ttl: float) -> None:
        ms = max(1, int(ttl * 1000))
        try:
            pipe = self._r.pipeline(transaction=not self._cluster)
            pipe.pexpire(self._p + "s:" + key, ms)
            pipe.pexpire(self._p + "m:" + key, ms)
            await pipe.execute()
        except RedisError as exc:
            raise StoreError(type(exc).__name__) from None

    async def delete(self, key: str) -> None:
        p = self._p
        try:
            raw = await self._r.get(p + "m:" + key)
            pipe = self._r.pipeline(transaction=not self._cluster)
            pipe.delete(p + "s:" + key)
            pipe.delete(p + "m:" + key)
            if raw:
                meta = SessionMeta.from_json(raw)
                pipe.srem(p + "u:" + _h(meta.sub), key)
                if meta.provider_sid:
                    pipe.srem(p + "p:" + _h(meta.provider_sid), key)
            await pipe.execute()
        except RedisError as exc:
            raise StoreError(type(exc).__name__) from None

    # -- indexes ---------------------------------------------------------------------------

    async def _index(self, index: str) -> list[SessionMeta]:
        try:
            keys = sorted(k.decode() for k in await self._r.smembers(index))
            if not keys:
                return []
            names = [self._p + "m:" + k for k in keys]
            # In a cluster the records sit in many hash slots; one MGET would be refused.
            raws = await (self._r.mget_nonatomic(names) if self._cluster else self._r.mget(names))
            metas, stale = [], []
            for key, raw in zip(keys, raws, strict=True):
                if raw is None:
                    stale.append(key)
                else:
                    metas.append(SessionMeta.from_json(raw))
            if stale:
                await self._r.srem(index, *stale)
            return metas
        except RedisError as exc:
            raise StoreError(type(exc).__name__) from None

    async def keys_for_user(self, sub: str) -> list[SessionMeta]:
        return await self._index(self._p + "u:" + _h(sub))

    async def keys_for_sid(self, sid: str) -> list[SessionMeta]:
        return await self._index(self._p + "p:" + _h(sid))

    async def all_sessions(self) -> AsyncIterator[SessionMeta]:
        try:
            async for name in self._r.scan_iter(match=self._p + "m:*", count=500):
                raw = await self._r.get(name)
                if raw is not None:
                    yield SessionMeta.from_json(raw)
        except RedisError as exc:
            raise StoreError(type(exc).__name__) from None

    # -- coordination ----------------------------------------------------------------------

    @asynccontextmanager
    async def lock(self, name: str, ttl: float, wait: float) -> AsyncIterator[bool]:
        key = self._p + "l:" + name
        token = secrets.token_hex(16)
        if not await self._acquire(key, token, ttl, wait):
            yield False
            return
        try:
            yield True
        finally:
            try:
                await self._release(keys=[key], args=[token])
            except RedisError:
                pass  # the lock expires by itself after ttl

    async def _acquire(self, key: str, token: str, ttl: float, wait: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        delay = 0.01
        try:
            while not await self._r.set(key, token, nx=True, px=max(1, int(ttl * 1000))):
                if loop.time() >= deadline:
                    return False
                await asyncio.sleep(delay)
                delay = min(delay * 1.5, 0.1)
        except RedisError as exc:
            raise StoreError(type(exc).__name__) from None
        return True

    async def claim_once(self, name: str, ttl: float) -> bool:
        try:
            won = await self._r.set(
                self._p + "o:" + name, b"1", nx=True, px=max(1, int(ttl * 1000))
            )
        except RedisError as exc:
            raise StoreError(type(exc).__name__) from None
        return bool(won)

    async def ping(self) -> None:
        try:
            await self._r.ping()
        except RedisError as exc:
            raise StoreError(type(exc).__name__) from None

    async def close(self) -> None:
        await self._r.aclose()


def _sentinel_client(url: str) -> Any:
    """``redis+sentinel://[:password@]host:port[,host:port...]/service[/db]``."""
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    password = unquote(parts.password) if parts.password else None
    hosts = []
    for item in netloc.split(","):
        host, _, port = item.rpartition(":")
        hosts.append((host.strip("[]") or item, int(port or 26379)))
    path = [p for p in parts.path.split("/") if p]
    if not path:
        raise ValueError(
            "redis+sentinel:// URLs name the service: redis+sentinel://h:26379/mymaster"
        )
    db = int(path[1]) if len(path) > 1 else 0
    sentinel = Sentinel(hosts, **_TIMEOUTS)  # type: ignore[no-untyped-call]
    return sentinel.master_for(path[0], db=db, password=password, **_TIMEOUTS)

"""Redis session store (``redis.asyncio`` with a connection pool): standalone, Sentinel, Cluster.

Layout, all under the configured prefix (default ``gw:``):

- ``s:<key>``   the sealed session record, TTL = min(idle, absolute end)
- ``m:<key>``   its plaintext ``SessionMeta`` (sub, provider sid, times), same TTL
- ``u:<sub>`` / ``p:<sid>``  sets of keys; members whose record has expired are pruned
  whenever an index is read, so the indexes stay consistent with expiry. Both are per
  provider: ``u:<id>:<sub>`` / ``p:<id>:<sid>`` for a provider other than ``default``
- ``l:<name>``  cross-process locks (SET NX PX, released by compare-and-delete)
- ``o:<name>``  replay caches (SET NX PX)
- ``inval``     a pub/sub channel: the store key of every record deleted or rewritten, for
  the session caches of every gateway process (``watch_invalidations``)

A write over an existing record (``replace``) is one Lua script on the single key ``s:<key>``
(compare the stored bytes, then set), so it needs no hash tag even in a cluster; ``m:<key>`` is
then refreshed with ``SET ... XX``, which can never bring back a deleted record.

Every operation goes through ``_op``: at most ``pool_size`` operations use the pool at once
(the others queue for up to ``pool_timeout``), and any failure of the client library, whatever
its exception class, becomes ``StoreError`` (a 503) and is logged, rate-limited, with the
operation, the node and the cause, never a password.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import secrets
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import ExponentialBackoff, NoBackoff

from gateway.config import DEFAULT_PROVIDER_ID
from gateway.errors import StoreError
from gateway.store.base import InvalidationListener, SessionMeta, per_provider

log = logging.getLogger("gateway.store")

_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""
# Compare-and-set of one record: written only while it still holds what the writer read.
_REPLACE = """
local cur = redis.call('get', KEYS[1])
if not cur or redis.sha1hex(cur) ~= ARGV[1] then return 0 end
redis.call('set', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.pcall('publish', ARGV[4], ARGV[5])
return 1
"""
# Indexes outlive any session they point at; they are pruned on read.
_INDEX_TTL_MS = 30 * 86400 * 1000
_LOG_EVERY = 10.0  # seconds between two log lines for the same operation and cause
_PASSWORD = re.compile(r"(://[^:/@\s]*:)[^@\s]*@")
# The invalidation feed: a PING this often while quiet; no answer for _LAG means lost.
_HEARTBEAT = 0.5
_LAG = 2.0
_RESUBSCRIBE = 0.2  # seconds between two attempts to subscribe again


@dataclass(frozen=True, slots=True)
class RedisOptions:
    """The ``session.redis_*`` settings (see docs/scaling.md)."""

    pool_size: int = 64
    pool_timeout: float = 5.0
    socket_timeout: float = 2.0
    connect_timeout: float = 2.0
    health_check_interval: float = 10.0
    ca_file: str | None = None


def redact(text: str) -> str:
    """``text`` with any password in a URL replaced by ``***``."""
    return _PASSWORD.sub(r"\1***@", text)


def _h(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:40]


def _ms(ttl: float) -> int:
    return max(1, int(ttl * 1000))


class RedisStore:
    def __init__(
        self,
        client: Any,
        prefix: str = "gw:",
        cluster: bool = False,
        *,
        where: str = "redis",
        options: RedisOptions | None = None,
    ) -> None:
        self._r = client
        self._p = prefix
        self._cluster = cluster
        self._where = redact(where)
        self._options = options or RedisOptions()
        self._slots = asyncio.Semaphore(self._options.pool_size)
        # One operation, retries included, never takes longer than this (a hung node).
        o = self._options
        self._deadline = 3 * (o.connect_timeout + o.socket_timeout)
        self._release = client.register_script(_RELEASE)
        self._replace = client.register_script(_REPLACE)
        self._logged: dict[tuple[str, str], float] = {}
        self.channel = prefix + "inval"
        self._listeners: list[InvalidationListener] = []
        self._watcher: asyncio.Task[None] | None = None
        self._closing = False

    @classmethod
    def from_url(
        cls, url: str, prefix: str = "gw:", options: RedisOptions | None = None
    ) -> RedisStore:
        opts = options or RedisOptions()
        scheme = urlsplit(url).scheme
        where = redact(url)
        if scheme in ("redis+sentinel", "rediss+sentinel"):
            return cls(_sentinel_client(url, opts), prefix, where=where, options=opts)
        if scheme in ("redis+cluster", "rediss+cluster"):
            return cls(_cluster_client(url, opts), prefix, True, where=where, options=opts)
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=opts.pool_size,
            timeout=opts.pool_timeout,
            **_connection_kwargs(opts, tls=scheme == "rediss"),
        )
        return cls(aioredis.Redis.from_pool(pool), prefix, where=where, options=opts)

    # -- every operation -------------------------------------------------------------------

    @asynccontextmanager
    async def _op(self, operation: str, *, queue: bool = True) -> AsyncIterator[None]:
        """One store operation: a pool slot (queued), and every failure as ``StoreError``."""
        acquired = False
        try:
            if queue:
                async with asyncio.timeout(self._options.pool_timeout):
                    await self._slots.acquire()
                acquired = True
            # A scan (not queued) yields to its caller between commands: no overall deadline.
            async with asyncio.timeout(self._deadline if queue else None):
                yield
        except StoreError:
            raise
        except TimeoutError as exc:
            cause = "no pool connection free" if queue and not acquired else "timeout"
            raise self._failed(operation, cause, exc) from None
        except Exception as exc:  # any client failure is a store failure
            raise self._failed(operation, type(exc).__name__, exc) from None
        finally:
            if acquired:
                self._slots.release()

    def _failed(self, operation: str, cause: str, exc: BaseException) -> StoreError:
        detail = redact(str(exc))[:300]
        node = getattr(exc, "connection", None)
        where = self._where if node is None else f"{self._where} (node {redact(str(node))})"
        now = time.monotonic()
        key = (operation, cause)
        if now - self._logged.get(key, 0.0) >= _LOG_EVERY:
            if len(self._logged) > 1000:
                self._logged.clear()
            self._logged[key] = now
            log.warning(
                "session store failed: operation=%s cause=%s store=%s detail=%s",
                operation, cause, where, detail or "-",
            )  # fmt: skip
        return StoreError(f"{cause} during {operation} on {where}")

    # -- records ---------------------------------------------------------------------------

    async def load(self, key: str) -> bytes | None:
        async with self._op("load"):
            value: bytes | None = await self._r.get(self._p + "s:" + key)
        return value

    async def save(self, meta: SessionMeta, sealed: bytes, ttl: float) -> None:
        ms = _ms(ttl)
        p = self._p
        async with self._op("save"):
            pipe = self._r.pipeline(transaction=not self._cluster)
            pipe.set(p + "s:" + meta.key, sealed, px=ms)
            pipe.set(p + "m:" + meta.key, meta.to_json(), px=ms)
            self._index_into(pipe, meta)
            await pipe.execute()

    async def replace(self, meta: SessionMeta, sealed: bytes, ttl: float, expected: bytes) -> bool:
        ms = _ms(ttl)
        p = self._p
        digest = hashlib.sha1(expected, usedforsecurity=False).hexdigest()
        async with self._op("replace"):
            # The script also publishes the key on the invalidation channel.
            args = [digest, sealed, ms, self.channel, meta.key]
            done = await self._replace(keys=[p + "s:" + meta.key], args=args)
            if not done:
                return False
            # XX: a record deleted since the script ran stays deleted.
            pipe = self._r.pipeline(transaction=not self._cluster)
            pipe.set(p + "m:" + meta.key, meta.to_json(), px=ms, xx=True)
            self._index_into(pipe, meta)
            await pipe.execute()
        return True

    def _user_index(self, sub: str, provider: str) -> str:
        """``u:<hash sub>`` for provider ``default``, ``u:<provider>:<hash sub>`` for the
        others (``per_provider``; a provider id never looks like a hash: no ``:`` in one)."""
        return self._p + "u:" + per_provider(provider, _h(sub))

    def _sid_index(self, sid: str, provider: str) -> str:
        return self._p + "p:" + per_provider(provider, _h(sid))

    def _index_into(self, pipe: Any, meta: SessionMeta) -> None:
        users = self._user_index(meta.sub, meta.provider)
        pipe.sadd(users, meta.key)
        pipe.pexpire(users, _INDEX_TTL_MS)
        if meta.provider_sid:
            sids = self._sid_index(meta.provider_sid, meta.provider)
            pipe.sadd(sids, meta.key)
            pipe.pexpire(sids, _INDEX_TTL_MS)

    async def touch(self, key: str, ttl: float) -> None:
        ms = _ms(ttl)
        async with self._op("touch"):
            pipe = self._r.pipeline(transaction=not self._cluster)
            pipe.pexpire(self._p + "s:" + key, ms)
            pipe.pexpire(self._p + "m:" + key, ms)
            await pipe.execute()

    async def delete(self, key: str) -> None:
        p = self._p
        async with self._op("delete"):
            raw = await self._r.get(p + "m:" + key)
            pipe = self._r.pipeline(transaction=not self._cluster)
            pipe.delete(p + "s:" + key)
            pipe.delete(p + "m:" + key)
            if raw:
                meta = SessionMeta.from_json(raw)
                pipe.srem(self._user_index(meta.sub, meta.provider), key)
                if meta.provider_sid:
                    pipe.srem(self._sid_index(meta.provider_sid, meta.provider), key)
            await pipe.execute()
            await self._publish(key)

    async def _publish(self, key: str) -> None:
        """Tell every process's session cache (a cluster broadcasts it to every node). A
        refusal (an ACL user without the channel) is logged, never fails the delete."""
        try:
            await self._r.publish(self.channel, key)
        except Exception as exc:
            self._failed("publish", type(exc).__name__, exc)

    # -- indexes ---------------------------------------------------------------------------

    async def _index(self, index: str, provider: str) -> list[SessionMeta]:
        async with self._op("index"):
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
                elif (meta := SessionMeta.from_json(raw)).provider == provider:
                    metas.append(meta)
            if stale:
                await self._r.srem(index, *stale)
            return metas

    async def keys_for_user(
        self, sub: str, provider: str = DEFAULT_PROVIDER_ID
    ) -> list[SessionMeta]:
        return await self._index(self._user_index(sub, provider), provider)

    async def keys_for_sid(
        self, sid: str, provider: str = DEFAULT_PROVIDER_ID
    ) -> list[SessionMeta]:
        return await self._index(self._sid_index(sid, provider), provider)

    async def all_sessions(self) -> AsyncIterator[SessionMeta]:
        # Not queued: the scan yields to its caller between commands (``gateway sessions``).
        async with self._op("scan", queue=False):
            async for name in self._r.scan_iter(match=self._p + "m:*", count=500):
                raw = await self._r.get(name)
                if raw is not None:
                    yield SessionMeta.from_json(raw)

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
                async with self._op("unlock"):
                    await self._release(keys=[key], args=[token])
            except StoreError:
                pass  # the lock expires by itself after ttl

    async def _acquire(self, key: str, token: str, ttl: float, wait: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        delay = 0.01
        while True:
            async with self._op("lock"):
                if await self._r.set(key, token, nx=True, px=_ms(ttl)):
                    return True
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 0.1)

    async def claim_once(self, name: str, ttl: float) -> bool:
        async with self._op("claim"):
            won = await self._r.set(self._p + "o:" + name, b"1", nx=True, px=_ms(ttl))
        return bool(won)

    async def ping(self) -> None:
        """Readiness. For a cluster: every primary answers and the cluster serves every slot."""
        async with self._op("ping"):
            if not self._cluster:
                await self._r.ping()
                return
            await self._r.ping(target_nodes=RedisCluster.PRIMARIES)
            info = await self._r.cluster_info(target_nodes=RedisCluster.RANDOM)
            state = info.get("cluster_state") if isinstance(info, dict) else None
            slots = int(info.get("cluster_slots_ok", 0)) if isinstance(info, dict) else 0
            if state != "ok" or slots != 16384:
                raise StoreError(f"cluster not serving every slot on {self._where}")

    # -- invalidation feed -----------------------------------------------------------------

    def watch_invalidations(self, listener: InvalidationListener) -> None:
        """Tell ``listener`` every key deleted or rewritten by any process, and whether the
        feed is live: trusted only from a confirmed subscription until the connection is lost,
        lags, or reconnects (the listener then flushes what it holds)."""
        self._listeners.append(listener)
        listener.set_trusted(False)
        if self._watcher is None:
            self._watcher = asyncio.create_task(self._watch(), name="gateway-invalidation-feed")

    def _trust(self, trusted: bool) -> None:
        for listener in self._listeners:
            listener.set_trusted(trusted)

    def _reconnected(self, connection: Any) -> None:
        # The client library reconnects (and subscribes again) by itself: whatever was
        # published meanwhile is lost, so nothing is trusted until the new confirmation.
        self._trust(False)

    async def _watch(self) -> None:
        # Stopped by ``_closing`` as well as by cancellation: the client library may turn a
        # cancellation in the middle of a connect into an error of its own.
        while not self._closing:
            try:
                await self._subscribed()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure of the feed: untrusted, then try again
                if not self._closing:
                    self._failed("invalidation feed", type(exc).__name__, exc)
            self._trust(False)
            await asyncio.sleep(_RESUBSCRIBE)

    async def _subscribed(self) -> None:
        loop = asyncio.get_running_loop()
        pubsub = self._r.pubsub()
        retry = None
        try:
            await pubsub.subscribe(self.channel)
            # A lost connection must reach us at once, not wait in the library's retries
            # (the cache would be trusted meanwhile): no retry on this connection.
            retry = pubsub.connection.retry
            pubsub.connection.retry = Retry(NoBackoff(), retries=0)
            pubsub.connection.register_connect_callback(self._reconnected)
            heard = loop.time()
            while not self._closing:
                message = await pubsub.get_message(timeout=_HEARTBEAT)
                now = loop.time()
                if message is not None:
                    heard = now
                    kind = message["type"]
                    if kind == "message":
                        key = message["data"].decode()
                        for listener in self._listeners:
                            listener.invalidate(key)
                    elif kind == "subscribe":  # first confirmation, or after a reconnect
                        self._trust(True)
                elif now - heard > _LAG:
                    raise TimeoutError("no answer on the invalidation channel")
                else:
                    await pubsub.ping()  # the PONG comes back as a message
        finally:
            self._trust(False)
            if pubsub.connection is not None:  # back to the pool: no longer ours to watch
                pubsub.connection.deregister_connect_callback(self._reconnected)
                if retry is not None:
                    pubsub.connection.retry = retry
            try:
                await pubsub.aclose()
            except Exception as exc:  # closing a dead connection must not stop the feed
                log.debug("closing the invalidation feed: %s", type(exc).__name__)

    async def close(self) -> None:
        self._closing = True
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.wait([self._watcher], timeout=self._options.connect_timeout)
            self._watcher = None
        # A Sentinel client keeps its own connections to the sentinels: close them too.
        manager = getattr(getattr(self._r, "connection_pool", None), "sentinel_manager", None)
        clients = [self._r, *(manager.sentinels if manager is not None else [])]
        for client in clients:
            await self._close(client)

    @staticmethod
    async def _close(client: Any) -> None:
        try:
            await client.aclose()
        except Exception as exc:  # closing a dead client must not fail a shutdown
            log.debug("closing the store client: %s", type(exc).__name__)


def _retry() -> Retry:
    """Two quick retries (a dropped connection, a failover's first refusal), never the
    library's default of seconds of back-off that would hold every request of an outage."""
    return Retry(ExponentialBackoff(cap=0.2, base=0.02), retries=2)


def _connection_kwargs(opts: RedisOptions, *, tls: bool) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "socket_timeout": opts.socket_timeout,
        "socket_connect_timeout": opts.connect_timeout,
        "health_check_interval": opts.health_check_interval,
        "retry": _retry(),
    }
    if tls:
        kwargs.update(_ca_kwargs(opts))
    return kwargs


def _ca_kwargs(opts: RedisOptions) -> dict[str, Any]:
    """Verify the server's certificate against ``session.redis_ca_file`` (when given)."""
    if not opts.ca_file:
        return {}
    return {"ssl_ca_certs": opts.ca_file, "ssl_cert_reqs": ssl.CERT_REQUIRED}


def _hosts(netloc: str, default_port: int) -> list[tuple[str, int]]:
    """``h1:p1,h2:p2,[::1]:p3`` (after any ``user:password@``)."""
    hosts = []
    for item in (i.strip() for i in netloc.rsplit("@", 1)[-1].split(",")):
        if item.startswith("["):  # [::1]:6379
            host, _, rest = item[1:].partition("]")
            port = rest.removeprefix(":")
        elif item.count(":") == 1:
            host, port = item.split(":")
        else:
            host, port = item, ""
        hosts.append((host, int(port or default_port)))
    if not hosts or not all(h for h, _ in hosts):
        raise ValueError("the URL names no host")
    return hosts


def _credentials(url: str) -> tuple[str | None, str | None]:
    parts = urlsplit(url)
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    return user, password


def _cluster_client(url: str, opts: RedisOptions) -> RedisCluster:
    """``redis+cluster://[user:password@]h1:p1,h2:p2,.../``; any reachable seed will do."""
    parts = urlsplit(url)
    tls = parts.scheme.startswith("rediss")
    user, password = _credentials(url)
    nodes = [ClusterNode(host, port) for host, port in _hosts(parts.netloc, 6379)]
    kwargs = _connection_kwargs(opts, tls=tls)
    if tls:
        kwargs["ssl"] = True
    return RedisCluster(
        startup_nodes=nodes,
        username=user,
        password=password,
        max_connections=opts.pool_size,
        **kwargs,
    )


class _BlockingSentinelPool(SentinelConnectionPool, aioredis.BlockingConnectionPool):
    """The Sentinel pool (follows the primary) that queues like ``BlockingConnectionPool``."""


def _sentinel_client(url: str, opts: RedisOptions) -> Any:
    """``redis+sentinel://[user:password@]host:port[,host:port...]/service[/db]``.

    ``user:password@`` authenticates to the data nodes; the sentinels' own credentials, when
    they differ, go in the query: ``?sentinel_username=...&sentinel_password=...``.
    ``rediss+sentinel://`` speaks TLS to the sentinels and to the data nodes alike, both
    checked against ``session.redis_ca_file`` when it is set.
    """
    parts = urlsplit(url)
    tls = parts.scheme == "rediss+sentinel"
    user, password = _credentials(url)
    hosts = _hosts(parts.netloc, 26379)
    path = [p for p in parts.path.split("/") if p]
    if not path:
        raise ValueError(
            "redis+sentinel:// URLs name the service: redis+sentinel://h:26379/mymaster"
        )
    db = int(path[1]) if len(path) > 1 else 0
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    timeouts = {"socket_timeout": opts.socket_timeout,
                "socket_connect_timeout": opts.connect_timeout}  # fmt: skip
    # A sentinel that does not answer is skipped for the next one: no retry of its own.
    sentinel_kwargs: dict[str, Any] = {**timeouts, "retry": Retry(NoBackoff(), retries=0)}
    if tls:
        sentinel_kwargs.update(ssl=True, **_ca_kwargs(opts))
    if "sentinel_password" in query:
        sentinel_kwargs["password"] = query["sentinel_password"]
    if "sentinel_username" in query:
        sentinel_kwargs["username"] = query["sentinel_username"]
    data_kwargs = _connection_kwargs(opts, tls=tls)
    if tls:
        data_kwargs["ssl"] = True  # the pool then makes SentinelManagedSSLConnections
    sentinel = Sentinel(hosts, sentinel_kwargs=sentinel_kwargs, **timeouts)  # type: ignore[no-untyped-call]
    return sentinel.master_for(
        path[0],
        connection_pool_class=_BlockingSentinelPool,
        db=db,
        username=user,
        password=password,
        max_connections=opts.pool_size,
        timeout=opts.pool_timeout,
        **data_kwargs,
    )

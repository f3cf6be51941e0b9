"""In-process session store: one gateway process only (``gateway demo``, small setups)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from gateway.config import DEFAULT_PROVIDER_ID
from gateway.store.base import SessionMeta


class MemoryStore:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._records: dict[str, tuple[bytes, SessionMeta, float]] = {}
        self._once: dict[str, float] = {}
        self._locks: dict[str, tuple[object, float]] = {}  # name -> (holder, expires at)
        self._released: dict[str, asyncio.Event] = {}

    def _live(self, key: str) -> tuple[bytes, SessionMeta, float] | None:
        item = self._records.get(key)
        if item is None:
            return None
        if item[2] <= self._clock():
            del self._records[key]
            return None
        return item

    async def load(self, key: str) -> bytes | None:
        item = self._live(key)
        return item[0] if item else None

    async def save(self, meta: SessionMeta, sealed: bytes, ttl: float) -> None:
        self._records[meta.key] = (sealed, meta, self._clock() + ttl)

    async def replace(self, meta: SessionMeta, sealed: bytes, ttl: float, expected: bytes) -> bool:
        item = self._live(meta.key)
        if item is None or item[0] != expected:
            return False
        self._records[meta.key] = (sealed, meta, self._clock() + ttl)
        return True

    async def touch(self, key: str, ttl: float) -> None:
        item = self._live(key)
        if item:
            self._records[key] = (item[0], item[1], self._clock() + ttl)

    async def delete(self, key: str) -> None:
        self._records.pop(key, None)

    def _metas(self) -> list[SessionMeta]:
        return [item[1] for key in list(self._records) if (item := self._live(key))]

    async def keys_for_user(
        self, sub: str, provider: str = DEFAULT_PROVIDER_ID
    ) -> list[SessionMeta]:
        return [m for m in self._metas() if m.sub == sub and m.provider == provider]

    async def keys_for_sid(
        self, sid: str, provider: str = DEFAULT_PROVIDER_ID
    ) -> list[SessionMeta]:
        return [m for m in self._metas() if m.provider_sid == sid and m.provider == provider]

    async def all_sessions(self) -> AsyncIterator[SessionMeta]:
        for meta in self._metas():
            yield meta

    def _try_lock(self, name: str, holder: object, ttl: float) -> bool:
        now = self._clock()
        held = self._locks.get(name)
        if held is not None and held[1] > now:
            return False
        self._locks[name] = (holder, now + ttl)
        return True

    @asynccontextmanager
    async def lock(self, name: str, ttl: float, wait: float) -> AsyncIterator[bool]:
        """Same contract as the Redis lock: a holder that never lets go loses it after ``ttl``."""
        holder = object()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while not self._try_lock(name, holder, ttl):
            left = deadline - loop.time()
            if left <= 0:
                yield False
                return
            released = self._released.setdefault(name, asyncio.Event())
            # Woken by a release; re-checked every 50 ms for a lock that expired instead.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(released.wait(), min(left, 0.05))
        try:
            yield True
        finally:
            held = self._locks.get(name)
            if held is not None and held[0] is holder:  # not one that expired and was retaken
                del self._locks[name]
                event = self._released.pop(name, None)
                if event is not None:
                    event.set()

    async def claim_once(self, name: str, ttl: float) -> bool:
        now = self._clock()
        if len(self._once) > 10_000:
            self._once = {k: v for k, v in self._once.items() if v > now}
        if self._once.get(name, 0.0) > now:
            return False
        self._once[name] = now + ttl
        return True

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        self._records.clear()

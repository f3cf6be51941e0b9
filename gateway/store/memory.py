"""In-process session store: one gateway process only (``gateway demo``, small setups)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from gateway.store.base import SessionMeta


class MemoryStore:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._records: dict[str, tuple[bytes, SessionMeta, float]] = {}
        self._once: dict[str, float] = {}
        self._locks: dict[str, asyncio.Lock] = {}

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

    async def touch(self, key: str, ttl: float) -> None:
        item = self._live(key)
        if item:
            self._records[key] = (item[0], item[1], self._clock() + ttl)

    async def delete(self, key: str) -> None:
        self._records.pop(key, None)

    def _metas(self) -> list[SessionMeta]:
        return [item[1] for key in list(self._records) if (item := self._live(key))]

    async def keys_for_user(self, sub: str) -> list[SessionMeta]:
        return [m for m in self._metas() if m.sub == sub]

    async def keys_for_sid(self, sid: str) -> list[SessionMeta]:
        return [m for m in self._metas() if m.provider_sid == sid]

    async def all_sessions(self) -> AsyncIterator[SessionMeta]:
        for meta in self._metas():
            yield meta

    @asynccontextmanager
    async def lock(self, name: str, ttl: float, wait: float) -> AsyncIterator[bool]:
        lock = self._locks.setdefault(name, asyncio.Lock())
        try:
            await asyncio.wait_for(lock.acquire(), wait)
        except TimeoutError:
            yield False
            return
        try:
            yield True
        finally:
            lock.release()
            if not lock.locked():
                self._locks.pop(name, None)

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

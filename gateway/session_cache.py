"""A per-process cache of opened sessions, trusted only while its invalidation feed is live.

Keyed by the store key. An entry holds the opened ``Session`` and the ``Ticket`` it was opened
with (a hit needs the same ticket), and lives at most ``ttl`` seconds and never past the
record's own end in the store (lifetime, refresh-token expiry). The cache answers only while ``trusted``: the store's invalidation feed
(Redis pub/sub, see docs/scaling.md) sets it when its subscription is confirmed and clears it
the moment the feed is lost; every change of state flushes it, since messages may have been
missed. A read that raced an invalidation is not cached (``generation``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from gateway.session import Session, Ticket


class SessionCache:
    def __init__(self, size: int, ttl: float, clock: Callable[[], float]) -> None:
        self.size = size
        self.ttl = ttl
        self._clock = clock
        self._entries: OrderedDict[str, tuple[Ticket, Session, float]] = OrderedDict()
        self.trusted = False
        # Bumped by every invalidation and flush: a read started before one is not cached.
        self.generation = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str, ticket: Ticket) -> Session | None:
        if not self.trusted:
            return None
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[2] <= self._clock() or entry[0] != ticket:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry[1]

    def put(
        self, key: str, ticket: Ticket, session: Session, generation: int, limit: float
    ) -> None:
        """Cache ``session`` (read when ``generation`` was current) for at most ``ttl`` and
        never past ``limit`` (the caller's bound: the record's own end in the store)."""
        if not self.trusted or generation != self.generation:
            return
        until = min(self._clock() + self.ttl, limit)
        self._entries[key] = (ticket, session, until)
        self._entries.move_to_end(key)
        if len(self._entries) > self.size:
            self._entries.popitem(last=False)

    # -- the invalidation feed (gateway.store.base.InvalidationListener) -------------------

    def invalidate(self, key: str) -> None:
        self.generation += 1
        self._entries.pop(key, None)

    def set_trusted(self, trusted: bool) -> None:
        self.flush()
        self.trusted = trusted

    def flush(self) -> None:
        self.generation += 1
        self._entries.clear()

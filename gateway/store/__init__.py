"""Session stores: the ``SessionStore`` protocol and its Redis and in-memory implementations."""

from gateway.store.base import InvalidationListener, SessionMeta, SessionStore, open_store
from gateway.store.memory import MemoryStore
from gateway.store.redis import RedisStore

__all__ = [
    "InvalidationListener",
    "MemoryStore",
    "RedisStore",
    "SessionMeta",
    "SessionStore",
    "open_store",
]

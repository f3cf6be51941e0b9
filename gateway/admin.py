"""``gateway sessions``: list and revoke sessions in the shared store, for every replica at once.

A revocation deletes the record and publishes its key on the store's invalidation channel:
every replica's session cache drops it, and a replica whose channel is down bypasses its cache,
so the next request on any replica finds no session. ``--provider`` keeps to one provider's
sessions (a ``sub`` is unique only per issuer).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime

from gateway.config import Settings
from gateway.errors import StoreError
from gateway.store import SessionMeta, SessionStore, open_store


def _fmt(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _line(meta: SessionMeta) -> str:
    left = max(0, int(meta.expires_at - time.time()))
    return (
        f"{meta.key[:16]}  provider={meta.provider}  sub={meta.sub}  "
        f"sid={meta.provider_sid or '-'}  "
        f"created={_fmt(meta.created_at)}  absolute_end_in={left}s"
    )


async def _with_store(settings: Settings, action: Callable[[SessionStore], Awaitable[int]]) -> int:
    # The store's own warning would repeat the one line printed below (a command has no
    # logging set up, so Python would print it as it is); configured logging still gets it.
    logging.getLogger("gateway.store").addHandler(logging.NullHandler())
    store = open_store(settings.session)
    try:
        return await action(store)
    except StoreError as exc:
        print(f"gateway sessions: the session store did not answer ({exc})", file=sys.stderr)
        return 1
    finally:
        await store.close()


async def _select(
    store: SessionStore, user: str | None, providers: Sequence[str], only: str | None
) -> list[SessionMeta]:
    """The sessions of ``user`` (None: everyone's) at provider ``only`` (None: at any).

    A sub is unique only per provider: a user is looked up in each provider's index."""
    if user is None:
        return [m async for m in store.all_sessions() if only is None or m.provider == only]
    metas: list[SessionMeta] = []
    for provider in [only] if only is not None else providers:
        metas.extend(await store.keys_for_user(user, provider))
    return metas


def _ids(settings: Settings) -> list[str]:
    return [ref.id for ref in settings.provider_refs]


async def list_sessions(settings: Settings, user: str | None, provider: str | None = None) -> int:
    """Print the sessions of one user (``user``) or every session (None), of one provider
    (``provider``) or of all; each line names its provider id."""

    async def act(store: SessionStore) -> int:
        metas = await _select(store, user, _ids(settings), provider)
        for meta in sorted(metas, key=lambda m: m.created_at):
            print(_line(meta))
        print(f"{len(metas)} session(s)")
        return 0

    return await _with_store(settings, act)


async def revoke_sessions(settings: Settings, user: str | None, provider: str | None = None) -> int:
    """Delete the sessions of one user (``user``) or every session (None), of one provider
    (``provider``) or of all."""

    async def act(store: SessionStore) -> int:
        metas = await _select(store, user, _ids(settings), provider)
        for meta in metas:
            await store.delete(meta.key)
            print(f"revoked {_line(meta)}")
        who = f"user {user}" if user is not None else "all users"
        if provider is not None:
            at = f" at provider {provider}"
        else:
            # A sub is unique only per provider: without --provider, every provider's user
            # of that sub (each line above names its provider).
            at = " at every provider" if len(_ids(settings)) > 1 else ""
        print(f"revoked {len(metas)} session(s) of {who}{at}")
        return 0

    return await _with_store(settings, act)

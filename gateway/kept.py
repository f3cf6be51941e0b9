"""``Kept``: the bounded memo behind every per-process table of the hot path (raw paths,
Cookie headers, cookies' tickets, identity headers, header sets, trusted peers)."""

from __future__ import annotations

from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")


class Kept(dict[K, V]):
    """A dict of what was worked out once, holding at most ``limit`` entries.

    When full it is emptied rather than evicting one entry at a time: what it holds is cheap
    to work out again, and the bound is what matters (a flood of distinct keys can make it
    hold no more). Reads are plain ``dict`` reads (``get``), at C speed.
    """

    __slots__ = ("limit",)

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def keep(self, key: K, value: V) -> V:
        """Remember ``value`` for ``key`` (emptying the table first when it is full)."""
        if len(self) >= self.limit:
            self.clear()
        self[key] = value
        return value

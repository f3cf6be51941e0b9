"""Counting the calls a mechanism makes: the tests of what the hot path remembers."""

from __future__ import annotations

from typing import Any

import pytest


def record_first_args(monkeypatch: pytest.MonkeyPatch, owner: object, name: str) -> list[Any]:
    """Replace ``owner.name`` (a plain function) with one that records the first argument of
    each call, then calls the original; return the record."""
    real = getattr(owner, name)
    seen: list[Any] = []

    def recorded(first: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(first)
        return real(first, *args, **kwargs)

    monkeypatch.setattr(owner, name, recorded)
    return seen

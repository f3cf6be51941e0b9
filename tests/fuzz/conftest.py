"""Fuzzing fixtures: hypothesis profiles, one real gateway stack per test module, counters.

Every property test here is a plain (sync) test: the stack - dev provider, echo upstream,
gateway on a real loopback port, real redis - runs on an ``asyncio.Runner`` owned by a
module-scoped fixture, and each hypothesis example sends its requests through that runner.
So one stack serves hundreds of examples and nothing depends on pytest-asyncio's loops.

Hypothesis profiles: ``tests/fuzz/profiles.py``.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import RedisServer
from tests.fuzz.profiles import PROFILE, TRIED
from tests.fuzz.stack import FuzzStack


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not TRIED:
        return
    terminalreporter.section(f"fuzz: inputs tried (profile {PROFILE})")
    for name, count in sorted(TRIED.items()):
        terminalreporter.write_line(f"{count:8d}  {name}")
    path = os.environ.get("GATEWAY_FUZZ_STATS")
    if path:
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(dict(TRIED), fh, indent=1, sort_keys=True)


def make_stack(redis_server: RedisServer, **overrides: Any) -> Iterator[FuzzStack]:
    runner = asyncio.Runner()
    stack = FuzzStack(runner, redis_server, TRIED)
    try:
        runner.run(stack.start(**overrides))
        yield stack
    finally:
        try:
            runner.run(stack.close())
        finally:
            runner.close()


@pytest.fixture(scope="module")
def fuzz_stack(redis_server: RedisServer) -> Iterator[FuzzStack]:
    """The standard fuzz stack (see ``FuzzStack.start``), one per test module."""
    yield from make_stack(redis_server)


@pytest.fixture(scope="module")
def trusted_stack(redis_server: RedisServer) -> Iterator[FuzzStack]:
    """The same, with 127.0.0.1 as a trusted proxy (forward-auth believes its headers)."""
    yield from make_stack(redis_server, trusted=True)

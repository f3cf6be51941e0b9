"""Timing against short-lived tokens: a stack with 2-second access tokens, and waiting."""

from __future__ import annotations

import asyncio
import time

from gateway.devidp import RunningIdp

SHORT = {"idp_config": {"access_token_ttl": 2}, "session": {"refresh_skew": 1}}


def latest_access_token(idp: RunningIdp) -> str:
    return list(idp.state.access_tokens)[-1]


async def sleep_until(moment: float) -> None:
    await asyncio.sleep(max(0.0, moment - time.time()))


class FakeClock:
    """An injected clock for unit tests: stands still until ``advance`` moves it.

    Starts at a whole second so that advancing by whole or half seconds stays exact.
    """

    def __init__(self, start: float | None = None) -> None:
        self.now = float(int(time.time())) if start is None else start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

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

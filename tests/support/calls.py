"""Talking to a test gateway as a browser or an API client does: sign in, call an API."""

from __future__ import annotations

import json
import time
from typing import Any

import aiohttp

from tests.conftest import Stack
from tests.idp_client import http_login

API = {"Accept": "application/json", "Sec-Fetch-Mode": "cors"}


async def call(http: aiohttp.ClientSession, url: str, **kw: Any) -> tuple[int, dict[str, Any]]:
    """An API call through the gateway: status and the JSON body (the echo's view, or an error)."""
    async with http.get(url, headers=API, allow_redirects=False, **kw) as resp:
        text = await resp.text()
        try:
            body = json.loads(text)
        except ValueError:
            body = {"text": text}
        body["_headers"] = dict(resp.headers)
        return resp.status, body


def upstream_headers(body: dict[str, Any]) -> dict[str, str]:
    """The headers the echo upstream received, lower-cased."""
    return {k.lower(): v for k, v in body["headers"]}


def bearer(body: dict[str, Any]) -> str:
    auth = upstream_headers(body)["authorization"]
    assert auth.startswith("Bearer ")
    return auth.removeprefix("Bearer ")


async def login(http: aiohttp.ClientSession, stack: Stack, user: str = "alice") -> float:
    """Sign in; return a time no earlier than when the gateway stored the tokens."""
    result = await http_login(http, stack.url + "/", user, user)
    assert result.status == 200, result.body
    return time.time()

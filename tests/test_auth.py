"""The request pipeline's seams (gateway/auth.py, the error table in gateway/middleware.py):

- ``authenticate`` gives one ``Principal`` type for a browser session and a bearer token;
- it runs once per request: one store read (one Redis GET, counted by the real Redis) for a
  plain authenticated request at every endpoint that asks who the request is from;
- a store or provider failure is a 503 with Retry-After at every endpoint, answered by the
  error middleware's table alone.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import redis
from aiohttp import web
from aiohttp.test_utils import TestServer, make_mocked_request

from gateway import keys, paths
from gateway.auth import authenticate, open_session
from gateway.echo import RunningEcho
from gateway.errors import ProviderTransportError, StoreError
from gateway.middleware import UNAVAILABLE, errors
from gateway.oidc.par import ParUnavailable
from gateway.principal import Principal
from tests.conftest import CLIENT_ID, RedisServer, Stack
from tests.support.calls import API, login
from tests.support.ports import free_port

StackMaker = Any


def routes(echo_url: str) -> list[dict[str, Any]]:
    return [
        {"prefix": "/", "upstream": echo_url},
        {"prefix": "/api", "upstream": echo_url, "accept_bearer": True,
         "on_unauthenticated": "deny"},
    ]  # fmt: skip


@pytest.fixture
def bearer_stack(make_stack: StackMaker, echo: RunningEcho) -> StackMaker:
    async def factory(**overrides: Any) -> Stack:
        stack: Stack = await make_stack(echo=echo, routes=routes(str(echo.url)), **overrides)
        return stack

    return factory


def session_cookie(browser: aiohttp.ClientSession, stack: Stack) -> str:
    name = stack.settings.session.cookie_name
    return next(c.value for c in browser.cookie_jar if c.key == name)


def request_to(stack: Stack, path: str, **headers: str) -> web.Request:
    return make_mocked_request("GET", path, headers=headers, app=stack.app)


async def test_a_session_and_a_bearer_token_give_the_same_principal_type(
    bearer_stack: StackMaker, browser: aiohttp.ClientSession
) -> None:
    stack = await bearer_stack()
    await login(browser, stack, "alice")
    cookie = f"{stack.settings.session.cookie_name}={session_cookie(browser, stack)}"
    token = stack.idp.state.issue_access_token("bob", CLIENT_ID, "openid email", 300)
    route = stack.app[keys.ROUTES].match("/api/items")
    assert route is not None and route.settings.accept_bearer

    by_session = request_to(stack, "/api/items", Cookie=cookie)
    from_session = await authenticate(by_session, route)
    by_token = request_to(stack, "/api/items", Authorization=f"Bearer {token}")
    from_token = await authenticate(by_token, route)

    assert type(from_session) is Principal and type(from_token) is Principal
    assert (from_session.via, from_session.identity.sub) == ("session", "alice")
    assert (from_token.via, from_token.identity.sub) == ("bearer", "bob")
    assert from_session.session is not None and from_session.ticket is not None
    assert from_token.session is None and from_token.access_token == token
    assert from_session.access_token == from_session.session.tokens.access_token
    # Kept on the request, for every later step and the access log.
    assert by_session[keys.PRINCIPAL] is from_session
    assert by_token[keys.PRINCIPAL] is from_token
    assert by_session[keys.IDENTITY] == from_session.identity

    # A browser session wins over a bearer token.
    both = request_to(stack, "/api/items", Cookie=cookie, Authorization=f"Bearer {token}")
    winner = await authenticate(both, route)
    assert winner is not None and (winner.via, winner.identity.sub) == ("session", "alice")


async def test_routes_without_accept_bearer_ignore_bearer_tokens(
    bearer_stack: StackMaker,
) -> None:
    stack = await bearer_stack()
    token = stack.idp.state.issue_access_token("bob", CLIENT_ID, "openid email", 300)
    route = stack.app[keys.ROUTES].match("/elsewhere")
    assert route is not None and not route.settings.accept_bearer
    assert await authenticate(request_to(stack, "/elsewhere", Authorization=f"Bearer {token}"), route) is None  # fmt: skip


def get_calls(server: RedisServer) -> int:
    client = redis.Redis.from_url(server.url)
    try:
        stats: dict[str, Any] = client.info("commandstats")
        return int(stats.get("cmdstat_get", {}).get("calls", 0))
    finally:
        client.close()


def reset_stats(server: RedisServer) -> None:
    client = redis.Redis.from_url(server.url)
    try:
        client.config_resetstat()
    finally:
        client.close()


async def test_authenticate_runs_once_and_a_plain_request_reads_the_store_once(
    make_stack: StackMaker, browser: aiohttp.ClientSession, own_redis: RedisServer
) -> None:
    # Without the session cache (its own tests count its hits): one GET, never more.
    stack: Stack = await make_stack(redis_url=own_redis.url, session={"cache_size": 0})
    await login(browser, stack)
    cookie = f"{stack.settings.session.cookie_name}={session_cookie(browser, stack)}"
    route = stack.app[keys.ROUTES].match("/x")
    assert route is not None

    reset_stats(own_redis)
    request = request_to(stack, "/x", Cookie=cookie)
    first = await authenticate(request, route)
    assert first is not None
    assert await authenticate(request, route) is first
    assert await open_session(request) is not None
    assert get_calls(own_redis) == 1

    # Over HTTP: each endpoint that asks who the request is from reads the session once.
    for path in ("/x", paths.AUTH, paths.USERINFO, paths.SIGN_OUT):
        reset_stats(own_redis)
        async with browser.get(stack.url + path, allow_redirects=False) as resp:
            assert resp.status == 200, (path, await resp.text())
        assert get_calls(own_redis) == 1, path


async def test_store_down_is_503_with_retry_after_at_every_endpoint(
    make_stack: StackMaker, browser: aiohttp.ClientSession, own_redis: RedisServer
) -> None:
    stack: Stack = await make_stack(redis_url=own_redis.url)
    await login(browser, stack)
    own_redis.stop()
    for method, path in (
        ("GET", "/x"),
        ("GET", paths.AUTH),
        ("GET", paths.USERINFO),
        ("GET", paths.SIGN_OUT),
        ("POST", paths.SIGN_OUT),
    ):
        async with browser.request(method, stack.url + path, headers=API) as resp:
            body = await resp.json()
            assert resp.status == 503, (method, path, body)
            assert body["error"] == "session_store_unavailable", (method, path)
            assert int(resp.headers["Retry-After"]) > 0, (method, path)


async def test_provider_down_is_503_with_retry_after_for_the_gate_and_forward_auth(
    bearer_stack: StackMaker, api: aiohttp.ClientSession
) -> None:
    dead = f"http://127.0.0.1:{free_port()}/jwks"
    # Forward-auth believes the original URI from a trusted proxy only.
    trusted = {"trusted_proxies": ["127.0.0.1/32"]}
    stack = await bearer_stack(provider={"jwks_uri": dead}, server=trusted)
    token = stack.idp.state.issue_access_token("bob", CLIENT_ID, "openid", 300)
    sent = {**API, "Authorization": f"Bearer {token}"}
    for path in ("/api/items", paths.AUTH + "/api/items"):
        async with api.get(stack.url + path, headers=sent) as resp:
            body = await resp.json()
            assert resp.status == 503, (path, body)
            assert body["error"] == "provider_unavailable", path
            assert int(resp.headers["Retry-After"]) > 0, path


@pytest.fixture
async def failing_app() -> AsyncIterator[str]:
    """Handlers that let a lower-level failure escape, behind the error middleware only."""

    def raising(exc: Exception) -> Any:
        async def handler(request: web.Request) -> web.StreamResponse:
            raise exc

        return handler

    app = web.Application(middlewares=[errors])
    app.router.add_get("/store", raising(StoreError("down")))
    app.router.add_get("/provider", raising(ProviderTransportError("down")))
    app.router.add_get("/par", raising(ParUnavailable("no PAR")))
    async with TestServer(app, host="127.0.0.1") as server:
        yield str(server.make_url("")).rstrip("/")


async def test_the_error_table_maps_store_and_provider_failures_to_503(
    failing_app: str, api: aiohttp.ClientSession
) -> None:
    assert set(UNAVAILABLE) == {StoreError, ProviderTransportError}
    expected = {
        "/store": "session_store_unavailable",
        "/provider": "provider_unavailable",
        "/par": "provider_unavailable",  # a subclass is answered as its base
    }
    for path, code in expected.items():
        async with api.get(failing_app + path, headers=API) as resp:
            body = await resp.json()
            assert resp.status == 503, path
            assert body["error"] == code, path
            assert int(resp.headers["Retry-After"]) > 0, path
            assert "down" not in body["message"] and "PAR" not in body["message"]

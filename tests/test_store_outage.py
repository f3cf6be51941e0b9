"""The session store down on the hot path (SECURITY.md 23): 503, never a logout and never a
login loop; service resumes by itself, with the same sessions, when Redis is back.

The Redis of these tests writes an append-only file to a temporary directory, so stopping
the process and starting it again is a real outage that loses nothing.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.conftest import RedisServer, Stack, gateway_config
from tests.support.browser import session_keys
from tests.support.calls import bearer, call, login
from tests.support.ports import free_port
from tests.support.processes import gateway_cli


@pytest.fixture
def durable_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(data_dir=str(tmp_path))
    server.start()
    yield server
    if server.proc is not None and server.proc.poll() is None:
        os.kill(server.proc.pid, signal.SIGCONT)  # in case a test left it paused
    server.stop()


async def assert_unavailable(stack: Stack, browser: aiohttp.ClientSession) -> None:
    # A navigation: a small retry page, not a redirect to the provider, no cookie cleared.
    async with browser.get(stack.url + "/some/page", allow_redirects=False) as resp:
        assert resp.status == 503
        assert "Location" not in resp.headers
        assert int(resp.headers["Retry-After"]) > 0
        assert resp.content_type == "text/html"
        assert "gw_test" not in resp.cookies
        assert "try" in (await resp.text()).lower()
    # An API call: 503 JSON.
    status, body = await call(browser, stack.url + "/api/items")
    assert status == 503
    assert body["error"] == "session_store_unavailable"
    assert int(body["_headers"]["Retry-After"]) > 0
    async with browser.get(stack.url + "/readyz") as resp:
        assert resp.status == 503
        assert (await resp.json())["checks"]["store"] == "unavailable"


async def test_redis_stopped_mid_session_is_a_503_and_the_session_survives(
    make_stack: Any, browser: aiohttp.ClientSession, durable_redis: RedisServer
) -> None:
    stack = await make_stack(redis_url=durable_redis.url)
    await login(browser, stack)
    status, before = await call(browser, stack.url + "/x")
    assert status == 200

    durable_redis.stop()
    await assert_unavailable(stack, browser)
    async with browser.get(stack.url + "/oauth2/userinfo") as resp:
        assert resp.status == 503

    durable_redis.start()
    status, after = await call(browser, stack.url + "/x")
    assert status == 200
    assert bearer(after) == bearer(before)  # the very same session, no new login
    assert stack.idp.state.token_calls["authorization_code"] == 1
    assert len(session_keys(durable_redis, stack)) == 1
    async with browser.get(stack.url + "/readyz") as resp:
        assert resp.status == 200


async def test_a_hung_redis_is_a_503_not_a_hang(
    make_stack: Any, browser: aiohttp.ClientSession, durable_redis: RedisServer
) -> None:
    stack = await make_stack(redis_url=durable_redis.url)
    await login(browser, stack)
    assert durable_redis.proc is not None
    os.kill(durable_redis.proc.pid, signal.SIGSTOP)  # accepts connections, answers nothing
    try:
        status, body = await call(browser, stack.url + "/api/items")
        assert status == 503
        assert body["error"] == "session_store_unavailable"
    finally:
        os.kill(durable_redis.proc.pid, signal.SIGCONT)
    assert (await call(browser, stack.url + "/x"))[0] == 200


async def test_a_cluster_with_every_seed_down_is_a_503_logged_with_its_cause(
    make_stack: Any,
    browser: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    """redis-py's cluster client fails with ``RedisClusterException`` (not a ``RedisError``):
    still a 503 everywhere, and the log says which operation failed where, without the
    password; ``gateway sessions`` prints one line."""
    caplog.set_level(logging.WARNING, logger="gateway.store")
    first = await make_stack()
    await login(browser, first)
    seeds = f"127.0.0.1:{free_port()},127.0.0.1:{free_port()}"
    url = f"redis+cluster://:hunter2secret@{seeds}"
    secrets = [s.get_secret_value() for s in first.settings.session.cookie_secrets]
    down = await make_stack(
        idp=first.idp, echo=first.echo, redis_url=url, session={"cookie_secrets": secrets}
    )
    await assert_unavailable(down, browser)
    logged = [r.getMessage() for r in caplog.records if r.name == "gateway.store"]
    assert any("operation=load" in line and seeds in line for line in logged), logged
    assert all("hunter2secret" not in line for line in logged)
    # Rate-limited: seven failed loads within a few seconds, one line per 10 s.
    for _ in range(5):
        assert (await call(browser, down.url + "/api/items"))[0] == 503
    logged = [r.getMessage() for r in caplog.records if r.name == "gateway.store"]
    load_lines = [line for line in logged if "operation=load" in line]
    assert 1 <= len(load_lines) <= 2, load_lines

    cfg = gateway_config(down.url, str(first.idp.url), str(first.echo.url), url)
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(cfg))
    for action in ("list", "revoke --all"):
        code, out = await gateway_cli("sessions", *action.split(), "--config", str(path))
        assert code == 1, out
        assert "Traceback" not in out and "hunter2secret" not in out
        (line,) = out.strip().splitlines()
        assert line.startswith("gateway sessions: the session store did not answer"), line

"""Exactly-once refresh across gateway processes (SECURITY.md 19), and per-user revocation.

Two real ``gateway run --config FILE`` processes share one Redis (same ``key_prefix`` and
``cookie_secrets``, same ``public_url`` so one cookie is good on both). The dev provider
rotates refresh tokens: a second refresh call with the same refresh token would revoke the
whole grant, so "exactly one refresh call" and "every request answered" prove the lock.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.conftest import RedisServer, gateway_config
from tests.idp_client import http_login
from tests.support.calls import bearer, call
from tests.support.clock import latest_access_token, sleep_until
from tests.support.ports import free_port
from tests.support.processes import Cluster, gateway_cli, gateway_pair


@pytest.fixture
async def cluster(tmp_path: Path, redis_server: RedisServer) -> AsyncIterator[Cluster]:
    async for pair in gateway_pair(tmp_path, redis_server.url):
        yield pair


async def login_everywhere(http: aiohttp.ClientSession, cluster: Cluster) -> float:
    """Sign in through the first replica; the cookie is good on every replica."""
    result = await http_login(http, cluster.public_url + "/", "alice", "alice")
    assert result.status == 200, result.body
    return time.time()


async def burst(
    http: aiohttp.ClientSession, cluster: Cluster, n: int = 50
) -> list[tuple[int, dict[str, Any]]]:
    """``n`` concurrent API calls with the one cookie, split evenly across the replicas."""
    urls = [cluster.replicas[i % 2].url + f"/burst/{i}" for i in range(n)]
    return list(await asyncio.gather(*(call(http, url) for url in urls)))


async def test_fifty_concurrent_requests_on_two_processes_refresh_exactly_once(
    cluster: Cluster, browser: aiohttp.ClientSession
) -> None:
    state = cluster.idp.state
    done = await login_everywhere(browser, cluster)
    first = latest_access_token(cluster.idp)
    for replica in cluster.replicas:
        status, body = await call(browser, replica.url + "/warm")
        assert status == 200 and bearer(body) == first

    # A slow provider makes the race real: every request arrives while the refresh runs.
    state.faults.token_delay = 0.5
    state.cfg.access_token_ttl = 4  # the refreshed token's window opens 3 s later
    await sleep_until(done + 1.2)
    answers = await burst(browser, cluster)
    refreshed = time.time()
    assert [status for status, _ in answers] == [200] * 50
    second = latest_access_token(cluster.idp)
    assert {bearer(body) for _, body in answers} == {second}
    assert second != first
    assert state.token_calls["refresh_token"] == 1

    # The next window works too: the rotated refresh token was stored and is used once.
    state.cfg.access_token_ttl = 300
    await sleep_until(refreshed + 3.2)
    answers = await burst(browser, cluster)
    assert [status for status, _ in answers] == [200] * 50
    third = latest_access_token(cluster.idp)
    assert {bearer(body) for _, body in answers} == {third}
    assert third not in (first, second)
    assert state.token_calls["refresh_token"] == 2
    assert not any(grant.revoked for grant in state.grants.values())
    assert [r.rotated for r in state.refresh_tokens.values()] == [True, True, False]


async def test_a_client_leaving_mid_refresh_does_not_lose_the_rotated_token(
    cluster: Cluster, browser: aiohttp.ClientSession
) -> None:
    """``gateway run`` cancels the handler of a client that disconnects; the refresh it
    started must finish and be stored, or the next refresh would reuse a rotated token."""
    state = cluster.idp.state
    done = await login_everywhere(browser, cluster)
    state.faults.token_delay = 1.0
    state.cfg.access_token_ttl = 300
    await sleep_until(done + 1.2)
    replica = cluster.replicas[1]
    with pytest.raises(TimeoutError):
        await call(browser, replica.url + "/gone", timeout=aiohttp.ClientTimeout(total=0.3))
    await asyncio.sleep(1.2)  # the provider answers the refresh meanwhile
    state.faults.token_delay = 0.0
    answers = await burst(browser, cluster, 10)
    assert [status for status, _ in answers] == [200] * 10
    assert {bearer(body) for _, body in answers} == {latest_access_token(cluster.idp)}
    assert state.token_calls["refresh_token"] == 1
    assert not any(grant.revoked for grant in state.grants.values())


async def test_sessions_revoke_user_ends_them_on_every_process(
    cluster: Cluster, browser: aiohttp.ClientSession
) -> None:
    async with aiohttp.ClientSession(
        cookie_jar=aiohttp.CookieJar(unsafe=True), headers={"Accept": "text/html"}
    ) as bob:
        await login_everywhere(browser, cluster)
        await login_everywhere(browser, cluster)  # a second session of alice (the first ends)
        result = await http_login(bob, cluster.public_url + "/", "bob", "bob")
        assert result.status == 200
        for replica in cluster.replicas:
            assert (await call(browser, replica.url + "/x"))[0] == 200

        code, out = await gateway_cli(
            "sessions", "list", "--user", "alice", "--config", str(cluster.config)
        )
        assert code == 0, out
        assert "sub=alice" in out and out.strip().endswith("1 session(s)")
        code, out = await gateway_cli("sessions", "list", "--config", str(cluster.config))
        assert code == 0 and out.strip().endswith("2 session(s)"), out

        code, out = await gateway_cli(
            "sessions", "revoke", "--user", "alice", "--config", str(cluster.config)
        )
        assert code == 0, out
        assert "revoked 1 session(s) of user alice" in out
        for replica in cluster.replicas:
            status, body = await call(browser, replica.url + "/api/x")
            assert status == 401, body
            async with browser.get(replica.url + "/x", allow_redirects=False) as resp:
                assert resp.status == 302
            assert (await call(bob, replica.url + "/x"))[0] == 200

        code, out = await gateway_cli(
            "sessions", "revoke", "--all", "--config", str(cluster.config)
        )
        assert code == 0 and "revoked 1 session(s) of all users" in out, out
        for replica in cluster.replicas:
            assert (await call(bob, replica.url + "/api/x"))[0] == 401
        code, out = await gateway_cli("sessions", "revoke", "--config", str(cluster.config))
        assert code == 2


async def test_sessions_command_without_redis_says_so(tmp_path: Path) -> None:
    cfg = gateway_config("http://127.0.0.1:4180", "http://127.0.0.1:1", "http://127.0.0.1:1", None)
    cfg["session"]["store"] = "redis"
    cfg["session"]["redis_url"] = f"redis://127.0.0.1:{free_port()}/0"
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code, out = await gateway_cli("sessions", "list", "--config", str(path))
    assert code == 1
    assert "the session store did not answer" in out
    assert "Traceback" not in out

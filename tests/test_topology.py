"""Two real ``gateway run`` processes on real Redis topologies (marker ``topology``):
a primary + replica + three sentinels, and a six-node cluster (three primaries, three
replicas), all Debian ``redis-server`` / ``redis-sentinel`` processes on loopback.

For each topology, in one run: sessions shared by both processes; exactly one refresh across
them; ``gateway sessions list``; every node down (503 and ``/readyz`` 503 on both processes,
the CLI prints one line) and back up with the same sessions; a primary killed under bounded
load (only 200 and 503 while it lasts, no logout, no 500, every session usable afterwards;
the gap is measured and printed); ``gateway sessions revoke``.

Skip them locally with ``-m "not topology"``; CI runs them.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis
import redis.cluster
import yaml

from gateway.devidp import RunningIdp
from tests.gateway_proc import GatewayProcess, start_gateway_process
from tests.idp_client import http_login
from tests.support.calls import API, bearer, call
from tests.support.clock import latest_access_token, sleep_until
from tests.support.ports import free_port
from tests.support.processes import gateway_cli, gateway_pair
from tests.topology import (
    Node,
    RedisClusterSet,
    SentinelSet,
    start_cluster,
    start_sentinel_set,
    wait_for,
)

pytestmark = pytest.mark.topology

USERS = ("alice", "bob", "alice", "bob", "alice", "bob")
LOAD_BOUND_S = 30.0  # the load loop stops by itself after this long
LOAD_BOUND_REQUESTS = 20_000


@dataclass
class Deployment:
    public_url: str
    replicas: list[GatewayProcess]
    idp: RunningIdp
    config: dict[str, Any]
    prefix: str
    tmp: Path

    async def cli(self, *args: str, redis_url: str | None = None) -> tuple[int, str]:
        """``gateway sessions ...`` with this deployment's config (or another store URL)."""
        cfg = {**self.config, "session": {**self.config["session"]}}
        if redis_url is not None:
            cfg["session"]["redis_url"] = redis_url
        path = self.tmp / f"cli-{uuid.uuid4().hex[:6]}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return await gateway_cli("sessions", *args, "--config", str(path))


async def deploy(redis_url: str, tmp: Path, **session: Any) -> AsyncIterator[Deployment]:
    """Two gateway processes with short store timeouts, so an outage is answered quickly."""
    timeouts = {"redis_socket_timeout": 0.5, "redis_connect_timeout": 0.5,
                "redis_pool_timeout": 2}  # fmt: skip
    async for pair in gateway_pair(tmp, redis_url, **timeouts, **session):
        cfg = yaml.safe_load(pair.config.read_text())
        yield Deployment(
            pair.public_url, pair.replicas, pair.idp, cfg, cfg["session"]["key_prefix"], tmp
        )


def new_browser() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        cookie_jar=aiohttp.CookieJar(unsafe=True),
        headers={"Accept": "text/html", "Sec-Fetch-Mode": "navigate"},
    )


async def status_of(http: aiohttp.ClientSession, url: str) -> int:
    try:
        async with http.get(url, headers=API, allow_redirects=False) as resp:
            await resp.read()
            return resp.status
    except (aiohttp.ClientError, TimeoutError):
        return 0  # no answer at all: never allowed either


async def ready(http: aiohttp.ClientSession, gw: GatewayProcess) -> int:
    async with http.get(gw.url + "/readyz") as resp:
        await resp.read()
        return resp.status


async def every_session(dep: Deployment, browsers: list[aiohttp.ClientSession]) -> list[int]:
    return [await status_of(b, gw.url + "/api/check") for b in browsers for gw in dep.replicas]


async def shared_sessions_and_one_refresh(
    dep: Deployment, browsers: list[aiohttp.ClientSession]
) -> None:
    state = dep.idp.state
    first = browsers[0]
    result = await http_login(first, dep.public_url + "/", "alice", "alice")
    assert result.status == 200, result.body
    done = time.time()
    for gw in dep.replicas:
        status, body = await call(first, gw.url + "/warm")
        assert status == 200
        assert bearer(body) == latest_access_token(dep.idp)
    # Refresh exactly once across the two processes, with every request waiting on it.
    state.faults.token_delay = 0.5
    state.cfg.access_token_ttl = 600  # every later token outlives the test
    await sleep_until(done + 1.2)
    urls = [dep.replicas[i % 2].url + f"/burst/{i}" for i in range(20)]
    answers = await asyncio.gather(*(call(first, url) for url in urls))
    assert [status for status, _ in answers] == [200] * 20
    assert {bearer(body) for _, body in answers} == {latest_access_token(dep.idp)}
    assert state.token_calls["refresh_token"] == 1
    state.faults.token_delay = 0.0
    for browser, user in zip(browsers[1:], USERS[1:], strict=True):
        result = await http_login(browser, dep.public_url + "/", user, user)
        assert result.status == 200, result.body
    assert await every_session(dep, browsers) == [200] * (2 * len(browsers))
    code, out = await dep.cli("list")
    assert code == 0, out
    assert out.strip().endswith(f"{len(browsers)} session(s)"), out


async def everything_down_and_back(
    dep: Deployment,
    browsers: list[aiohttp.ClientSession],
    stop_all: Callable[[], None],
    start_all: Callable[[], None],
) -> None:
    stop_all()
    async with aiohttp.ClientSession() as http:
        for gw in dep.replicas:
            assert await ready(http, gw) == 503
    assert set(await every_session(dep, browsers)) == {503}
    code, out = await dep.cli("list")
    assert code == 1 and "Traceback" not in out, out
    (line,) = out.strip().splitlines()
    assert line.startswith("gateway sessions: the session store did not answer"), line
    await asyncio.to_thread(start_all)

    async def all_ready() -> bool:
        async with aiohttp.ClientSession() as http:
            return [await ready(http, gw) for gw in dep.replicas] == [200, 200]

    deadline = time.monotonic() + 30
    while not await all_ready():
        assert time.monotonic() < deadline, "the gateways did not become ready again"
        await asyncio.sleep(0.1)
    # The same sessions (the nodes kept them on disk), no new login.
    assert await every_session(dep, browsers) == [200] * (2 * len(browsers))
    assert dep.idp.state.token_calls["authorization_code"] == len(browsers)


async def kill_primary_under_load(
    dep: Deployment,
    browsers: list[aiohttp.ClientSession],
    kill: Callable[[], None],
    label: str,
) -> None:
    """Kill a primary while every session sends requests to both processes, round after
    round; stop once the answers have been all 200 for a while after the outage."""
    seen: Counter[int] = Counter()
    first_failure: float | None = None
    recovered_at: float | None = None
    killed_at = time.monotonic()
    readiness: Counter[int] = Counter()
    kill()
    deadline = killed_at + LOAD_BOUND_S
    async with aiohttp.ClientSession() as probe:
        while time.monotonic() < deadline and sum(seen.values()) < LOAD_BOUND_REQUESTS:
            started = time.monotonic()
            answers, ready_now = await asyncio.gather(
                asyncio.gather(
                    *(status_of(b, gw.url + f"/api/load/{i}")
                      for i, b in enumerate(browsers) for gw in dep.replicas)
                ),
                asyncio.gather(*(ready(probe, gw) for gw in dep.replicas)),
            )  # fmt: skip
            seen.update(answers)
            readiness.update(ready_now)
            if any(a != 200 for a in answers):
                first_failure = first_failure or started
                recovered_at = None
            elif first_failure is not None:
                recovered_at = recovered_at or started
                if time.monotonic() - recovered_at > 1.0:
                    break
    assert set(seen) <= {200, 503}, seen  # never a logout (401/302), a 500 or no answer
    assert readiness[503] > 0, readiness  # not ready while a primary is gone
    assert first_failure is not None and recovered_at is not None, seen
    gap = recovered_at - killed_at
    print(
        f"\n[{label}] primary killed under load: {seen[503]} x 503, {seen[200]} x 200; "
        f"no success from the kill for {gap:.2f} s"
    )
    assert await every_session(dep, browsers) == [200] * (2 * len(browsers))
    assert dep.idp.state.token_calls["authorization_code"] == len(browsers)
    async with aiohttp.ClientSession() as http:
        assert [await ready(http, gw) for gw in dep.replicas] == [200, 200]


async def revoke_alice(dep: Deployment, browsers: list[aiohttp.ClientSession]) -> None:
    code, out = await dep.cli("revoke", "--user", "alice")
    assert code == 0, out
    assert "revoked 3 session(s) of user alice" in out
    expected = [401 if user == "alice" else 200 for user in USERS for _ in dep.replicas]
    assert await every_session(dep, browsers) == expected


@pytest.fixture
async def browsers() -> AsyncIterator[list[aiohttp.ClientSession]]:
    sessions = [new_browser() for _ in USERS]
    try:
        yield sessions
    finally:
        for http in sessions:
            await http.close()


async def test_sentinel_primary_replica_and_three_sentinels(
    tmp_path: Path, browsers: list[aiohttp.ClientSession]
) -> None:
    topo: SentinelSet = await asyncio.to_thread(start_sentinel_set, tmp_path / "redis")
    try:
        async for dep in deploy(topo.url, tmp_path):
            await shared_sessions_and_one_refresh(dep, browsers)
            await everything_down_and_back(dep, browsers, topo.stop_all, topo.start_all)
            topo.wait_replicated()
            old = topo.current_primary()
            await kill_primary_under_load(dep, browsers, old.kill, "sentinel")
            assert topo.promoted(old)
            await revoke_alice(dep, browsers)
    finally:
        topo.close()


def primary_of_first_session(cluster: RedisClusterSet, prefix: str) -> Node:
    """The primary serving the slot of a session record, so the kill hits live sessions."""
    client = redis.cluster.RedisCluster(host="127.0.0.1", port=cluster.nodes[0].port)
    try:
        # Consumed whole: a half-read scan would keep its connections open past close().
        keys = sorted(client.scan_iter(match=prefix + "s:*", target_nodes="primaries"))
        node = client.get_node_from_key(keys[0])
    finally:
        client.close()
    return next(n for n in cluster.nodes if n.port == node.port)


async def test_cluster_of_three_primaries_and_three_replicas(
    tmp_path: Path, browsers: list[aiohttp.ClientSession]
) -> None:
    topo: RedisClusterSet = await asyncio.to_thread(start_cluster, tmp_path / "redis")
    try:
        # Without the session cache: its invalidation channel lives on another node, so it
        # would keep answering cached sessions through the death of the primary under test
        # (tests/test_session_cache.py covers the cache on a cluster).
        async for dep in deploy(topo.url, tmp_path, cache_size=0):
            await shared_sessions_and_one_refresh(dep, browsers)
            await everything_down_and_back(dep, browsers, topo.stop_all, topo.start_all)
            await asyncio.to_thread(topo.wait_replicated)
            victim = primary_of_first_session(topo, dep.prefix)
            await kill_primary_under_load(dep, browsers, victim.kill, "cluster")
            wait_for(topo.healthy, "the cluster to serve every slot again")
            # The CLI and a new gateway start and work while a seed node (the dead primary,
            # named first) is down.
            others = [n for n in topo.nodes if n is not victim]
            url = "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in [victim, *others])
            code, out = await dep.cli("list", redis_url=url)
            assert code == 0 and out.strip().endswith(f"{len(USERS)} session(s)"), out
            cfg = {**dep.config, "session": {**dep.config["session"], "redis_url": url}}
            cfg["server"] = {**cfg["server"], "port": free_port()}
            late = await start_gateway_process(cfg, tmp_path, name="gateway-late")
            try:
                assert await status_of(browsers[1], late.url + "/api/late") == 200
                async with aiohttp.ClientSession() as http:
                    assert await ready(http, late) == 200
            finally:
                await late.close()
            await revoke_alice(dep, browsers)
    finally:
        topo.close()

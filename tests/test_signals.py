"""Signals and the process model of ``gateway run``, on real subprocesses: SIGTERM drains,
SIGHUP reloads (or refuses an invalid file), the ``--workers`` parent restarts workers and
leaves no orphan, a taken port is an error, and ``/metrics`` sums over workers."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from gateway.devidp import ClientRegistration, DevIdpConfig, demo_users, start_devidp
from gateway.echo import start_echo
from tests.conftest import CLIENT_ID, CLIENT_SECRET, gateway_config
from tests.gateway_proc import (
    GatewayProcess,
    command_env,
    gateway_command,
    start_gateway_process,
)
from tests.idp_client import http_login
from tests.support.metrics import Scrape
from tests.support.ports import free_port

BOUND = 30.0  # seconds: every wait here ends by itself
BODY = b"x" * 200_000  # big enough to need several writes


async def wait_for(predicate: Any, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + BOUND
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def wait_exit(gw: GatewayProcess) -> int:
    return await asyncio.wait_for(gw.process.wait(), BOUND)


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def worker_pids(gw: GatewayProcess) -> dict[int, int]:
    """Slot -> pid of the latest start of each worker, from the parent's log."""
    found = re.findall(r"worker (\d+) started \(pid (\d+)\)", gw.log())
    return {int(slot): int(pid) for slot, pid in found}


class HeldUpstream:
    """An upstream whose answers wait until ``release()``; counts requests that arrived."""

    def __init__(self) -> None:
        self.arrived = 0
        self.gate = asyncio.Event()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.arrived += 1
        await self.gate.wait()
        return web.Response(body=BODY, content_type="application/octet-stream")


@pytest.fixture
async def held() -> AsyncIterator[tuple[HeldUpstream, str]]:
    upstream = HeldUpstream()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", upstream.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield upstream, f"http://127.0.0.1:{port}"
    upstream.gate.set()
    await runner.cleanup()


def public_config(upstream: str, **server: Any) -> dict[str, Any]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cfg = gateway_config(url, "http://127.0.0.1:1", upstream, None)
    cfg["server"].update(port=port, **server)
    cfg["routes"] = [{"prefix": "/", "upstream": upstream, "auth": "none"}]
    return cfg


async def test_sigterm_finishes_every_running_request_then_exits_0(
    tmp_path: Path, held: tuple[HeldUpstream, str]
) -> None:
    upstream, upstream_url = held
    gw = await start_gateway_process(public_config(upstream_url), tmp_path)
    try:
        port = int(gw.url.rsplit(":", 1)[1])
        # A connection with a request running and /readyz pipelined behind it.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"GET /held HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
            b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        )
        n = 20
        connector = aiohttp.TCPConnector(force_close=True, limit=0)
        async with aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=BOUND)
        ) as http:

            async def fetch(i: int) -> tuple[int, bytes]:
                async with http.get(f"{gw.url}/load/{i}") as resp:
                    return resp.status, await resp.read()

            loads = [asyncio.create_task(fetch(i)) for i in range(n)]
            await wait_for(lambda: upstream.arrived == n + 1, "every request at the upstream")
            gw.process.send_signal(signal.SIGTERM)
            await wait_for(lambda: "draining" in gw.log(), "the drain log line")
            upstream.gate.set()
            results = await asyncio.gather(*loads)
        assert results == [(200, BODY)] * n
        stream = await asyncio.wait_for(reader.read(), BOUND)  # to EOF: Connection: close
        first, _, rest = stream.partition(b"\r\n\r\n")
        assert first.startswith(b"HTTP/1.1 200 ")
        assert rest[len(BODY) :].startswith(b"HTTP/1.1 503 ")
        assert b'"shutdown": "draining"' in rest[len(BODY) :]
        writer.close()
        assert await wait_exit(gw) == 0
    finally:
        await gw.close()


async def test_second_gateway_on_the_same_port_fails_with_one_clear_line(
    tmp_path: Path,
) -> None:
    echo = await start_echo()
    cfg = public_config(str(echo.url))
    first = await start_gateway_process(cfg, tmp_path, name="first")
    try:
        path = tmp_path / "second.yaml"
        path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
        env = command_env()
        proc = await asyncio.create_subprocess_exec(
            *gateway_command(), "run", "--config", str(path),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=env,
        )  # fmt: skip
        _, err = await asyncio.wait_for(proc.communicate(), BOUND)
        assert proc.returncode == 1
        lines = [line for line in err.decode().splitlines() if "gateway run:" in line]
        assert len(lines) == 1
        assert f"cannot listen on 127.0.0.1:{cfg['server']['port']}" in lines[0]
        assert "Address already in use" in lines[0]
        assert first.process.returncode is None
    finally:
        await first.close()
        await echo.close()


async def test_reuse_port_lets_gateways_share_a_port_on_purpose(tmp_path: Path) -> None:
    echo = await start_echo()
    cfg = public_config(str(echo.url), reuse_port=True)
    running: list[GatewayProcess] = []
    try:
        for name in ("first", "second"):
            running.append(await start_gateway_process(cfg, tmp_path, name=name))
        assert [gw.process.returncode for gw in running] == [None, None]
    finally:
        for gw in running:
            await gw.close()
        await echo.close()


async def test_sighup_reloads_policy_for_an_existing_session_and_refuses_a_bad_file(
    tmp_path: Path, browser: aiohttp.ClientSession
) -> None:
    port = free_port()
    public = f"http://127.0.0.1:{port}"
    idp = await start_devidp(
        DevIdpConfig(
            users=demo_users(),
            clients=[
                ClientRegistration(
                    client_id=CLIENT_ID,
                    client_secret=CLIENT_SECRET,
                    redirect_uris=(public + "/oauth2/callback",),
                )
            ],
        )
    )
    echo = await start_echo()
    cfg = gateway_config(public, str(idp.url), str(echo.url), None)
    cfg["server"]["port"] = port
    gw = await start_gateway_process(cfg, tmp_path)
    http = browser
    try:
        login = await http_login(http, public + "/", "alice", "alice")
        assert login.status == 200, login.body

        async def admin() -> int:
            async with http.get(public + "/admin/x", allow_redirects=False) as resp:
                return resp.status

        assert await admin() == 200
        # An invalid file: refused, its problem logged on a line, the old config serves.
        gw.config_path.write_text(
            yaml.safe_dump({**cfg, "routes": [{"prefix": "/", "upstrem": "x"}]}),
            encoding="utf-8",
        )
        gw.process.send_signal(signal.SIGHUP)
        await wait_for(lambda: "the running config stays" in gw.log(), "the refusal")
        assert "reload refused: routes[0].upstrem: unknown key" in gw.log()
        assert await admin() == 200
        # A valid file: the next request of the same session gets the new policy.
        routes = [dict(r) for r in cfg["routes"]]
        for r in routes:
            if r["prefix"] == "/admin":
                r["require"] = {"groups": ["auditors"]}
        gw.config_path.write_text(yaml.safe_dump({**cfg, "routes": routes}), encoding="utf-8")
        gw.process.send_signal(signal.SIGHUP)
        await wait_for(lambda: "config reloaded" in gw.log(), "the reload")
        assert await admin() == 403
        async with http.get(public + "/x", allow_redirects=False) as resp:
            assert resp.status == 200  # the session survived the reload
        assert gw.process.returncode is None
    finally:
        await gw.close()
        await echo.close()
        await idp.close()


@pytest.fixture
async def two_workers(tmp_path: Path) -> AsyncIterator[GatewayProcess]:
    """``gateway run --workers 2`` with one public route to an echo upstream."""
    echo = await start_echo()
    cfg = public_config(str(echo.url))
    gw = await start_gateway_process(cfg, tmp_path, args=["--workers", "2"])
    try:
        await wait_for(lambda: len(worker_pids(gw)) == 2, "two workers")
        yield gw
    finally:
        await gw.close()
        await echo.close()


async def test_killed_worker_is_restarted_and_no_worker_outlives_the_parent(
    two_workers: GatewayProcess,
) -> None:
    gw = two_workers
    first = worker_pids(gw)
    os.kill(first[0], signal.SIGKILL)
    await wait_for(lambda: worker_pids(gw).get(0, first[0]) != first[0], "a restart")
    assert f"worker 0 (pid {first[0]}) exited with -9; restarting" in gw.log()
    workers = worker_pids(gw)
    assert workers[1] == first[1]
    async with aiohttp.ClientSession() as http, http.get(gw.url + "/healthz") as resp:
        assert resp.status == 200
    # SIGKILL the parent: its workers must not survive it.
    gw.process.kill()
    await gw.process.wait()
    await wait_for(lambda: not any(alive(pid) for pid in workers.values()), "no orphans")


async def test_metrics_with_two_workers_give_the_same_totals_scrape_after_scrape(
    two_workers: GatewayProcess,
) -> None:

    gw = two_workers
    n = 40
    # A fresh connection per request, so both workers take some.
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http:
        for i in range(n):
            async with http.get(f"{gw.url}/counted/{i}") as resp:
                assert resp.status == 200
        scrapes = []
        for _ in range(8):
            async with http.get(gw.url + "/metrics") as resp:
                assert resp.status == 200
                scrapes.append(Scrape(await resp.text()))
    counted = [s.value("gateway_requests_total", route="/", status="200") for s in scrapes]
    assert counted == [n] * len(scrapes)
    assert all(s.value("gateway_build_info") == 1 for s in scrapes)
    assert all(s.value("process_resident_memory_bytes") > 0 for s in scrapes)


def test_reload_names_the_keys_that_need_a_restart() -> None:
    from gateway.config import validate
    from gateway.server import restart_only_changes

    cfg = public_config("http://127.0.0.1:9")
    old = validate(cfg, env={})
    new_cfg = {
        **cfg,
        "server": {**cfg["server"], "port": cfg["server"]["port"] + 1, "header_timeout": "5s"},
        "observability": {"log_format": "json", "log_level": "debug"},
        "routes": [*cfg["routes"], {"prefix": "/more", "upstream": "http://127.0.0.1:9"}],
    }
    changed = restart_only_changes(old, validate(new_cfg, env={}))
    assert changed == ["server.port", "server.header_timeout", "observability.log_format"]


async def test_sighup_to_the_workers_parent_reloads_every_worker(
    two_workers: GatewayProcess,
) -> None:
    gw = two_workers
    cfg = yaml.safe_load(gw.config_path.read_text(encoding="utf-8"))
    gw.config_path.write_text("routes: [", encoding="utf-8")
    gw.process.send_signal(signal.SIGHUP)
    await wait_for(lambda: "the running config stays" in gw.log(), "the refusal")
    await asyncio.sleep(0.5)
    assert gw.log().count("reload refused: ") == 2  # the problem and the verdict, once
    assert "config reloaded" not in gw.log()
    upstream = cfg["routes"][0]["upstream"]
    cfg["routes"].insert(
        0, {"prefix": "/closed", "upstream": upstream, "on_unauthenticated": "deny"}
    )
    gw.config_path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    gw.process.send_signal(signal.SIGHUP)
    await wait_for(lambda: gw.log().count("config reloaded") == 2, "both workers reloaded")
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http:
        for _ in range(10):
            async with http.get(gw.url + "/closed/x") as resp:
                assert resp.status == 401


class _Cycle:
    def __init__(self) -> None:
        self.me = self


async def test_the_heap_is_frozen_and_a_retired_apps_cycles_are_freed() -> None:
    """``freeze_heap`` hides the long-lived heap from the cyclic collector; closing a retired
    generation unfreezes first, so the cycles of the old app can still be collected."""
    import gc
    import weakref

    from gateway.server import _close_generation, _Generation, freeze_heap

    threshold = gc.get_threshold()
    app = web.Application()
    app.freeze()
    cycle = _Cycle()
    gone = weakref.ref(cycle)
    try:
        freeze_heap()
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold()[0] == 10_000
        del cycle
        gc.collect()
        assert gone() is not None  # frozen: out of the collector's sight
        await _close_generation(_Generation(app, None))  # type: ignore[arg-type]
        gc.collect()
        assert gone() is None
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


@pytest.mark.parametrize("workers", [1, 2])
async def test_sigterm_loses_no_access_line(tmp_path: Path, workers: int) -> None:
    """The JSON access lines a worker collects during a loop iteration (gateway.logs,
    ``CoalescedStream``) all reach the log, whole, before the process exits on SIGTERM,
    in one process and in ``--workers`` workers (which end with ``os._exit``)."""
    echo = await start_echo()
    cfg = public_config(str(echo.url))
    cfg["observability"] = {"log_format": "json", "log_level": "info"}
    args = ["--workers", str(workers)] if workers > 1 else []
    gw = await start_gateway_process(cfg, tmp_path, args=args)
    try:
        if workers > 1:
            await wait_for(lambda: len(worker_pids(gw)) == workers, "the workers")
        n = 60
        connector = aiohttp.TCPConnector(force_close=True, limit=0)
        async with aiohttp.ClientSession(connector=connector) as http:

            async def fetch(i: int) -> int:
                async with http.get(f"{gw.url}/logged/{i}") as resp:
                    await resp.read()
                    return resp.status

            assert await asyncio.gather(*(fetch(i) for i in range(n))) == [200] * n
        gw.process.send_signal(signal.SIGTERM)
        assert await wait_exit(gw) == 0
        records = [json.loads(line) for line in gw.log().splitlines()]
        access = [r["path"] for r in records if r["logger"] == "gateway.access"]
        paths = sorted(p for p in access if p.startswith("/logged/"))  # not the start's /healthz
        assert paths == sorted(f"/logged/{i}" for i in range(n))
        drained = [r for r in records if r["message"] == "drained; exiting"]
        assert len(drained) == workers
    finally:
        await gw.close()
        await echo.close()

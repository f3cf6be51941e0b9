"""``/metrics`` (issue 4 item 8, SECURITY.md 22): values change as real requests flow, nothing
secret is ever exported, and with ``observability.metrics_listen`` the metrics are served on
that address only.

Each test scrapes the Prometheus text exposition and parses it with prometheus-client's
own parser, so a label or type change would show up here as it would in Prometheus.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from gateway.config import ConfigError, validate
from gateway.echo import RunningEcho, start_echo
from tests.conftest import CLIENT_SECRET, RedisServer, Stack, gateway_config
from tests.support.browser import cookie_value, new_browser
from tests.support.calls import bearer, call, login
from tests.support.clock import SHORT, sleep_until
from tests.support.logout import confirmation_form, logout_token
from tests.support.metrics import Scrape
from tests.support.ports import free_port


async def scrape(url: str) -> Scrape:
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"].startswith("text/plain; version=")
        return Scrape(await resp.text())


def delta(before: Scrape, after: Scrape, name: str, **labels: str) -> float:
    return after.value(name, **labels) - before.value(name, **labels)


@pytest.fixture
async def echo() -> AsyncIterator[RunningEcho]:
    running = await start_echo()
    yield running
    await running.close()


async def test_request_and_login_metrics_change_as_requests_flow(
    stack: Stack, browser: aiohttp.ClientSession
) -> None:
    metrics = stack.url + "/metrics"
    s0 = await scrape(metrics)
    # Every known result is exported from the start, at zero.
    for result in ("success", "failure"):
        assert f'gateway_logins_total{{result="{result}"}} 0.0' in s0.text
    assert "gateway_websockets_open 0.0" in s0.text

    await login(browser, stack)
    for path in ("/x", "/y", "/deep/z"):
        status, _ = await call(browser, stack.url + path)
        assert status == 200
    assert (await call(browser, stack.url + "/public/p"))[0] == 200
    assert (await call(browser, stack.url + "/admin/a"))[0] == 200
    async with aiohttp.ClientSession() as anon:
        assert (await call(anon, stack.url + "/api/x"))[0] == 401
        async with anon.get(stack.url + "/healthz") as resp:
            assert resp.status == 200
        # A callback with a forged state: a failed login.
        async with anon.get(stack.url + "/oauth2/callback?state=" + "x" * 30 + "&code=c") as resp:
            assert resp.status == 400
    s1 = await scrape(metrics)

    assert delta(s0, s1, "gateway_logins_total", result="success") == 1
    assert delta(s0, s1, "gateway_logins_total", result="failure") == 1
    # Route labels are the configured prefixes; the gateway's own endpoints are "gateway".
    assert delta(s0, s1, "gateway_requests_total", route="/", status="200") >= 4  # + the landing
    assert delta(s0, s1, "gateway_requests_total", route="/public", status="200") == 1
    assert delta(s0, s1, "gateway_requests_total", route="/admin", status="200") == 1
    assert delta(s0, s1, "gateway_requests_total", route="/api", status="401") == 1
    assert delta(s0, s1, "gateway_requests_total", route="gateway", status="400") == 1
    assert delta(s0, s1, "gateway_requests_total", route="gateway") >= 5  # start, callback...
    assert delta(s0, s1, "gateway_request_duration_seconds_count", route="/") >= 4
    assert delta(s0, s1, "gateway_request_duration_seconds_count", route="/public") == 1
    assert s1.value("gateway_request_duration_seconds_sum", route="/") > 0
    # Histogram buckets are cumulative; +Inf holds every observation.
    assert s1.value("gateway_request_duration_seconds_bucket", route="/public", le="+Inf") == 1


async def test_upstream_and_store_errors_are_counted(
    make_stack: Any, echo: RunningEcho, own_redis: RedisServer, browser: aiohttp.ClientSession
) -> None:
    url = str(echo.url)
    stack = await make_stack(
        echo=echo,
        redis_url=own_redis.url,
        routes=[
            {"prefix": "/", "upstream": url},
            {"prefix": "/dead", "upstream": f"http://127.0.0.1:{free_port()}", "auth": "none"},
            {"prefix": "/_echo/slow", "upstream": url, "auth": "none", "timeouts": {"read": 0.2}},
        ],
    )
    s0 = await scrape(stack.url + "/metrics")
    async with aiohttp.ClientSession() as anon:
        assert (await call(anon, stack.url + "/dead/x"))[0] == 502
        assert (await call(anon, stack.url + "/_echo/slow?delay=2"))[0] == 504
    await login(browser, stack)
    own_redis.stop()
    try:
        assert (await call(browser, stack.url + "/x"))[0] == 503
    finally:
        own_redis.start()
    s1 = await scrape(stack.url + "/metrics")
    assert delta(s0, s1, "gateway_upstream_errors_total", kind="bad_gateway") == 1
    assert delta(s0, s1, "gateway_upstream_errors_total", kind="timeout") == 1
    assert delta(s0, s1, "gateway_store_errors_total") == 1
    assert delta(s0, s1, "gateway_requests_total", route="/dead", status="502") == 1
    assert delta(s0, s1, "gateway_requests_total", route="/_echo/slow", status="504") == 1
    assert delta(s0, s1, "gateway_requests_total", route="/", status="503") == 1


async def test_refresh_and_logout_metrics(make_stack: Any, browser: aiohttp.ClientSession) -> None:
    stack = await make_stack(**SHORT)
    state = stack.idp.state
    metrics = stack.url + "/metrics"
    s0 = await scrape(metrics)

    done = await login(browser, stack)
    await sleep_until(done + 1.2)  # inside refresh_skew: the next request refreshes
    assert (await call(browser, stack.url + "/x"))[0] == 200
    s1 = await scrape(metrics)
    assert delta(s0, s1, "gateway_token_refreshes_total", result="success") == 1
    assert delta(s0, s1, "gateway_token_refreshes_total", result="failure") == 0

    # The provider fails: the session is kept (its token is still valid), the failure counted.
    done = time.time()
    state.faults.token_status = 500
    await sleep_until(done + 1.2)
    assert (await call(browser, stack.url + "/x"))[0] == 200
    s2 = await scrape(metrics)
    assert delta(s1, s2, "gateway_token_refreshes_total", result="failure") == 1

    # The grant is gone: the session ends.
    state.faults.token_status = None
    state.faults.token_error = "invalid_grant"
    await asyncio.sleep(0.5)  # past the short retry back-off of a failed refresh
    assert (await call(browser, stack.url + "/x"))[0] == 401
    s3 = await scrape(metrics)
    assert delta(s2, s3, "gateway_token_refreshes_total", result="ended") == 1
    state.faults.token_error = None

    # Sign-out (POST with CSRF), then a back-channel logout ending another session.
    await login(browser, stack)
    async with new_browser() as other:
        await login(other, stack, "bob")
        fields = await confirmation_form(browser, stack)
        async with browser.post(
            stack.url + "/oauth2/sign_out", data=fields, allow_redirects=False
        ) as resp:
            assert resp.status == 303
        token = logout_token(stack, sub="bob")
        async with other.post(
            stack.url + "/oauth2/backchannel_logout", data={"logout_token": token}
        ) as resp:
            assert resp.status == 200
    s4 = await scrape(metrics)
    assert delta(s3, s4, "gateway_logouts_total", kind="sign_out") == 1
    assert delta(s3, s4, "gateway_logouts_total", kind="backchannel") == 1


async def test_open_websockets_gauge(stack: Stack, browser: aiohttp.ClientSession) -> None:
    metrics = stack.url + "/metrics"
    await login(browser, stack)
    async with browser.ws_connect(stack.url + "/_echo/ws") as one:
        await one.receive_json(timeout=5)
        async with browser.ws_connect(stack.url + "/_echo/ws") as two:
            await two.receive_json(timeout=5)
            assert (await scrape(metrics)).value("gateway_websockets_open") == 2
        await wait_for_gauge(metrics, 1)
    await wait_for_gauge(metrics, 0)
    done = await scrape(metrics)
    assert done.value("gateway_requests_total", route="/", status="101") == 2


async def wait_for_gauge(url: str, want: float) -> None:
    for _ in range(100):
        if (await scrape(url)).value("gateway_websockets_open") == want:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"gateway_websockets_open never reached {want}")


async def test_metrics_reveal_no_token_cookie_or_path(
    stack: Stack, browser: aiohttp.ClientSession
) -> None:
    await login(browser, stack)
    status, body = await call(browser, stack.url + "/private-path-7f3a?code=query-code-9c1e")
    assert status == 200
    access = bearer(body)
    cookie = cookie_value(browser, stack)
    assert cookie is not None
    async with browser.ws_connect(stack.url + "/_echo/ws?token=ws-query-5d2b") as ws:
        await ws.receive_json(timeout=5)
    text = (await scrape(stack.url + "/metrics")).text
    state = stack.idp.state
    secrets = [
        access,
        cookie,
        CLIENT_SECRET,
        *state.access_tokens,
        *state.refresh_tokens,
        *(s.get_secret_value() for s in stack.settings.session.cookie_secrets),
        "private-path-7f3a",
        "query-code-9c1e",
        "ws-query-5d2b",
        "alice",
    ]
    for secret in secrets:
        assert secret not in text


async def test_metrics_listen_serves_metrics_only_there(
    make_stack: Any, browser: aiohttp.ClientSession
) -> None:
    port = free_port()
    stack = await make_stack(
        observability={"metrics_listen": f"127.0.0.1:{port}", "log_format": "text"}
    )
    separate = f"http://127.0.0.1:{port}/metrics"
    before = await scrape(separate)
    async with aiohttp.ClientSession() as anon:
        # The main port has no /metrics of its own: it is an ordinary protected path.
        async with anon.get(stack.url + "/metrics", headers={"Accept": "application/json"}) as resp:
            assert resp.status == 401
            assert "gateway_requests_total" not in await resp.text()
        # The separate listener serves nothing else.
        async with anon.get(f"http://127.0.0.1:{port}/healthz") as resp:
            assert resp.status == 404
    await login(browser, stack)
    async with browser.get(stack.url + "/metrics", headers={"Accept": "application/json"}) as resp:
        assert resp.status == 200
        seen = json.loads(await resp.text())
    assert seen["path"] == "/metrics"  # the upstream's, not the gateway's
    after = await scrape(separate)
    # Traffic on the main port shows up on the separate listener.
    assert delta(before, after, "gateway_requests_total", route="/", status="401") == 1
    assert delta(before, after, "gateway_requests_total", route="/", status="200") >= 2
    assert delta(before, after, "gateway_logins_total", result="success") == 1


def test_metrics_listen_must_be_host_and_port() -> None:
    for bad in ("9090", "localhost", "127.0.0.1:", "127.0.0.1:http", ":9090", "[::1]:70000"):
        cfg = gateway_config("http://127.0.0.1:4180", "http://i", "http://e", None)
        cfg["observability"] = {"metrics_listen": bad}
        with pytest.raises(ConfigError) as err:
            validate(cfg, env={})
        assert err.value.problems[0].startswith("observability.metrics_listen: "), bad
    cfg = gateway_config("http://127.0.0.1:4180", "http://i", "http://e", None)
    cfg["observability"] = {"metrics_listen": "[::1]:9090"}
    assert validate(cfg, env={}).observability.metrics_listen == "[::1]:9090"


async def test_main_port_metrics_only_for_a_local_scraper_unless_public(
    make_stack: Any,
) -> None:
    """Default: a loopback peer without forwarding headers scrapes; a request that came
    through a proxy (or from another host) gets 404. ``metrics_public: true`` opens it."""
    stack = await make_stack(store="memory")
    assert (await scrape(stack.url + "/metrics")).value("gateway_build_info") == 1
    async with aiohttp.ClientSession() as http:
        for header in ("X-Forwarded-For", "Forwarded", "X-Real-IP"):
            value = "for=203.0.113.9" if header == "Forwarded" else "203.0.113.9"
            async with http.get(stack.url + "/metrics", headers={header: value}) as resp:
                assert resp.status == 404, header
    public = await make_stack(store="memory", observability={"metrics_public": True})
    async with (
        aiohttp.ClientSession() as http,
        http.get(public.url + "/metrics", headers={"X-Forwarded-For": "203.0.113.9"}) as resp,
    ):
        assert resp.status == 200
        assert "gateway_requests_total" in await resp.text()


async def test_build_info_and_process_metrics(stack: Stack) -> None:
    from gateway import __version__

    s = await scrape(stack.url + "/metrics")
    assert s.value("gateway_build_info", version=__version__) == 1
    assert s.value("process_resident_memory_bytes") > 0
    assert s.value("process_cpu_seconds_total") > 0


@pytest.mark.parametrize("multiprocess", [False, True])
def test_observe_counts_each_request_under_its_route_and_status(
    multiprocess: bool, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pre-bound children count exactly as ``labels()`` each time did, also when the
    values live in multiprocess files (``gateway run --workers N``)."""
    from prometheus_client import values

    from gateway.metrics import MULTIPROC_ENV, Metrics

    if multiprocess:
        monkeypatch.setenv(MULTIPROC_ENV, str(tmp_path))
        monkeypatch.setattr(values, "ValueClass", values.get_value_class())  # type: ignore[no-untyped-call]
    metrics = Metrics()
    assert (metrics.multiprocess_dir is not None) is multiprocess
    for route, status, seconds in [
        ("/", 200, 0.002), ("/", 200, 0.02), ("/", 404, 0.2), ("/api", 200, 3.0),
        ("gateway", 302, 0.0005), ("/", 200, 0.002),
    ]:  # fmt: skip
        metrics.observe(route, status, seconds)
    metrics.login("success")
    metrics.login("failure")
    metrics.login("success")
    s = Scrape(metrics.render().decode())
    count = "gateway_requests_total"
    assert s.value(count, route="/", status="200") == 3
    assert s.value(count, route="/", status="404") == 1
    assert s.value(count, route="/api", status="200") == 1
    assert s.value(count, route="gateway", status="302") == 1
    assert s.value(count) == 6
    hist = "gateway_request_duration_seconds"
    assert s.value(hist + "_count", route="/") == 4
    assert s.value(hist + "_sum", route="/") == pytest.approx(0.224)
    assert s.value(hist + "_bucket", route="/", le="0.0025") == 2
    assert s.value(hist + "_bucket", route="/", le="0.025") == 3
    assert s.value(hist + "_bucket", route="/", le="+Inf") == 4
    assert s.value(hist + "_bucket", route="/api", le="2.5") == 0
    assert s.value(hist + "_bucket", route="/api", le="5.0") == 1
    assert s.value("gateway_logins_total", result="success") == 2
    assert s.value("gateway_logins_total", result="failure") == 1

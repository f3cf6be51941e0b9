"""Several providers end to end: the chooser driven by keyboard in headless Chromium,
``check-config --probe`` against both providers, and ``gateway run`` with an environment
override of a list entry and a SIGHUP reload."""

from __future__ import annotations

import asyncio
import re
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import yaml

from tests.conftest import RedisServer
from tests.gateway_proc import start_gateway_process
from tests.support.chromium import chromium_context
from tests.support.ports import free_port
from tests.support.processes import gateway
from tests.support.providers import Multi, start_multi


@pytest.fixture
async def multi(redis_server: RedisServer) -> AsyncIterator[Multi]:
    running = await start_multi(redis_server.url)
    yield running
    await running.close()


@pytest.mark.browser
async def test_the_chooser_works_with_the_keyboard_in_chromium(multi: Multi) -> None:
    async with chromium_context() as ctx:
        page = await ctx.new_page()
        await page.goto(multi.url + "/reports/2024")
        assert page.url.startswith(multi.url + "/oauth2/start?rd=/reports/2024")
        assert await page.title() == "Sign in"
        assert await page.get_attribute("html", "lang") == "en"
        nav = page.get_by_role("navigation", name="Sign-in options")
        links = nav.get_by_role("link")
        assert await links.all_inner_texts() == ["Corporate sign-in", "Partner sign-in"]
        # Tab reaches the links in order; Enter follows the focused one.
        await page.keyboard.press("Tab")
        assert await page.evaluate("document.activeElement.textContent") == "Corporate sign-in"
        await page.keyboard.press("Tab")
        assert await page.evaluate("document.activeElement.textContent") == "Partner sign-in"
        async with page.expect_navigation():
            await page.keyboard.press("Enter")
        assert page.url.startswith(multi.partners.url + "/authorize?"), page.url
        assert await page.title() == "Sign in - Dev IdP"
        await page.fill("#username", "alice")
        await page.fill("#password", "alice")
        async with page.expect_navigation():
            await page.get_by_role("button", name="Sign in").click()
        await page.get_by_role("button", name="Allow").click()
        await page.wait_for_url(multi.url + "/reports/2024")
        assert await page.title() == "Echo upstream"
        row = page.locator("tr", has=page.locator("td", has_text="X-Provider"))
        assert (await row.locator("td").nth(1).inner_text()).strip() == "partners"
    assert multi.code_exchanges("partners") == 1
    assert multi.code_exchanges("corp") == 0


async def test_check_config_probe_probes_every_provider(multi: Multi, tmp_path: Path) -> None:
    path = tmp_path / "multi.yaml"
    path.write_text(yaml.safe_dump(multi.config), encoding="utf-8")
    code, out, err = await gateway("check-config", "--probe", "--config", str(path), cwd=tmp_path)
    assert code == 0, out + err
    assert f"ok   provider corp discovery: issuer {multi.corp.issuer}" in out
    assert f"ok   provider partners discovery: issuer {multi.partners.issuer}" in out
    assert "ok   provider corp client authentication" in out
    assert "ok   provider partners client authentication" in out
    assert multi.config["providers"][0]["client_secret"] not in out
    assert "mix-up" not in out  # both providers send iss (RFC 9207)
    # A provider without RFC 9207: a warning about it, not a failure.
    multi.partners.state.faults.discovery_omit = ["authorization_response_iss_parameter_supported"]
    code, out, err = await gateway("check-config", "--probe", "--config", str(path), cwd=tmp_path)
    assert code == 0, out + err
    assert (
        "WARN provider partners mix-up defence: does not send iss in its authorization "
        "responses (RFC 9207): with several providers, only the login state ties a response "
        "to this provider\n"
    ) in out
    assert "provider corp mix-up" not in out
    # One provider down: its lines fail, the exit status says so.
    await multi.partners.close()
    code, out, err = await gateway("check-config", "--probe", "--config", str(path), cwd=tmp_path)
    assert code == 1
    assert "FAIL provider partners discovery" in out
    assert "ok   provider corp discovery" in out


async def chooser_labels(url: str) -> list[str]:
    async with aiohttp.ClientSession() as http:
        async with http.get(url + "/oauth2/start?rd=/x", allow_redirects=False) as resp:
            assert resp.status == 200
            return re.findall(r'<a class="button"[^>]*>([^<]+)</a>', await resp.text())


async def test_gateway_run_with_an_env_override_and_a_sighup_reload(
    multi: Multi, tmp_path: Path
) -> None:
    cfg = dict(multi.config)
    port = free_port()
    cfg["server"] = {**cfg["server"], "port": port, "public_url": f"http://127.0.0.1:{port}"}
    env = {"GATEWAY_PROVIDERS__PARTNERS__DISPLAY_NAME": "Partners (from env)"}
    gw = await start_gateway_process(cfg, tmp_path, extra_env=env)
    try:
        assert await chooser_labels(gw.url) == ["Corporate sign-in", "Partners (from env)"]
        cfg["providers"] = [{**cfg["providers"][0], "display_name": "Staff"}, cfg["providers"][1]]
        gw.config_path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
        gw.process.send_signal(signal.SIGHUP)
        for _ in range(100):
            if "config reloaded" in gw.log():
                break
            await asyncio.sleep(0.1)
        assert "config reloaded" in gw.log(), gw.log()
        assert await chooser_labels(gw.url) == ["Staff", "Partners (from env)"]
    finally:
        await gw.close()

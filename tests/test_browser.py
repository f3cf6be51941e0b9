"""End to end in headless Chromium: deep link → dev provider sign-in and consent → the deep link,
tokens kept out of the browser, sign-out through the UI and the provider's end_session, and a
denied consent.

Debian's /usr/bin/chromium is driven by Playwright's async API inside the test's own event
loop; no browser is ever downloaded. Set ``BROWSER_TEST_SCREENSHOTS=/some/dir`` to keep
PNG screenshots of the provider's sign-in page and the echo page for a human to look at.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import BrowserContext, Page, Request

from gateway.echo import RunningEcho, start_echo
from tests.conftest import RedisServer, Stack, StackFactory
from tests.support.chromium import chromium_context
from tests.support.ports import free_port

pytestmark = pytest.mark.browser

DEEP_LINK = "/reports/2024?tab=summary"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
async def context() -> AsyncIterator[BrowserContext]:
    async with chromium_context() as ctx:
        yield ctx


async def _shot(page: Page, name: str) -> None:
    """Render the page (proves it paints); keep the PNG when a human asked for it."""
    png = await page.screenshot(full_page=True)
    assert png.startswith(PNG_MAGIC)
    where = os.environ.get("BROWSER_TEST_SCREENSHOTS")
    if where:
        Path(where, f"gateway-browser-{name}.png").write_bytes(png)


async def _sign_in(page: Page, stack: Stack, username: str, password: str) -> None:
    """Fill the dev provider's sign-in form (the page must be showing it)."""
    assert page.url.startswith(stack.idp.url), page.url
    assert await page.title() == "Sign in - Dev IdP"
    await page.fill("#username", username)
    await page.fill("#password", password)
    async with page.expect_navigation():
        await page.get_by_role("button", name="Sign in").click()


async def _echo_row(page: Page, header: str) -> str:
    """The value cell of the echo page's row for ``header``."""
    row = page.locator("tr", has=page.locator("td", has_text=header))
    return (await row.locator("td").nth(1).inner_text()).strip()


async def test_deep_link_login_tokens_stay_server_side_and_sign_out(
    make_stack: StackFactory, context: BrowserContext, redis_server: RedisServer
) -> None:
    stack: Stack = await make_stack()
    cookie_name = stack.settings.session.cookie_name
    prefix = stack.settings.session.key_prefix
    page = await context.new_page()
    seen: list[str] = []

    def record(request: Request) -> None:
        if request.is_navigation_request():
            seen.append(request.url)

    page.on("request", record)

    # 1. The deep link sends an unauthenticated browser to the provider's sign-in page.
    await page.goto(stack.url + DEEP_LINK)
    assert page.url.startswith(stack.idp.url + "/authorize?")
    await _shot(page, "login")
    await _sign_in(page, stack, "alice", "alice")

    # 2. Consent, then back through the callback to exactly the deep link.
    assert await page.title() == "Allow access? - Dev IdP"
    await page.get_by_role("button", name="Allow").click()
    await page.wait_for_url(stack.url + DEEP_LINK)
    assert page.url == stack.url + DEEP_LINK
    assert any(u.startswith(stack.url + "/oauth2/callback?") for u in seen)
    assert await page.title() == "Echo upstream"
    assert await page.inner_text("h1") == "Echo upstream — what the gateway sent me"
    assert await _echo_row(page, "X-Forwarded-User") == "alice"
    assert await _echo_row(page, "X-Forwarded-Email") == "alice@example.com"
    assert (await _echo_row(page, "Authorization")).startswith("Bearer ")
    await _shot(page, "echo")

    # 3. The token the upstream received is nowhere in the browser's cookies or page.
    resp = await page.request.get(stack.url + DEEP_LINK, headers={"Accept": "application/json"})
    assert resp.status == 200
    echoed = await resp.json()
    await resp.dispose()
    headers = {k.lower(): v for k, v in echoed["headers"]}
    scheme, _, access_token = headers["authorization"].partition(" ")
    assert scheme == "Bearer" and len(access_token) >= 20
    assert headers["x-forwarded-user"] == "alice"
    assert cookie_name not in headers.get("cookie", "")
    idp = stack.idp.state
    assert access_token in idp.access_tokens
    issued = list(idp.access_tokens) + list(idp.refresh_tokens)
    assert idp.refresh_tokens, "offline_access should have given the gateway a refresh token"
    cookies = await context.cookies()
    ours = [c for c in cookies if c["name"] == cookie_name]
    assert len(ours) == 1
    assert ours[0]["httpOnly"] and ours[0]["sameSite"] == "Lax" and ours[0]["path"] == "/"
    assert not [c for c in cookies if c["name"].startswith(cookie_name + "-login-")]
    everything = " ".join(f"{c['name']}={c['value']}" for c in cookies) + await page.content()
    for token in issued:
        assert token not in everything
    # The session lives in Redis, sealed: no token readable there either.
    stored = [value for key, value in redis_server.dump() if key.startswith(prefix.encode())]
    assert stored
    for token in issued:
        assert not any(token.encode() in value for value in stored)

    # 4. Sign out through the UI: GET shows a confirmation form, the button POSTs it, the
    #    provider's end_session returns the browser to the gateway's signed-out page.
    seen.clear()
    await page.goto(stack.url + "/oauth2/sign_out")
    assert await page.title() == "Sign out?"
    assert "alice@example.com" in await page.inner_text("body")
    await page.get_by_role("button", name="Sign out").click()
    await page.wait_for_url(stack.url + "/oauth2/signed_out?**")
    assert any(u.startswith(stack.idp.url + "/end_session?") for u in seen), seen
    assert await page.title() == "Signed out"
    assert "You have been signed out." in await page.inner_text("body")
    assert not [c for c in await context.cookies() if c["name"] == cookie_name]
    assert idp.access_tokens[access_token].revoked
    assert not idp.sessions, "end_session should have ended the provider's session"

    # 5. The next visit asks to sign in again (gateway and provider sessions are both gone).
    await page.goto(stack.url + DEEP_LINK)
    assert page.url.startswith(stack.idp.url + "/authorize?")
    assert await page.title() == "Sign in - Dev IdP"


async def test_denied_consent_lands_on_not_signed_in_page(
    make_stack: StackFactory, context: BrowserContext
) -> None:
    stack: Stack = await make_stack()
    page = await context.new_page()
    await page.goto(stack.url + DEEP_LINK)
    await _sign_in(page, stack, "bob", "bob")
    assert await page.title() == "Allow access? - Dev IdP"
    async with page.expect_navigation(url=stack.url + "/oauth2/callback?**") as nav:
        await page.get_by_role("button", name="Deny").click()
    response = await nav.value
    assert response is not None and response.status == 400
    assert await page.title() == "Not signed in"
    text = await page.inner_text("body")
    assert "You declined the request, so you are not signed in." in text
    assert "error: access_denied" in text
    await _check_page(page, "denied", request_id=await response.header_value("X-Request-Id"))
    link = page.get_by_role("link", name="Try signing in again")
    assert await link.get_attribute("href") == "/oauth2/start"
    cookies = await context.cookies()
    assert not [c for c in cookies if c["name"] == stack.settings.session.cookie_name]
    # The page stays put: no redirect loop back to the provider.
    await page.wait_for_load_state("networkidle")
    assert page.url.startswith(stack.url + "/oauth2/callback?")


# -- the gateway's own pages, at desktop and mobile width (issue 10 item 6) -----------------------

SCREENSHOTS = Path(__file__).resolve().parent / "screenshots"  # ignored by git
WIDTHS = {"desktop": {"width": 1000, "height": 760}, "mobile": {"width": 375, "height": 740}}


async def _check_page(page: Page, name: str, *, request_id: str | None) -> str:
    """Every page: fits the width (no sideways scrolling), has the viewport meta, offers at
    least one button or link to go on, names the request id when it is an error; a PNG per
    width goes to tests/screenshots/. Returns the page's text."""
    text = await page.inner_text("body")
    meta = await page.get_attribute('meta[name="viewport"]', "content")
    assert meta is not None and "width=device-width" in meta
    for width, size in WIDTHS.items():
        await page.set_viewport_size(size)
        fits = await page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        assert fits, (name, width)
        png = await page.screenshot(full_page=True)
        assert png.startswith(PNG_MAGIC)
        SCREENSHOTS.mkdir(exist_ok=True)
        (SCREENSHOTS / f"{name}-{width}.png").write_bytes(png)
    await page.set_viewport_size(WIDTHS["desktop"])
    assert await page.locator(".actions a, .actions button").count() >= 1, name
    if request_id is not None:
        assert request_id in text, name
    assert "upstream" not in text.lower(), name
    return text


@pytest.fixture
async def echo() -> AsyncIterator[RunningEcho]:
    running = await start_echo()
    yield running
    await running.close()


async def test_every_page_explains_itself_at_desktop_and_mobile_width(
    make_stack: StackFactory, context: BrowserContext, own_redis: RedisServer, echo: RunningEcho
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    up = str(echo.url)
    stack: Stack = await make_stack(
        echo=echo,
        redis_url=own_redis.url,
        pages={"title": "Acme Intranet"},
        routes=[
            {"prefix": "/admin", "upstream": up, "require": {"groups": ["admins"]}},
            {"prefix": "/api", "upstream": up, "on_unauthenticated": "deny"},
            {"prefix": "/down", "upstream": dead, "auth": "none"},
            {"prefix": "/_echo", "upstream": up, "auth": "none", "timeouts": {"read": "300ms"}},
            {"prefix": "/", "upstream": up},
        ],
    )
    page = await context.new_page()

    async def visit(path: str, status: int) -> str | None:
        response = await page.goto(stack.url + path)
        assert response is not None and response.status == status, (path, response)
        return await response.header_value("X-Request-Id")

    # 401 (an API route a browser opened): a Sign in button that comes back here.
    rid = await visit("/api/reports?x=1", 401)
    text = await _check_page(page, "401", request_id=rid)
    assert await page.title() == "Please sign in · Acme Intranet"
    assert "Acme Intranet" in text
    link = page.get_by_role("link", name="Sign in")
    assert await link.get_attribute("href") == "/oauth2/start?rd=/api/reports%3Fx%3D1"

    # 404 and a 400 from the callback (with a way to start again).
    rid = await visit("/oauth2/nothing", 404)
    await _check_page(page, "404", request_id=rid)
    rid = await visit("/oauth2/callback", 400)
    await _check_page(page, "400-callback", request_id=rid)
    assert await page.get_by_role("link", name="Start signing in again").count() == 1

    # 502 and 504: plain words, a Try again button and the home page.
    rid = await visit("/down/page", 502)
    text = await _check_page(page, "502", request_id=rid)
    assert "The application isn't answering" in text
    assert await page.get_by_role("link", name="Try again").get_attribute("href") == ""
    assert await page.get_by_role("link", name="Go to the home page").count() == 1
    rid = await visit("/_echo/slow?delay=5", 504)
    await _check_page(page, "504", request_id=rid)

    # 403 for a signed-in user: who, switch account, sign out.
    await page.goto(stack.url + "/admin/panel")
    await _sign_in(page, stack, "bob", "bob")
    async with page.expect_navigation(url=stack.url + "/admin/panel"):
        await page.get_by_role("button", name="Allow").click()
    rid = await visit("/admin/panel", 403)
    text = await _check_page(page, "403", request_id=rid)
    assert "Signed in as bob@example.org" in text
    switch = await page.get_by_role("link", name="Switch account").get_attribute("href")
    assert switch == "/oauth2/sign_out?rd=/oauth2/start%3Frd%3D/admin/panel"
    assert await page.get_by_role("link", name="Sign out").get_attribute("href") == (
        "/oauth2/sign_out"
    )

    # Sign-out confirmation: Cancel goes back and changes nothing.
    await page.goto(stack.url + "/oauth2/sign_out?rd=/hello")
    text = await _check_page(page, "sign-out", request_id=None)
    assert "bob@example.org" in text
    await page.get_by_role("link", name="Cancel").click()
    await page.wait_for_url(stack.url + "/hello")
    assert await page.title() == "Echo upstream"

    # Switch account: sign out (provider too), then straight to a fresh sign-in as alice.
    await page.goto(stack.url + switch)
    await _check_page(page, "sign-out-switch", request_id=None)
    await page.get_by_role("button", name="Sign out").click()
    await page.wait_for_url(stack.url + "/oauth2/signed_out?**")
    text = await _check_page(page, "signed-out", request_id=None)
    assert "You have been signed out." in text
    await page.get_by_role("link", name="Continue").click()
    await page.wait_for_url(stack.idp.url + "/authorize?**")
    await _sign_in(page, stack, "alice", "alice")
    async with page.expect_navigation(url=stack.url + "/admin/panel"):
        await page.get_by_role("button", name="Allow").click()
    assert await page.title() == "Echo upstream"

    # 503: the session store is down.
    own_redis.stop()
    try:
        rid = await visit("/hello", 503)
        text = await _check_page(page, "503", request_id=rid)
        assert "Temporarily unavailable" in text
    finally:
        own_redis.start()

    await page.goto(stack.url + "/oauth2/sign_out")  # the restarted store has no session
    text = await _check_page(page, "not-signed-in", request_id=None)
    assert "There is no session to sign out of." in text

"""Sign-out: GET confirmation, POST with CSRF (SECURITY.md 14), RFC 7009 revocation at the
provider, RP-Initiated Logout through ``end_session_endpoint``, the signed-out page, and the
back-channel logout the provider sends on the way.
"""

from __future__ import annotations

import logging

import aiohttp
import pytest
from yarl import URL

from tests.conftest import CLIENT_ID, RedisServer, Stack
from tests.support.browser import session_keys
from tests.support.calls import bearer, call, login, upstream_headers
from tests.support.logout import confirmation_form


async def test_full_sign_out_revokes_ends_the_provider_session_and_lands_signed_out(
    stack: Stack,
    browser: aiohttp.ClientSession,
    redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.devidp")
    caplog.set_level(logging.INFO, logger="gateway.logout")
    state = stack.idp.state
    await login(browser, stack)
    status, body = await call(browser, stack.url + "/x")
    assert status == 200
    access = bearer(body)
    refresh = list(state.refresh_tokens)[-1]
    (idp_session,) = state.sessions.values()
    old_cookie = browser.cookie_jar.filter_cookies(URL(stack.url))["gw_test"].value

    fields = await confirmation_form(browser, stack, "?rd=/goodbye")
    assert fields["rd"] == "/goodbye"
    async with browser.post(
        stack.url + "/oauth2/sign_out", data=fields, allow_redirects=False
    ) as resp:
        assert resp.status == 303
        assert resp.cookies["gw_test"].value == ""
        end_session = URL(resp.headers["Location"])
    # RFC 7009: both tokens were revoked at the provider before the redirect.
    assert refresh in state.revoked and access in state.revoked
    assert session_keys(redis_server, stack) == set()
    # The sign-out state cookie is the gateway's own: never forwarded upstream.
    assert "gw_test-logout" in browser.cookie_jar.filter_cookies(URL(stack.url))
    status, seen = await call(browser, stack.url + "/public/x")
    assert status == 200
    assert "gw_test" not in upstream_headers(seen).get("cookie", "")

    # RP-Initiated Logout 1.0 §2: client_id, post_logout_redirect_uri and state; no
    # id_token_hint, since the Location header travels through the browser (SECURITY.md 11).
    assert str(end_session.with_query(None)) == stack.idp.url + "/end_session"
    q = end_session.query
    assert q["post_logout_redirect_uri"] == stack.url + "/oauth2/signed_out"
    assert q["client_id"] == CLIENT_ID
    assert len(q["state"]) >= 20
    assert "id_token_hint" not in q

    async with browser.get(end_session, allow_redirects=False) as resp:
        assert resp.status == 302
        back = URL(resp.headers["Location"])
    assert back.path == "/oauth2/signed_out" and back.query["state"] == q["state"]
    # The provider ended its session and told the gateway through the back channel.
    assert state.sessions == {}
    assert [(c["sub"], c["sid"]) for c in state.backchannel_sent] == [("alice", idp_session.sid)]
    said = [r.getMessage() for r in caplog.records if "back-channel" in r.getMessage()]
    assert said == ["back-channel logout ended 0 session(s)"]  # delivered, answered 200

    async with browser.get(back) as resp:
        assert resp.status == 200
        page = await resp.text()
        # The round trip consumes the sign-out state cookie; the session cookie was already
        # cleared by the POST that ended the session.
        assert resp.cookies["gw_test-logout"].value == ""
        assert "gw_test" not in resp.cookies
    assert "signed out" in page
    assert 'href="/goodbye"' in page
    assert "gw_test-logout" not in browser.cookie_jar.filter_cookies(URL(stack.url))

    # The old cookie is worthless now, in any browser.
    async with aiohttp.ClientSession(cookies={"gw_test": old_cookie}) as thief:
        async with thief.get(stack.url + "/api/x") as resp:
            assert resp.status == 401
    async with browser.get(stack.url + "/x", allow_redirects=False) as resp:
        assert resp.status == 302


async def test_a_get_or_a_cross_site_post_logs_nobody_out(
    stack: Stack, browser: aiohttp.ClientSession, redis_server: RedisServer
) -> None:
    await login(browser, stack)
    fields = await confirmation_form(browser, stack)
    url = stack.url + "/oauth2/sign_out"
    attempts: list[tuple[dict[str, str], dict[str, str]]] = [
        ({}, {}),  # no CSRF token at all
        ({"csrf": "x" * 32}, {}),  # a wrong one
        ({"csrf": fields["csrf"] + "x"}, {}),
        (fields, {"Origin": "http://evil.example"}),  # right token, other site
        (fields, {"Sec-Fetch-Site": "cross-site"}),
        (fields, {"Origin": "null"}),
    ]
    for data, headers in attempts:
        async with browser.post(url, data=data, headers=headers, allow_redirects=False) as resp:
            assert resp.status == 403, (data.keys(), headers)
            assert "gw_test" not in resp.cookies
    for method in ("GET", "HEAD"):
        async with browser.request(method, url, allow_redirects=False) as resp:
            assert resp.status == 200
    async with browser.put(url, data=fields, allow_redirects=False) as resp:
        assert resp.status == 405
    assert len(session_keys(redis_server, stack)) == 1
    assert (await call(browser, stack.url + "/x"))[0] == 200
    assert stack.idp.state.revoked == []


@pytest.mark.parametrize("query", ["", "?state=forged"])
async def test_a_cross_site_get_of_the_signed_out_page_changes_nothing(
    stack: Stack, browser: aiohttp.ClientSession, redis_server: RedisServer, query: str
) -> None:
    """Any site can make a browser GET /oauth2/signed_out (a link, an <img>): that must not
    drop the session cookie while the session lives on at the gateway."""
    await login(browser, stack)
    cross_site = {"Sec-Fetch-Site": "cross-site", "Referer": "http://evil.example/"}
    async with browser.get(stack.url + "/oauth2/signed_out" + query, headers=cross_site) as resp:
        assert resp.status == 200
        assert resp.headers.getall("Set-Cookie", []) == []
    assert (await call(browser, stack.url + "/x"))[0] == 200
    assert len(session_keys(redis_server, stack)) == 1
    # Nor does it spoil a sign-out in progress: its state cookie survives a forged state.
    fields = await confirmation_form(browser, stack, "?rd=/goodbye")
    async with browser.post(
        stack.url + "/oauth2/sign_out", data=fields, allow_redirects=False
    ) as resp:
        assert resp.status == 303
        end_session = URL(resp.headers["Location"])
    async with browser.get(stack.url + "/oauth2/signed_out?state=forged") as resp:
        assert resp.headers.getall("Set-Cookie", []) == []
        assert 'href="/"' in await resp.text()
    async with browser.get(end_session) as resp:  # the provider sends it back with its state
        assert resp.status == 200
        assert resp.url.path == "/oauth2/signed_out"
        assert 'href="/goodbye"' in await resp.text()


async def test_sign_out_of_one_browser_leaves_the_other(
    stack: Stack, browser: aiohttp.ClientSession
) -> None:
    async with aiohttp.ClientSession(
        cookie_jar=aiohttp.CookieJar(unsafe=True), headers={"Accept": "text/html"}
    ) as other:
        await login(browser, stack)
        await login(other, stack)
        fields = await confirmation_form(browser, stack)
        async with browser.post(stack.url + "/oauth2/sign_out", data=fields) as resp:
            assert resp.status == 200  # followed to the signed-out page
        assert (await call(browser, stack.url + "/api/x"))[0] == 401
        assert (await call(other, stack.url + "/x"))[0] == 200


@pytest.mark.parametrize("rd", ["//evil.example/", "https://evil.example/", "/\\evil.example"])
async def test_the_sign_out_target_is_never_another_site(
    stack: Stack, browser: aiohttp.ClientSession, rd: str
) -> None:
    await login(browser, stack)
    fields = await confirmation_form(browser, stack)
    fields["rd"] = rd
    async with browser.post(stack.url + "/oauth2/sign_out", data=fields) as resp:
        assert resp.status == 200
        assert str(resp.url).startswith(stack.url + "/oauth2/signed_out")
        page = await resp.text()
    assert "evil" not in page
    assert 'href="/"' in page


async def test_sign_out_without_a_session(stack: Stack, browser: aiohttp.ClientSession) -> None:
    async with browser.get(stack.url + "/oauth2/sign_out") as resp:
        assert resp.status == 200
        assert "not signed in" in await resp.text()
    async with browser.post(stack.url + "/oauth2/sign_out", allow_redirects=False) as resp:
        assert resp.status == 303
        assert resp.headers["Location"] == "/"
    # A signed-out page reached with a forged state just offers the home page.
    async with browser.get(stack.url + "/oauth2/signed_out?state=forged") as resp:
        assert resp.status == 200
        assert 'href="/"' in await resp.text()


async def test_id_token_hint_is_sent_only_when_the_operator_opts_in(
    make_stack: object, browser: aiohttp.ClientSession
) -> None:
    """``logout.id_token_hint: true`` adds the hint for providers that refuse logout without it;
    the default keeps every token out of the browser (SECURITY.md 11)."""
    stack: Stack = await make_stack(logout={"id_token_hint": True})  # type: ignore[operator]
    await login(browser, stack)
    fields = await confirmation_form(browser, stack)
    async with browser.post(
        stack.url + "/oauth2/sign_out", data=fields, allow_redirects=False
    ) as resp:
        assert resp.status == 303
        q = URL(resp.headers["Location"]).query
    hint = q["id_token_hint"]
    assert hint.count(".") == 2
    # The provider accepts it and still returns the browser to the gateway.
    async with browser.get(resp.headers["Location"], allow_redirects=False) as back:
        assert back.status == 302
        assert URL(back.headers["Location"]).path == "/oauth2/signed_out"

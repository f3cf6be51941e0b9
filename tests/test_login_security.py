"""The login flow under attack (SECURITY.md 1-3, 6-8, 11, 12), over real HTTP.

Each test drives the flow step by step (start → provider → callback, redirects not followed)
so it can replay, tamper with or transplant the pieces an attacker would. The ID-token and
nonce checks (SECURITY.md 4-5) live in test_id_token.py.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from yarl import URL

from gateway.crypto import sha256_b64u
from tests.conftest import CLIENT_ID, RedisServer, Stack
from tests.idp_client import http_login
from tests.support.browser import (
    COOKIE,
    Answer,
    authorize,
    callback_url,
    cookie_value,
    echo_json,
    exposes,
    fetch,
    follow,
    login,
    login_cookies,
    new_browser,
    open_flow,
    query_of,
    redis_snapshot,
    session_keys,
    start_login,
    store_key,
    stored_session,
    whoami,
    with_query,
)

B64URL_43 = re.compile(r"[A-Za-z0-9_-]{43}")


def is_bad_request(answer: Answer) -> bool:
    return answer.status == 400


def assert_no_store(answer: Answer) -> None:
    """SECURITY.md 8: no cache keeps the answer, no Referer leaks the code."""
    assert "no-store" in answer.headers.get("Cache-Control", ""), dict(answer.headers)
    assert answer.headers.get("Referrer-Policy") == "no-referrer", dict(answer.headers)


# -- 1. state: single-use, unguessable, bound to the browser ----------------------------------


async def test_replayed_callback_in_same_browser_is_refused(
    stack: Stack, browser: aiohttp.ClientSession, redis_server: RedisServer
) -> None:
    url = await callback_url(browser, stack)
    first = await fetch(browser, url)
    assert first.status == 302 and first.sets_session()
    cookie = cookie_value(browser, stack)
    before = redis_snapshot(redis_server, stack)

    again = await fetch(browser, url)
    assert is_bad_request(again), again.status
    assert not again.sets_session()
    assert cookie_value(browser, stack) == cookie
    assert redis_snapshot(redis_server, stack) == before
    # The code was not sent again: a replayed code makes the provider revoke the grant.
    assert stack.idp.state.token_calls["authorization_code"] == 1


async def test_replay_with_the_flow_cookie_kept_is_refused_server_side(
    stack: Stack, browser: aiohttp.ClientSession, redis_server: RedisServer
) -> None:
    """A copy of the login-state cookie does not make the callback usable twice.

    The cookie is cleared on success, but a browser (or an attacker holding a copy) may send it
    again; the store's single-use claim on the state is what refuses the second callback.
    """
    url = await callback_url(browser, stack)
    flow_cookies = login_cookies(browser, stack)
    assert len(flow_cookies) == 1
    first = await fetch(browser, url)
    assert first.status == 302
    cookie = cookie_value(browser, stack)
    assert cookie is not None
    assert login_cookies(browser, stack) == {}  # cleared by the successful callback
    before = redis_snapshot(redis_server, stack)

    browser.cookie_jar.update_cookies(flow_cookies, URL(stack.url))
    again = await fetch(browser, url)
    assert is_bad_request(again), again.status
    assert not again.sets_session()
    assert cookie_value(browser, stack) == cookie
    assert redis_snapshot(redis_server, stack) == before
    assert stack.idp.state.token_calls["authorization_code"] == 1
    status, me = await whoami(browser, stack)  # the first login's session is unharmed
    assert (status, me.get("sub")) == (200, "alice")


async def test_callback_replayed_in_another_browser_is_refused(
    stack: Stack, browser: aiohttp.ClientSession, redis_server: RedisServer
) -> None:
    # Before the victim uses it (a leaked callback URL): refused, and the code is not spent.
    url = await callback_url(browser, stack)
    before = redis_snapshot(redis_server, stack)
    async with new_browser() as other:
        stolen = await fetch(other, url)
        assert is_bad_request(stolen), stolen.status
        assert not stolen.sets_session()
        assert cookie_value(other, stack) is None
    assert redis_snapshot(redis_server, stack) == before
    assert stack.idp.state.token_calls["authorization_code"] == 0

    # The victim's own callback still works, and replaying it elsewhere afterwards fails too.
    assert (await fetch(browser, url)).sets_session()
    before = redis_snapshot(redis_server, stack)
    async with new_browser() as other:
        replayed = await fetch(other, url)
        assert is_bad_request(replayed), replayed.status
        assert not replayed.sets_session()
        assert cookie_value(other, stack) is None
    assert redis_snapshot(redis_server, stack) == before
    assert stack.idp.state.token_calls["authorization_code"] == 1


async def test_state_with_one_character_changed_is_refused(
    stack: Stack, browser: aiohttp.ClientSession, redis_server: RedisServer
) -> None:
    url = await callback_url(browser, stack)
    state = query_of(url)["state"]
    middle = len(state) // 2
    changed = state[:middle] + ("A" if state[middle] != "A" else "B") + state[middle + 1 :]
    before = redis_snapshot(redis_server, stack)

    answer = await fetch(browser, with_query(url, state=changed))
    assert is_bad_request(answer), answer.status
    assert not answer.sets_session()
    assert redis_snapshot(redis_server, stack) == before
    assert stack.idp.state.token_calls["authorization_code"] == 0
    # A tampered copy burns nothing: the genuine callback still completes.
    assert (await fetch(browser, url)).sets_session()


@pytest.mark.parametrize("state", [None, "", "short", "x" * 200, "a b c d e f g h i j k l"])
async def test_missing_or_malformed_state_is_refused(
    stack: Stack, browser: aiohttp.ClientSession, redis_server: RedisServer, state: str | None
) -> None:
    url = await callback_url(browser, stack)
    before = redis_snapshot(redis_server, stack)
    answer = await fetch(browser, with_query(url, state=state))
    assert is_bad_request(answer), answer.status
    assert not answer.sets_session()
    assert redis_snapshot(redis_server, stack) == before
    assert stack.idp.state.token_calls["authorization_code"] == 0


async def test_state_and_nonce_are_long_random_and_fresh(
    stack: Stack, browser: aiohttp.ClientSession
) -> None:
    seen: dict[str, set[str]] = {"state": set(), "nonce": set()}
    for _ in range(3):
        q = query_of(await start_login(browser, stack))
        for name in seen:
            assert B64URL_43.fullmatch(q[name]), q[name]  # 256 bits of base64url
            seen[name].add(q[name])
    assert all(len(values) == 3 for values in seen.values())


# -- 2. PKCE S256 --------------------------------------------------------------------------------


@dataclass
class Traffic:
    """Everything the browser received: URLs it was sent to, response headers, bodies."""

    urls: list[str] = field(default_factory=list)
    headers: list[str] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)

    def texts(self) -> list[str]:
        return [*self.urls, *self.headers, self.body.decode("utf-8", "replace")]


@pytest.fixture
async def recorded() -> AsyncIterator[tuple[aiohttp.ClientSession, Traffic]]:
    """A ``browser`` that records every answer it receives (aiohttp client tracing)."""
    traffic = Traffic()
    trace = aiohttp.TraceConfig()

    async def on_end(_s: Any, _c: SimpleNamespace, params: Any) -> None:
        traffic.urls.append(str(params.url))
        traffic.headers.extend(f"{k}: {v}" for k, v in params.response.headers.items())

    async def on_chunk(_s: Any, _c: SimpleNamespace, params: Any) -> None:
        traffic.body.extend(params.chunk)

    trace.on_request_end.append(on_end)
    trace.on_request_redirect.append(on_end)
    trace.on_response_chunk_received.append(on_chunk)
    async with aiohttp.ClientSession(
        cookie_jar=aiohttp.CookieJar(unsafe=True),
        headers={"Accept": "text/html", "Sec-Fetch-Mode": "navigate"},
        trace_configs=[trace],
    ) as http:
        yield http, traffic


async def test_pkce_s256_fresh_challenge_verifier_never_in_front_channel(
    stack: Stack, recorded: tuple[aiohttp.ClientSession, Traffic]
) -> None:
    http, traffic = recorded
    challenges, verifiers = set(), []
    for user in ("alice", "bob"):
        auth_url = await start_login(http, stack)
        q = query_of(auth_url)
        assert q["code_challenge_method"] == "S256"
        assert B64URL_43.fullmatch(q["code_challenge"])
        challenges.add(q["code_challenge"])
        # The verifier sits sealed in the flow cookie; open it as the gateway would.
        flow = open_flow(http, stack, q["state"])
        assert sha256_b64u(flow.verifier) == q["code_challenge"]  # RFC 7636 §4.2
        verifiers.append(flow.verifier)
        answer = await fetch(http, await authorize(http, stack, auth_url, user))
        assert answer.status == 302 and answer.sets_session()
    assert len(challenges) == 2 and len(set(verifiers)) == 2
    assert traffic.urls and traffic.body
    for verifier in verifiers:
        assert not exposes(verifier, traffic.texts())


@pytest.mark.parametrize("method", ["plain", None, "s256"])
async def test_dev_provider_refuses_anything_but_s256(stack: Stack, method: str | None) -> None:
    """The provider the suite relies on never falls back to ``plain`` (RFC 9700 §2.1.1)."""
    params = {
        "client_id": CLIENT_ID,
        "redirect_uri": stack.settings.redirect_uri,
        "response_type": "code",
        "scope": "openid",
        "state": "s" * 43,
        "nonce": "n" * 43,
        "code_challenge": "c" * 43,
    }
    if method is not None:
        params["code_challenge_method"] = method
    async with aiohttp.ClientSession() as http:
        answer = await fetch(http, str(URL(stack.idp.url + "/authorize").with_query(params)))
    assert answer.status == 302
    q = query_of(answer.location or "")
    assert q["error"] == "invalid_request"
    assert "code" not in q


# -- 3. code injection ---------------------------------------------------------------------------


async def test_code_from_another_flow_is_refused(
    stack: Stack, browser: aiohttp.ClientSession, redis_server: RedisServer
) -> None:
    """The attacker's own code, pasted into the victim's callback with the victim's state."""
    victim_url = await callback_url(browser, stack, "alice")
    async with new_browser() as attacker:
        attacker_url = await callback_url(attacker, stack, "bob")
    idp = stack.idp.state
    tokens_before = len(idp.access_tokens)
    sessions_before = session_keys(redis_server, stack)

    injected = with_query(victim_url, code=query_of(attacker_url)["code"])
    answer = await fetch(browser, injected)
    assert is_bad_request(answer), answer.status
    assert not answer.sets_session()
    assert cookie_value(browser, stack) is None
    # The exchange happened and the provider refused it (PKCE): no token was issued.
    assert idp.token_calls["authorization_code"] == 1
    assert len(idp.access_tokens) == tokens_before
    assert session_keys(redis_server, stack) == sessions_before
    assert (await whoami(browser, stack))[0] == 401


# -- 6. the RFC 9207 iss parameter ---------------------------------------------------------------


@pytest.mark.parametrize(
    "fault",
    [
        pytest.param({"authz_iss": "http://127.0.0.1:9/not-the-issuer"}, id="wrong-iss"),
        pytest.param({"authz_iss": "{issuer}/"}, id="issuer-with-slash"),
        pytest.param({"authz_iss": "{issuer}.evil"}, id="issuer-prefix"),
        pytest.param({"omit_authz_iss": True}, id="missing-iss"),
    ],
)
async def test_iss_parameter_must_name_the_issuer(
    stack: Stack,
    browser: aiohttp.ClientSession,
    redis_server: RedisServer,
    fault: dict[str, Any],
) -> None:
    async with aiohttp.ClientSession() as http:
        answer = await fetch(http, stack.idp.url + "/.well-known/openid-configuration")
    assert json.loads(answer.body)["authorization_response_iss_parameter_supported"] is True
    for name, value in fault.items():
        if isinstance(value, str):
            value = value.replace("{issuer}", stack.idp.issuer)
        setattr(stack.idp.state.faults, name, value)
    answer = await login(browser, stack)
    assert is_bad_request(answer), answer.status
    assert not answer.sets_session()
    assert_no_store(answer)
    # Refused before the code was redeemed (a mix-up would hand it to the wrong server).
    assert stack.idp.state.token_calls["authorization_code"] == 0
    assert session_keys(redis_server, stack) == set()


# -- 7. provider errors on the callback ----------------------------------------------------------


async def test_consent_denied_shows_a_clear_page_without_a_loop(
    stack: Stack, browser: aiohttp.ClientSession, redis_server: RedisServer
) -> None:
    result = await http_login(browser, stack.url + "/deep", "alice", "alice", consent="deny")
    assert result.url.startswith(stack.url + "/oauth2/callback?")
    assert result.status == 400, result.status
    assert "Location" not in result.headers and "Refresh" not in result.headers
    assert "http-equiv" not in result.body.lower()  # no meta refresh either
    assert result.headers["Content-Type"].startswith("text/html")
    assert "declined" in result.body
    assert 'href="/oauth2/start' in result.body  # a way to start again
    assert sum(u.startswith(stack.url + "/oauth2/callback") for u in result.history) == 1
    assert cookie_value(browser, stack) is None
    assert session_keys(redis_server, stack) == set()
    assert stack.idp.state.token_calls["authorization_code"] == 0


@pytest.mark.parametrize(
    ("error", "says"),
    [
        ("login_required", "sign in"),
        ("interaction_required", "interact"),
        ("server_error", "did not sign you in"),
        ("<script>alert(1)</script>", "did not sign you in"),
        ('"><img src=x onerror=alert(1)>', "did not sign you in"),
        ("x" * 300, "did not sign you in"),
    ],
)
async def test_provider_error_is_explained_and_nothing_echoed_unescaped(
    stack: Stack, browser: aiohttp.ClientSession, error: str, says: str
) -> None:
    """An error response crafted against a real flow: the state and its cookie are genuine."""
    state = query_of(await start_login(browser, stack))["state"]
    url = str(
        URL(stack.settings.redirect_uri).with_query(
            state=state,
            iss=stack.idp.issuer,
            error=error,
            error_description='<script>alert("d")</script><b>bold</b><a href="//evil">x</a>',
            error_uri="javascript:alert(3)",
        )
    )
    answer = await fetch(browser, url)
    assert answer.status == 400, answer.status
    assert "Location" not in answer.headers
    assert_no_store(answer)
    body = answer.body.lower()
    for raw in ("<script", "<img", "<b>", 'href="//evil', "javascript:", "onerror=alert"):
        assert raw not in body, raw
    assert says in body
    assert 'href="/oauth2/start' in body
    assert not answer.sets_session()


# -- 8. callback answers: no-store, no-referrer, a clean redirect --------------------------------


async def test_every_callback_answer_is_no_store_and_no_referrer(
    stack: Stack, browser: aiohttp.ClientSession
) -> None:
    answers: dict[str, Answer] = {}
    url = await callback_url(browser, stack, rd="/landing/page?x=1")
    answers["success"] = ok = await fetch(browser, url)
    assert ok.status == 302
    assert ok.location == "/landing/page?x=1"
    assert not {"code", "state", "iss"} & set(query_of(ok.location).keys())
    answers["replay"] = await fetch(browser, url)
    answers["replay-json"] = await fetch(browser, url, headers={"Accept": "application/json"})
    answers["no-state"] = await fetch(browser, with_query(url, state=None))
    answers["repeated"] = await fetch(browser, url + "&state=x")
    answers["bare"] = await fetch(browser, stack.settings.redirect_uri)
    state = query_of(await start_login(browser, stack))["state"]
    denied = URL(stack.settings.redirect_uri).with_query(
        state=state, iss=stack.idp.issuer, error="access_denied"
    )
    answers["denied"] = await fetch(browser, str(denied))
    stack.idp.state.faults.bad_signature = True
    answers["bad-id-token"] = await login(browser, stack)
    for name, answer in answers.items():
        if name != "success":
            assert answer.status == 400, (name, answer.status)
            assert "Location" not in answer.headers, name
        assert_no_store(answer)


async def test_callback_answer_is_no_store_when_the_store_is_down(
    make_stack: Any, own_redis: RedisServer, browser: aiohttp.ClientSession
) -> None:
    stack = await make_stack(redis_url=own_redis.url)
    url = await callback_url(browser, stack)
    own_redis.stop()
    try:
        answer = await fetch(browser, url)
    finally:
        own_redis.start()
    assert answer.status == 503
    assert_no_store(answer)
    assert not answer.sets_session()


# -- 11. tokens never reach the browser ----------------------------------------------------------


async def test_tokens_never_reach_the_browser(
    stack: Stack, recorded: tuple[aiohttp.ClientSession, Traffic]
) -> None:
    """A whole login, proxied requests, /oauth2/userinfo and sign-out, all recorded."""
    http, traffic = recorded
    # A deep link: the gate → /oauth2/start → the provider's sign-in page (the last URL).
    landed = await follow(http, stack.url + "/app/page?x=1")
    assert landed.status == 200 and "/oauth2/start" in "".join(traffic.urls)
    assert (
        await follow(http, await authorize(http, stack, traffic.urls[-1], "alice"))
    ).status == 200
    cookie = cookie_value(http, stack)
    assert cookie is not None
    _, session = await stored_session(stack, cookie)
    tokens = session.tokens
    assert tokens.access_token and tokens.refresh_token and tokens.id_token
    # The upstream does get the access token (seen from a separate, unrecorded client).
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as upstream_view:
        upstream_view.cookie_jar.update_cookies({COOKIE: cookie}, URL(stack.url))
        seen = await echo_json(upstream_view, stack.url + "/app/data")
    sent = {k.lower(): v for k, v in seen["headers"]}
    assert sent["authorization"] == f"Bearer {tokens.access_token}"

    for path in ("/app/page", "/public/info", "/api/items", "/admin/panel", "/nothing?q=1"):
        assert (await follow(http, stack.url + path)).status == 200, path
    for accept in ("application/json", "text/html"):
        me = await fetch(http, stack.url + "/oauth2/userinfo", headers={"Accept": accept})
        assert me.status == 200
    assert json.loads(me.body)["sub"] == "alice"
    confirm = await fetch(http, stack.url + "/oauth2/sign_out")
    csrf = re.search(r'name="csrf" value="([^"]+)"', confirm.body)
    assert csrf is not None
    out = await follow(
        http, stack.url + "/oauth2/sign_out", method="POST", data={"csrf": csrf.group(1)}
    )
    assert out.status == 200 and "signed out" in out.body.lower()
    assert cookie_value(http, stack) is None

    texts = traffic.texts() + [m.value for m in http.cookie_jar]
    needles = {
        "access token": tokens.access_token,
        "refresh token": tokens.refresh_token,
        "ID token": tokens.id_token,
        "ID token signature": tokens.id_token.rsplit(".", 1)[1],
        "access token signature": tokens.access_token.rsplit(".", 1)[-1],
    }
    for what, secret in needles.items():
        assert not exposes(secret, texts), f"the {what} reached the browser"


# -- 12. session fixation ------------------------------------------------------------------------


async def test_every_login_gets_a_new_session_id(
    stack: Stack, browser: aiohttp.ClientSession, redis_server: RedisServer
) -> None:
    assert (await login(browser, stack, "alice")).sets_session()
    first = cookie_value(browser, stack)
    assert first is not None
    assert session_keys(redis_server, stack) == {store_key(stack, first)}

    again = await login(browser, stack, "alice")  # same browser, same user, cookie sent along
    assert again.sets_session()
    second = cookie_value(browser, stack)
    assert second is not None and second != first
    assert store_key(stack, second) != store_key(stack, first)
    # The first session is gone from the store, not merely shadowed.
    assert session_keys(redis_server, stack) == {store_key(stack, second)}
    async with new_browser() as other:
        other.cookie_jar.update_cookies({COOKIE: first}, URL(stack.url))
        assert (await whoami(other, stack))[0] == 401


async def test_planted_cookie_does_not_survive_login(
    stack: Stack, browser: aiohttp.ClientSession, redis_server: RedisServer
) -> None:
    async with new_browser() as attacker:
        assert (await login(attacker, stack, "bob")).sets_session()
        planted = cookie_value(attacker, stack)
    assert planted is not None
    browser.cookie_jar.update_cookies({COOKIE: planted}, URL(stack.url))
    assert (await whoami(browser, stack))[1].get("sub") == "bob"  # planted, valid

    answer = await login(browser, stack, "alice")
    assert answer.sets_session()
    mine = cookie_value(browser, stack)
    assert mine is not None and mine != planted
    assert store_key(stack, mine) != store_key(stack, planted)
    assert (await whoami(browser, stack))[1].get("sub") == "alice"
    # Whoever holds the planted value does not share the victim's session: the login ended
    # the session the browser arrived with, so the planted value opens nothing at all.
    assert store_key(stack, planted) not in session_keys(redis_server, stack)
    async with new_browser() as attacker:
        attacker.cookie_jar.update_cookies({COOKIE: planted}, URL(stack.url))
        assert (await whoami(attacker, stack))[0] == 401


async def test_old_cookie_is_worthless_after_sign_out(
    stack: Stack, browser: aiohttp.ClientSession, redis_server: RedisServer
) -> None:
    assert (await login(browser, stack, "alice")).sets_session()
    cookie = cookie_value(browser, stack)
    assert cookie is not None
    confirm = await fetch(browser, stack.url + "/oauth2/sign_out")
    csrf = re.search(r'name="csrf" value="([^"]+)"', confirm.body)
    assert confirm.status == 200 and csrf is not None
    out = await fetch(
        browser, stack.url + "/oauth2/sign_out", method="POST", data={"csrf": csrf.group(1)}
    )
    assert out.status == 303
    assert out.set_cookies.get(COOKIE) == ""  # the browser is told to drop it
    assert store_key(stack, cookie) not in session_keys(redis_server, stack)

    async with new_browser() as replay:
        replay.cookie_jar.update_cookies({COOKIE: cookie}, URL(stack.url))
        assert (await whoami(replay, stack))[0] == 401
        api = await fetch(replay, stack.url + "/api/items", headers={"Accept": "application/json"})
        assert api.status == 401
        page = await fetch(replay, stack.url + "/app")
        assert page.status == 302 and (page.location or "").startswith("/oauth2/start")

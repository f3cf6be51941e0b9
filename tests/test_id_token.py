"""ID-token validation at login (SECURITY.md 4-5, OIDC Core §3.1.3.7), over real HTTP.

The dev provider bends its ID tokens through its fault switches; each bent token must end
the login with a 4xx, no session cookie, nothing stored, and the access token unused (the
provider's userinfo endpoint never called). JWKS fetches are counted at the provider.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from tests.conftest import CLIENT_ID, RedisServer, Stack
from tests.support.browser import Answer, cookie_value, login, new_browser, session_keys, whoami


async def assert_refused(
    stack: Stack, browser: aiohttp.ClientSession, redis_server: RedisServer, answer: Answer
) -> None:
    """400, no session, nothing stored, the code was redeemed but the access token unused."""
    idp = stack.idp.state
    assert answer.status == 400, (answer.status, answer.body)
    assert not answer.sets_session()
    assert cookie_value(browser, stack) is None
    assert session_keys(redis_server, stack) == set()
    assert idp.token_calls["authorization_code"] >= 1  # it got as far as the token response
    assert idp.userinfo_calls == 0  # OIDC Core §3.1.3.7: validate before using the token
    issued = [*idp.access_tokens, *idp.refresh_tokens]
    assert issued  # the provider did hand out tokens...
    shown = answer.body + "".join(answer.headers.values())
    assert not any(token in shown for token in issued)  # ...and the error page shows none
    assert (await whoami(browser, stack))[0] == 401


async def test_control_a_good_id_token_logs_in_and_uses_userinfo(
    stack: Stack, browser: aiohttp.ClientSession
) -> None:
    """The counters the refusals below rely on do move when the login is accepted."""
    answer = await login(browser, stack)
    assert answer.status == 302 and answer.sets_session()
    assert stack.idp.state.userinfo_calls == 1
    assert (await whoami(browser, stack))[1]["sub"] == "alice"


# -- 4. nonce ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fault",
    [
        pytest.param({"id_token_nonce": "n" * 43}, id="wrong-nonce"),
        pytest.param({"id_token_nonce": ""}, id="empty-nonce"),
        pytest.param({"omit_nonce": True}, id="missing-nonce"),
    ],
)
async def test_nonce_mismatch_is_refused_before_the_access_token_is_used(
    stack: Stack, browser: aiohttp.ClientSession, redis_server: RedisServer, fault: dict[str, Any]
) -> None:
    for name, value in fault.items():
        setattr(stack.idp.state.faults, name, value)
    await assert_refused(stack, browser, redis_server, await login(browser, stack))


# -- 5. the ID token itself --------------------------------------------------------------------

BAD_ID_TOKENS = [
    pytest.param({"id_token_iss": "http://127.0.0.1:9"}, id="wrong-iss"),
    pytest.param({"id_token_iss": "{issuer}/"}, id="iss-with-trailing-slash"),
    pytest.param({"id_token_aud": ["some-other-client"]}, id="aud-without-client-id"),
    pytest.param({"id_token_aud": [CLIENT_ID, "untrusted-api"]}, id="aud-with-extra-audience"),
    pytest.param({"id_token_aud": []}, id="aud-empty"),
    pytest.param({"id_token_azp": "some-other-client"}, id="azp-mismatch"),
    pytest.param({"bad_signature": True}, id="bad-signature"),
    pytest.param({"alg_none": True}, id="alg-none"),
    pytest.param({"hs256_with_public_key": True}, id="hs256-with-rsa-public-key"),
    pytest.param({"id_token_exp_offset": -300}, id="expired"),
    pytest.param({"id_token_iat_offset": 3600}, id="iat-far-in-future"),
    pytest.param({"id_token_iat_offset": -7200}, id="iat-far-in-past"),
    pytest.param({"unknown_kid": True}, id="unknown-kid"),
]


@pytest.mark.parametrize("fault", BAD_ID_TOKENS)
async def test_bad_id_token_is_refused(
    stack: Stack, browser: aiohttp.ClientSession, redis_server: RedisServer, fault: dict[str, Any]
) -> None:
    for name, value in fault.items():
        if isinstance(value, str):
            value = value.replace("{issuer}", stack.idp.issuer)
        setattr(stack.idp.state.faults, name, value)
    await assert_refused(stack, browser, redis_server, await login(browser, stack))


async def test_unknown_kid_refetches_jwks_once_then_fails_rate_limited(
    stack: Stack, browser: aiohttp.ClientSession, redis_server: RedisServer
) -> None:
    """A kid the cache does not know triggers one JWKS fetch; a second miss right after none."""
    idp = stack.idp.state
    idp.faults.unknown_kid = True
    fetched = idp.jwks_calls
    await assert_refused(stack, browser, redis_server, await login(browser, stack))
    assert idp.jwks_calls == fetched + 1
    async with new_browser() as second:
        answer = await login(second, stack)
        assert answer.status == 400 and not answer.sets_session(), answer.status
    assert idp.jwks_calls == fetched + 1  # rate-limited: a forged kid is no fetch amplifier


async def test_login_works_after_the_provider_rotates_its_keys(
    stack: Stack, browser: aiohttp.ClientSession
) -> None:
    """OIDC Core §10.1.1: a new kid is looked up again, right away, and then found."""
    idp = stack.idp.state
    old_kid = idp.keys.current.kid
    idp.rotate_keys()
    assert idp.keys.current.kid != old_kid
    fetched = idp.jwks_calls
    answer = await login(browser, stack)
    assert answer.status == 302 and answer.sets_session(), answer.body
    assert idp.jwks_calls == fetched + 1
    assert (await whoami(browser, stack))[1]["sub"] == "alice"
    # Tokens signed with the key now cached need no further fetch.
    async with new_browser() as second:
        assert (await login(second, stack, "bob")).sets_session()
    assert idp.jwks_calls == fetched + 1

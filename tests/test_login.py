"""The login flow end to end over HTTP: deep link → provider → callback → deep link.

The step-by-step helpers (start a login, pass the provider, call the callback by hand, look
at what the gateway wrote to Redis) are in ``tests/support/browser.py``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from typing import Any

import aiohttp
import pytest
from yarl import URL

from gateway import keys
from gateway.devidp.config import Faults
from tests.conftest import CLIENT_ID, RedisServer, Stack
from tests.idp_client import http_login
from tests.support.browser import echo_json, fetch, login, query_of, start_login, whoami
from tests.support.logout import confirmation_form


async def test_deep_link_login_lands_on_deep_link(
    stack: Stack, browser: aiohttp.ClientSession
) -> None:
    result = await http_login(browser, stack.url + "/some/deep/page?x=1&y=2", "alice", "alice")
    assert result.status == 200
    assert result.url == stack.url + "/some/deep/page?x=1&y=2"
    seen = await echo_json(browser, stack.url + "/some/deep/page?x=1")
    headers = {k.lower(): v for k, v in seen["headers"]}
    assert headers["x-forwarded-user"] == "alice"
    assert headers["x-forwarded-email"] == "alice@example.com"
    assert headers["x-forwarded-groups"] == "admins,staff"
    assert headers["authorization"].startswith("Bearer ")
    assert "gw_test" not in headers.get("cookie", "")


@pytest.mark.parametrize(
    "deep_link",
    [
        "/my%20file.pdf",  # a space in the path (found by tests/fuzz)
        "/notes/C%23%3F.txt",  # an encoded '#' and '?' in the path (found by tests/fuzz)
        "/search?q=a%0Ab",  # an encoded newline in the query (found by tests/fuzz)
        "/files?path=%5Cdir%5Cx",  # encoded backslashes in the query
        "/caf%C3%A9/menu?x=%1F",
    ],
)
async def test_deep_links_with_any_encoded_byte_survive_the_login(
    stack: Stack, browser: aiohttp.ClientSession, deep_link: str
) -> None:
    result = await http_login(
        browser, str(URL(stack.url + deep_link, encoded=True)), "alice", "alice"
    )
    assert result.status == 200, result.body
    assert result.url == stack.url + deep_link


@pytest.mark.parametrize("value", ["²", "❼.x", "1².x"])
async def test_a_login_state_cookie_with_a_unicode_digit_does_not_block_sign_in(
    stack: Stack, value: str
) -> None:
    # str.isdigit() is true for "²"; int() refused it: a 500 on every sign-in while such a
    # cookie (tossed by a sibling subdomain, say) was around (found by tests/fuzz).
    async with aiohttp.ClientSession() as http:
        answer = await fetch(
            http, stack.url + "/oauth2/start?rd=/x", headers={"Cookie": f"gw_test-login-0={value}"}
        )
    assert answer.status == 302


@pytest.mark.parametrize("method", ["none", "client_secret_post", "client_secret_basic"])
async def test_login_with_each_client_auth_method(
    make_stack: Any, browser: aiohttp.ClientSession, method: str
) -> None:
    """A public client (PKCE only, no secret) and both secret methods all log in.

    The dev provider accepts only the registered method (OIDC Core §9), so each passing run
    proves the gateway authenticated at the token endpoint the configured way.
    """
    stack = await make_stack(client_auth=method)
    answer = await login(browser, stack, "bob", rd="/after")
    assert answer.status == 302, answer.body
    assert answer.location == "/after"
    assert answer.sets_session()
    assert stack.idp.state.token_calls["authorization_code"] == 1
    status, me = await whoami(browser, stack)
    assert status == 200
    assert me["sub"] == "bob"


async def test_wrong_client_auth_method_fails_cleanly(
    make_stack: Any, browser: aiohttp.ClientSession
) -> None:
    """Control for the test above: a method the provider did not register is refused (400)."""
    stack = await make_stack(client_auth="client_secret_post")
    clients = stack.idp.state.clients
    clients[CLIENT_ID] = replace(
        clients[CLIENT_ID], token_endpoint_auth_method="client_secret_basic"
    )
    answer = await login(browser, stack)
    assert answer.status == 400, answer.status
    assert not answer.sets_session()


# -- provider metadata, default scopes, prompt, error responses (CONTRACT "Provider metadata") --


async def test_revocation_endpoint_from_rfc8414_metadata_is_used_at_sign_out(
    make_stack: Any, browser: aiohttp.ClientSession
) -> None:
    """Discovery without revocation/introspection endpoints; the RFC 8414 document has them."""
    faults = Faults(discovery_omit=["revocation_endpoint", "introspection_endpoint"])
    stack = await make_stack(idp_config={"faults": faults})
    async with aiohttp.ClientSession() as http:
        discovery = json.loads(
            (await fetch(http, stack.idp.url + "/.well-known/openid-configuration")).body
        )
    assert "revocation_endpoint" not in discovery
    answer = await login(browser, stack)
    assert answer.status == 302
    meta = await stack.app[keys.PROVIDER].metadata()
    assert meta.revocation_endpoint == stack.idp.url + "/revoke"
    assert meta.introspection_endpoint == stack.idp.url + "/introspect"

    refresh = list(stack.idp.state.refresh_tokens)[-1]
    fields = await confirmation_form(browser, stack)
    async with browser.post(
        stack.url + "/oauth2/sign_out", data=fields, allow_redirects=False
    ) as resp:
        assert resp.status == 303
    assert refresh in stack.idp.state.revoked


async def test_rfc8414_metadata_of_another_issuer_is_ignored(make_stack: Any) -> None:
    faults = Faults(discovery_omit=["revocation_endpoint"], no_oauth_metadata=True)
    stack = await make_stack(idp_config={"faults": faults})
    meta = await stack.app[keys.PROVIDER].metadata()
    assert meta.revocation_endpoint is None
    other = meta.with_oauth_metadata(
        {"issuer": "https://other.example", "revocation_endpoint": "https://other.example/r"}
    )
    assert other.revocation_endpoint is None


@pytest.mark.parametrize(
    ("faults", "scopes", "want"),
    [
        pytest.param(Faults(), None, "openid email profile offline_access", id="listed"),
        pytest.param(
            Faults(scopes_supported=["openid", "email", "profile"]),
            None,
            "openid email profile",
            id="not-listed",
        ),
        pytest.param(
            Faults(discovery_omit=["scopes_supported"]),
            None,
            "openid email profile offline_access",
            id="no-list",
        ),
        pytest.param(
            Faults(scopes_supported=["openid"]),
            ["openid", "email", "offline_access"],
            "openid email offline_access",
            id="explicit-kept",
        ),
    ],
)
async def test_default_scopes_adapt_to_the_provider_and_no_consent_is_forced(
    make_stack: Any,
    browser: aiohttp.ClientSession,
    faults: Faults,
    scopes: list[str] | None,
    want: str,
) -> None:
    stack = await make_stack(idp_config={"faults": faults}, provider={"scopes": scopes})
    query = query_of(await start_login(browser, stack))
    assert query["scope"] == want
    assert "prompt" not in query


async def test_prompt_is_sent_only_when_configured(
    make_stack: Any, browser: aiohttp.ClientSession
) -> None:
    stack = await make_stack(provider={"prompt": "consent"})
    assert query_of(await start_login(browser, stack))["prompt"] == "consent"


async def test_provider_error_without_iss_is_shown_as_that_error_and_logged(
    stack: Stack,
    browser: aiohttp.ClientSession,
    redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.login")
    stack.idp.state.faults.omit_authz_iss = True
    result = await http_login(browser, stack.url + "/deep", "alice", "alice", consent="deny")
    assert result.url.startswith(stack.url + "/oauth2/callback?")
    assert "iss=" not in result.url
    assert result.status == 400
    assert "You declined the request" in result.body
    assert "did not name its issuer" not in result.body
    assert stack.idp.state.token_calls["authorization_code"] == 0
    assert set(redis_server.keys(stack.settings.session.key_prefix + "s:*")) == set()
    warned = [r for r in caplog.records if "did not name its issuer" in r.getMessage()]
    assert [(r.levelname, r.__dict__["error"]) for r in warned] == [("WARNING", "access_denied")]
    refused = [r for r in caplog.records if r.getMessage().startswith("sign-in refused")]
    assert [r.__dict__["error"] for r in refused] == ["access_denied"]


async def test_callback_refusal_is_logged_with_its_reason(
    stack: Stack, browser: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.login")
    answer = await fetch(browser, stack.settings.redirect_uri + "?state=short&code=x")
    assert answer.status == 400
    (record,) = [r for r in caplog.records if r.getMessage().startswith("sign-in callback")]
    assert (
        record.__dict__["reason"] == "The sign-in response has no valid state. Please start again."
    )

"""Several providers at once (``providers:``), against two real development providers
(``corp`` and ``partners``, each its own server and issuer, both with a user whose ``sub`` is
``alice``): login with either, the chooser, per-route restriction, the RFC 9700 §4.4 mix-up
defence, per-provider back-channel logout, revocation, refresh and sign-out, pseudo-claims,
bearer tokens, and the CLI."""

from __future__ import annotations

import copy
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
import yaml
from aiohttp import web

from gateway import keys
from gateway.app import create_app
from gateway.config import validate
from gateway.devidp.config import Faults
from gateway.devidp.tokens import BACKCHANNEL_EVENT
from gateway.echo import RunningEcho
from gateway.probe import probe
from tests.conftest import CLIENT_ID, RedisServer, StackFactory
from tests.support.browser import fetch, login, new_browser, query_of, with_query
from tests.support.calls import API, call, upstream_headers
from tests.support.ports import free_port
from tests.support.processes import gateway
from tests.support.providers import (
    COOKIE,
    Multi,
    authorization_url,
    callback_at,
    login_at,
    start_multi,
)

LOGOUT = "/oauth2/backchannel_logout"


@pytest.fixture
async def multi(redis_server: RedisServer) -> AsyncIterator[Multi]:
    running = await start_multi(redis_server.url)
    yield running
    await running.close()


async def echo_headers(http: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, str]]:
    status, body = await call(http, url)
    return status, upstream_headers(body) if status == 200 else {}


def logout_token(multi: Multi, provider: str, **claims: Any) -> str:
    idp = multi.idps[provider]
    now = int(time.time())
    body: dict[str, Any] = {
        "iss": idp.issuer,
        "aud": CLIENT_ID,
        "iat": now,
        "exp": now + 120,
        "jti": uuid.uuid4().hex,
        "events": {BACKCHANNEL_EVENT: {}},
        **claims,
    }
    return idp.state.sign(body, headers={"typ": "logout+jwt"})


async def status_with(http: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> int:
    async with http.get(url, headers={**API, **headers}, allow_redirects=False) as resp:
        await resp.read()
        return resp.status


async def backchannel(multi: Multi, token: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http:
        async with http.post(multi.url + LOGOUT, data={"logout_token": token}) as resp:
            return resp.status, await resp.text()


def write_config(multi: Multi, tmp_path: Path) -> Path:
    path = tmp_path / "multi.yaml"
    path.write_text(yaml.safe_dump(multi.config), encoding="utf-8")
    return path


# -- login with either, and the chooser ---------------------------------------------------


async def test_login_with_either_provider_names_it_to_the_upstream(multi: Multi) -> None:
    async with new_browser() as a, new_browser() as b:
        answer = await login_at(a, multi, "corp", rd="/x")
        assert answer.location == "/x" and answer.set_cookies.get(COOKIE)
        await login_at(b, multi, "partners", rd="/x")
        status, seen = await echo_headers(a, multi.url + "/x")
        assert status == 200
        assert seen["x-forwarded-user"] == "alice"
        assert seen["x-provider"] == "corp"
        assert seen["x-issuer"] == multi.corp.issuer
        status, seen = await echo_headers(b, multi.url + "/x")
        assert status == 200
        assert seen["x-forwarded-user"] == "alice"
        assert seen["x-provider"] == "partners"
        assert seen["x-issuer"] == multi.partners.issuer
    # Each code went to its own provider's token endpoint only.
    assert multi.code_exchanges("corp") == 1
    assert multi.code_exchanges("partners") == 1


async def test_userinfo_tells_the_same_sub_at_two_providers_apart(multi: Multi) -> None:
    async with new_browser() as a, new_browser() as b:
        await login_at(a, multi, "corp", rd="/x")
        await login_at(b, multi, "partners", rd="/x")
        status, corp = await call(a, multi.url + "/oauth2/userinfo")
        assert status == 200
        status, partners = await call(b, multi.url + "/oauth2/userinfo")
        assert status == 200
    assert corp["sub"] == partners["sub"] == "alice"
    assert (corp["provider"], corp["iss"]) == ("corp", multi.corp.issuer)
    assert (partners["provider"], partners["iss"]) == ("partners", multi.partners.issuer)


async def test_the_probe_warns_of_a_public_client_at_a_provider_without_rfc_9207(
    multi: Multi,
) -> None:
    """Such a provider's code could be redeemed by another configured provider that mixes up
    a login (it receives the code and the PKCE verifier at its token endpoint): the probe
    says so, and what to do."""
    cfg = copy.deepcopy(multi.config)
    partners = cfg["providers"][1]
    partners["client_auth_method"] = "none"
    del partners["client_secret"]
    multi.partners.state.faults.discovery_omit = ["authorization_response_iss_parameter_supported"]
    results = await probe(validate(cfg, env={}))
    (warning,) = [r for r in results if "mix-up" in r[0]]
    assert warning[:2] == ("provider partners mix-up defence", None)
    assert warning[2].endswith(
        "; with a public client, another configured provider that mixes up a login could "
        "redeem this provider's code: give it a confidential client"
    )


async def test_each_provider_without_rfc_9207_is_named_in_a_warning_at_start(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="gateway")

    async def start_up_warnings(**idp_config: Any) -> list[str]:
        caplog.clear()
        running = await start_multi(redis_server.url, idp_config=idp_config)
        await running.close()
        return [r.getMessage() for r in caplog.records if "RFC 9207" in r.getMessage()]

    assert await start_up_warnings() == []
    omit = Faults(discovery_omit=["authorization_response_iss_parameter_supported"])
    risk = (
        "does not send iss in its authorization responses (RFC 9207): with several "
        "providers, only the login state ties a response to this provider"
    )
    assert await start_up_warnings(faults=omit) == [
        f"provider corp {risk}",
        f"provider partners {risk}",
    ]


async def test_readyz_stays_ready_while_one_of_several_providers_is_down(multi: Multi) -> None:
    """One provider's outage names it in ``checks`` but keeps the process ready (taking every
    replica out of the load balancer would lock out the other providers' users too); with
    every provider down it is not ready."""

    async def readiness(*dead: str) -> tuple[int, dict[str, Any]]:
        cfg = copy.deepcopy(multi.config)
        port = free_port()
        cfg["server"]["public_url"] = f"http://127.0.0.1:{port}"
        for entry in cfg["providers"]:
            if entry["id"] in dead:  # nobody listens there
                entry["issuer"] = f"http://127.0.0.1:{free_port()}"
        runner = web.AppRunner(create_app(validate(cfg, env={})), access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, "127.0.0.1", port).start()
            async with aiohttp.ClientSession() as http:
                if dead:  # signing in with a provider that is down: 503, nothing set
                    start = f"http://127.0.0.1:{port}/oauth2/start?provider={dead[-1]}&rd=/x"
                    answer = await fetch(http, start)
                    assert (answer.status, answer.set_cookies) == (503, {})
                async with http.get(f"http://127.0.0.1:{port}/readyz") as resp:
                    return resp.status, await resp.json()
        finally:
            await runner.cleanup()

    status, body = await readiness()
    assert (status, body["status"]) == (200, "ready")
    assert body["checks"] == {"store": "ok", "provider:corp": "ok", "provider:partners": "ok"}
    status, body = await readiness("partners")
    assert (status, body["status"]) == (200, "ready")
    assert body["checks"] == {
        "store": "ok",
        "provider:corp": "ok",
        "provider:partners": "metadata not loaded",
    }
    status, body = await readiness("corp", "partners")
    assert (status, body["status"]) == (503, "not ready")
    assert set(body["checks"].values()) == {"ok", "metadata not loaded"}


async def test_the_chooser_links_every_allowed_provider_in_config_order(
    multi: Multi, browser: aiohttp.ClientSession
) -> None:
    # An unauthenticated navigation on a route allowing both goes to the chooser.
    first = await fetch(browser, multi.url + "/reports/q?x=1")
    assert first.status == 302
    assert first.location == "/oauth2/start?rd=/reports/q?x%3D1"
    page = await fetch(browser, multi.url + first.location)
    assert page.status == 200
    assert page.headers["Content-Type"].startswith("text/html")
    assert page.headers["Cache-Control"] == "no-store"
    assert '<html lang="en">' in page.body
    links = re.findall(r'<a class="button"[^>]* href="([^"]+)">([^<]+)</a>', page.body)
    assert links == [
        ("/oauth2/start?provider=corp&amp;rd=/reports/q%3Fx%3D1", "Corporate sign-in"),
        ("/oauth2/start?provider=partners&amp;rd=/reports/q%3Fx%3D1", "Partner sign-in"),
    ]
    assert '<nav aria-label="Sign-in options">' in page.body
    assert "<script" not in page.body and "<form" not in page.body
    # The chooser remembers nothing: no cookie is set before a provider is chosen.
    assert page.set_cookies == {}
    # Following a link starts the login with that provider, landing back on the same path.
    href = links[1][0].replace("&amp;", "&")
    answer = await fetch(browser, multi.url + href)
    assert answer.status == 302 and answer.location is not None
    assert answer.location.startswith(multi.partners.url + "/authorize?")


async def test_a_route_allowing_one_provider_goes_straight_to_it(
    multi: Multi, browser: aiohttp.ClientSession
) -> None:
    first = await fetch(browser, multi.url + "/partners/page")
    assert first.status == 302 and first.location == "/oauth2/start?rd=/partners/page"
    answer = await fetch(browser, multi.url + first.location)
    assert answer.status == 302 and answer.location is not None
    assert answer.location.startswith(multi.partners.url + "/authorize?")
    answer = await fetch(browser, multi.url + "/oauth2/start?rd=/corp/x")
    assert answer.location is not None
    assert answer.location.startswith(multi.corp.url + "/authorize?")


@pytest.mark.parametrize(
    "query",
    [
        "provider=nope&rd=/x",  # unknown
        "provider=corp&rd=/partners/x",  # not allowed by the route of rd
        "provider=partners&rd=/corp",
        "provider=corp&provider=partners&rd=/x",  # two
        "provider=&rd=/x",
        "provider=CORP&rd=/x",
    ],
)
async def test_an_unknown_or_disallowed_provider_is_400(
    multi: Multi, browser: aiohttp.ClientSession, query: str
) -> None:
    answer = await fetch(browser, f"{multi.url}/oauth2/start?{query}")
    assert answer.status == 400
    assert answer.set_cookies == {}
    assert multi.code_exchanges("corp") == multi.code_exchanges("partners") == 0


# -- per-route restriction ------------------------------------------------------------------


async def test_a_session_of_another_provider_is_no_session_on_a_restricted_route(
    multi: Multi, browser: aiohttp.ClientSession
) -> None:
    await login_at(browser, multi, "corp")
    assert (await echo_headers(browser, multi.url + "/corp/x"))[0] == 200
    assert (await echo_headers(browser, multi.url + "/x"))[0] == 200
    # Navigation: to the login of the route's provider (straight to partners).
    answer = await fetch(browser, multi.url + "/partners/x")
    assert answer.status == 302 and answer.location == "/oauth2/start?rd=/partners/x"
    # API: 401; the session itself stays (the cookie is not cleared).
    status, body = await call(browser, multi.url + "/api/partners/x")
    assert status == 401
    assert COOKIE not in body["_headers"].get("Set-Cookie", "")
    assert (await echo_headers(browser, multi.url + "/corp/x"))[0] == 200
    # Forward-auth answers the same for that route.
    forwarded = {"X-Forwarded-Uri": "/api/partners/x"}
    assert await status_with(browser, multi.url + "/oauth2/auth", forwarded) == 401
    forwarded = {"X-Forwarded-Uri": "/corp/x"}
    assert await status_with(browser, multi.url + "/oauth2/auth", forwarded) == 200


# -- the mix-up defence (RFC 9700 §4.4) -----------------------------------------------------


async def test_a_response_naming_the_other_provider_is_refused_and_no_code_is_redeemed(
    multi: Multi, browser: aiohttp.ClientSession
) -> None:
    # A genuine partners response (code, state, iss of partners) ...
    partners_cb = await callback_at(browser, multi, "partners")
    partners = query_of(partners_cb)
    assert partners["iss"] == multi.partners.issuer
    # ... delivered to a flow the user began with corp (the attacker's mix-up).
    corp_auth = await authorization_url(browser, multi, "corp")
    corp_state = query_of(corp_auth)["state"]
    forged = with_query(partners_cb, state=corp_state)
    answer = await fetch(browser, forged)
    assert answer.status == 400
    assert "unexpected issuer" in answer.body
    assert not answer.set_cookies.get(COOKIE)
    # The same without iss (corp advertises authorization_response_iss_parameter_supported).
    answer = await fetch(browser, with_query(partners_cb, state=corp_state, iss=None))
    assert answer.status == 400
    assert "did not name its issuer" in answer.body
    assert multi.code_exchanges("corp") == 0
    assert multi.code_exchanges("partners") == 0
    # The genuine response, to its own flow, still works: the code was never spent.
    answer = await fetch(browser, partners_cb)
    assert answer.status == 302 and answer.set_cookies.get(COOKIE)
    assert multi.code_exchanges("partners") == 1
    assert multi.code_exchanges("corp") == 0


async def test_an_error_response_without_iss_is_refused_with_several_providers(
    multi: Multi, browser: aiohttp.ClientSession
) -> None:
    corp_auth = await authorization_url(browser, multi, "corp")
    state = query_of(corp_auth)["state"]
    answer = await fetch(browser, f"{multi.url}/oauth2/callback?error=access_denied&state={state}")
    assert answer.status == 400
    assert "did not name its issuer" in answer.body


# -- sessions: same sub at two providers ------------------------------------------------------


async def test_back_channel_logout_ends_only_that_providers_sessions(
    multi: Multi, redis_server: RedisServer
) -> None:
    async with new_browser() as at_corp, new_browser() as at_partners:
        await login_at(at_corp, multi, "corp")
        await login_at(at_partners, multi, "partners")
        # By sub: partners' alice ends, corp's alice (the same sub) does not.
        status, body = await backchannel(multi, logout_token(multi, "partners", sub="alice"))
        assert status == 200, body
        assert body == '{"ended": 1}'
        assert (await call(at_partners, multi.url + "/api/x"))[0] == 401
        assert (await call(at_corp, multi.url + "/api/x"))[0] == 200
        # By sid: a sid of corp's session, sent by partners, ends nothing.
        await login_at(at_partners, multi, "partners")
        corp_sid = next(iter(multi.corp.state.sessions.values())).sid
        status, body = await backchannel(multi, logout_token(multi, "partners", sid=corp_sid))
        assert (status, body) == (200, '{"ended": 0}')
        assert (await call(at_corp, multi.url + "/api/x"))[0] == 200
        status, body = await backchannel(multi, logout_token(multi, "corp", sid=corp_sid))
        assert (status, body) == (200, '{"ended": 1}')
        assert (await call(at_corp, multi.url + "/api/x"))[0] == 401
        assert (await call(at_partners, multi.url + "/api/x"))[0] == 200


async def test_a_logout_token_of_an_unknown_or_lying_issuer_is_400(multi: Multi) -> None:
    async with new_browser() as http:
        await login_at(http, multi, "corp")
        unknown = logout_token(multi, "corp", sub="alice", iss="http://127.0.0.1:9/other")
        assert (await backchannel(multi, unknown))[0] == 400
        # Signed by partners' key but naming corp's issuer: corp's keys refuse it.
        lying = logout_token(multi, "partners", sub="alice", iss=multi.corp.issuer)
        assert (await backchannel(multi, lying))[0] == 400
        assert (await call(http, multi.url + "/api/x"))[0] == 200


async def test_store_indexes_keep_the_same_sub_at_two_providers_apart(
    multi: Multi, redis_server: RedisServer
) -> None:
    store = multi.app[keys.STORE]
    async with new_browser() as a, new_browser() as b:
        await login_at(a, multi, "corp")
        await login_at(b, multi, "partners")
        corp = await store.keys_for_user("alice", "corp")
        partners = await store.keys_for_user("alice", "partners")
        assert [m.provider for m in corp] == ["corp"]
        assert [m.provider for m in partners] == ["partners"]
        assert corp[0].key != partners[0].key
        assert await store.keys_for_user("alice") == []  # no "default" provider here
        prefix = multi.settings.session.key_prefix
        names = {k.decode() for k in redis_server.keys(prefix + "u:*")}
        assert {n.split(":")[1] for n in names} == {"u"}
        assert {n.split(":")[2] for n in names} == {"corp", "partners"}


async def test_the_cli_lists_and_revokes_per_provider(multi: Multi, tmp_path: Path) -> None:
    config = write_config(multi, tmp_path)
    async with new_browser() as a, new_browser() as b:
        await login_at(a, multi, "corp")
        await login_at(b, multi, "partners")
        code, out, err = await gateway(
            "sessions", "list", "--user", "alice", "--config", str(config), cwd=tmp_path
        )
        assert code == 0, err
        lines = out.splitlines()
        assert lines[-1] == "2 session(s)"
        assert sorted(re.findall(r"provider=(\S+)", out)) == ["corp", "partners"]
        code, out, err = await gateway(
            "sessions", "list", "--user", "alice", "--provider", "corp",
            "--config", str(config), cwd=tmp_path,
        )  # fmt: skip
        assert code == 0, err
        assert re.findall(r"provider=(\S+)", out) == ["corp"]
        code, out, err = await gateway(
            "sessions", "revoke", "--user", "alice", "--provider", "nope",
            "--config", str(config), cwd=tmp_path,
        )  # fmt: skip
        assert code == 2 and "'nope' is not a configured provider id" in err
        code, out, err = await gateway(
            "sessions", "revoke", "--user", "alice", "--provider", "partners",
            "--config", str(config), cwd=tmp_path,
        )  # fmt: skip
        assert code == 0, err
        assert out.splitlines()[-1] == "revoked 1 session(s) of user alice at provider partners"
        assert (await call(b, multi.url + "/api/x"))[0] == 401
        assert (await call(a, multi.url + "/api/x"))[0] == 200
        # Without --provider: the sub at every provider (two people here), each line naming
        # its provider.
        await login_at(b, multi, "partners")
        code, out, err = await gateway(
            "sessions", "revoke", "--user", "alice", "--config", str(config), cwd=tmp_path
        )
        assert code == 0, err
        assert sorted(re.findall(r"^revoked \S+  provider=(\S+)", out, re.M)) == [
            "corp",
            "partners",
        ]
        assert out.splitlines()[-1] == "revoked 2 session(s) of user alice at every provider"
        assert (await call(a, multi.url + "/api/x"))[0] == 401
        assert (await call(b, multi.url + "/api/x"))[0] == 401


async def test_sign_out_revokes_and_ends_at_the_sessions_own_provider(
    multi: Multi, browser: aiohttp.ClientSession
) -> None:
    await login_at(browser, multi, "partners")
    page = await fetch(browser, multi.url + "/oauth2/sign_out")
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.body)
    assert csrf is not None
    answer = await fetch(
        browser,
        multi.url + "/oauth2/sign_out",
        method="POST",
        data={"csrf": csrf.group(1), "rd": "/"},
        headers={"Origin": multi.url},
    )
    assert answer.status == 303 and answer.location is not None
    assert answer.location.startswith(multi.partners.url + "/")
    assert len(multi.partners.state.revoked) == 2  # refresh and access token
    assert multi.corp.state.revoked == []


async def test_refresh_goes_to_the_sessions_own_provider(redis_server: RedisServer) -> None:
    # The access token (300 s) is always within the skew: every request refreshes.
    multi = await start_multi(redis_server.url, session={"refresh_skew": "1h"})
    try:
        async with new_browser() as http:
            await login_at(http, multi, "partners")
            status, seen = await echo_headers(http, multi.url + "/x")
            assert status == 200 and seen["x-provider"] == "partners"
        assert multi.partners.state.token_calls["refresh_token"] == 1
        assert multi.corp.state.token_calls["refresh_token"] == 0
    finally:
        await multi.close()


# -- pseudo-claims in the assertion ---------------------------------------------------------


async def test_the_assertion_names_the_provider_and_its_issuer(
    multi: Multi, browser: aiohttp.ClientSession
) -> None:
    await login_at(browser, multi, "partners")
    status, seen = await echo_headers(browser, multi.url + "/signed/x")
    assert status == 200
    claims = jwt.decode(seen["x-gateway-assertion"], options={"verify_signature": False})
    assert claims["iss"] == multi.url
    assert claims["sub"] == "alice"
    assert claims["provider"] == "partners"
    assert claims["provider_iss"] == multi.partners.issuer


# -- bearer tokens ----------------------------------------------------------------------------


def access_token(multi: Multi, provider: str, **changes: Any) -> str:
    idp = multi.idps[provider]
    now = int(time.time())
    claims = {
        "iss": idp.issuer,
        "sub": "alice",
        "aud": CLIENT_ID,
        "client_id": CLIENT_ID,
        "iat": now,
        "exp": now + 300,
        "jti": uuid.uuid4().hex,
        "scope": "openid",
        **changes,
    }
    return idp.state.sign(claims, headers={"typ": "at+jwt"})


async def test_a_bearer_jwt_is_checked_by_the_provider_its_iss_names(multi: Multi) -> None:
    async with aiohttp.ClientSession() as http:

        async def status_of(token: str) -> int:
            auth = {"Authorization": f"Bearer {token}"}
            return await status_with(http, multi.url + "/api/partners/x", auth)

        assert await status_of(access_token(multi, "partners")) == 200
        # corp's own token on a partners-only route: refused, corp is never asked.
        assert await status_of(access_token(multi, "corp")) == 401
        # Signed by corp's key, claiming partners' issuer: partners' keys refuse it.
        assert await status_of(access_token(multi, "corp", iss=multi.partners.issuer)) == 401
        # An opaque token on a route that allows one provider goes to that one only.
        before = multi.corp.state.introspect_calls
        assert await status_of("opaque-token-value") == 401
        assert multi.partners.state.introspect_calls == 1
        assert multi.corp.state.introspect_calls == before == 0


async def test_a_single_provider_is_default_in_headers_and_the_assertion(
    make_stack: StackFactory, echo: RunningEcho, browser: aiohttp.ClientSession
) -> None:
    headers = {"X-Provider": "provider", "X-Issuer": "iss", "X-Forwarded-User": "sub"}
    route = {"prefix": "/", "upstream": str(echo.url), "identity_headers": headers}
    stack = await make_stack(echo=echo, routes=[{**route, "assertion": True}])
    await login(browser, stack)
    status, seen = await echo_headers(browser, stack.url + "/x")
    assert status == 200
    assert seen["x-provider"] == "default"
    assert seen["x-issuer"] == stack.idp.issuer
    claims = jwt.decode(seen["x-gateway-assertion"], options={"verify_signature": False})
    assert (claims["provider"], claims["provider_iss"]) == ("default", stack.idp.issuer)
    # /oauth2/userinfo answers as it did before there could be several providers.
    status, me = await call(browser, stack.url + "/oauth2/userinfo")
    assert status == 200
    assert "provider" not in me and "iss" not in me and me["sub"] == "alice"

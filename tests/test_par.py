"""Pushed authorization requests (RFC 9126): ``par: auto | required | off`` against the dev
provider with and without a PAR endpoint, the browser URL, the pushed parameters, failures
of the PAR endpoint, ``check-config --probe``, and the dev provider's own PAR checks.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import aiohttp
import pytest
import yaml

from gateway import keys
from gateway.devidp import ClientRegistration, DevIdpConfig, demo_users, start_devidp
from gateway.devidp.par import PAR_TTL, URN
from gateway.oidc import par
from gateway.oidc.metadata import ProviderMetadata
from gateway.oidc.par import ParUnavailable
from tests.conftest import (
    CLIENT_ID,
    CLIENT_SECRET,
    RedisServer,
    Stack,
    StackFactory,
    gateway_config,
)
from tests.gateway_proc import start_gateway_process
from tests.idp_client import FormParser, http_login
from tests.support.ports import free_port
from tests.support.processes import gateway

NAVIGATE = {"Accept": "text/html", "Sec-Fetch-Mode": "navigate"}
API = {"Accept": "application/json", "Sec-Fetch-Mode": "cors"}


def idp(mode: str) -> dict[str, Any]:
    return {"idp_config": {"pushed_authorization": mode}}


async def start(http: aiohttp.ClientSession, stack: Stack, rd: str = "/deep") -> str:
    """GET /oauth2/start; the Location it answers with (302 expected)."""
    async with http.get(
        stack.url + "/oauth2/start?rd=" + rd, headers=NAVIGATE, allow_redirects=False
    ) as resp:
        assert resp.status == 302, await resp.text()
        return resp.headers["Location"]


def query(url: str) -> dict[str, str]:
    return dict(parse_qsl(urlsplit(url).query, keep_blank_values=True))


async def sign_out(http: aiohttp.ClientSession, stack: Stack) -> None:
    async with http.get(stack.url + "/oauth2/sign_out") as resp:
        parser = FormParser()
        parser.feed(await resp.text())
    (form,) = parser.forms
    async with http.post(
        stack.url + "/oauth2/sign_out",
        data={name: value for _, name, value in form.fields},
        allow_redirects=False,
    ) as resp:
        assert resp.status == 303


@pytest.mark.parametrize("mode", ["enabled", "required"])
async def test_auto_pushes_and_the_browser_carries_only_client_id_and_request_uri(
    make_stack: StackFactory, browser: aiohttp.ClientSession, mode: str
) -> None:
    stack = await make_stack(
        **idp(mode),
        provider={"extra_auth_params": {"ui_locales": "de"}},
        session={"refresh_skew": "1h"},  # every request refreshes
    )
    state = stack.idp.state
    location = await start(browser, stack)
    assert location.startswith(stack.idp.url + "/authorize?")
    sent = query(location)
    assert set(sent) == {"client_id", "request_uri"}
    assert sent["client_id"] == CLIENT_ID
    assert sent["request_uri"].startswith(URN)
    # Everything else went through the back channel, authenticated.
    ((client_id, pushed, _),) = state.pushed_requests.values()
    assert client_id == CLIENT_ID
    # Exactly the parameters a plain request would carry in the browser's URL.
    provider = stack.app[keys.PROVIDER]
    plain = provider.authorization_url(await provider.metadata(), "st", "no", "ch")
    assert set(pushed) == set(query(plain))
    assert {
        "response_type", "client_id", "redirect_uri", "scope", "state", "nonce",
        "code_challenge", "code_challenge_method", "ui_locales",
    } <= set(pushed)  # fmt: skip
    assert pushed["redirect_uri"] == stack.url + "/oauth2/callback"
    assert pushed["code_challenge_method"] == "S256" and len(pushed["code_challenge"]) == 43
    assert pushed["scope"] == "openid email profile offline_access"
    assert pushed["ui_locales"] == "de"
    assert state.par_calls == 1

    # The login goes on from there: the state cookie, state, nonce and PKCE work as ever.
    result = await http_login(browser, location, "alice", "alice")
    assert result.status == 200, result.body
    assert result.url == stack.url + "/deep"
    assert state.token_calls["authorization_code"] == 1
    async with browser.get(stack.url + "/x", headers=API) as resp:
        assert resp.status == 200
        seen = {k.lower(): v for k, v in (await resp.json())["headers"]}
    assert seen["x-forwarded-user"] == "alice"
    assert state.token_calls["refresh_token"] >= 1
    # The request_uri was used up.
    assert state.pushed_requests == {}
    async with browser.get(location, allow_redirects=False) as resp:
        assert resp.status == 400
        assert "Invalid request_uri" in await resp.text()

    await sign_out(browser, stack)
    assert len(state.revoked) == 2


async def test_auto_without_an_endpoint_sends_a_plain_request(
    make_stack: StackFactory, browser: aiohttp.ClientSession
) -> None:
    stack = await make_stack()  # the dev provider names no PAR endpoint by default
    sent = query(await start(browser, stack))
    assert {"state", "nonce", "code_challenge", "redirect_uri", "scope"} <= set(sent)
    assert "request_uri" not in sent
    assert stack.idp.state.par_calls == 0


async def test_off_never_pushes(make_stack: StackFactory, browser: aiohttp.ClientSession) -> None:
    stack = await make_stack(**idp("enabled"), provider={"par": "off"})
    sent = query(await start(browser, stack))
    assert "code_challenge" in sent and "request_uri" not in sent
    assert stack.idp.state.par_calls == 0


async def test_required_without_an_endpoint_starts_but_sign_in_is_503(
    make_stack: StackFactory, browser: aiohttp.ClientSession
) -> None:
    stack = await make_stack(provider={"par": "required"})
    async with browser.get(stack.url + "/healthz") as resp:
        assert resp.status == 200
    async with browser.get(stack.url + "/public/x") as resp:
        assert resp.status == 200  # public routes are served
    async with browser.get(stack.url + "/protected", allow_redirects=False) as resp:
        assert resp.status == 302
        assert resp.headers["Location"] == "/oauth2/start?rd=/protected"
    async with browser.get(stack.url + "/oauth2/start?rd=/protected") as resp:
        assert resp.status == 503
        assert "pushed authorization requests" in await resp.text()
    assert browser.cookie_jar.filter_cookies(stack.url) == {}  # no login-state cookie


@pytest.mark.parametrize(
    ("mode", "endpoint", "required", "expected"),
    [
        ("auto", "https://idp/par", False, "https://idp/par"),
        ("auto", None, False, None),
        ("auto", "https://idp/par", True, "https://idp/par"),
        ("auto", None, True, ParUnavailable),
        ("required", "https://idp/par", False, "https://idp/par"),
        ("required", None, False, ParUnavailable),
        ("off", "https://idp/par", False, None),
        ("off", "https://idp/par", True, None),  # the provider will refuse: probe says so
    ],
)
def test_auto_follows_the_metadata(
    mode: str, endpoint: str | None, required: bool, expected: Any
) -> None:
    meta = ProviderMetadata(
        issuer="https://idp",
        authorization_endpoint="https://idp/auth",
        token_endpoint="https://idp/token",
        pushed_authorization_request_endpoint=endpoint,
        require_pushed_authorization_requests=required,
    )
    if expected is ParUnavailable:
        with pytest.raises(ParUnavailable):
            par.endpoint(mode, meta)
    else:
        assert par.endpoint(mode, meta) == expected


async def test_a_refusing_par_endpoint_is_502_and_an_unreachable_one_503(
    make_stack: StackFactory, browser: aiohttp.ClientSession
) -> None:
    # The client is registered with another redirect_uri: the PAR endpoint says invalid_request.
    other = await start_devidp(
        DevIdpConfig(
            users=demo_users(),
            clients=[
                ClientRegistration(
                    client_id=CLIENT_ID,
                    client_secret=CLIENT_SECRET,
                    redirect_uris=("http://127.0.0.1:1/elsewhere",),
                )
            ],
            pushed_authorization="enabled",
        )
    )
    try:
        stack = await make_stack(idp=other)
        async with browser.get(
            stack.url + "/oauth2/start?rd=/x", headers=NAVIGATE, allow_redirects=False
        ) as resp:
            assert resp.status == 502
            assert "refused to start the sign-in" in await resp.text()
    finally:
        await other.close()
    closed = f"http://127.0.0.1:{free_port()}/par"
    stack = await make_stack(provider={"pushed_authorization_request_endpoint": closed})
    async with browser.get(
        stack.url + "/oauth2/start?rd=/x", headers=NAVIGATE, allow_redirects=False
    ) as resp:
        assert resp.status == 503
        assert resp.headers["Retry-After"] == "10"
    assert browser.cookie_jar.filter_cookies(stack.url) == {}


async def test_probe_fails_for_required_without_an_endpoint(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    plain = await start_devidp(DevIdpConfig(users=demo_users(), clients=[_client()]))
    pushing = await start_devidp(
        DevIdpConfig(users=demo_users(), clients=[_client()], pushed_authorization="enabled")
    )
    try:
        for provider, par, code, line in (
            (plain, "required", 1, "FAIL provider PAR: par: required, but the provider "
             "advertises no pushed_authorization_request_endpoint: /oauth2/start will answer 503"),
            (pushing, "auto", 0, f"ok   provider PAR: authorization requests are pushed to "
             f"{pushing.url}/par"),
        ):  # fmt: skip
            data = {
                "server": {"public_url": "https://app.example.com"},
                "provider": {
                    "issuer": provider.issuer,
                    "client_id": CLIENT_ID,
                    "client_secret": CLIENT_SECRET,
                    "par": par,
                },
                "session": {"redis_url": redis_server.url, "cookie_secrets": ["A" * 43 + "="]},
                "routes": [{"prefix": "/", "upstream": "http://127.0.0.1:8080"}],
            }
            path = tmp_path / "gw.yaml"
            path.write_text(yaml.safe_dump(data))
            rc, out, err = await gateway(
                "check-config", "--probe", "--config", str(path), cwd=tmp_path
            )
            assert rc == code, (out, err)
            assert line in out.splitlines(), out
    finally:
        await plain.close()
        await pushing.close()


def _client() -> ClientRegistration:
    return ClientRegistration(
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        redirect_uris=("https://app.example.com/oauth2/callback",),
    )


# -- the dev provider's PAR endpoint ---------------------------------------------------------


PUSH = {
    "response_type": "code",
    "client_id": CLIENT_ID,
    "redirect_uri": "https://app.example.com/oauth2/callback",
    "scope": "openid",
    "state": "s" * 22,
    "code_challenge": "c" * 43,
    "code_challenge_method": "S256",
}


async def test_dev_provider_par_endpoint() -> None:
    provider = await start_devidp(
        DevIdpConfig(users=demo_users(), clients=[_client()], pushed_authorization="required")
    )
    basic = base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
    auth = {"Authorization": "Basic " + basic}
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(provider.url + "/.well-known/openid-configuration") as resp:
                meta = await resp.json()
            assert meta["pushed_authorization_request_endpoint"] == provider.url + "/par"
            assert meta["require_pushed_authorization_requests"] is True
            assert "private_key_jwt" in meta["token_endpoint_auth_methods_supported"]

            async with http.post(provider.url + "/par", data=PUSH, headers=auth) as resp:
                assert resp.status == 201
                answer = await resp.json()
            assert answer["expires_in"] == PAR_TTL
            uri = answer["request_uri"]
            # A plain request is refused while PAR is required.
            async with http.get(provider.url + "/authorize", params=PUSH) as resp:
                assert resp.status == 400
                assert "Pushed authorization request required" in await resp.text()
            # Unauthenticated, or pushing a request_uri: refused.
            async with http.post(provider.url + "/par", data=PUSH) as resp:
                assert resp.status == 401
            async with http.post(
                provider.url + "/par", data={**PUSH, "request_uri": uri}, headers=auth
            ) as resp:
                assert (resp.status, (await resp.json())["error"]) == (400, "invalid_request")
            # Another client_id at the authorization endpoint: refused.
            use = {"client_id": "someone", "request_uri": uri}
            async with http.get(provider.url + "/authorize", params=use) as resp:
                assert resp.status == 400
            # Expired: the provider's clock moves past expires_in.
            async with http.post(provider.url + "/par", data=PUSH, headers=auth) as resp:
                late = (await resp.json())["request_uri"]
            real = provider.state.clock
            provider.state.clock = lambda: real() + PAR_TTL + 1
            async with http.get(
                provider.url + "/authorize", params={"client_id": CLIENT_ID, "request_uri": late}
            ) as resp:
                assert resp.status == 400
                assert "Invalid request_uri" in await resp.text()
    finally:
        await provider.close()


def test_dev_provider_config_checks_the_par_mode() -> None:
    cfg = DevIdpConfig(users=demo_users(), clients=[_client()], pushed_authorization="maybe")
    assert cfg.problems() == ["pushed_authorization must be one of off, enabled, required"]


async def test_dev_provider_without_par_still_answers_request_not_supported() -> None:
    provider = await start_devidp(DevIdpConfig(users=demo_users(), clients=[_client()]))
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(
                provider.url + "/authorize",
                params={**PUSH, "request_uri": URN + "x"},
                allow_redirects=False,
            ) as resp:
                assert resp.status == 302
                assert query(resp.headers["Location"])["error"] == "request_not_supported"
            async with http.post(provider.url + "/par", data=PUSH) as resp:
                assert resp.status == 404
    finally:
        await provider.close()


async def test_gateway_run_starts_with_par_required_and_no_endpoint(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    plain = await start_devidp(DevIdpConfig(users=demo_users(), clients=[_client()]))
    try:
        cfg = gateway_config(url, plain.issuer, "http://127.0.0.1:9", redis_server.url)
        cfg["server"]["port"] = port
        cfg["provider"]["par"] = "required"
        proc = await start_gateway_process(cfg, tmp_path)  # waits for /healthz 200
        try:
            async with aiohttp.ClientSession() as http:
                async with http.get(url + "/readyz") as resp:
                    assert resp.status == 200  # metadata loaded, store up: ready
                async with http.get(url + "/oauth2/start?rd=/", headers=NAVIGATE) as resp:
                    assert resp.status == 503
        finally:
            await proc.close()
        assert "par: required, but the provider advertises no" in proc.log()
    finally:
        await plain.close()

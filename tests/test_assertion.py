"""``X-Gateway-Assertion`` (issue 4 item 7): an ES256 JWT for routes with ``assertion: true``,
verified here the way an upstream would, with the gateway's own ``/.well-known/jwks.json``.

Also: key rotation (two keys published, the first signs), the ephemeral key when none is
configured, a client-sent assertion never reaching the upstream in any spelling, the
per-session reuse of a signed assertion, and ``check-config`` naming a bad key.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from gateway import keys
from gateway.assertion import AssertionKey, AssertionSigner, thumbprint
from gateway.cli import main as cli_main
from gateway.config import ConfigError, validate
from gateway.echo import RunningEcho, start_echo
from gateway.session import Identity
from tests.conftest import CLIENT_ID, CLIENT_SECRET, Stack, gateway_config
from tests.support.calls import API, login, upstream_headers

HEADER = "x-gateway-assertion"


def pem_of(key: Any) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def new_pem() -> str:
    return pem_of(ec.generate_private_key(ec.SECP256R1()))


@pytest.fixture
async def echo() -> AsyncIterator[RunningEcho]:
    running = await start_echo()
    yield running
    await running.close()


def routes(echo: RunningEcho, **extra: Any) -> list[dict[str, Any]]:
    url = str(echo.url)
    return [
        {"prefix": "/", "upstream": url, "assertion": True, **extra},
        {"prefix": "/plain", "upstream": url},
        {"prefix": "/public", "upstream": url, "auth": "none", "assertion": True},
        {"prefix": "/other", "upstream": url + "/svc/", "assertion": True},
    ]


async def jwks_of(stack: Stack) -> tuple[dict[str, Any], dict[str, str]]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(stack.url + "/.well-known/jwks.json") as resp,
    ):
        assert resp.status == 200
        assert resp.content_type == "application/json"
        return await resp.json(), dict(resp.headers)


def verify(token: str, jwks: dict[str, Any], audience: str, issuer: str) -> dict[str, Any]:
    """What an upstream does: pick the key by kid from the JWKS, check alg, iss, aud, exp."""
    header = jwt.get_unverified_header(token)
    key = jwt.PyJWKSet.from_dict(jwks)[header["kid"]]
    claims: dict[str, Any] = jwt.decode(
        token,
        key.key,
        algorithms=["ES256"],
        audience=audience,
        issuer=issuer,
        options={"require": ["exp", "iat", "iss", "aud", "sub", "jti"]},
    )
    return claims


async def call(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    """An API call through the gateway: status and the echo's JSON view."""
    async with http.get(url, headers={**API, **(headers or {})}, allow_redirects=False) as resp:
        text = await resp.text()
        return resp.status, json.loads(text) if resp.content_type == "application/json" else {}


async def assertion_at(http: aiohttp.ClientSession, url: str, **kw: Any) -> str | None:
    status, body = await call(http, url, **kw)
    assert status == 200, body
    return upstream_headers(body).get(HEADER)


async def test_assertion_verifies_with_the_gateway_jwks(
    make_stack: Any, echo: RunningEcho, browser: aiohttp.ClientSession
) -> None:
    first, second = new_pem(), new_pem()
    stack = await make_stack(
        echo=echo, routes=routes(echo), assertion={"signing_keys": [first, second]}
    )
    await login(browser, stack)
    token = await assertion_at(browser, stack.url + "/x")
    assert token is not None

    jwks, headers = await jwks_of(stack)
    assert headers["Cache-Control"] == "public, max-age=300"
    # Rotation: both keys are published, the first one signs.
    kids = [k["kid"] for k in jwks["keys"]]
    first_kid = AssertionKey.from_pem(first).kid
    assert kids == [first_kid, AssertionKey.from_pem(second).kid]
    for k in jwks["keys"]:
        assert (k["kty"], k["crv"], k["alg"], k["use"]) == ("EC", "P-256", "ES256", "sig")
        assert "d" not in k  # never the private part
        assert k["kid"] == thumbprint(k)  # RFC 7638: the same kid in every replica

    header = jwt.get_unverified_header(token)
    assert header == {"alg": "ES256", "kid": first_kid, "typ": "JWT"}
    claims = verify(token, jwks, audience=str(echo.url), issuer=stack.url)
    assert claims["sub"] == "alice"
    assert claims["email"] == "alice@example.com"
    assert claims["groups"] == ["admins", "staff"]
    assert 0 < claims["exp"] - claims["iat"] <= 60
    assert abs(claims["iat"] - time.time()) < 30
    assert len(claims["jti"]) >= 16

    # The audience is the route's upstream: another route's assertion is not valid here.
    other = await assertion_at(browser, stack.url + "/other/x")
    assert other is not None
    assert verify(other, jwks, audience=str(echo.url) + "/svc", issuer=stack.url)["sub"] == "alice"
    with pytest.raises(jwt.InvalidAudienceError):
        verify(other, jwks, audience=str(echo.url), issuer=stack.url)

    # Routes without assertion: true get none; the public route has nobody to assert.
    assert await assertion_at(browser, stack.url + "/plain/x") is None
    assert await assertion_at(browser, stack.url + "/public/x") is None


async def test_configured_issuer_and_ttl(
    make_stack: Any, echo: RunningEcho, browser: aiohttp.ClientSession
) -> None:
    stack = await make_stack(
        echo=echo,
        routes=routes(echo),
        assertion={"signing_keys": [new_pem()], "issuer": "https://gw.example", "ttl": "20s"},
    )
    await login(browser, stack, "bob")
    token = await assertion_at(browser, stack.url + "/x")
    assert token is not None
    claims = verify(token, (await jwks_of(stack))[0], str(echo.url), "https://gw.example")
    assert claims["sub"] == "bob"
    assert claims["groups"] == ["staff"]
    assert claims["exp"] - claims["iat"] == 20


@pytest.mark.parametrize(
    "spelling", ["X-Gateway-Assertion", "x-gateway-assertion", "X_Gateway_Assertion"]
)
async def test_a_client_sent_assertion_never_reaches_the_upstream(
    make_stack: Any, echo: RunningEcho, browser: aiohttp.ClientSession, spelling: str
) -> None:
    stack = await make_stack(
        echo=echo, routes=routes(echo), assertion={"signing_keys": [new_pem()]}
    )
    forged = jwt.encode({"sub": "admin"}, "k" * 32, algorithm="HS256")
    spoof = {spelling: forged, "Connection": "X-Gateway-Assertion"}
    # Before login, on a public route and an unauthenticated request.
    async with aiohttp.ClientSession() as anon:
        status, body = await call(anon, stack.url + "/public/x", headers=spoof)
        assert status == 200
        assert forged not in json.dumps(body)
        assert HEADER not in upstream_headers(body)
        assert "x_gateway_assertion" not in upstream_headers(body)
    await login(browser, stack)
    for path in ("/x", "/plain/x", "/public/x"):
        status, body = await call(browser, stack.url + path, headers=spoof)
        assert status == 200, body
        assert forged not in json.dumps(body), path
        values = [v for k, v in body["headers"] if k.lower().replace("_", "-") == HEADER]
        assert len(values) == (1 if path == "/x" else 0), path


async def test_no_key_configured_signs_with_an_ephemeral_key_and_warns(
    make_stack: Any,
    echo: RunningEcho,
    browser: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.assertion")
    stack = await make_stack(echo=echo, routes=routes(echo))
    warned = [r.getMessage() for r in caplog.records if r.name == "gateway.assertion"]
    assert len(warned) == 1
    assert "ephemeral" in warned[0] and "restart" in warned[0] and "replica" in warned[0]
    assert stack.app[keys.ASSERTION].ephemeral
    await login(browser, stack)
    token = await assertion_at(browser, stack.url + "/x")
    assert token is not None
    jwks, _ = await jwks_of(stack)
    assert len(jwks["keys"]) == 1
    assert verify(token, jwks, str(echo.url), stack.url)["sub"] == "alice"


async def test_no_assertion_routes_no_keys_an_empty_key_set(
    stack: Stack, browser: aiohttp.ClientSession
) -> None:
    assert (await jwks_of(stack))[0] == {"keys": []}
    await login(browser, stack)
    assert await assertion_at(browser, stack.url + "/x") is None


async def test_the_signed_assertion_is_reused_briefly_per_session(
    make_stack: Any, echo: RunningEcho, browser: aiohttp.ClientSession
) -> None:
    stack = await make_stack(
        echo=echo, routes=routes(echo), assertion={"signing_keys": [new_pem()]}
    )
    await login(browser, stack)
    a = await assertion_at(browser, stack.url + "/x")
    b = await assertion_at(browser, stack.url + "/y")
    # Same session, same audience, within the reuse window: the same signed token.
    assert a == b
    async with aiohttp.ClientSession(
        cookie_jar=aiohttp.CookieJar(unsafe=True),
        headers={"Accept": "text/html", "Sec-Fetch-Mode": "navigate"},
    ) as other:
        await login(other, stack)
        c = await assertion_at(other, stack.url + "/x")
    # Another session of the same user gets its own.
    assert c is not None and c != a


def test_signer_cache_window_and_identity_change() -> None:
    now = [1000.0]
    signer = AssertionSigner([AssertionKey.generate()], "https://gw", 60, clock=lambda: now[0])
    alice = Identity("alice", {"email": "a@example.com", "groups": ["staff"]})
    first = signer.assertion(alice, "http://up", "s1")
    now[0] += 4.9
    assert signer.assertion(alice, "http://up", "s1") == first
    # A different audience or session never shares a token.
    assert signer.assertion(alice, "http://other", "s1") != first
    assert signer.assertion(alice, "http://up", "s2") != first
    # A refresh that changed the groups: a new assertion at once.
    promoted = Identity("alice", {"email": "a@example.com", "groups": ["staff", "admins"]})
    renewed = signer.assertion(promoted, "http://up", "s1")
    assert renewed != first
    assert jwt.decode(renewed, options={"verify_signature": False})["groups"] == ["staff", "admins"]
    # After the reuse window (at most a quarter of the lifetime) a fresh one.
    now[0] += 5.1
    later = signer.assertion(promoted, "http://up", "s1")
    assert later != renewed
    claims = jwt.decode(later, options={"verify_signature": False})
    assert claims["iat"] == int(now[0]) and claims["exp"] == int(now[0]) + 60
    # No session (bearer clients): signed every time, never cached.
    assert signer.assertion(alice, "http://up", None) != signer.assertion(alice, "http://up", None)
    short = AssertionSigner([AssertionKey.generate()], "https://gw", 8, clock=lambda: now[0])
    assert short.reuse == 2.0


# -- configuration ----------------------------------------------------------------------------


def base_config(**assertion: Any) -> dict[str, Any]:
    cfg = gateway_config("http://127.0.0.1:4180", "http://127.0.0.1:1", "http://127.0.0.1:2", None)
    cfg["assertion"] = assertion
    return cfg


def problems_of(cfg: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as err:
        validate(cfg, env={})
    return err.value.problems


def test_signing_keys_from_files_and_inline(tmp_path: Path) -> None:
    path = tmp_path / "assertion.pem"
    pem = new_pem()
    path.write_text(pem)
    settings = validate(base_config(signing_keys=[str(path), new_pem()]), env={})
    loaded = settings.assertion.signing_keys
    assert loaded[0].get_secret_value() == pem
    assert "PRIVATE KEY" not in repr(settings)  # SecretStr: never in a repr or a log line
    sec1 = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    assert validate(base_config(signing_keys=[sec1.decode()]), env={}).assertion.signing_keys


def test_bad_keys_are_named_by_index(tmp_path: Path) -> None:
    rsa_pem = pem_of(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    p384 = pem_of(ec.generate_private_key(ec.SECP384R1()))
    garbage = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"
    not_pem = tmp_path / "key.der"
    not_pem.write_bytes(b"\x30\x82\x01\xff" * 10)
    problems = problems_of(
        base_config(
            signing_keys=[
                new_pem(),
                str(tmp_path / "missing.pem"),
                rsa_pem,
                p384,
                garbage,
                str(not_pem),
                "",
            ]
        )
    )
    for i in range(1, 7):
        assert sum(p.startswith(f"assertion.signing_keys[{i}]: ") for p in problems) == 1, (
            i,
            problems,
        )
    assert not any(p.startswith("assertion.signing_keys[0]") for p in problems)
    assert any("cannot read the key file" in p for p in problems)
    assert all("P-256" in p for p in problems if "cannot read" not in p)
    # A bad key is never echoed back: not its PEM, not a fragment of it.
    text = "\n".join(problems)
    assert "AAAA" not in text and "BEGIN" not in text and rsa_pem[40:80] not in text


def test_ttl_over_a_minute_is_refused() -> None:
    assert any(p.startswith("assertion.ttl: ") for p in problems_of(base_config(ttl="2m")))
    assert any(p.startswith("assertion.ttl: ") for p in problems_of(base_config(ttl=0)))


def test_check_config_rejects_an_unreadable_key_and_redacts_good_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [n for n in __import__("os").environ if n.startswith("GATEWAY_")]:
        monkeypatch.delenv(name)
    good = new_pem()
    cfg = base_config(signing_keys=[good, str(tmp_path / "nope.pem")])
    path = tmp_path / "gateway.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    with pytest.raises(SystemExit) as exited:
        cli_main(["check-config", "--config", str(path)])
    assert exited.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"{path}: assertion.signing_keys[1]: cannot read the key file (No such file or directory)"
    ]

    cfg["assertion"]["signing_keys"] = [good]
    path.write_text(json.dumps(cfg))
    assert cli_main(["check-config", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    printed = json.loads(out)
    assert printed["assertion"]["signing_keys"] == ["**********"]
    assert "PRIVATE KEY" not in out and CLIENT_SECRET not in out


async def test_a_bearer_client_gets_an_assertion_too(make_stack: Any, echo: RunningEcho) -> None:
    """``accept_bearer`` + ``assertion``: an API client's own token, no session; the upstream
    still receives one signed statement of who called."""
    stack = await make_stack(
        echo=echo,
        routes=[
            {"prefix": "/", "upstream": str(echo.url), "accept_bearer": True, "assertion": True}
        ],
        assertion={"signing_keys": [new_pem()]},
    )
    token = stack.idp.state.issue_access_token("bob", CLIENT_ID, "openid email", 300)
    async with aiohttp.ClientSession() as client:
        status, body = await call(client, stack.url + "/x", {"Authorization": f"Bearer {token}"})
    assert status == 200, body
    assertion = upstream_headers(body)[HEADER]
    claims = verify(assertion, (await jwks_of(stack))[0], str(echo.url), stack.url)
    assert claims["sub"] == "bob"

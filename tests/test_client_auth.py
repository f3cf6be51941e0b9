"""private_key_jwt (RFC 7523 §2.2): the assertion the gateway signs, ``gateway client-jwks``,
the config checks, and the dev provider that verifies assertions on every back-channel call
(code exchange, refresh, revocation at sign-out, introspection of a bearer token).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from gateway.cli import main as cli_main
from gateway.config import ConfigError, redacted, validate
from gateway.devidp import ClientRegistration, DevIdpConfig, demo_users, start_devidp
from gateway.echo import start_echo
from gateway.oidc.client_auth import (
    ASSERTION_TYPE,
    ClientAssertions,
    ClientKey,
    audience,
    jwk_thumbprint,
)
from tests.conftest import CLIENT_ID, StackFactory
from tests.idp_client import FormParser, http_login
from tests.support.client_keys import certificate, ec_pem, rsa_pem
from tests.support.ports import free_port

PRIVATE_MEMBERS = {"d", "p", "q", "dp", "dq", "qi"}
ISSUER = "https://idp.example.com"


def settings_data(**provider: Any) -> dict[str, Any]:
    return {
        "server": {"public_url": "https://app.example.com"},
        "provider": {"issuer": ISSUER, "client_id": CLIENT_ID, **provider},
        "session": {"store": "memory", "cookie_secrets": ["A" * 43 + "="]},
        "routes": [{"prefix": "/", "upstream": "http://127.0.0.1:8080"}],
    }


def problems(**provider: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        validate(settings_data(**provider), env={})
    return info.value.problems


def public_key(jwk: dict[str, Any]) -> Any:
    text = json.dumps(jwk)
    return RSAAlgorithm.from_jwk(text) if jwk["kty"] == "RSA" else ECAlgorithm.from_jwk(text)


# -- the assertion ---------------------------------------------------------------------------


@pytest.mark.parametrize(("make", "alg"), [(rsa_pem, "RS256"), (ec_pem, "ES256")])
def test_the_assertion_carries_exactly_the_rfc_7523_claims(make: Any, alg: str) -> None:
    settings = validate(
        settings_data(client_auth_method="private_key_jwt", client_private_key=make()), env={}
    )
    signer = ClientAssertions.from_settings(settings.provider, clock=lambda: 1_700_000_000.7)
    assert signer is not None
    form = signer.form(ISSUER)
    assert set(form) == {"client_assertion_type", "client_assertion"}
    assert form["client_assertion_type"] == ASSERTION_TYPE
    token = form["client_assertion"]
    (jwk,) = signer.jwks()["keys"]
    header = jwt.get_unverified_header(token)
    assert header == {"alg": alg, "kid": jwk["kid"], "typ": "JWT"}
    claims = jwt.decode(
        token, public_key(jwk), algorithms=[alg], audience=ISSUER, options={"verify_exp": False}
    )
    assert set(claims) == {"iss", "sub", "aud", "jti", "iat", "exp"}
    assert claims["iss"] == claims["sub"] == CLIENT_ID
    assert claims["aud"] == ISSUER
    assert claims["iat"] == 1_700_000_000
    assert claims["exp"] == 1_700_000_060  # at most 60 s ahead
    assert len(claims["jti"]) >= 32


def test_every_assertion_has_a_fresh_jti() -> None:
    signer = ClientAssertions(CLIENT_ID, [ClientKey.from_pem(ec_pem())], clock=lambda: 1000.0)
    tokens = [signer.sign(ISSUER) for _ in range(50)]
    jtis = {jwt.decode(t, options={"verify_signature": False})["jti"] for t in tokens}
    assert len(jtis) == 50


def test_kid_is_the_rfc_7638_thumbprint() -> None:
    # RFC 7638 §3.1: the example RSA key and its thumbprint.
    example = {
        "kty": "RSA",
        "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6"
        "tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65Y"
        "GjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-"
        "bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
        "e": "AQAB",
        "alg": "RS256",
        "kid": "2011-04-29",
    }
    assert jwk_thumbprint(example) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
    key = ClientKey.from_pem(rsa_pem())
    assert key.kid == jwk_thumbprint(key.public_jwk)


def test_the_configured_alg_signs() -> None:
    settings = validate(
        settings_data(
            client_auth_method="private_key_jwt",
            client_private_key=rsa_pem(),
            client_signing_alg="PS256",
        ),
        env={},
    )
    signer = ClientAssertions.from_settings(settings.provider)
    assert signer is not None
    assert jwt.get_unverified_header(signer.sign(ISSUER))["alg"] == "PS256"
    assert signer.jwks()["keys"][0]["alg"] == "PS256"


def test_the_audience_follows_client_assertion_audience() -> None:
    urls = {"issuer": ISSUER, "token_endpoint": ISSUER + "/token", "endpoint": ISSUER + "/revoke"}
    assert audience("issuer", **urls) == ISSUER
    assert audience("token_endpoint", **urls) == ISSUER + "/token"
    assert audience("endpoint", **urls) == ISSUER + "/revoke"
    # A provider configured without an issuer: its token endpoint names it (RFC 7523 §3).
    assert audience("issuer", **{**urls, "issuer": ""}) == ISSUER + "/token"


def test_a_certificate_adds_its_thumbprints_and_nbf_for_entra_id() -> None:
    import base64
    import hashlib

    from cryptography import x509

    pems = [rsa_pem(), rsa_pem()]
    cert = certificate(pems[0])
    der = x509.load_pem_x509_certificate(cert.encode()).public_bytes(serialization.Encoding.DER)
    settings = validate(
        settings_data(
            client_private_key=pems,
            client_certificate=cert,
            client_signing_alg="PS256",
            client_assertion_audience="token_endpoint",
        ),
        env={},
    )
    signer = ClientAssertions.from_settings(settings.provider, clock=lambda: 1_700_000_000.0)
    assert signer is not None
    token = signer.sign(ISSUER + "/oauth2/v2.0/token")
    first, second = signer.jwks()["keys"]
    header = jwt.get_unverified_header(token)
    sha256 = base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()
    sha1 = base64.urlsafe_b64encode(hashlib.sha1(der).digest()).rstrip(b"=").decode()
    assert header == {
        "alg": "PS256", "kid": first["kid"], "typ": "JWT", "x5t#S256": sha256, "x5t": sha1,
    }  # fmt: skip
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["nbf"] == claims["iat"] == 1_700_000_000
    assert first["x5c"] == [base64.b64encode(der).decode()] and first["x5t#S256"] == sha256
    assert "x5c" not in second  # no certificate for the second key
    shown = redacted(settings)["provider"]["client_certificate"]
    assert len(shown) == 1 and shown[0].startswith("CN=gateway (valid until ")


def test_a_certificate_must_belong_to_a_key() -> None:
    assert problems(client_private_key=rsa_pem(), client_certificate=certificate(rsa_pem())) == [
        "provider.client_certificate: certificate is not for any client_private_key"
    ]
    assert problems(client_secret="s3cret", client_certificate=certificate(ec_pem())) == [
        "provider.client_certificate: only used with client_auth_method private_key_jwt, "
        "not client_secret_basic"
    ]
    (found,) = problems(client_private_key=ec_pem(), client_certificate="not a pem")
    assert found.startswith("provider.client_certificate: cannot read the certificate file")


# -- gateway client-jwks ---------------------------------------------------------------------


def test_client_jwks_prints_every_public_key_and_nothing_private(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "new.pem").write_text(rsa_pem())
    old = ec_pem()
    data = settings_data(
        client_auth_method="private_key_jwt",
        client_private_key=[str(tmp_path / "new.pem"), old],
    )
    (tmp_path / "gw.yaml").write_text(yaml.safe_dump(data))
    assert cli_main(["client-jwks", "--config", str(tmp_path / "gw.yaml")]) == 0
    out = capsys.readouterr().out
    keys = json.loads(out)["keys"]
    assert [(k["kty"], k["alg"], k["use"]) for k in keys] == [
        ("RSA", "RS256", "sig"),
        ("EC", "ES256", "sig"),
    ]
    assert set(keys[0]) == {"kty", "n", "e", "kid", "alg", "use"}
    assert set(keys[1]) == {"kty", "crv", "x", "y", "kid", "alg", "use"}
    for key in keys:
        assert not PRIVATE_MEMBERS & set(key)
        assert key["kid"] == jwk_thumbprint(key)
    assert "PRIVATE" not in out
    # The first key signs, and the provider finds it by the kid in the header.
    settings = validate(data, env={})
    signer = ClientAssertions.from_settings(settings.provider)
    assert signer is not None
    assert jwt.get_unverified_header(signer.sign(ISSUER))["kid"] == keys[0]["kid"]


def test_client_jwks_without_a_key_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "gw.yaml").write_text(yaml.safe_dump(settings_data(client_secret="s3cret")))
    assert cli_main(["client-jwks", "--config", str(tmp_path / "gw.yaml")]) == 2
    assert "provider.client_private_key: not set" in capsys.readouterr().err


# -- config ----------------------------------------------------------------------------------


def test_private_key_jwt_without_a_key_names_the_key() -> None:
    assert problems(client_auth_method="private_key_jwt") == [
        "provider.client_private_key: client_auth_method private_key_jwt needs "
        "client_private_key (a PEM file path or inline PEM)"
    ]


def test_a_key_that_does_not_parse_is_named_and_never_echoed(tmp_path: Path) -> None:
    junk = "-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n"
    (found,) = problems(client_auth_method="private_key_jwt", client_private_key=junk)
    assert found.startswith("provider.client_private_key: must be an unencrypted RSA")
    assert "bm90IGEga2V5" not in found
    (found,) = problems(client_private_key=str(tmp_path / "missing.pem"))
    assert found == (
        "provider.client_private_key: cannot read the key file (No such file or directory)"
    )
    (found,) = problems(client_private_key=[rsa_pem(), ec_pem(ec.SECP384R1())])
    assert found.startswith("provider.client_private_key: key 2 of 2: must be an unencrypted")
    (found,) = problems(client_private_key=rsa_pem(1024))
    assert found == (
        "provider.client_private_key: an RSA key needs 2048 bits or more, this one has 1024"
    )


def test_the_alg_must_fit_every_key() -> None:
    (found,) = problems(client_private_key=[ec_pem(), rsa_pem()], client_signing_alg="ES256")
    assert found == (
        "provider.client_signing_alg: ES256 does not fit the RSA key (key 2); use one of "
        "RS256, RS384, RS512, PS256, PS384, PS512"
    )


def test_method_and_key_must_agree() -> None:
    assert problems(client_secret="s3cret", client_private_key=rsa_pem()) == [
        "provider.client_private_key: only used with client_auth_method private_key_jwt, "
        "not client_secret_basic"
    ]
    assert problems(
        client_auth_method="private_key_jwt", client_secret="s3cret", client_private_key=ec_pem()
    ) == ["provider.client_secret: not used with client_auth_method private_key_jwt"]
    # A key alone means private_key_jwt; the default scheme is unchanged otherwise.
    only_key = validate(settings_data(client_private_key=ec_pem()), env={})
    assert only_key.provider.effective_auth_method == "private_key_jwt"
    secret = validate(settings_data(client_secret="s3cret"), env={})
    assert secret.provider.effective_auth_method == "client_secret_basic"


def test_check_config_shows_the_keys_redacted() -> None:
    pems = [rsa_pem(), ec_pem()]
    settings = validate(settings_data(client_private_key=pems), env={})
    shown = json.dumps(redacted(settings))
    assert redacted(settings)["provider"]["client_private_key"] == ["**********"] * 2
    assert "PRIVATE KEY" not in shown
    assert all(line not in shown for pem in pems for line in pem.splitlines()[1:-1])
    assert pems[0] not in repr(settings)


# -- against the dev provider ----------------------------------------------------------------


async def private_key_jwt_stack(
    make_stack: StackFactory, pem: str | list[str], jwks: dict[str, Any], **overrides: Any
) -> Any:
    """Dev provider with a private_key_jwt client registered with ``jwks``, and a gateway."""
    port = overrides.pop("port")
    url = f"http://127.0.0.1:{port}"
    idp = await start_devidp(
        DevIdpConfig(
            users=demo_users(),
            clients=[
                ClientRegistration(
                    client_id=CLIENT_ID,
                    client_secret=None,
                    token_endpoint_auth_method="private_key_jwt",
                    jwks=jwks,
                    redirect_uris=(url + "/oauth2/callback",),
                    post_logout_redirect_uris=(url + "/oauth2/signed_out",),
                )
            ],
            **overrides.pop("idp_config", {}),
        )
    )
    provider = {
        "client_secret": None,
        "client_auth_method": "private_key_jwt",
        "client_private_key": pem,
        **overrides.pop("provider", {}),
    }
    stack = await make_stack(idp=idp, port=port, provider=provider, **overrides)
    stack.extra.append(idp)
    return stack


@pytest.fixture
async def closing() -> Any:
    items: list[Any] = []
    yield items
    for item in items:
        await item.close()


API = {"Accept": "application/json", "Sec-Fetch-Mode": "cors"}


@pytest.mark.parametrize("aud", ["issuer", "endpoint"])
async def test_login_refresh_introspection_and_sign_out_authenticate_with_assertions(
    make_stack: StackFactory, browser: aiohttp.ClientSession, closing: list[Any], aud: str
) -> None:
    pems = [ec_pem(), rsa_pem()]  # the first signs; the second (e.g. the previous) is published
    signing, previous = ClientKey.from_pem(pems[0]), ClientKey.from_pem(pems[1])
    echo = await start_echo()
    closing.append(echo)
    stack = await private_key_jwt_stack(
        make_stack,
        pems,
        {"keys": [signing.public_jwk, previous.public_jwk]},
        port=free_port(),
        echo=echo,
        idp_config={"access_token_format": "opaque"},
        provider={"client_assertion_audience": aud},
        session={"refresh_skew": "1h"},  # every request refreshes
        routes=[{"prefix": "/", "upstream": str(echo.url), "accept_bearer": True}],
    )
    closing.append(stack.idp)
    state = stack.idp.state
    result = await http_login(browser, stack.url + "/", "alice", "alice")
    assert result.status == 200, result.body
    async with browser.get(stack.url + "/again", headers=API) as resp:
        assert resp.status == 200
        seen = {k.lower(): v for k, v in (await resp.json())["headers"]}
    # The landing page after the callback and this request: each refreshed.
    assert state.token_calls == {"authorization_code": 1, "refresh_token": 2}
    # An API client's own opaque token: the gateway introspects it, authenticated the same way.
    access = seen["authorization"].removeprefix("Bearer ")
    async with aiohttp.ClientSession() as api:
        async with api.get(
            stack.url + "/api-call", headers={**API, "Authorization": f"Bearer {access}"}
        ) as resp:
            assert resp.status == 200
    assert state.introspect_calls == 1

    async with browser.get(stack.url + "/oauth2/sign_out") as resp:
        parser = FormParser()
        parser.feed(await resp.text())
    (form,) = parser.forms
    async with browser.post(
        stack.url + "/oauth2/sign_out",
        data={name: value for _, name, value in form.fields},
        allow_redirects=False,
    ) as resp:
        assert resp.status == 303
    assert len(state.revoked) == 2  # access and refresh token, each revoked

    # code exchange, two refreshes, introspection, two revocations: six assertions, all fresh.
    made = state.client_assertions
    assert len(made) == 6
    assert {a["header"]["kid"] for a in made} == {signing.kid}
    assert {a["header"]["alg"] for a in made} == {"ES256"}
    for a in made:
        claims = a["claims"]
        assert claims["iss"] == claims["sub"] == CLIENT_ID
        assert claims["exp"] - claims["iat"] == 60
    assert len({a["claims"]["jti"] for a in made}) == 6
    issuer = stack.idp.issuer
    if aud == "issuer":
        assert [a["claims"]["aud"] for a in made] == [issuer] * 6
    else:  # the URL each assertion was sent to
        assert [a["claims"]["aud"].removeprefix(issuer) for a in made] == [
            "/token", "/token", "/token", "/introspect", "/revoke", "/revoke",
        ]  # fmt: skip


# -- the dev provider's checks ---------------------------------------------------------------


@pytest.fixture
async def key_idp() -> Any:
    key = ClientKey.from_pem(rsa_pem())
    idp = await start_devidp(
        DevIdpConfig(
            users=demo_users(),
            clients=[
                ClientRegistration(
                    client_id=CLIENT_ID,
                    client_secret=None,
                    token_endpoint_auth_method="private_key_jwt",
                    jwks={"keys": [key.public_jwk]},
                    redirect_uris=("http://127.0.0.1:1/oauth2/callback",),
                )
            ],
        )
    )
    yield idp, key
    await idp.close()


async def _revoke(idp: Any, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http:
        async with http.post(idp.url + "/revoke", data={"token": "t", **form}) as resp:
            text = await resp.text()
            return resp.status, json.loads(text) if text else {}


def _assertion(key: ClientKey, **claims: Any) -> dict[str, str]:
    import secrets
    import time

    now = int(time.time())
    body = {
        "iss": CLIENT_ID,
        "sub": CLIENT_ID,
        "aud": "",
        "jti": secrets.token_urlsafe(16),
        "iat": now,
        "exp": now + 60,
        **claims,
    }
    body = {k: v for k, v in body.items() if v is not None}
    token = jwt.encode(body, key.private, algorithm=key.alg, headers={"kid": key.kid})
    return {"client_assertion_type": ASSERTION_TYPE, "client_assertion": token}


async def test_the_dev_provider_verifies_each_assertion(key_idp: Any) -> None:
    idp, key = key_idp
    good = _assertion(key, aud=idp.issuer)
    assert (await _revoke(idp, good))[0] == 200
    # Single-use jti.
    assert await _revoke(idp, good) == (
        401,
        {"error": "invalid_client", "error_description": "client assertion jti was already used"},
    )
    # RFC 7523 §3: the token endpoint URL is an acceptable audience too.
    assert (await _revoke(idp, _assertion(key, aud=idp.issuer + "/token")))[0] == 200
    refused = [
        _assertion(key, aud="https://elsewhere.example"),
        _assertion(key, aud=idp.issuer, exp=1),
        _assertion(key, aud=idp.issuer, sub="someone-else"),
        _assertion(key, aud=idp.issuer, jti=None),
        _assertion(ClientKey.from_pem(rsa_pem()), aud=idp.issuer),  # unregistered key
        {**_assertion(key, aud=idp.issuer), "client_id": "another"},
        {**_assertion(key, aud=idp.issuer), "client_assertion_type": "urn:other"},
    ]
    forged = _assertion(key, aud=idp.issuer)
    head, body, sig = forged["client_assertion"].split(".")
    refused.append({**forged, "client_assertion": f"{head}.{body}.{sig[::-1]}"})
    for form in refused:
        status, answer = await _revoke(idp, form)
        assert (status, answer["error"]) == (401, "invalid_client"), form
    # A client registered for private_key_jwt cannot authenticate without an assertion.
    status, answer = await _revoke(idp, {"client_id": CLIENT_ID})
    assert (status, answer["error"]) == (401, "invalid_client")
    assert len(idp.state.client_assertions) == 2

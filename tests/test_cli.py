"""The ``gateway`` command, run as a real subprocess (``python -m gateway.cli``): gen-secret,
check-config (with and without --probe), and ``sessions list|revoke`` against real Redis."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from gateway.config import validate
from gateway.devidp import ClientRegistration, DevIdpConfig, demo_users, start_devidp
from gateway.devidp.config import Faults
from tests.conftest import CLIENT_ID, CLIENT_SECRET, SERVICE_LINKS, RedisServer, StackFactory
from tests.idp_client import http_login
from tests.support.ports import free_port
from tests.support.processes import gateway

REDIS_PASSWORD = "redis-pass-91c4e7"


def config(
    secret: str,
    *,
    issuer: str = "https://idp.example.com",
    redis_url: str = "redis://127.0.0.1:6379/0",
    **session: Any,
) -> dict[str, Any]:
    return {
        "server": {"public_url": "https://app.example.com"},
        "provider": {"issuer": issuer, "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET},
        "session": {"redis_url": redis_url, "cookie_secrets": [secret], **session},
        "routes": [{"prefix": "/", "upstream": "http://127.0.0.1:8080"}],
    }


def write(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


async def new_secret(tmp_path: Path) -> str:
    code, out, err = await gateway("gen-secret", cwd=tmp_path)
    assert code == 0, err
    return out.strip()


# -- gen-secret and check-config --------------------------------------------------------------


async def test_gen_secret_prints_a_secret_config_accepts(tmp_path: Path) -> None:
    first = await new_secret(tmp_path)
    second = await new_secret(tmp_path)
    assert first != second
    for secret in (first, second):
        assert len(secret) == 44
        assert secret.endswith("=")
    settings = validate(config(first), env={})
    assert settings.session.cookie_secrets[0].get_secret_value() == first


async def test_check_config_prints_redacted_json(tmp_path: Path) -> None:
    secret = await new_secret(tmp_path)
    redis_url = f"redis://:{REDIS_PASSWORD}@127.0.0.1:6379/0"
    path = write(tmp_path / "good.yaml", config(secret, redis_url=redis_url))
    code, out, err = await gateway("check-config", "--config", str(path), cwd=tmp_path)
    assert code == 0, err
    data = json.loads(out)
    assert data["provider"]["client_id"] == CLIENT_ID
    assert data["provider"]["client_secret"] == "**********"
    assert data["session"]["cookie_secrets"] == ["**********"]
    assert data["session"]["redis_url"] == "redis://:**********@127.0.0.1:6379/0"
    for text in (secret, CLIENT_SECRET, REDIS_PASSWORD):
        assert text not in out
        assert text not in err


async def test_check_config_bad_file_one_line_per_problem(tmp_path: Path) -> None:
    secret = await new_secret(tmp_path)
    data = config(secret, cookie_secure=False)  # __Host- cookie without Secure
    data["server"]["public_url"] = "https://app.example.com/sub"
    data["routes"][0]["upstreem"] = "http://127.0.0.1:1"
    path = write(tmp_path / "bad.yaml", data)
    code, out, err = await gateway("check-config", "--config", str(path), cwd=tmp_path)
    assert code == 2
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 3, err
    assert all(line.startswith(f"{path}: ") for line in lines)
    keys = [line.removeprefix(f"{path}: ").split(": ", 1)[0] for line in lines]
    assert sorted(keys) == ["routes[0].upstreem", "server.public_url", "session.cookie_name"]
    assert "Traceback" not in err
    assert secret not in err and CLIENT_SECRET not in err


async def test_check_config_missing_file_exits_2(tmp_path: Path) -> None:
    code, _, err = await gateway("check-config", "--config", "nope.yaml", cwd=tmp_path)
    assert code == 2
    assert "nope.yaml" in err and "cannot read the file" in err
    assert "Traceback" not in err


async def test_check_config_env_override(tmp_path: Path) -> None:
    path = write(tmp_path / "good.yaml", config(await new_secret(tmp_path)))
    code, out, err = await gateway(
        "check-config", "--config", str(path), cwd=tmp_path,
        env={"GATEWAY_SESSION__COOKIE_NAME": "__Host-from-env", "GATEWAY_SERVER__PORT": "8081"},
    )  # fmt: skip
    assert code == 0, err
    data = json.loads(out)
    assert data["session"]["cookie_name"] == "__Host-from-env"
    assert data["server"]["port"] == 8081


async def test_check_config_and_run_ignore_kubernetes_service_links(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    from gateway.echo import start_echo
    from tests.conftest import gateway_config
    from tests.gateway_proc import start_gateway_process

    path = write(tmp_path / "good.yaml", config(await new_secret(tmp_path)))
    code, out, err = await gateway(
        "check-config", "--config", str(path), cwd=tmp_path, env=SERVICE_LINKS
    )
    assert code == 0, err
    assert json.loads(out)["server"]["port"] == 4180
    # gateway run serves with them set: a browser signs in through it.
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    client = ClientRegistration(
        client_id=CLIENT_ID, client_secret=CLIENT_SECRET, redirect_uris=(url + "/oauth2/callback",)
    )
    async with (
        await start_devidp(DevIdpConfig(users=demo_users(), clients=[client])) as idp,
        aiohttp.ClientSession(
            cookie_jar=aiohttp.CookieJar(unsafe=True),
            headers={"Accept": "text/html", "Sec-Fetch-Mode": "navigate"},
        ) as http,
    ):
        echo = await start_echo()
        cfg = gateway_config(url, idp.url, str(echo.url), redis_server.url)
        cfg["server"]["port"] = port
        gw = await start_gateway_process(cfg, tmp_path, extra_env=SERVICE_LINKS)
        try:
            result = await http_login(http, url + "/whoami", "alice", "alice")
            assert result.status == 200, result.body
            async with http.get(url + "/whoami", headers={"Accept": "application/json"}) as resp:
                assert resp.status == 200
                seen = (await resp.json())["headers"]
            assert ["X-Forwarded-User", "alice"] in seen
        finally:
            await gw.close()
            await echo.close()


async def test_check_config_env_problem_names_the_variable_not_the_file(tmp_path: Path) -> None:
    path = write(tmp_path / "good.yaml", config(await new_secret(tmp_path)))
    env = {"GATEWAY_SERVER__PORT": "http", "GATEWAY_PORT": "tcp://10.0.0.1:4180"}
    code, out, err = await gateway("check-config", "--config", str(path), cwd=tmp_path, env=env)
    assert code == 2
    assert out == ""
    assert err.splitlines() == [
        "GATEWAY_SERVER__PORT (server.port): Input should be a valid integer, unable to parse "
        "string as an integer"
    ]


async def test_version_and_dash_dash_version(tmp_path: Path) -> None:
    from gateway import __version__

    for args in (("version",), ("--version",)):
        code, out, err = await gateway(*args, cwd=tmp_path)
        assert code == 0, err
        assert out == f"gateway {__version__}\n"


async def test_check_config_default_paths(tmp_path: Path) -> None:
    secret = await new_secret(tmp_path)
    elsewhere = write(tmp_path / "etc" / "gw.yaml", config(secret, key_prefix="from-env:"))
    code, out, err = await gateway(
        "check-config", cwd=tmp_path, env={"GATEWAY_CONFIG": str(elsewhere)}
    )
    assert code == 0, err
    assert json.loads(out)["session"]["key_prefix"] == "from-env:"
    # Neither --config nor $GATEWAY_CONFIG: config/gateway.yaml under the working directory.
    write(tmp_path / "config" / "gateway.yaml", config(secret, key_prefix="default:"))
    code, out, err = await gateway("check-config", cwd=tmp_path)
    assert code == 0, err
    assert json.loads(out)["session"]["key_prefix"] == "default:"
    # --config wins over $GATEWAY_CONFIG.
    code, out, err = await gateway(
        "check-config", "--config", "config/gateway.yaml", cwd=tmp_path,
        env={"GATEWAY_CONFIG": str(elsewhere)},
    )  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["session"]["key_prefix"] == "default:"


# -- check-config --probe ------------------------------------------------------------------------


def probe_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith(("ok ", "FAIL "))]


async def test_probe_all_ok(tmp_path: Path, redis_server: RedisServer) -> None:
    idp = await start_devidp(
        DevIdpConfig(
            users=demo_users(),
            clients=[
                ClientRegistration(
                    client_id=CLIENT_ID,
                    client_secret=CLIENT_SECRET,
                    redirect_uris=("https://app.example.com/oauth2/callback",),
                )
            ],
        )
    )
    try:
        data = config(await new_secret(tmp_path), issuer=str(idp.url), redis_url=redis_server.url)
        path = write(tmp_path / "probe.yaml", data)
        code, out, err = await gateway(
            "check-config", "--probe", "--config", str(path), cwd=tmp_path
        )
    finally:
        await idp.close()
    assert code == 0, out + err
    lines = probe_lines(out)
    names = [line.split(":", 1)[0].split(None, 1)[1] for line in lines]
    assert names == [
        "provider discovery",
        "provider JWKS",
        "provider client authentication",
        "redis",
    ]
    assert all(line.startswith("ok ") for line in lines), lines
    assert "client id and secret accepted" in out
    assert "WARN" not in out
    assert CLIENT_SECRET not in out + err


async def test_probe_redis_down_exits_1(tmp_path: Path) -> None:
    idp = await start_devidp(DevIdpConfig(users=demo_users(), clients=[PROBE_CLIENT]))
    try:
        dead = f"redis://:{REDIS_PASSWORD}@127.0.0.1:{free_port()}/0"
        data = config(await new_secret(tmp_path), issuer=str(idp.url), redis_url=dead)
        path = write(tmp_path / "probe.yaml", data)
        code, out, err = await gateway(
            "check-config", "--probe", "--config", str(path), cwd=tmp_path
        )
    finally:
        await idp.close()
    assert code == 1, out + err
    lines = probe_lines(out)
    assert [line for line in lines if line.startswith("FAIL")] == [
        line for line in lines if line.startswith("FAIL redis")
    ]
    assert any(line.startswith("FAIL redis") for line in lines)
    assert any(line.startswith("ok ") and "provider discovery" in line for line in lines)
    assert REDIS_PASSWORD not in out + err
    assert "Traceback" not in err


async def test_probe_provider_down_exits_1(tmp_path: Path, redis_server: RedisServer) -> None:
    data = config(
        await new_secret(tmp_path),
        issuer=f"http://127.0.0.1:{free_port()}",
        redis_url=redis_server.url,
    )
    path = write(tmp_path / "probe.yaml", data)
    code, out, err = await gateway("check-config", "--probe", "--config", str(path), cwd=tmp_path)
    assert code == 1, out + err
    lines = probe_lines(out)
    assert any(line.startswith("FAIL provider discovery") for line in lines)
    assert any(line.startswith("ok ") and "redis" in line for line in lines)
    assert "Traceback" not in err


PROBE_CLIENT = ClientRegistration(
    client_id=CLIENT_ID,
    client_secret=CLIENT_SECRET,
    redirect_uris=("https://app.example.com/oauth2/callback",),
)


async def probe_against(
    tmp_path: Path, redis_server: RedisServer, faults: Faults, **provider: Any
) -> tuple[int, str, str]:
    """``check-config --probe`` against a dev provider with these faults."""
    idp = await start_devidp(
        DevIdpConfig(users=demo_users(), clients=[PROBE_CLIENT], faults=faults)
    )
    try:
        data = config(await new_secret(tmp_path), issuer=str(idp.url), redis_url=redis_server.url)
        data["provider"].update(provider)
        path = write(tmp_path / "probe.yaml", data)
        return await gateway("check-config", "--probe", "--config", str(path), cwd=tmp_path)
    finally:
        await idp.close()


async def test_probe_fails_on_a_wrong_client_secret(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    code, out, err = await probe_against(
        tmp_path, redis_server, Faults(), client_secret="not-the-secret"
    )
    assert code == 1, out + err
    failed = [ln for ln in out.splitlines() if ln.startswith("FAIL")]
    assert len(failed) == 1, failed
    assert failed[0].startswith("FAIL provider client authentication: the provider refused")
    assert "invalid_client" in failed[0]
    assert "not-the-secret" not in out + err


async def test_probe_fails_on_an_unknown_client(tmp_path: Path, redis_server: RedisServer) -> None:
    code, out, err = await probe_against(tmp_path, redis_server, Faults(), client_id="nobody")
    assert code == 1, out + err
    assert "FAIL provider client authentication" in out


async def test_probe_warns_on_unsupported_scopes_and_missing_endpoints(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    faults = Faults(
        scopes_supported=["openid", "email", "profile"],
        discovery_omit=[
            "revocation_endpoint",
            "end_session_endpoint",
            "code_challenge_methods_supported",
        ],
        no_oauth_metadata=True,
    )
    code, out, err = await probe_against(
        tmp_path, redis_server, faults, scopes=["openid", "email", "groups", "offline_access"]
    )
    assert code == 0, out + err
    warns = [ln for ln in out.splitlines() if ln.startswith("WARN")]
    assert warns == [
        "WARN provider scopes: groups is not in scopes_supported",
        "WARN provider scopes: offline_access is not in scopes_supported",
        "WARN provider revocation: no revocation_endpoint: sign-out cannot revoke tokens",
        "WARN provider end-session: no end_session_endpoint: sign-out cannot end the "
        "provider's session",
        "WARN provider PKCE: S256 not in code_challenge_methods_supported (PKCE is sent anyway)",
    ]
    assert not [ln for ln in out.splitlines() if ln.startswith("FAIL")]


async def test_probe_default_scopes_and_rfc8414_endpoints_give_no_warning(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """Default scopes leave out offline_access the provider does not list; the revocation
    endpoint missing from discovery is found in the RFC 8414 document."""
    faults = Faults(
        scopes_supported=["openid", "email", "profile"], discovery_omit=["revocation_endpoint"]
    )
    code, out, err = await probe_against(tmp_path, redis_server, faults)
    assert code == 0, out + err
    assert "WARN" not in out
    assert "FAIL" not in out


# -- sessions list / revoke ---------------------------------------------------------------------


async def api_status(http: aiohttp.ClientSession, url: str) -> int:
    """200 with a session; /api answers 401 without one instead of starting a login."""
    async with http.get(url + "/api/me", allow_redirects=False) as resp:
        return resp.status


async def test_sessions_list_and_revoke(
    tmp_path: Path,
    make_stack: StackFactory,
    redis_server: RedisServer,
    browser: aiohttp.ClientSession,
) -> None:
    stack = await make_stack()
    prefix = stack.settings.session.key_prefix
    data = config(await new_secret(tmp_path), redis_url=redis_server.url, key_prefix=prefix)
    path = write(tmp_path / "gw.yaml", data)

    result = await http_login(browser, stack.url + "/", "alice", "alice")
    assert result.status == 200
    async with aiohttp.ClientSession(
        cookie_jar=aiohttp.CookieJar(unsafe=True),
        headers={"Accept": "text/html", "Sec-Fetch-Mode": "navigate"},
    ) as other:
        result = await http_login(other, stack.url + "/", "bob", "bob")
        assert result.status == 200
        assert await api_status(browser, stack.url) == 200
        assert await api_status(other, stack.url) == 200

        code, out, err = await gateway(
            "sessions", "list", "--user", "alice", "--config", str(path), cwd=tmp_path
        )
        assert code == 0, err
        assert "sub=alice" in out and "sub=bob" not in out
        assert out.splitlines()[-1] == "1 session(s)"

        code, out, err = await gateway("sessions", "list", "--config", str(path), cwd=tmp_path)
        assert code == 0, err
        assert "sub=alice" in out and "sub=bob" in out
        assert out.splitlines()[-1] == "2 session(s)"

        code, out, err = await gateway(
            "sessions", "revoke", "--user", "alice", "--config", str(path), cwd=tmp_path
        )
        assert code == 0, err
        assert out.splitlines()[-1] == "revoked 1 session(s) of user alice"
        assert "sub=alice" in out
        assert await api_status(browser, stack.url) == 401
        assert await api_status(other, stack.url) == 200

        code, out, err = await gateway(
            "sessions", "revoke", "--all", "--config", str(path), cwd=tmp_path
        )
        assert code == 0, err
        assert out.splitlines()[-1] == "revoked 1 session(s) of all users"
        assert "sub=bob" in out
        assert await api_status(other, stack.url) == 401

        code, out, err = await gateway("sessions", "list", "--config", str(path), cwd=tmp_path)
        assert code == 0, err
        assert out.splitlines() == ["0 session(s)"]
    # Nothing the CLI printed reveals a cookie value.
    for cookie in browser.cookie_jar:
        assert cookie.value not in out


async def test_sessions_revoke_needs_user_or_all(tmp_path: Path) -> None:
    path = write(tmp_path / "gw.yaml", config(await new_secret(tmp_path)))
    code, _, err = await gateway("sessions", "revoke", "--config", str(path), cwd=tmp_path)
    assert code == 2
    assert "--user" in err
    code, _, err = await gateway(
        "sessions", "revoke", "--user", "a", "--all", "--config", str(path), cwd=tmp_path
    )
    assert code == 2


async def test_sessions_with_memory_store_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "gw.yaml", config(await new_secret(tmp_path), store="memory"))
    code, _, err = await gateway("sessions", "list", "--config", str(path), cwd=tmp_path)
    assert code == 2
    assert "session.store: redis" in err


async def test_sessions_redis_down_one_clear_line(tmp_path: Path) -> None:
    dead = f"redis://:{REDIS_PASSWORD}@127.0.0.1:{free_port()}/0"
    path = write(tmp_path / "gw.yaml", config(await new_secret(tmp_path), redis_url=dead))
    for args in (("list",), ("list", "--user", "alice"), ("revoke", "--all")):
        code, out, err = await gateway("sessions", *args, "--config", str(path), cwd=tmp_path)
        assert code == 1
        assert "Traceback" not in err
        assert len(err.strip().splitlines()) == 1, err
        assert err.startswith("gateway sessions: ") and "did not answer" in err
        assert REDIS_PASSWORD not in out + err

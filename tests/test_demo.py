"""``gateway demo`` ports, ``gateway healthcheck``, and the demo's parts run alone
(``gateway devidp``, ``gateway echo``) as the compose files use them."""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path

import aiohttp
import pytest
import yaml

from gateway.config import validate
from gateway.healthcheck import healthz_url
from tests.conftest import RedisServer, Stack, gateway_config
from tests.gateway_proc import command_env, gateway_command, start_gateway_process
from tests.idp_client import http_login
from tests.support.ports import free_port
from tests.support.processes import run_command, serving

ROOT = Path(__file__).resolve().parent.parent
NAV = {"Accept": "text/html", "Sec-Fetch-Mode": "navigate"}


async def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    return await run_command([*gateway_command(), *args], cwd=ROOT, env=command_env(env))


def _free_triple() -> int:
    """A port P with P, P+1 and P+2 free on 127.0.0.1."""
    for _ in range(50):
        port = free_port()
        if port > 65000:
            continue
        with contextlib.ExitStack() as stack:
            try:
                for p in (port, port + 1, port + 2):
                    s = stack.enter_context(socket.socket())
                    s.bind(("127.0.0.1", p))
            except OSError:
                continue
            return port
    raise RuntimeError("no three consecutive free ports")


@pytest.mark.parametrize("taken", [0, 1, 2])
async def test_demo_names_its_ports_and_fails_in_one_line_when_one_is_taken(taken: int) -> None:
    port = _free_triple()
    what = ["the gateway", "the identity provider", "the echo upstream"][taken]
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port + taken))
        holder.listen()
        code, out, err = await run("demo", "--port", str(port))
    assert code == 2
    assert out.splitlines() == [
        f"gateway demo: listening on 127.0.0.1, ports {port} (the gateway), {port + 1} "
        f"(the identity provider), {port + 2} (the echo upstream)"
    ]
    assert err.splitlines() == [
        f"gateway demo: port {port + taken} on 127.0.0.1 is already in use (wanted for {what}); "
        f"the demo needs {port} (the gateway), {port + 1} (the identity provider), "
        f"{port + 2} (the echo upstream): free them or choose others with --port"
    ]


@pytest.mark.parametrize("part", ["devidp", "echo"])
@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.1"])
async def test_devidp_and_echo_refuse_a_non_loopback_bind_without_container(
    part: str, host: str
) -> None:
    code, out, err = await run(part, "--host", host, "--port", str(free_port()))
    assert code == 2
    assert out == ""
    assert len(err.splitlines()) == 1
    assert f"binds to loopback only, not {host!r}" in err
    assert "--container" in err


async def test_devidp_needs_the_client_secret_from_the_environment() -> None:
    code, _, err = await run("devidp", "--port", str(free_port()))
    assert code == 2
    assert (
        err == "gateway: set the client secret in the environment variable DEVIDP_CLIENT_SECRET\n"
    )


async def test_devidp_and_echo_alone_serve_a_login_through_gateway_run(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    idp_port, echo_port, gw_port = free_port(), free_port(), free_port()
    gw_url = f"http://127.0.0.1:{gw_port}"
    secret = "compose-demo-secret-0123456789"
    async with (
        serving(
            "devidp", "--port", str(idp_port), "--relying-party", gw_url,
            port=idp_port, env={"DEVIDP_CLIENT_SECRET": secret},
        ),
        serving("echo", "--port", str(echo_port), port=echo_port),
    ):  # fmt: skip
        cfg = gateway_config(
            gw_url,
            f"http://127.0.0.1:{idp_port}",
            f"http://127.0.0.1:{echo_port}",
            redis_server.url,
            provider={"client_id": "gateway-demo", "client_secret": secret},
        )
        cfg["server"]["port"] = gw_port
        gw = await start_gateway_process(cfg, tmp_path)
        try:
            jar = aiohttp.CookieJar(unsafe=True)
            async with aiohttp.ClientSession(cookie_jar=jar, headers=NAV) as http:
                result = await http_login(http, gw_url + "/", "bob", "bob")
                assert result.status == 200, result.body
                async with http.get(gw_url + "/x", headers={"Accept": "application/json"}) as resp:
                    assert resp.status == 200
                    assert ["X-Forwarded-User", "bob"] in (await resp.json())["headers"]
        finally:
            await gw.close()


async def test_healthcheck_exit_0_when_healthz_answers_200(stack: Stack) -> None:
    code, out, err = await run("healthcheck", "--url", stack.url + "/healthz")
    assert code == 0, err
    assert out == f"ok: {stack.url}/healthz: HTTP 200\n"


async def test_healthcheck_exit_1_in_one_line_when_nothing_answers() -> None:
    url = f"http://127.0.0.1:{free_port()}/healthz"
    code, out, err = await run("healthcheck", "--url", url)
    assert code == 1
    assert out == ""
    assert len(err.splitlines()) == 1 and err.startswith(f"unhealthy: {url}: ")


async def test_healthcheck_exit_1_on_a_non_200_answer(stack: Stack) -> None:
    code, _, err = await run("healthcheck", "--url", stack.url + "/oauth2/userinfo")
    assert code == 1
    assert err == f"unhealthy: {stack.url}/oauth2/userinfo: HTTP 401\n"


async def test_healthcheck_reads_the_address_from_the_config(tmp_path: Path, stack: Stack) -> None:
    port = stack.url.rsplit(":", 1)[1]
    path = tmp_path / "gw.yaml"
    cfg = gateway_config("https://gw.example", "https://idp.example", "http://127.0.0.1:1", None)
    cfg["server"].update({"host": "0.0.0.0", "port": int(port)})
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    code, out, err = await run("healthcheck", env={"GATEWAY_CONFIG": str(path)})
    assert code == 0, err
    assert out == f"ok: http://127.0.0.1:{port}/healthz: HTTP 200\n"


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("0.0.0.0", "http://127.0.0.1:4180/healthz"),
        ("::", "http://[::1]:4180/healthz"),
        ("10.1.2.3", "http://10.1.2.3:4180/healthz"),
        ("gateway.internal", "http://gateway.internal:4180/healthz"),
    ],
)
def test_healthz_url_asks_loopback_for_a_wildcard_bind(host: str, url: str) -> None:
    cfg = gateway_config("https://gw.example", "https://idp.example", "http://127.0.0.1:1", None)
    cfg["server"]["host"] = host
    cfg["server"]["port"] = 4180
    assert healthz_url(validate(cfg, env={})) == url

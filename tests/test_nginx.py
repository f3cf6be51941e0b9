"""The nginx recipe (deploy/nginx/gateway.conf) end to end with a real Debian nginx.

nginx runs the recipe's own text, with only its addresses replaced, in front of the echo
upstream; the gateway answers its ``auth_request`` subrequests. Browser sign-in, API 401,
policy 403, spoofed identity headers and bearer clients all go through nginx.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from yarl import URL

from tests.conftest import CLIENT_ID, Stack
from tests.idp_client import http_login
from tests.support.ports import free_port

pytestmark = pytest.mark.nginx

NGINX = "/usr/sbin/nginx"
RECIPE = Path(__file__).resolve().parents[1] / "deploy" / "nginx" / "gateway.conf"
TRUSTED = {"trusted_proxies": ["127.0.0.1/32"]}


@dataclass
class Nginx:
    url: str
    proc: subprocess.Popen[bytes]
    prefix: Path

    def error_log(self) -> str:
        return (self.prefix / "error.log").read_text(errors="replace")


def render(recipe: str, *, port: int, gateway: str, app: str) -> str:
    """The recipe with its three marked addresses replaced; nothing else changes."""
    swaps = [
        ("server 127.0.0.1:4180;", f"server {gateway};"),
        ("server 127.0.0.1:8080;", f"server {app};"),
        ("listen 80;", f"listen 127.0.0.1:{port};"),
    ]
    for old, new in swaps:
        assert recipe.count(old) == 1, f"the recipe no longer has exactly one {old!r}"
        recipe = recipe.replace(old, new)
    return recipe


def main_config(prefix: Path, http_block: str) -> str:
    """A whole nginx.conf around the recipe: foreground, every path inside ``prefix``."""
    temp = "\n".join(
        f"    {name}_temp_path {prefix / name};"
        for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""
daemon off;
worker_processes 1;
pid {prefix / "nginx.pid"};
error_log {prefix / "error.log"} notice;
events {{ worker_connections 256; }}
http {{
    access_log off;
{temp}
{http_block}
}}
"""


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"nginx exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError("nginx did not start listening")


NginxFactory = Callable[..., Awaitable[tuple[Stack, Nginx]]]


@pytest.fixture
async def behind_nginx(make_stack: Any, tmp_path: Path) -> AsyncIterator[NginxFactory]:
    """Start a gateway whose public URL is nginx's, then nginx running the recipe."""
    if not os.access(NGINX, os.X_OK):
        pytest.fail(f"{NGINX} is missing: install Debian's nginx-light")
    running: list[Nginx] = []

    async def factory(**overrides: Any) -> tuple[Stack, Nginx]:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = {**TRUSTED, "public_url": url, **overrides.pop("server", {})}
        stack: Stack = await make_stack(server=server, **overrides)
        prefix = tmp_path / f"nginx-{port}"
        prefix.mkdir()
        for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (prefix / name).mkdir()
        http_block = render(
            RECIPE.read_text(),
            port=port,
            gateway=URL(stack.url).raw_authority,
            app=URL(stack.echo.url).raw_authority,
        )
        conf = prefix / "nginx.conf"
        conf.write_text(main_config(prefix, http_block))
        args = [NGINX, "-p", f"{prefix}/", "-c", str(conf), "-e", str(prefix / "error.log")]
        check = subprocess.run([*args, "-t"], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        nginx = Nginx(url, proc, prefix)
        running.append(nginx)
        await asyncio.to_thread(_wait_for_port, port, proc)
        return stack, nginx

    yield factory
    for nginx in running:
        if nginx.proc.poll() is None:
            nginx.proc.send_signal(signal.SIGQUIT)  # graceful: workers finish, then exit
            try:
                nginx.proc.wait(10)
            except subprocess.TimeoutExpired:
                nginx.proc.kill()
                nginx.proc.wait(5)
        if nginx.proc.stderr is not None:
            nginx.proc.stderr.close()
    for nginx in running:
        # The gateway never answered a subrequest with something nginx could not use.
        problems = [
            line
            for line in nginx.error_log().splitlines()
            if any(level in line for level in ("[error]", "[crit]", "[alert]", "[emerg]"))
        ]
        assert not problems, problems[:5]


def headers_of(body: dict[str, Any]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, value in body["headers"]:
        out.setdefault(name.lower(), []).append(value)
    return out


async def echo_json(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None
) -> dict[str, Any]:
    async with http.get(
        url, headers={"Accept": "application/json", **(headers or {})}, allow_redirects=False
    ) as resp:
        text = await resp.text()
        assert resp.status == 200, (resp.status, text)
        return json.loads(text)  # type: ignore[no-any-return]


async def test_sign_in_through_nginx_lands_on_the_app(
    behind_nginx: NginxFactory, browser: aiohttp.ClientSession
) -> None:
    stack, nginx = await behind_nginx()
    target = nginx.url + "/some/deep/page?x=1&y=a%26b"
    result = await http_login(browser, target, "alice", "alice")
    assert result.status == 200, (result.status, result.body[:300], nginx.error_log()[-2000:])
    assert result.url == target
    # The first hop was nginx's redirect to the gateway's sign-in, carrying the whole URI.
    assert result.history[0] == target
    start = URL(result.history[1])
    assert str(start.origin()) == nginx.url and start.path == "/oauth2/start"
    assert start.query["rd"] == "/some/deep/page?x=1&y=a%26b"
    assert any(h.startswith(stack.idp.url) for h in result.history)
    assert any(h.startswith(nginx.url + "/oauth2/callback") for h in result.history)

    seen = await echo_json(browser, target)
    got = headers_of(seen)
    assert seen["path"] == "/some/deep/page" and seen["query"] == "x=1&y=a%26b"
    assert got["x-forwarded-user"] == ["alice"]
    assert got["x-forwarded-email"] == ["alice@example.com"]
    assert got["x-forwarded-groups"] == ["admins,staff"]
    assert len(got["authorization"]) == 1 and got["authorization"][0].startswith("Bearer ")
    # The gateway's session cookie reaches the app only because nginx passes Cookie as is;
    # the token in Authorization is the session's access token, valid at the provider.
    token = got["authorization"][0].removeprefix("Bearer ")
    assert stack.idp.state.active_access_token(token) is not None


async def test_api_call_without_session_is_401(
    behind_nginx: NginxFactory, api: aiohttp.ClientSession
) -> None:
    _, nginx = await behind_nginx()
    for path, accept in (("/api/items", "text/html"), ("/some/page", "application/json")):
        async with api.get(
            nginx.url + path, headers={"Accept": accept}, allow_redirects=False
        ) as resp:
            assert resp.status == 401, path
            assert "Location" not in resp.headers
            assert resp.headers.getall("WWW-Authenticate") == ['Bearer realm="gateway"']
            assert (await resp.json())["error"] == "unauthenticated"
    # A POST is never a navigation, whatever it accepts.
    async with api.post(
        nginx.url + "/form", data={"a": "1"}, headers={"Accept": "text/html"},
        allow_redirects=False,
    ) as resp:  # fmt: skip
        assert resp.status == 401


async def test_route_policy_failure_is_403(
    behind_nginx: NginxFactory, browser: aiohttp.ClientSession
) -> None:
    _, nginx = await behind_nginx()
    result = await http_login(browser, nginx.url + "/", "bob", "bob")
    assert result.status == 200
    async with browser.get(nginx.url + "/admin/panel", allow_redirects=False) as resp:
        assert resp.status == 403
    # Naming another URI to the check is nginx's job, never the client's.
    async with browser.get(
        nginx.url + "/admin/panel",
        headers={"X-Forwarded-Uri": "/public", "X-Original-URI": "/public"},
        allow_redirects=False,
    ) as resp:
        assert resp.status == 403
    seen = await echo_json(browser, nginx.url + "/staff/page")
    assert headers_of(seen)["x-forwarded-user"] == ["bob"]


SPOOFED = [
    ("X-Forwarded-User", "mallory"),
    ("x-forwarded-user", "mallory2"),
    ("X_Forwarded_User", "mallory3"),
    ("X-Forwarded-Email", "mallory@evil.example"),
    ("X-Forwarded-Groups", "admins"),
    ("X-Forwarded-Preferred-Username", "mallory"),
    ("X-Auth-Request-User", "mallory"),
    ("X-Auth-Request-Email", "mallory@evil.example"),
    ("X-Gateway-Assertion", "forged.jwt.value"),
    ("X-Forwarded-Access-Token", "forged"),
    ("X-Gateway-Login", "forged"),
    ("X-Original-Method", "forged"),
    ("X-Auth-Request-Access-Token", "forged"),
    ("Authorization", "Bearer forged-by-client"),
]


async def test_spoofed_identity_headers_never_reach_the_app(
    behind_nginx: NginxFactory, browser: aiohttp.ClientSession, api: aiohttp.ClientSession
) -> None:
    _, nginx = await behind_nginx()
    # Public route, nobody signed in: the app sees no identity at all.
    async with api.get(
        nginx.url + "/public/page", headers=[("Accept", "application/json"), *SPOOFED]
    ) as resp:
        assert resp.status == 200
        seen = await resp.json()
    assert not [v for _, v in seen["headers"] if "mallory" in v or "forged" in v], seen
    got = headers_of(seen)
    for name in ("x-forwarded-user", "x-forwarded-email", "authorization", "x-gateway-assertion"):
        assert name not in got

    # Signed in: the app sees the gateway's identity, once, and nothing of the client's.
    await http_login(browser, nginx.url + "/", "alice", "alice")
    async with browser.get(
        nginx.url + "/page", headers=[("Accept", "application/json"), *SPOOFED]
    ) as resp:
        assert resp.status == 200
        seen = await resp.json()
    assert not [v for _, v in seen["headers"] if "mallory" in v or "forged" in v], seen
    got = headers_of(seen)
    assert got["x-forwarded-user"] == ["alice"]
    assert got["x-forwarded-groups"] == ["admins,staff"]
    assert len(got["authorization"]) == 1
    assert not [n for n, _ in seen["headers"] if "_" in n]


async def test_the_check_endpoint_is_not_exposed(
    behind_nginx: NginxFactory, browser: aiohttp.ClientSession
) -> None:
    _, nginx = await behind_nginx()
    await http_login(browser, nginx.url + "/", "alice", "alice")
    for path in ("/oauth2/auth", "/oauth2/auth/admin", "/oauth2/./auth", "/oauth2/%61uth"):
        async with browser.get(nginx.url + path, allow_redirects=False) as resp:
            assert resp.status == 404, path
            assert "Authorization" not in resp.headers
            assert "Bearer" not in await resp.text()


async def test_bearer_client_through_nginx(
    behind_nginx: NginxFactory, api: aiohttp.ClientSession
) -> None:
    routes = [
        {"prefix": "/", "upstream": "http://127.0.0.1:9"},
        {"prefix": "/api", "upstream": "http://127.0.0.1:9", "accept_bearer": True,
         "on_unauthenticated": "deny"},
    ]  # fmt: skip
    stack, nginx = await behind_nginx(routes=routes)
    token = stack.idp.state.issue_access_token("bob", CLIENT_ID, "openid email", 300)
    seen = await echo_json(api, nginx.url + "/api/items", {"Authorization": f"Bearer {token}"})
    got = headers_of(seen)
    assert got["x-forwarded-user"] == ["bob"]
    assert got["authorization"] == [f"Bearer {token}"]
    # A bearer token does nothing on a route that does not accept one.
    async with api.get(
        nginx.url + "/elsewhere", headers={"Authorization": f"Bearer {token}"}
    ) as resp:
        assert resp.status == 401
    async with api.get(
        nginx.url + "/api/items", headers={"Authorization": "Bearer not-a-real-token"}
    ) as resp:
        assert resp.status == 401
        assert resp.headers.getall("WWW-Authenticate") == [
            'Bearer realm="gateway", error="invalid_token"'
        ]
    assert stack.idp.state.introspect_calls == 1


async def test_signed_assertion_through_nginx(
    behind_nginx: NginxFactory, browser: aiohttp.ClientSession
) -> None:
    import jwt

    routes = [{"prefix": "/", "upstream": "http://127.0.0.1:9", "assertion": True}]
    stack, nginx = await behind_nginx(routes=routes)
    await http_login(browser, nginx.url + "/", "alice", "alice")
    seen = await echo_json(
        browser, nginx.url + "/x", {"X-Gateway-Assertion": "forged", "X_Gateway_Assertion": "f"}
    )
    (token,) = headers_of(seen)["x-gateway-assertion"]
    async with browser.get(stack.url + "/.well-known/jwks.json") as resp:
        jwks = jwt.PyJWKSet.from_dict(await resp.json())
    key = jwks[jwt.get_unverified_header(token)["kid"]]
    claims = jwt.decode(token, key, algorithms=["ES256"], options={"verify_aud": False})
    assert claims["sub"] == "alice"


def test_recipe_is_only_addresses_away_from_running() -> None:
    """Every directive the test relies on is in the recipe itself, not added by the test."""
    text = RECIPE.read_text()
    for needle in (
        "auth_request /oauth2/auth;",
        "error_page 401 = @gateway_login;",
        "proxy_set_header X-Forwarded-Uri $request_uri;",
        "internal;",
        "location /oauth2/ {",
    ):
        assert needle in text
    assert re.search(r"auth_request_set \$gw_auth\s+\$upstream_http_authorization;", text)


def test_recipe_copies_what_the_gateway_answers_and_blanks_what_it_emits() -> None:
    """Every header forward-auth answers with is copied by ``auth_request_set``; every other
    name the gateway emits as identity or trusts from a proxy is blanked on the way to the
    app, so a client cannot send it through nginx (issue 7 item 6)."""
    from gateway.config import DEFAULT_IDENTITY_HEADERS
    from gateway.forward_auth import LOGIN_HEADER
    from gateway.gate import ASSERTION_HEADER, EMITTED_ELSEWHERE

    text = RECIPE.read_text()
    app_block = text.split("location / {", 1)[1].split("}", 1)[0]
    copied = set(re.findall(r"auth_request_set \$\w+\s+\$upstream_http_(\w+);", app_block))
    answered = (*DEFAULT_IDENTITY_HEADERS, "Authorization", ASSERTION_HEADER, LOGIN_HEADER)
    assert {n.lower().replace("-", "_") for n in answered} == copied
    forwarded_from_copies = {
        n.lower() for n in re.findall(r"proxy_set_header ([\w-]+) \$gw_\w+;", app_block)
    }
    blanked = {n.lower() for n in re.findall(r'proxy_set_header ([\w-]+) "";', app_block)}
    for name in (*EMITTED_ELSEWHERE, *DEFAULT_IDENTITY_HEADERS, ASSERTION_HEADER):
        assert name.lower() in blanked | forwarded_from_copies, name

"""Shared fixtures: a real redis-server on a free port, the dev provider, the echo upstream and
the gateway, all on 127.0.0.1. Only the clock and randomness are ever injected; nothing is mocked.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway.app import create_app
from gateway.config import Settings, validate
from gateway.crypto import new_secret
from gateway.devidp import ClientRegistration, DevIdpConfig, RunningIdp, demo_users, start_devidp
from gateway.echo import RunningEcho, start_echo
from tests.support.ports import free_port

CLIENT_ID = "gateway-test"
CLIENT_SECRET = "test-client-secret-0123456789abcdef"

# What Kubernetes injects into every pod of a namespace with a Service named "gateway".
SERVICE_LINKS = {
    "GATEWAY_PORT": "tcp://10.0.0.1:4180",
    "GATEWAY_PORT_4180_TCP": "tcp://10.0.0.1:4180",
    "GATEWAY_PORT_4180_TCP_PROTO": "tcp",
    "GATEWAY_PORT_4180_TCP_PORT": "4180",
    "GATEWAY_PORT_4180_TCP_ADDR": "10.0.0.1",
    "GATEWAY_SERVICE_HOST": "10.0.0.1",
    "GATEWAY_SERVICE_PORT": "4180",
    "GATEWAY_SERVICE_PORT_HTTP": "4180",
}


class RedisServer:
    """A redis-server process of our own, so a test can stop and start it."""

    def __init__(self, data_dir: str | None = None) -> None:
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        # With a data_dir, every write goes to an AOF there, so data survives stop()/start().
        self.data_dir = data_dir

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        persist = (
            ["--dir", self.data_dir, "--appendonly", "yes", "--appendfsync", "always"]
            if self.data_dir
            else ["--appendonly", "no"]
        )
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             *persist, "--daemonize", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), 0.2) as s,
            ):
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def keys(self, pattern: str = "*") -> list[bytes]:
        """KEYS over a raw socket (tests inspect what was written without the gateway's code)."""
        import redis

        client = redis.Redis.from_url(self.url)
        try:
            return list(client.keys(pattern))
        finally:
            client.close()

    def dump(self) -> list[tuple[bytes, bytes]]:
        import redis

        client = redis.Redis.from_url(self.url)
        try:
            out = []
            for key in client.keys("*"):
                if client.type(key) == b"string":
                    out.append((key, client.get(key) or b""))
                else:
                    out.append((key, repr(client.smembers(key)).encode()))
            return out
        finally:
            client.close()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server for one test alone (stopped and started by the test)."""
    server = RedisServer()
    server.start()
    yield server
    server.stop()


def gateway_config(
    gateway_url: str, idp_url: str, echo_url: str, redis_url: str | None, **overrides: Any
) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": 0, "public_url": gateway_url},
        "provider": {
            "issuer": idp_url,
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            "scopes": ["openid", "email", "profile", "offline_access"],
        },
        "session": {
            "store": "redis" if redis_url else "memory",
            "redis_url": redis_url or "redis://127.0.0.1:1/0",
            "key_prefix": f"t{uuid.uuid4().hex[:8]}:",
            "cookie_name": "gw_test",
            "cookie_secure": False,
            "cookie_secrets": [new_secret()],
        },
        "routes": [
            {"prefix": "/", "upstream": echo_url},
            {"prefix": "/public", "upstream": echo_url, "auth": "none"},
            {"prefix": "/admin", "upstream": echo_url, "require": {"groups": ["admins"]}},
            {"prefix": "/api", "upstream": echo_url, "on_unauthenticated": "deny"},
        ],
        "observability": {"log_format": "text"},
    }
    return with_sections(cfg, overrides)


def with_sections(cfg: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` with each overridden section merged into its own (a mapping) or replaced."""
    for section, value in overrides.items():
        if isinstance(value, dict) and isinstance(cfg.get(section), dict):
            cfg[section] = {**cfg[section], **value}
        else:
            cfg[section] = value
    return cfg


def registration(public: str, backchannel_base: str | None = None) -> ClientRegistration:
    """The test client at the dev provider, for a gateway whose public URL is ``public``."""
    return ClientRegistration(
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        redirect_uris=(public + "/oauth2/callback",),
        post_logout_redirect_uris=(public + "/oauth2/signed_out",),
        backchannel_logout_uri=(backchannel_base or public) + "/oauth2/backchannel_logout",
    )


@dataclass
class Stack:
    url: str
    idp: RunningIdp
    echo: RunningEcho
    settings: Settings
    app: web.Application
    runner: web.AppRunner
    extra: list[Any] = field(default_factory=list)

    async def close(self) -> None:
        await self.runner.cleanup()


StackFactory = Callable[..., Any]


@pytest.fixture
async def make_stack(redis_server: RedisServer) -> AsyncIterator[StackFactory]:
    """Build dev provider + echo + gateway; keyword args override config sections.

    ``store="memory"`` uses the in-memory store; ``idp_config`` tweaks DevIdpConfig fields;
    ``idp`` / ``echo`` reuse running servers (two gateways sharing one provider);
    ``client_auth`` registers the client with that token-endpoint auth method (``"none"``:
    a public client without a secret) and configures the gateway to match.
    ``handler_cancellation=True`` cancels a request's handler when its client leaves, as
    ``gateway run`` does.
    """
    started: list[Any] = []

    async def factory(
        *,
        store: str = "redis",
        redis_url: str | None = None,
        idp: RunningIdp | None = None,
        echo: RunningEcho | None = None,
        port: int | None = None,
        idp_config: dict[str, Any] | None = None,
        client_auth: str = "client_secret_basic",
        handler_cancellation: bool = False,
        **overrides: Any,
    ) -> Stack:
        port = port or free_port()
        url = f"http://127.0.0.1:{port}"
        # A gateway behind a proxy (server.public_url) is registered under the proxy's origin.
        public = str((overrides.get("server") or {}).get("public_url", url))
        secret = None if client_auth == "none" else CLIENT_SECRET
        if client_auth != "client_secret_basic":
            overrides["provider"] = {
                "client_auth_method": client_auth,
                "client_secret": secret,
                **overrides.get("provider", {}),
            }
        if idp is None:
            idp = await start_devidp(
                DevIdpConfig(
                    users=demo_users(),
                    clients=[
                        ClientRegistration(
                            client_id=CLIENT_ID,
                            client_secret=secret,
                            token_endpoint_auth_method=client_auth,
                            redirect_uris=(public + "/oauth2/callback",),
                            post_logout_redirect_uris=(public + "/oauth2/signed_out",),
                            backchannel_logout_uri=url + "/oauth2/backchannel_logout",
                        )
                    ],
                    **(idp_config or {}),
                )
            )
            started.append(idp)
        if echo is None:
            echo = await start_echo()
            started.append(echo)
        rurl = (redis_url or redis_server.url) if store == "redis" else None
        settings = validate(
            gateway_config(url, str(idp.url), str(echo.url), rurl, **overrides), env={}
        )
        app = create_app(settings)
        runner = web.AppRunner(app, access_log=None, handler_cancellation=handler_cancellation)
        await runner.setup()
        try:
            await web.TCPSite(runner, "127.0.0.1", port).start()
        except BaseException:
            # The app's client sessions were opened by setup(); left open, they would be
            # reported by the garbage collector in whichever test runs next.
            await runner.cleanup()
            raise
        stack = Stack(url, idp, echo, settings, app, runner)
        started.append(stack)
        return stack

    yield factory
    for item in reversed(started):
        await item.close()


@pytest.fixture
async def stack(make_stack: StackFactory) -> Stack:
    return await make_stack()  # type: ignore[no-any-return]


@pytest.fixture
async def browser() -> AsyncIterator[aiohttp.ClientSession]:
    """A cookie-keeping HTTP client that asks for HTML like a browser navigation."""
    async with aiohttp.ClientSession(
        cookie_jar=aiohttp.CookieJar(unsafe=True),
        headers={"Accept": "text/html", "Sec-Fetch-Mode": "navigate"},
    ) as http:
        yield http


@pytest.fixture
async def api() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        yield http


@pytest.fixture
async def echo() -> AsyncIterator[RunningEcho]:
    """An echo upstream of the test's own (its address goes into the test's routes)."""
    running = await start_echo()
    yield running
    await running.close()

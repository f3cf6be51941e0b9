"""A gateway in front of TWO development providers (``providers:``): ``corp`` and
``partners``, each its own server on its own port (so its own issuer), both with the demo
users (so ``alice`` is the same ``sub`` at both)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import quote

import aiohttp
from aiohttp import web

from gateway.app import create_app
from gateway.config import Settings, validate
from gateway.crypto import new_secret
from gateway.devidp import DevIdpConfig, RunningIdp, demo_users, start_devidp
from gateway.echo import RunningEcho, start_echo
from tests.conftest import CLIENT_ID, CLIENT_SECRET, registration, with_sections
from tests.idp_client import http_login
from tests.support.browser import Answer, fetch
from tests.support.ports import free_port

COOKIE = "gw_multi"
PROVIDER_HEADERS = {"X-Provider": "provider", "X-Issuer": "iss", "X-Forwarded-User": "sub"}


class Gateway(Protocol):
    """A gateway in front of providers by id (in this process, or processes)."""

    @property
    def url(self) -> str: ...

    def idp_url(self, provider: str) -> str: ...


@dataclass
class Multi:
    url: str
    idps: dict[str, RunningIdp]  # by provider id
    echo: RunningEcho
    settings: Settings
    config: dict[str, Any]  # as validated (for a config file of the CLI)
    app: web.Application
    runner: web.AppRunner
    started: list[Any] = field(default_factory=list)

    @property
    def corp(self) -> RunningIdp:
        return self.idps["corp"]

    @property
    def partners(self) -> RunningIdp:
        return self.idps["partners"]

    def idp_url(self, provider: str) -> str:
        return self.idps[provider].url

    def code_exchanges(self, provider: str) -> int:
        """How many authorization codes that provider's token endpoint was sent."""
        return self.idps[provider].state.token_calls["authorization_code"]

    async def close(self) -> None:
        await self.runner.cleanup()
        for item in reversed(self.started):
            await item.close()


async def _idp(public: str, **cfg: Any) -> RunningIdp:
    return await start_devidp(
        DevIdpConfig(users=demo_users(), clients=[registration(public)], **cfg)
    )


def multi_config(
    url: str, issuers: dict[str, str], echo_url: str, redis_url: str, **overrides: Any
) -> dict[str, Any]:
    """The gateway's config: ``providers`` by id (each its issuer), and the routes."""
    names = {"corp": "Corporate sign-in", "partners": "Partner sign-in"}
    cfg: dict[str, Any] = {
        "server": {
            "host": "127.0.0.1",
            "port": 0,
            "public_url": url,
            "trusted_proxies": ["127.0.0.1/32"],  # forward-auth's X-Forwarded-Uri
        },
        "providers": [
            {
                "id": pid,
                "display_name": names[pid],
                "issuer": issuer,
                "client_id": CLIENT_ID,
                "client_secret": CLIENT_SECRET,
                "scopes": ["openid", "email", "profile", "offline_access"],
            }
            for pid, issuer in issuers.items()
        ],
        "session": {
            "store": "redis",
            "redis_url": redis_url,
            "key_prefix": f"m{uuid.uuid4().hex[:8]}:",
            "cookie_name": COOKIE,
            "cookie_secure": False,
            "cookie_secrets": [new_secret()],
        },
        "routes": [
            {"prefix": "/", "upstream": echo_url, "identity_headers": PROVIDER_HEADERS},
            {"prefix": "/corp", "upstream": echo_url, "providers": ["corp"]},
            {
                "prefix": "/partners",
                "upstream": echo_url,
                "providers": ["partners"],
                "identity_headers": PROVIDER_HEADERS,
            },
            {
                "prefix": "/api/partners",
                "upstream": echo_url,
                "providers": ["partners"],
                "on_unauthenticated": "deny",
                "accept_bearer": True,
            },
            {"prefix": "/api", "upstream": echo_url, "on_unauthenticated": "deny"},
            {"prefix": "/signed", "upstream": echo_url, "assertion": True},
        ],
        "observability": {"log_format": "text"},
    }
    return with_sections(cfg, overrides)


async def start_multi(
    redis_url: str, idp_config: dict[str, Any] | None = None, **overrides: Any
) -> Multi:
    """Two providers, an echo upstream and a gateway (in this process) in front of them."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    started: list[Any] = []
    try:
        idps = {}
        for pid in ("corp", "partners"):
            idps[pid] = await _idp(url, **(idp_config or {}))
            started.append(idps[pid])
        echo = await start_echo()
        started.append(echo)
        issuers = {pid: idp.issuer for pid, idp in idps.items()}
        cfg = multi_config(url, issuers, str(echo.url), redis_url, **overrides)
        settings = validate(cfg, env={})
        app = create_app(settings)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
    except BaseException:
        for item in reversed(started):
            await item.close()
        raise
    return Multi(url, idps, echo, settings, cfg, app, runner, started)


async def authorization_url(
    http: aiohttp.ClientSession, multi: Gateway, provider: str, rd: str = "/"
) -> str:
    """``/oauth2/start?provider=…``: the chosen provider's authorization URL."""
    answer = await fetch(
        http, f"{multi.url}/oauth2/start?provider={provider}&rd={quote(rd, safe='/')}"
    )
    assert answer.status == 302, answer.body
    assert answer.location is not None
    assert answer.location.startswith(multi.idp_url(provider) + "/authorize?")
    return answer.location


async def callback_at(
    http: aiohttp.ClientSession, multi: Gateway, provider: str, user: str = "alice", rd: str = "/"
) -> str:
    """Sign in at ``provider`` up to (not including) the callback: its URL."""
    auth_url = await authorization_url(http, multi, provider, rd)
    result = await http_login(http, auth_url, user, user, stop_at=multi.url + "/oauth2/callback")
    assert result.location is not None, (result.status, result.body)
    return result.location


async def login_at(
    http: aiohttp.ClientSession, multi: Gateway, provider: str, user: str = "alice", rd: str = "/"
) -> Answer:
    """A whole login with ``provider``; the callback's answer (302 to ``rd`` when it worked)."""
    answer = await fetch(http, await callback_at(http, multi, provider, user, rd))
    assert answer.status == 302, answer.body
    return answer

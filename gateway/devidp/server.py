"""Assembly and serving: ``create_devidp_app`` wires the routes, ``start_devidp`` binds it
to a loopback address (never anything else) and fixes the issuer from the bound port.
"""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import TracebackType

import aiohttp
from aiohttp import web

from . import authorize, logout, par, resources, token_endpoint
from .config import DevIdpConfig
from .state import STATE_KEY, IdpState


def create_devidp_app(cfg: DevIdpConfig) -> web.Application:
    """The provider as an aiohttp application; ``cfg.issuer`` must be set before it serves."""
    problems = cfg.problems()
    if problems:
        raise ValueError("invalid devidp config: " + "; ".join(problems))
    app = web.Application()
    state = IdpState(cfg)
    app[STATE_KEY] = state

    async def http_client(app: web.Application) -> AsyncIterator[None]:
        async with aiohttp.ClientSession() as http:
            state.http = http
            yield
            state.http = None

    app.cleanup_ctx.append(http_client)
    app.router.add_get("/", resources.index)
    app.router.add_get("/.well-known/openid-configuration", resources.discovery)
    app.router.add_get("/.well-known/oauth-authorization-server", resources.oauth_metadata)
    app.router.add_get("/jwks", resources.jwks)
    app.router.add_get("/authorize", authorize.authorize)
    app.router.add_post("/login", authorize.login)
    app.router.add_post("/consent", authorize.consent)
    app.router.add_post("/token", token_endpoint.token)
    app.router.add_route("GET", "/userinfo", resources.userinfo)
    app.router.add_route("POST", "/userinfo", resources.userinfo)
    app.router.add_post("/revoke", resources.revoke)
    app.router.add_post("/introspect", resources.introspect)
    app.router.add_post("/par", par.push)
    app.router.add_route("GET", "/end_session", logout.end_session)
    app.router.add_route("POST", "/end_session", logout.end_session)
    return app


def _loopback(host: str) -> str:
    """The address to bind for ``host``; ValueError unless it is a loopback address."""
    if host == "localhost":
        return "127.0.0.1"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"devidp binds only to loopback addresses, not {host!r}") from None
    if not address.is_loopback:
        raise ValueError(f"devidp binds only to loopback addresses, not {host!r}")
    return str(address)


@dataclass
class RunningIdp:
    """A provider serving on loopback; ``url`` is its base URL (and default issuer)."""

    url: str
    app: web.Application
    state: IdpState
    runner: web.AppRunner

    @property
    def issuer(self) -> str:
        return self.state.issuer

    async def close(self) -> None:
        await self.runner.cleanup()

    async def __aenter__(self) -> RunningIdp:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


async def start_devidp(cfg: DevIdpConfig, host: str = "127.0.0.1", port: int = 0) -> RunningIdp:
    """Serve the provider on ``host:port`` (port 0: any free port) and return it running.

    Raises ValueError for any host that is not loopback (127.0.0.0/8, ::1, localhost).
    ``localhost`` is bound as 127.0.0.1 so that port 0 yields one port, not one per family.
    """
    bind = _loopback(host)
    app = create_devidp_app(cfg)
    # No access log: query strings carry codes and id_token_hints.
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, bind, port)
        await site.start()
        bound_port = runner.addresses[0][1]
    except BaseException:
        await runner.cleanup()
        raise
    shown = host if host == "localhost" else bind
    if ":" in shown:
        shown = f"[{shown}]"
    url = f"http://{shown}:{bound_port}"
    if cfg.issuer is None:
        cfg.issuer = url
    return RunningIdp(url=url, app=app, state=app[STATE_KEY], runner=runner)

"""``gateway demo``: the development provider, an echo upstream and the gateway on one machine.

Nothing else is needed: the session store is in memory, the cookie is not ``Secure`` because
the demo speaks plain HTTP on loopback, and the provider sends back-channel logouts to the
gateway so signing out at the provider ends the gateway session too.
"""

from __future__ import annotations

import asyncio
import ipaddress

from aiohttp import web

from gateway.app import create_app
from gateway.config import Settings, validate
from gateway.crypto import new_secret, random_token
from gateway.devidp import ClientRegistration, DevIdpConfig, demo_users, start_devidp
from gateway.echo import start_echo


def _loopback(host: str) -> None:
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise ValueError(f"the demo binds to loopback only, not {host!r}")


def demo_settings(gateway_url: str, idp_url: str, echo_url: str, client_secret: str) -> Settings:
    return validate(
        {
            "server": {"host": "127.0.0.1", "port": 0, "public_url": gateway_url},
            "provider": {
                "issuer": idp_url,
                "client_id": "gateway-demo",
                "client_secret": client_secret,
                "scopes": ["openid", "email", "profile", "offline_access"],
            },
            "session": {
                "store": "memory",
                "cookie_name": "gateway_demo",
                "cookie_secure": False,
                "cookie_secrets": [new_secret()],
            },
            "routes": [
                {"prefix": "/", "upstream": echo_url},
                {"prefix": "/public", "upstream": echo_url, "auth": "none"},
            ],
            "observability": {"log_format": "text"},
        },
        env={},
    )


async def run_demo(
    host: str = "127.0.0.1", port: int = 4180, *, ready: asyncio.Event | None = None
) -> None:
    _loopback(host)
    gateway_url = f"http://{host}:{port}" if ":" not in host else f"http://[{host}]:{port}"
    secret = random_token(24)
    idp = await start_devidp(
        DevIdpConfig(
            users=demo_users(),
            clients=[
                ClientRegistration(
                    client_id="gateway-demo",
                    client_secret=secret,
                    redirect_uris=(gateway_url + "/oauth2/callback",),
                    post_logout_redirect_uris=(gateway_url + "/oauth2/signed_out",),
                    backchannel_logout_uri=gateway_url + "/oauth2/backchannel_logout",
                )
            ],
        ),
        host=host,
        port=port + 1 if port else 0,
    )
    echo = await start_echo(host, port + 2 if port else 0)
    settings = demo_settings(gateway_url, str(idp.url), str(echo.url), secret)
    runner = web.AppRunner(create_app(settings), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        print(
            f"\n  Gateway demo ready: open {gateway_url}/\n"
            f"  Identity provider:  {idp.url}/   Echo upstream (behind the gateway): {echo.url}/\n"
            "  Demo users:         alice / alice (groups admins, staff)\n"
            "                      bob / bob     (group staff)\n"
            f"  Public route:       {gateway_url}/public (no login)\n"
            f"  Sign out:           {gateway_url}/oauth2/sign_out\n"
            "  Stop with Ctrl-C.\n",
            flush=True,
        )
        if ready is not None:
            ready.set()
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
        await echo.close()
        await idp.close()

"""``gateway demo``: the development provider, an echo upstream and the gateway on one machine.

Nothing else is needed: the session store is in memory, the cookie is not ``Secure`` because
the demo speaks plain HTTP on loopback, and the provider sends back-channel logouts to the
gateway so signing out at the provider ends the gateway session too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import ipaddress
import os

from aiohttp import web

from gateway import paths
from gateway.app import create_app
from gateway.config import Settings, validate
from gateway.crypto import new_secret, random_token
from gateway.devidp import ClientRegistration, DevIdpConfig, demo_users, start_devidp
from gateway.devidp.server import create_devidp_app
from gateway.echo import create_echo_app, start_echo


def _loopback(host: str) -> None:
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise ValueError(f"the demo binds to loopback only, not {host!r}")


def _port_taken(exc: OSError, host: str, port: int, what: str, needs: str = "") -> ValueError:
    """One clear line for a bind that failed (typically: the port is already in use)."""
    if exc.errno == errno.EADDRINUSE:
        reason = f"port {port} on {host} is already in use (wanted for {what})"
    else:
        reason = f"cannot listen on {host}:{port} for {what} ({exc.strerror or exc})"
    return ValueError(reason + (f"; {needs}" if needs else ""))


def demo_ports(port: int) -> list[tuple[int, str]]:
    """The ports ``gateway demo --port PORT`` listens on, with what listens there."""
    return [
        (port, "the gateway"),
        (port + 1, "the identity provider"),
        (port + 2, "the echo upstream"),
    ]


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
    """Run the demo until cancelled; ValueError (one line) for a refused host or a taken port."""
    _loopback(host)
    gateway_url = f"http://{host}:{port}" if ":" not in host else f"http://[{host}]:{port}"
    ports = demo_ports(port) if port else []
    needs = ""
    if ports:
        listed = ", ".join(f"{n} ({what})" for n, what in ports)
        needs = f"the demo needs {listed}: free them or choose others with --port"
        print(f"gateway demo: listening on {host}, ports {listed}", flush=True)
    secret = random_token(24)
    async with contextlib.AsyncExitStack() as stack:
        try:
            idp = await start_devidp(
                DevIdpConfig(
                    users=demo_users(),
                    clients=[
                        ClientRegistration(
                            client_id="gateway-demo",
                            client_secret=secret,
                            redirect_uris=(gateway_url + paths.CALLBACK,),
                            post_logout_redirect_uris=(gateway_url + paths.SIGNED_OUT,),
                            backchannel_logout_uri=gateway_url + paths.BACKCHANNEL_LOGOUT,
                        )
                    ],
                ),
                host=host,
                port=port + 1 if port else 0,
            )
        except OSError as exc:
            raise _port_taken(exc, host, port + 1, "the identity provider", needs) from None
        stack.push_async_callback(idp.close)
        try:
            echo = await start_echo(host, port + 2 if port else 0)
        except OSError as exc:
            raise _port_taken(exc, host, port + 2, "the echo upstream", needs) from None
        stack.push_async_callback(echo.close)
        settings = demo_settings(gateway_url, str(idp.url), str(echo.url), secret)
        runner = web.AppRunner(create_app(settings), access_log=None)
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as exc:
            raise _port_taken(exc, host, port, "the gateway", needs) from None
        print(
            f"\n  Gateway demo ready: open {gateway_url}/\n"
            f"  Identity provider:  {idp.url}/   Echo upstream (behind the gateway): {echo.url}/\n"
            "  Demo users:         alice / alice (groups admins, staff)\n"
            "                      bob / bob     (group staff)\n"
            f"  Public route:       {gateway_url}/public (no login)\n"
            f"  Sign out:           {gateway_url}{paths.SIGN_OUT}\n"
            "  Stop with Ctrl-C.\n",
            flush=True,
        )
        if ready is not None:
            ready.set()
        await asyncio.Event().wait()


def _bind_host(host: str, container: bool, what: str) -> str:
    """``host`` if loopback, or anything with ``--container``; else ValueError."""
    if container:
        return host
    try:
        _loopback(host)
    except ValueError:
        raise ValueError(
            f"{what} binds to loopback only, not {host!r}; inside a container whose port is "
            "published to loopback, pass --container"
        ) from None
    return "127.0.0.1" if host == "localhost" else host


async def _serve(app: web.Application, host: str, port: int, what: str) -> None:
    """Serve ``app`` until cancelled (no access log: query strings carry codes)."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as exc:
            raise _port_taken(exc, host, port, what) from None
        print(f"gateway: {what} listening on {host}:{port}", flush=True)
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


async def run_devidp(args: argparse.Namespace) -> None:
    """``gateway devidp``: the development provider with the demo users and one client."""
    host = _bind_host(args.host, args.container, "the development provider")
    secret = os.environ.get(args.client_secret_env)
    if not secret:
        raise ValueError(
            f"set the client secret in the environment variable {args.client_secret_env}"
        )
    rp = args.relying_party.rstrip("/")
    shown = f"[{host}]" if ":" in host else host
    cfg = DevIdpConfig(
        users=demo_users(),
        clients=[
            ClientRegistration(
                client_id=args.client_id,
                client_secret=secret,
                redirect_uris=(rp + paths.CALLBACK,),
                post_logout_redirect_uris=(rp + paths.SIGNED_OUT, rp + "/"),
                backchannel_logout_uri=rp + paths.BACKCHANNEL_LOGOUT,
            )
        ],
        issuer=(args.issuer or f"http://{shown}:{args.port}").rstrip("/"),
    )
    problems = cfg.problems()
    if problems:
        raise ValueError("; ".join(problems))
    await _serve(create_devidp_app(cfg), host, args.port, "the development provider")


async def run_echo(host: str, port: int, *, container: bool = False) -> None:
    """``gateway echo``: the echo upstream that shows what the gateway sent it."""
    bind = _bind_host(host, container, "the echo upstream")
    await _serve(create_echo_app(), bind, port, "the echo upstream")

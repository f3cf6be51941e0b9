"""Several providers as real processes: two ``gateway devidp`` processes (``corp`` and
``partners``, both with the demo users, so ``alice`` is the same ``sub`` at both) and a
``gateway run`` process with ``providers:`` of both, on a real Redis.

A provider process has no counter a test could read, so each is reached through a
``TokenWitness``: a transparent loopback forwarder that is the provider's issuer URL (the
devidp's ``--issuer``), so the browser and the gateway reach the provider only through it,
and it counts the grants sent to ``POST /token``. It changes nothing it forwards.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from gateway.echo import start_echo
from tests.conftest import CLIENT_ID, CLIENT_SECRET
from tests.gateway_proc import GatewayProcess, start_gateway_process
from tests.support.ports import free_port
from tests.support.processes import serving
from tests.support.providers import multi_config

PROVIDER_IDS = ("corp", "partners")
# Hop-by-hop headers (RFC 9110 §7.6.1) and those the client library recomputes.
_NOT_FORWARDED = {
    "connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
    "upgrade", "host", "content-length", "content-encoding",
}  # fmt: skip


class TokenWitness:
    """Forwards everything at ``url`` to a provider at ``upstream``; counts token grants."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.grants: Counter[str] = Counter()  # grant_type -> POST /token calls
        self._runner: web.AppRunner | None = None
        self._http: aiohttp.ClientSession | None = None

    def code_exchanges(self) -> int:
        return self.grants["authorization_code"]

    async def start(self) -> None:
        # No cookie jar of its own: every browser's cookies pass through untouched.
        self._http = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._http is not None:
            await self._http.close()

    async def _forward(self, request: web.Request) -> web.Response:
        assert self._http is not None
        body = await request.read()
        if request.method == "POST" and request.path == "/token":
            for grant in parse_qs(body.decode("ascii", "replace")).get("grant_type", [""]):
                self.grants[grant] += 1
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _NOT_FORWARDED]
        async with self._http.request(
            request.method,
            self.upstream + request.path_qs,
            headers=CIMultiDict(headers),
            data=body,
            allow_redirects=False,
        ) as resp:
            payload = await resp.read()
            back = [(k, v) for k, v in resp.headers.items() if k.lower() not in _NOT_FORWARDED]
            return web.Response(status=resp.status, body=payload, headers=CIMultiDict(back))


@dataclass
class ProcessStack:
    gateway: GatewayProcess
    witnesses: dict[str, TokenWitness]  # by provider id; each one's url is that issuer

    @property
    def url(self) -> str:
        return self.gateway.url

    def idp_url(self, provider: str) -> str:
        """Where browsers and the gateway reach that provider: its issuer."""
        return self.witnesses[provider].url

    def code_exchanges(self, provider: str) -> int:
        return self.witnesses[provider].code_exchanges()


@contextlib.asynccontextmanager
async def provider_processes(workdir: Path, redis_url: str) -> AsyncIterator[ProcessStack]:
    """Two ``gateway devidp`` processes behind witnesses, an echo upstream, ``gateway run``."""
    gw_port = free_port()
    public = f"http://127.0.0.1:{gw_port}"
    env = {"DEVIDP_CLIENT_SECRET": CLIENT_SECRET}
    async with contextlib.AsyncExitStack() as stack:
        witnesses: dict[str, TokenWitness] = {}
        for pid in PROVIDER_IDS:
            port = free_port()
            witness = TokenWitness(f"http://127.0.0.1:{port}")
            await witness.start()
            stack.push_async_callback(witness.close)
            witnesses[pid] = witness
            devidp = serving(
                "devidp", "--port", str(port), "--issuer", witness.url,
                "--relying-party", public, "--client-id", CLIENT_ID,
                port=port, env=env,
            )  # fmt: skip
            await stack.enter_async_context(devidp)
        echo = await start_echo()
        stack.push_async_callback(echo.close)
        issuers = {pid: w.url for pid, w in witnesses.items()}
        cfg = multi_config(public, issuers, str(echo.url), redis_url)
        cfg["server"]["port"] = gw_port
        gateway = await start_gateway_process(cfg, workdir, name="gateway-multi")
        stack.push_async_callback(gateway.close)
        yield ProcessStack(gateway, witnesses)

"""The baseline: a bare aiohttp pass-through proxy (no auth, no logs, no metrics), on uvloop.

One process per worker, all bound to the same loopback port with SO_REUSEPORT, exactly as
``gateway run --workers N`` does. Usage: ``bare_proxy.py HOST PORT UPSTREAM_URL``.
"""

import asyncio
import sys

import aiohttp
import uvloop
from aiohttp import web

HOP = {"connection", "keep-alive", "transfer-encoding", "te", "upgrade", "host", "content-length"}


def make_app(upstream: str) -> web.Application:
    async def proxy(request: web.Request) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
        body = await request.read() if request.body_exists else None
        async with request.app[CLIENT].request(
            request.method, upstream + request.path_qs, headers=headers, data=body,
            allow_redirects=False, skip_auto_headers=("Accept-Encoding", "User-Agent"),
        ) as up:  # fmt: skip
            out = {k: v for k, v in up.headers.items() if k.lower() not in HOP}
            return web.Response(status=up.status, body=await up.read(), headers=out)

    async def client(app: web.Application):  # type: ignore[no-untyped-def]
        jar = aiohttp.DummyCookieJar()
        async with aiohttp.ClientSession(auto_decompress=False, cookie_jar=jar) as http:
            app[CLIENT] = http
            yield

    app = web.Application()
    app.cleanup_ctx.append(client)
    app.router.add_route("*", "/{tail:.*}", proxy)
    return app


CLIENT = web.AppKey("client", aiohttp.ClientSession)


async def main(host: str, port: int, upstream: str) -> None:
    runner = web.AppRunner(make_app(upstream.rstrip("/")), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, reuse_port=True).start()
    await asyncio.Event().wait()


if __name__ == "__main__":
    uvloop.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3]))

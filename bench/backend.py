"""The backend when nginx is not installed: a tiny aiohttp app answering ``ok`` to everything.

Usage: ``backend.py PORT`` (binds 127.0.0.1 only).
"""

import sys

import uvloop
from aiohttp import web


async def ok(request: web.Request) -> web.Response:
    return web.Response(body=b"ok\n", content_type="text/plain")


if __name__ == "__main__":
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", ok)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None,
                loop=uvloop.new_event_loop())  # fmt: skip

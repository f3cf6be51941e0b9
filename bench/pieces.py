"""The cost of each per-request piece of the gateway, in microseconds, measured in-process.

Every piece is the gateway's real function called in a ``timeit``-style loop (best of five
repeats, like ``timeit``), against real servers where it talks to one (Redis, the upstream).
Not a test: nothing is asserted; ``measure`` returns rows for the results table.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
import timeit
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from bench.bare_proxy import make_app as bare_app
from gateway.app import create_app
from gateway.config import Settings
from gateway.cookies import CookiePolicy
from gateway.crypto import KeyRing, decode_secret
from gateway.gate import Gate
from gateway.headers import client_headers, upstream_headers
from gateway.logs import CoalescedStream, configure_logging
from gateway.metrics import Metrics
from gateway.middleware import log_access
from gateway.policy import RouteTable, check_requirements, normalize_path
from gateway.proxy import ProxyTarget, upstream_url
from gateway.routes import Routes, identity_headers, protected_header_names
from gateway.session import Ticket
from gateway.sessions import SessionManager
from gateway.store.redis import RedisStore

REPEAT = 5


@dataclass(frozen=True)
class Piece:
    name: str
    micros: float
    covers: str


def best(fn: Callable[[], object], number: int) -> float:
    """Microseconds per call, best of REPEAT (``timeit``'s convention: the least disturbed)."""
    return min(timeit.repeat(fn, number=number, repeat=REPEAT)) / number * 1e6


async def abest(fn: Callable[[], Awaitable[object]], number: int) -> float:
    out = float("inf")
    for _ in range(REPEAT):
        start = time.perf_counter()
        for _ in range(number):
            await fn()
        out = min(out, (time.perf_counter() - start) / number)
    return out * 1e6


def _wrk_headers(host: str, cookie_name: str, cookie: str) -> CIMultiDictProxy[str]:
    """The headers wrk sends to the gateway."""
    return CIMultiDictProxy(CIMultiDict({"Host": host, "Cookie": f"{cookie_name}={cookie}"}))


# Access lines written together in the access-log piece, as if that many requests ended in
# one loop iteration (a figure picked for the piece, not measured under load).
_LINES_A_WRITE = 8
# The backend's answer headers (nginx, `return 200 "ok"`).
_NGINX_ANSWER = [("Server", "nginx"), ("Date", "Sun, 29 Nov 2026 01:00:00 GMT"),
                 ("Content-Type", "text/plain"), ("Content-Length", "3"),
                 ("Connection", "keep-alive")]  # fmt: skip


@contextlib.contextmanager
def _access_log_to_null() -> Any:
    """The gateway's JSON log set-up, writing to /dev/null instead of stderr."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    with open(os.devnull, "w") as null:
        configure_logging("json", "info")
        root.handlers[0].setStream(CoalescedStream(null))  # type: ignore[attr-defined]
        try:
            yield
        finally:
            root.handlers[:], _ = saved
            root.setLevel(saved[1])


async def measure(
    settings: Settings, cookie: str, backend_url: str, quick: bool
) -> tuple[list[Piece], list[tuple[str, float, float]], list[tuple[str, str, float]]]:
    """The per-piece rows, the profile of whole requests by area (bare, gateway), and the
    functions with the most own time in the gateway's requests."""
    n = 200 if quick else 3_000
    n_io = 50 if quick else 600
    rows: list[Piece] = []

    def add(name: str, micros: float, covers: str) -> None:
        rows.append(Piece(name, micros, covers))

    ring = KeyRing([decode_secret(s.get_secret_value()) for s in settings.session.cookie_secrets])
    store = RedisStore.from_url(
        settings.session.redis_url.get_secret_value(), prefix=settings.session.key_prefix
    )
    # open() and touch() never reach the provider: none is needed for these pieces.
    sessions = SessionManager(settings.session, store, ring, provider=None)  # type: ignore[arg-type]
    try:
        ticket = Ticket.from_cookie(cookie, ring)
        key = ticket.store_key
        raw = await store.load(key)
        assert raw is not None, "the benchmark's session is not in Redis"
        session = ticket.open_record(raw)
        loaded = await sessions.open(cookie)
        assert loaded is not None
        routes = RouteTable(settings.routes)
        route = routes.match("/")
        assert route is not None
        strip = protected_header_names(settings)
        own_cookies = CookiePolicy.from_settings(settings.session).own
        upstream = URL(route.settings.upstream)
        mapping = route.settings.identity_headers
        metrics = Metrics()
        host = f"127.0.0.1:{settings.server.port}"
        headers = _wrk_headers(host, settings.session.cookie_name, cookie)

        # -- the request's own bookkeeping (access_log middleware) --------------------------
        extra = {"request_id": "0" * 32, "method": "GET", "path": "/", "status": 200,
                 "duration_ms": 1.23, "route": "/", "remote": "127.0.0.1"}  # fmt: skip
        with _access_log_to_null():
            handler = logging.getLogger().handlers[0]
            lines = iter(range(1 << 62))

            def access_line() -> None:
                log_access("GET", "/", 200, dict(extra))
                if next(lines) % _LINES_A_WRITE == _LINES_A_WRITE - 1:
                    handler.flush()  # what the loop's next iteration does

            add("access-log line (JSON, to /dev/null)", best(access_line, n),
                f"`middleware.log_access`: the line made directly (`logs.json_line`, no `LogRecord`), collected and written {_LINES_A_WRITE} lines a write (`logs.CoalescedStream`)")  # fmt: skip
        add("request id (validate the client's, else generate)",
            best(lambda: _request_id(headers), n), "`middleware.request_id`: regex match, else an id from a pool of random bytes")  # fmt: skip
        add("metrics observe", best(lambda: metrics.observe("/", 200, 0.002), n),
            "`Metrics.observe`: counter + histogram children, bound once per route and status")  # fmt: skip

        # -- authentication ----------------------------------------------------------------
        add("path normalise + route match",
            best(lambda: routes.match(normalize_path("/")), n), "`normalize_path`, `RouteTable.match`")  # fmt: skip
        gate, compiled_routes = Gate(), Routes(settings, lambda _: None)  # type: ignore[arg-type,return-value]
        add("Gate.resolve (repeat path)", best(lambda: gate.resolve("/", compiled_routes), n),
            "what the gate does per request: the normalized path and route remembered per raw path (a new path adds the row above and the own-endpoint checks)")  # fmt: skip
        add("cookie open (ticket AEAD)", best(lambda: Ticket.from_cookie(cookie, ring), n),
            "`Ticket.from_cookie`: base64 + AES-GCM open under the cookie key ring")  # fmt: skip
        add("store key (SHA-256 of the id)",
            best(lambda: Ticket(ticket.session_id, ticket.key).store_key, n),
            "a `Ticket` made and its `store_key` (worked out once, when the ticket is made)")  # fmt: skip
        add("store load (Redis GET round trip)", await abest(lambda: store.load(key), n_io),
            "`RedisStore.load` against the benchmark's redis-server on loopback")  # fmt: skip
        add("record open (AEAD + JSON → Session)", best(lambda: ticket.open_record(raw), n),
            "`Ticket.open_record`: AES-GCM open, `json.loads`, dataclasses")  # fmt: skip
        add("SessionManager.open (repeat request)", await abest(lambda: sessions.open(cookie), n_io),
            "a remembered cookie (its ticket and store key) + a session-cache hit; a new cookie adds the cookie open, a miss the store load and record open")  # fmt: skip
        add("touch (rate-limited, no write)", await abest(lambda: sessions.touch(loaded), n),
            "`SessionManager.touch` when the last touch is recent (the usual case)")  # fmt: skip
        cache = sessions.cache
        if cache is not None and cache.trusted and cache.get(key, ticket) is not None:
            add("cache hit", best(lambda: cache.get(key, ticket), n),
                "`SessionCache.get`: LRU lookup, ticket and expiry check")  # fmt: skip
        else:
            add("cache hit", float("nan"), "n/a: the cache was off or not trusted in this run")
        add("policy check", best(lambda: check_requirements(route.settings, session.identity,
                                                             session.tokens.scope), n),
            "`check_requirements` (no `require` on the route)")  # fmt: skip

        # -- forwarding --------------------------------------------------------------------
        add("identity headers (worked out)",
            best(lambda: identity_headers(mapping, session.identity), n),
            "`routes.identity_headers`: claims → X-Forwarded-* values")  # fmt: skip
        compiled = Routes(settings, lambda _: None).compiled[0]  # type: ignore[arg-type,return-value]
        add("identity headers (kept)", best(lambda: compiled.identity(session.identity), n),
            "`CompiledRoute.identity` for the same `Identity` again (a cached session): a copy of the kept headers")  # fmt: skip
        inject = identity_headers(mapping, session.identity)

        def target() -> ProxyTarget:
            return ProxyTarget(
                upstream=upstream, path="/", query_string="", inject=inject,
                strip=strip, own_cookies=own_cookies,
                forwarded_for="127.0.0.1", forwarded_proto="http", forwarded_host=host,
            )  # fmt: skip

        add("ProxyTarget + upstream URL", best(lambda: upstream_url(target()), n),
            "the per-request `ProxyTarget` (rebuilt every time) and `upstream_url`")  # fmt: skip
        t = target()
        add("upstream request headers",
            best(lambda: upstream_headers(
                headers, strip=t.strip, inject=t.inject, own_cookies=t.own_cookies,
                forwarded_for=t.forwarded_for, forwarded_proto=t.forwarded_proto,
                forwarded_host=t.forwarded_host, host=None, keep_content_length=False), n),
            "`headers.upstream_headers`: strip, own-cookie filter, X-Forwarded-*, identity")  # fmt: skip
        answer = CIMultiDictProxy(CIMultiDict(_NGINX_ANSWER))
        add("client response headers", best(lambda: client_headers(answer, own_cookies), n),
            "`headers.client_headers`: hop-by-hop and own `Set-Cookie` removed from nginx's answer")  # fmt: skip
        with _access_log_to_null():
            whole, areas, top = await _whole_requests(settings, cookie, backend_url, n_io)
            rows.extend(whole)
    finally:
        await store.close()
    return rows, areas, top


def _request_id(headers: CIMultiDictProxy[str]) -> str:
    from gateway.middleware import request_id

    return request_id(headers.get("X-Request-Id", ""))


async def _serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


async def _whole_requests(
    settings: Settings, cookie: str, backend_url: str, number: int
) -> tuple[list[Piece], list[tuple[str, float, float]], list[tuple[str, str, float]]]:
    """One request at a time through each proxy, served in this process, from a client in
    this process: the difference is what the gateway adds to one request, all pieces in."""
    bare, bare_url = await _serve(bare_app(backend_url))
    gw, gw_url = await _serve(create_app(settings))
    rows: list[Piece] = []
    jar = aiohttp.DummyCookieJar()
    try:
        async with aiohttp.ClientSession(cookie_jar=jar) as http:

            async def get(url: str, headers: dict[str, str]) -> None:
                async with http.get(url, headers=headers, allow_redirects=False) as resp:
                    if resp.status != 200:
                        raise RuntimeError(f"{url} answered {resp.status}")
                    await resp.read()

            cookie_header = {"Cookie": f"{settings.session.cookie_name}={cookie}"}
            await asyncio.gather(get(bare_url + "/", {}), get(gw_url + "/", cookie_header))
            b = await abest(lambda: get(bare_url + "/", {}), number)
            g = await abest(lambda: get(gw_url + "/", cookie_header), number)
            areas_bare = await profile_areas(lambda: get(bare_url + "/", {}), number)
            top: list[tuple[str, str, float]] = []
            areas_gw = await profile_areas(lambda: get(gw_url + "/", cookie_header), number, top)
    finally:
        await gw.cleanup()
        await bare.cleanup()
    rows.append(Piece("whole request via the bare proxy (in-process)", b,
                      "client → bare proxy → nginx → back, one at a time, same process"))  # fmt: skip
    rows.append(Piece("whole request via the gateway (in-process)", g,
                      "client → gateway (Redis, JSON access log, metrics) → nginx → back, one at a time"))  # fmt: skip
    rows.append(Piece("gateway minus bare proxy", g - b, "what the gateway adds to one request"))
    areas = [(a, areas_bare.get(a, 0.0), areas_gw.get(a, 0.0)) for a in AREAS]
    return rows, areas, top


# Where a profiled function lives → the part of the stack it belongs to (first match wins).
_AREA_OF = (
    ("/gateway/", "gateway's own code"),
    ("pythonjsonlogger", "logging (access log)"),
    ("/logging/", "logging (access log)"),
    ("prometheus_client", "metrics (prometheus-client)"),
    ("/redis/", "redis-py (store load)"),
    ("AESGCM", "AES-GCM (cryptography)"),
    ("/cryptography/", "AES-GCM (cryptography)"),
    ("/json/", "json"),
    ("/aiohttp/", "aiohttp, multidict, yarl (server and client)"),
    ("/multidict/", "aiohttp, multidict, yarl (server and client)"),
    ("/yarl/", "aiohttp, multidict, yarl (server and client)"),
    ("/asyncio/", "asyncio / uvloop"),
    ("uvloop", "asyncio / uvloop"),
)
AREAS = (*dict.fromkeys(area for _, area in _AREA_OF), "everything else")
TOP = 15
_REPO = str(Path(__file__).resolve().parents[1]) + "/"


async def profile_areas(
    fn: Callable[[], Awaitable[object]],
    number: int,
    top: list[tuple[str, str, float]] | None = None,
) -> dict[str, float]:
    """Profiled time per request (µs), by the part of the stack each function belongs to.
    The client's share is in it for both proxies alike; the profiler inflates Python code
    more than C code, so read the columns against each other, not as absolute costs."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(number):
        await fn()
    profiler.disable()
    stats = pstats.Stats(profiler)
    out: dict[str, float] = {}
    functions = []
    for (filename, line, name), row in stats.stats.items():  # type: ignore[attr-defined]
        where = f"{filename} {name}"
        area = next((a for needle, a in _AREA_OF if needle in where), "everything else")
        micros = row[2] / number * 1e6  # tottime: the function's own time
        out[area] = out.get(area, 0.0) + micros
        short = re.split(r"site-packages/|/lib/python3\.\d+/", filename)[-1]
        short = short.replace(_REPO, "")
        functions.append((f"`{short}:{line} {name}`" if line else f"`{name}`", area, micros))
    if top is not None:
        top.extend(sorted(functions, key=lambda f: f[2], reverse=True)[:TOP])
    return out

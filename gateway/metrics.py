"""Prometheus metrics (prometheus-client), one registry per app, and the optional separate
listener on ``observability.metrics_listen``.

Labels carry route prefixes, status codes and fixed result words, never a path with user
data, a token or a cookie (SECURITY.md 22). With ``metrics_listen`` set, ``/metrics`` is
served only there (started from ``create_app``'s ``cleanup_ctx``), so the public port can
keep it away from the internet; without it, ``/metrics`` is on the main port.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

from gateway.config import Settings

__all__ = ["METRICS", "Metrics", "metrics_handler", "metrics_listener", "start_metrics_server"]

log = logging.getLogger("gateway.metrics")
# The ``route`` label of everything the gateway answers itself (its /oauth2/* endpoints,
# health checks, /metrics) and of requests that match no route.
OWN_ROUTE = "gateway"
LOGIN_RESULTS = ("success", "failure")
# ``ended``: the provider refused the grant (invalid_grant...), the user must log in again;
# ``failure``: the provider could not be reached or answered an error, the session is kept.
REFRESH_RESULTS = ("success", "failure", "ended")
UPSTREAM_KINDS = ("bad_gateway", "timeout")  # 502, 504
LOGOUT_KINDS = ("sign_out", "backchannel")


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter(
            "gateway_requests_total", "Requests answered", ["route", "status"], registry=r
        )
        self.latency = Histogram(
            "gateway_request_duration_seconds",
            "Time from the request to the response headers",
            ["route"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.logins = Counter(
            "gateway_logins_total", "Completed logins by result", ["result"], registry=r
        )
        self.refreshes = Counter(
            "gateway_token_refreshes_total", "Token refreshes by result", ["result"], registry=r
        )
        self.store_errors = Counter(
            "gateway_store_errors_total", "Requests failed by the session store", registry=r
        )
        self.upstream_errors = Counter(
            "gateway_upstream_errors_total", "Upstream failures (502, 504)", ["kind"], registry=r
        )
        self.websockets = Gauge("gateway_websockets_open", "Proxied websockets open", registry=r)
        self.logouts = Counter(
            "gateway_logouts_total", "Sessions ended by kind", ["kind"], registry=r
        )
        # Every known label value is exported from the start (as 0): a rate() over a
        # series that appears only at its first event misses that event.
        for result in LOGIN_RESULTS:
            self.logins.labels(result=result)
        for result in REFRESH_RESULTS:
            self.refreshes.labels(result=result)
        for kind in UPSTREAM_KINDS:
            self.upstream_errors.labels(kind=kind)
        for kind in LOGOUT_KINDS:
            self.logouts.labels(kind=kind)

    def observe(self, route: str, status: int, seconds: float) -> None:
        """One answered request."""
        self.requests.labels(route=route, status=str(status)).inc()
        self.latency.labels(route=route).observe(seconds)

    def refreshed(self, result: str) -> None:
        self.refreshes.labels(result=result).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


METRICS = web.AppKey("metrics", Metrics)


async def metrics_handler(request: web.Request) -> web.StreamResponse:
    body = request.app[METRICS].render()
    return web.Response(
        body=body, headers={"Content-Type": CONTENT_TYPE_LATEST, "Cache-Control": "no-store"}
    )


def _host_port(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


async def start_metrics_server(settings: Settings, metrics: Metrics) -> web.AppRunner | None:
    """Serve /metrics on ``observability.metrics_listen`` (host:port) when it is set."""
    listen = settings.observability.metrics_listen
    if not listen:
        return None
    host, port = _host_port(listen)
    app = web.Application()
    app[METRICS] = metrics
    app.router.add_get("/metrics", metrics_handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        # reuse_port: with ``gateway run --workers N`` every worker binds the address (each
        # scrape then sees one worker's registry; see README).
        await web.TCPSite(runner, host, port, reuse_port=True).start()
    except BaseException:
        await runner.cleanup()
        raise
    log.info("metrics on http://%s/metrics", listen)
    return runner


def metrics_listener(settings: Settings) -> Callable[[web.Application], AsyncIterator[None]]:
    """A ``cleanup_ctx``: the separate metrics listener lives as long as the app."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        runner = await start_metrics_server(settings, app[METRICS])
        yield
        if runner is not None:
            await runner.cleanup()

    return ctx

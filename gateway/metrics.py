"""Prometheus metrics (prometheus-client), one registry per app, and the optional separate
listener on ``observability.metrics_listen``. Labels carry route prefixes and status codes,
never a path with user data, a token or a cookie.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

from gateway.config import Settings


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
            "Time to the response headers",
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
            "gateway_store_errors_total", "Session store failures", registry=r
        )
        self.upstream_errors = Counter(
            "gateway_upstream_errors_total", "Upstream failures", ["kind"], registry=r
        )
        self.websockets = Gauge("gateway_websockets_open", "Proxied websockets open", registry=r)
        self.logouts = Counter(
            "gateway_logouts_total", "Sessions ended by kind", ["kind"], registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


METRICS = web.AppKey("metrics", Metrics)


async def metrics_handler(request: web.Request) -> web.StreamResponse:
    body = request.app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def start_metrics_server(settings: Settings, metrics: Metrics) -> web.AppRunner | None:
    """Serve /metrics on ``observability.metrics_listen`` (host:port) when it is set."""
    listen = settings.observability.metrics_listen
    if not listen:
        return None
    host, _, port = listen.rpartition(":")
    app = web.Application()
    app[METRICS] = metrics
    app.router.add_get("/metrics", metrics_handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host.strip("[]") or "127.0.0.1", int(port)).start()
    return runner

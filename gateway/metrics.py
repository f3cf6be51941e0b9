"""Prometheus metrics (prometheus-client), one registry per app, and the optional separate
listener on ``observability.metrics_listen``.

Labels carry route prefixes, status codes and fixed result words, never a path with user
data, a token or a cookie (SECURITY.md 22). With ``metrics_listen`` set, ``/metrics`` is
served only there (started from ``create_app``'s ``cleanup_ctx``), so the public port can
keep it away from the internet; without it, ``/metrics`` is on the main port, answered only to
a loopback peer that came through no proxy unless ``observability.metrics_public`` is set.

With ``gateway run --workers N`` the parent gives every worker one private directory
(:func:`enable_multiprocess`); each worker's values live in files there and every scrape sums
them, whichever worker answers (prometheus-client's multiprocess mode).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    values,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from gateway import __version__
from gateway.config import Settings

__all__ = [
    "METRICS",
    "Metrics",
    "enable_multiprocess",
    "main_port_metrics",
    "metrics_handler",
    "metrics_listener",
    "start_metrics_server",
]

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


MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Requests through a proxy carry one of these; a loopback peer with one is not "local".
_FORWARDING_HEADERS = ("Forwarded", "X-Forwarded-For", "X-Real-IP")


def enable_multiprocess(directory: str) -> None:
    """Keep this process's metric values in ``directory`` (shared with the other workers).

    Call before the first ``Metrics()``; prometheus-client reads the variable for every value.
    """
    os.environ[MULTIPROC_ENV] = directory
    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]


def multiprocess_dir() -> str | None:
    """The directory :func:`enable_multiprocess` set in this process, if any."""
    if values.ValueClass is values.MutexValue:
        return None
    return os.environ.get(MULTIPROC_ENV)


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    # Set: ``render`` sums the values of every worker found in this directory.
    multiprocess_dir: str | None = field(default_factory=multiprocess_dir)
    # (route, status) -> the request counter's and the latency histogram's children.
    _per_request: dict[tuple[str, int], tuple[Counter, Histogram]] = field(
        default_factory=dict, init=False, repr=False
    )

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
        self.websockets = Gauge(
            "gateway_websockets_open",
            "Proxied websockets open",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.build_info = Gauge(
            "gateway_build_info",
            "The gateway's version, as a label; the value is always 1",
            ["version"],
            registry=r,
            multiprocess_mode="max",
        )
        self.build_info.labels(version=__version__).set(1)
        if self.multiprocess_dir is None:
            ProcessCollector(registry=r)
        self.logouts = Counter(
            "gateway_logouts_total", "Sessions ended by kind", ["kind"], registry=r
        )
        # Every known label value is exported from the start (as 0): a rate() over a
        # series that appears only at its first event misses that event.
        self._logins = {result: self.logins.labels(result=result) for result in LOGIN_RESULTS}
        for result in REFRESH_RESULTS:
            self.refreshes.labels(result=result)
        for kind in UPSTREAM_KINDS:
            self.upstream_errors.labels(kind=kind)
        for kind in LOGOUT_KINDS:
            self.logouts.labels(kind=kind)

    def observe(self, route: str, status: int, seconds: float) -> None:
        """One answered request.

        The labelled children are resolved once per (route, status) and kept: ``labels()``
        costs more than the increment itself. The table holds no more than prometheus-client
        keeps anyway (a child per label set): routes come from the configuration, statuses
        are three-digit codes.
        """
        children = self._per_request.get((route, status))
        if children is None:
            children = (
                self.requests.labels(route=route, status=str(status)),
                self.latency.labels(route=route),
            )
            self._per_request[(route, status)] = children
        children[0].inc()
        children[1].observe(seconds)

    def login(self, result: str) -> None:
        """One completed login (``result`` is one of ``LOGIN_RESULTS``)."""
        self._logins[result].inc()

    def refreshed(self, result: str) -> None:
        self.refreshes.labels(result=result).inc()

    def render(self) -> bytes:
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self.multiprocess_dir)  # type: ignore[no-untyped-call]
        registry.register(WorkersProcessCollector(self.multiprocess_dir))
        return generate_latest(registry)


_LIVE_FILE = re.compile(r"^gauge_livesum_(\d+)\.db$")


class WorkersProcessCollector:
    """``process_*`` metrics summed over the live workers of a multiprocess directory.

    A worker is live while its ``livesum`` gauge file exists: the parent removes it when the
    worker dies (``mark_process_dead``). CPU, memory and descriptors add up; the start time
    is the oldest worker's.
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def _pids(self) -> list[int]:
        try:
            names = os.listdir(self.directory)
        except OSError:
            return []
        return sorted(int(m.group(1)) for n in names if (m := _LIVE_FILE.match(n)))

    def collect(self) -> Iterable[Metric]:
        totals: dict[str, float] = {}
        docs: dict[str, tuple[str, str]] = {}
        for pid in self._pids():
            collector = ProcessCollector(pid=lambda pid=pid: pid, registry=None)  # type: ignore[misc]
            for family in collector.collect():
                docs[family.name] = (family.type, family.documentation)
                for sample in family.samples:
                    if sample.name not in totals:
                        totals[sample.name] = sample.value
                    elif sample.name == "process_start_time_seconds":
                        totals[sample.name] = min(totals[sample.name], sample.value)
                    else:
                        totals[sample.name] += sample.value
        for name, (kind, doc) in docs.items():
            if kind == "counter":
                yield CounterMetricFamily(name, doc, value=totals[name + "_total"])
            elif name in totals:
                yield GaugeMetricFamily(name, doc, value=totals[name])


METRICS = web.AppKey("metrics", Metrics)


def _local_peer(request: web.Request) -> bool:
    """A loopback peer that came through no proxy: a scraper on this host."""
    peer = request.transport.get_extra_info("peername") if request.transport else None
    try:
        address = ipaddress.ip_address(peer[0]) if peer else None
    except ValueError:
        return False
    if address is None or not address.is_loopback:
        return False
    return not any(name in request.headers for name in _FORWARDING_HEADERS)


def main_port_metrics(settings: Settings) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """``/metrics`` on the main port: for a local scraper, or anyone with ``metrics_public``.

    Any other peer gets 404, as if there were no such endpoint: a gateway that listens on the
    internet does not publish its traffic figures by accident.
    """
    public = settings.observability.metrics_public

    async def handler(request: web.Request) -> web.StreamResponse:
        if not public and not _local_peer(request):
            raise web.HTTPNotFound()
        return await metrics_handler(request)

    return handler


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
        # reuse_port: with ``gateway run --workers N`` every worker binds the address; each
        # answers the sum over all workers (multiprocess mode).
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

"""OpenTelemetry tracing (``observability.tracing``), optional: ``pip install gateway[otel]``.

Spans: the request (a server span, continuing the client's W3C ``traceparent`` when it sent
one), the session load, every provider call (discovery, JWKS, token, refresh, userinfo,
revocation, introspection), and the upstream call, whose ``traceparent`` is sent upstream.

Without the extra installed, or with tracing off, ``Tracing`` is a no-op that costs a
function call. The gateway builds its own ``TracerProvider`` (no global one is installed), so
two apps in one process never share spans. No span attribute ever holds a query string, a
header value, a token or a secret: method, path, route, status, upstream host:port, and the
provider endpoint's path.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, MutableMapping
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.typedefs import Handler

if TYPE_CHECKING:
    from gateway.config import TracingSettings

log = logging.getLogger("gateway.tracing")

try:  # the optional extra
    from opentelemetry import trace as otel
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    AVAILABLE = True
except ImportError:  # pragma: no cover - exercised where the extra is not installed
    AVAILABLE = False


_NO_SPAN = contextlib.nullcontext()


class Tracing:
    """Spans for one app; ``Tracing()`` (no provider) does nothing."""

    def __init__(self, provider: Any = None) -> None:
        self.provider = provider
        self._tracer = provider.get_tracer("gateway") if provider is not None else None
        self._propagator = TraceContextTextMapPropagator() if provider is not None else None

    @classmethod
    def from_settings(cls, settings: TracingSettings) -> Tracing:
        if not settings.enabled:
            return cls()
        if not AVAILABLE:
            log.warning(
                "observability.tracing.enabled is set but OpenTelemetry is not installed "
                "(pip install 'gateway[otel]'); tracing is off"
            )
            return cls()
        resource = Resource.create({"service.name": settings.service_name})
        sampler = ParentBased(TraceIdRatioBased(settings.sample_ratio))
        provider = TracerProvider(resource=resource, sampler=sampler)
        exporter: Any = None
        if settings.exporter == "console":
            exporter = ConsoleSpanExporter()
        elif settings.exporter == "otlp":
            try:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[import-not-found,unused-ignore]
                    OTLPSpanExporter,
                )
            except ImportError:
                log.warning(
                    "tracing exporter otlp needs opentelemetry-exporter-otlp-proto-http; "
                    "spans are propagated but not exported"
                )
            else:
                exporter = OTLPSpanExporter(endpoint=settings.endpoint)
        if exporter is not None:
            provider.add_span_processor(BatchSpanProcessor(exporter))
        return cls(provider)

    @property
    def enabled(self) -> bool:
        return self._tracer is not None

    def span(
        self, name: str, kind: str = "internal", attributes: dict[str, Any] | None = None
    ) -> contextlib.AbstractContextManager[Any]:
        """A child of the current span; yields the span (None when tracing is off: one shared
        ``nullcontext``, nothing made per call on the hot path)."""
        if self._tracer is None:
            return _NO_SPAN
        return self._span(name, kind, attributes)

    @contextlib.contextmanager
    def _span(self, name: str, kind: str, attributes: dict[str, Any] | None) -> Iterator[Any]:
        assert self._tracer is not None
        attrs = {k: v for k, v in (attributes or {}).items() if v is not None}
        with self._tracer.start_as_current_span(name, kind=_kind(kind), attributes=attrs) as span:
            yield span

    def inject(self, headers: MutableMapping[str, str]) -> None:
        """Set ``traceparent`` (and ``tracestate``) for the current span, replacing any."""
        if self._propagator is not None:
            self._propagator.inject(headers)

    def middleware(self) -> Any:
        """The request's server span, continuing the client's ``traceparent``."""
        tracer, propagator = self._tracer, self._propagator
        # Here, not at the top: gateway.keys (imported by gateway.middleware) imports this module.
        from gateway import keys
        from gateway.middleware import failed_status

        @web.middleware
        async def trace_request(request: web.Request, handler: Handler) -> web.StreamResponse:
            if tracer is None or propagator is None:
                return await handler(request)
            parent = propagator.extract({k.lower(): v for k, v in request.headers.items()})
            with tracer.start_as_current_span(
                f"{request.method} gateway",
                context=parent,
                kind=otel.SpanKind.SERVER,
                attributes={"http.request.method": request.method, "url.path": request.path},
            ) as span:
                status = 500
                try:
                    resp = await handler(request)
                    status = resp.status
                    return resp
                except BaseException as exc:
                    status = failed_status(exc)
                    raise
                finally:
                    route = request.get(keys.ROUTE_LABEL)
                    if route is not None:
                        span.set_attribute("http.route", route)
                    span.set_attribute("http.response.status_code", status)
                    if status >= 500:
                        span.set_status(otel.StatusCode.ERROR)

        return trace_request

    async def shutdown(self) -> None:
        if self.provider is not None:
            self.provider.shutdown()


def _kind(kind: str) -> Any:
    return {
        "server": otel.SpanKind.SERVER,
        "client": otel.SpanKind.CLIENT,
    }.get(kind, otel.SpanKind.INTERNAL)

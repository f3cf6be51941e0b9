"""OpenTelemetry tracing (issue 10 item 5): spans for the request, the session load, provider
calls and the upstream call; the W3C ``traceparent`` continued from the client and passed
upstream; a no-op when off or when the ``otel`` extra is not installed."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
import pytest

from gateway import keys, tracing
from gateway.config import TracingSettings
from tests.conftest import Stack
from tests.idp_client import http_login

otel_sdk = pytest.importorskip("opentelemetry.sdk.trace")
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: E402
    InMemorySpanExporter,
)
from opentelemetry.trace import StatusCode  # noqa: E402

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{CLIENT_SPAN}-01"
ON = {"tracing": {"enabled": True, "exporter": "none"}}


async def upstream_headers(http: aiohttp.ClientSession, url: str, **headers: str) -> dict[str, str]:
    async with http.get(url, headers={"Accept": "application/json", **headers}) as resp:
        assert resp.status == 200
        body = await resp.json()
    return {k.lower(): v for k, v in body["headers"]}


async def test_spans_and_traceparent_upstream(
    make_stack: Any, browser: aiohttp.ClientSession
) -> None:
    stack: Stack = await make_stack(observability=ON)
    exporter = InMemorySpanExporter()
    stack.app[keys.TRACING].provider.add_span_processor(SimpleSpanProcessor(exporter))
    await http_login(browser, stack.url + "/", "alice", "alice")
    seen = await upstream_headers(browser, stack.url + "/x?token=abc", traceparent=TRACEPARENT)

    spans = exporter.get_finished_spans()
    names = [s.name for s in spans]
    assert "provider POST authorization_code" in names
    (server,) = [s for s in spans if s.name == "GET gateway" and s.attributes["url.path"] == "/x"]
    assert format(server.context.trace_id, "032x") == TRACE_ID
    assert server.parent is not None and format(server.parent.span_id, "016x") == CLIENT_SPAN
    assert server.attributes["http.route"] == "/"
    assert server.attributes["http.response.status_code"] == 200
    children = {s.name: s for s in spans if s.parent and s.parent.span_id == server.context.span_id}
    assert {"session.load", "session.refresh", "upstream GET"} <= set(children)
    upstream = children["upstream GET"]
    assert upstream.attributes["server.address"] == stack.echo.url.raw_authority
    assert upstream.attributes["http.response.status_code"] == 200
    # The upstream got the gateway's span as its parent, in the client's trace.
    assert seen["traceparent"] == f"00-{TRACE_ID}-{upstream.context.span_id:016x}-01"
    # No query string, token or cookie in any span.
    for span in spans:
        text = repr(dict(span.attributes or {}))
        assert "abc" not in text and "token=" not in text and "gw_test" not in text


async def test_a_client_that_leaves_is_499_in_the_trace_as_in_the_access_log(
    make_stack: Any, browser: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    """``gateway run`` cancels the handler of a client that hangs up. The span reports what
    the access log reports, 499, and is no server error (it was reported as a 500 and
    marked as an error, inflating a dashboard's error rate with clients that gave up)."""
    stack: Stack = await make_stack(observability=ON, handler_cancellation=True)
    exporter = InMemorySpanExporter()
    stack.app[keys.TRACING].provider.add_span_processor(SimpleSpanProcessor(exporter))
    caplog.set_level(logging.INFO, logger="gateway.access")
    await http_login(browser, stack.url + "/", "alice", "alice")
    with pytest.raises(TimeoutError):
        await browser.get(stack.url + "/_echo/slow?delay=3", timeout=aiohttp.ClientTimeout(0.5))

    def finished() -> list[Any]:
        return [
            s
            for s in exporter.get_finished_spans()
            if s.name == "GET gateway" and s.attributes["url.path"] == "/_echo/slow"
        ]

    for _ in range(100):
        if finished():
            break
        await asyncio.sleep(0.05)
    (server,) = finished()
    assert server.attributes["http.response.status_code"] == 499
    assert server.status.status_code is StatusCode.UNSET
    (line,) = [
        r for r in caplog.records if r.name == "gateway.access" and vars(r)["path"] == "/_echo/slow"
    ]
    assert line.getMessage() == "GET /_echo/slow 499"


async def test_tracing_off_passes_the_clients_traceparent_through(
    stack: Stack, browser: aiohttp.ClientSession
) -> None:
    assert not stack.app[keys.TRACING].enabled
    await http_login(browser, stack.url + "/", "alice", "alice")
    seen = await upstream_headers(browser, stack.url + "/x", traceparent=TRACEPARENT)
    assert seen["traceparent"] == TRACEPARENT


def test_without_the_extra_tracing_is_a_logged_no_op(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(tracing, "AVAILABLE", False)
    caplog.set_level(logging.WARNING, logger="gateway.tracing")
    t = tracing.Tracing.from_settings(TracingSettings(enabled=True))
    assert not t.enabled
    with t.span("x") as span:
        assert span is None
    headers: dict[str, str] = {}
    t.inject(headers)
    assert headers == {}
    assert "OpenTelemetry is not installed" in caplog.text


def test_spans_cost_nothing_when_tracing_is_off() -> None:
    """Off, every span is one shared no-op context (the hot path opens two a request); an
    exception inside still propagates."""
    off = tracing.Tracing()
    assert not off.enabled
    first, second = off.span("session.load"), off.span("session.refresh", "client", {"a": 1})
    assert first is second
    with first as span:
        assert span is None
    with pytest.raises(KeyError), off.span("x"):
        raise KeyError("passes through")

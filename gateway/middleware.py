"""Middlewares: the one place a ``GatewayError`` (or a lower-level failure, see
``UNAVAILABLE``) becomes an HTTP answer, the access log and the per-request metrics.

Nothing a hostile client sends may turn into a 500: unexpected exceptions are logged (without
request data that could hold a secret) and answered with a generic 500 page. The access log
line carries the path only, never the query (it can hold a code or state), and the metrics
carry the matched route's prefix, never the path.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections.abc import Callable

from aiohttp import web, web_response
from aiohttp.typedefs import Handler

from gateway import keys, paths
from gateway.errors import (
    GatewayError,
    ProviderTransportError,
    ProviderUnavailable,
    StoreError,
    StoreUnavailable,
    UpstreamError,
    UpstreamTimeout,
)
from gateway.logs import json_line, json_stream_handler, write_line
from gateway.metrics import OWN_ROUTE
from gateway.pages import error_response

# The Server header of every answer this process makes (own answers, error pages, aiohttp's
# own 400s for malformed requests, the metrics listener): a name, never a version.
SERVER_NAME = "gateway"

log = logging.getLogger("gateway.access")
errlog = logging.getLogger("gateway.error")
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._\-]{1,128}$")
_CALLBACK = paths.CALLBACK
# Lower-level failures and the answer each gets, for every endpoint alike: the one place
# they become HTTP (no call site converts them by hand).
UNAVAILABLE: dict[type[Exception], Callable[[], GatewayError]] = {
    StoreError: StoreUnavailable,
    ProviderTransportError: ProviderUnavailable,
}
_LOWER = tuple(UNAVAILABLE)


def hide_server_version() -> None:
    """Replace aiohttp's default ``Server: Python/3.x aiohttp/3.x`` with ``SERVER_NAME``.

    aiohttp sets that default on every response it writes, including the 400/431/500 it
    answers itself before any handler or signal runs, so the one place to change it is the
    default. Idempotent; a proxied answer keeps the upstream's own ``Server``.
    """
    setattr(web_response, "SERVER_SOFTWARE", SERVER_NAME)  # noqa: B010


def _clear_if_asked(request: web.Request, resp: web.StreamResponse) -> None:
    if request.get(keys.CLEAR_SESSION) and not resp.prepared:
        cookies = request.app[keys.COOKIES]
        cookies.clear(resp, cookies.name)


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        resp = await handler(request)
    except GatewayError as exc:
        return _answer(request, exc)
    except _LOWER as exc:
        answer = next(make for kind, make in UNAVAILABLE.items() if isinstance(exc, kind))
        return _answer(request, answer())
    except web.HTTPException as exc:
        _clear_if_asked(request, exc)
        raise
    except ConnectionResetError:
        # The client left mid-request (e.g. while its body was read): not the gateway's
        # failure, and nobody is there to read an answer.
        errlog.info("client disconnected during %s %s", request.method, request.path)
        return error_response(request, 400, "bad_request", "The request was incomplete.")
    except Exception:
        errlog.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(request, 500, "internal_error", "The gateway failed unexpectedly.")
    _clear_if_asked(request, resp)
    return resp


def _answer(request: web.Request, exc: GatewayError) -> web.Response:
    _count_error(request, exc)
    resp = error_response(request, exc.status, exc.code, exc.message, exc.headers, exc.link)
    _clear_if_asked(request, resp)
    return resp


def _count_error(request: web.Request, exc: GatewayError) -> None:
    metrics = request.app.get(keys.METRICS)
    if metrics is None:
        return
    if isinstance(exc, StoreUnavailable):
        metrics.store_errors.inc()
    elif isinstance(exc, UpstreamTimeout):
        metrics.upstream_errors.labels(kind="timeout").inc()
    elif isinstance(exc, UpstreamError):
        metrics.upstream_errors.labels(kind="bad_gateway").inc()


async def on_response_prepare(request: web.Request, response: web.StreamResponse) -> None:
    """Signal: stamp every answer (proxied and streamed ones too) with the request id, and
    note when the headers went out so latency is time-to-headers, not stream lifetime."""
    request[keys.HEADERS_AT] = time.perf_counter()
    rid = request.get(keys.REQUEST_ID)
    if rid is not None:
        response.headers["X-Request-Id"] = rid


def request_id(sent: str) -> str:
    """The client's ``X-Request-Id`` when well-formed, else a new random one (32 hex digits)."""
    if _REQUEST_ID_RE.match(sent):
        return sent
    if not _random_ids:
        # One getrandom call for the next 256 ids rather than one per request.
        pool = os.urandom(16 * 256).hex()
        _random_ids.extend(pool[i : i + 32] for i in range(0, len(pool), 32))
    return _random_ids.pop()


_random_ids: list[str] = []
os.register_at_fork(after_in_child=_random_ids.clear)  # a worker never repeats its parent's


def failed_status(exc: BaseException) -> int:
    """The status of a request whose handler raised ``exc``, as the access log, the metrics
    and the trace all report it: an HTTP exception's own; 499 (nginx's "client closed
    request") when the handler was cancelled because the client left; else 500."""
    if isinstance(exc, web.HTTPException):
        return exc.status
    if isinstance(exc, asyncio.CancelledError):
        return 499
    return 500


@web.middleware
async def access_log(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request id (passed through when well-formed, else generated), one log line a request,
    and the request metrics."""
    rid = request_id(request.headers.get("X-Request-Id", ""))
    request[keys.REQUEST_ID] = rid
    start = time.perf_counter()
    status = 500
    try:
        resp = await handler(request)
        status = resp.status
        return resp
    except BaseException as exc:
        status = failed_status(exc)
        raise
    finally:
        end = time.perf_counter()
        route = request.get(keys.ROUTE_LABEL, OWN_ROUTE)
        metrics = request.app.get(keys.METRICS)
        if metrics is not None:
            metrics.observe(route, status, request.get(keys.HEADERS_AT, end) - start)
            if request.path == _CALLBACK:
                # The callback redirects only once the session exists; any other answer
                # (provider error, bad state, store down) is a failed login.
                result = "success" if 300 <= status < 400 else "failure"
                metrics.login(result)
        if log.isEnabledFor(logging.INFO):
            method, path = request.method, request.path
            fields: dict[str, object] = {
                "request_id": rid,
                "method": method,
                "path": path,
                "status": status,
                "duration_ms": round((end - start) * 1000, 2),
                "route": route,
                "remote": request.remote,
            }
            identity = request.get(keys.IDENTITY)
            if identity is not None:
                fields["sub"] = identity.sub
            log_access(method, path, status, fields)


def log_access(method: str, path: str, status: int, fields: dict[str, object]) -> None:
    """Write the ``gateway.access`` record (``METHOD PATH STATUS`` and ``fields`` as extras).

    Every field is escaped (gateway.logs), whatever the client sent. When the record would
    only reach the one JSON stream handler, the line is made and written here, the same text
    the formatter would make, without a ``LogRecord``; otherwise the record is made here
    rather than by ``log.info``, which would walk the stack for the caller's file and line on
    every request: they are always the ``access_log`` middleware's.
    """
    handler = json_stream_handler(log)
    if handler is not None:
        line = json_line(time.time(), "INFO", log.name, f"{method} {path} {status}", fields.items())
        write_line(handler, line, lambda: _access_record(method, path, status, fields))
    else:
        log.handle(_access_record(method, path, status, fields))


def _access_record(
    method: str, path: str, status: int, fields: dict[str, object]
) -> logging.LogRecord:
    return log.makeRecord(
        log.name, logging.INFO, __file__, _ACCESS_LOG_LINE, "%s %s %s",
        (method, path, status), None, "access_log", fields,
    )  # fmt: skip


_ACCESS_LOG_LINE = access_log.__code__.co_firstlineno

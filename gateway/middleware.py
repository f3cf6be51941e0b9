"""Middlewares: the one place a ``GatewayError`` becomes an HTTP answer, and the access log.

Nothing a hostile client sends may turn into a 500: unexpected exceptions are logged (without
request data that could hold a secret) and answered with a generic 500 page.
"""

from __future__ import annotations

import logging
import re
import secrets
import time

from aiohttp import web
from aiohttp.typedefs import Handler

from gateway import keys
from gateway.errors import GatewayError, ProviderDenied
from gateway.login import denied_page
from gateway.pages import error_response

log = logging.getLogger("gateway.access")
errlog = logging.getLogger("gateway.error")
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._\-]{1,128}$")


def _clear_if_asked(request: web.Request, resp: web.StreamResponse) -> None:
    if request.get(keys.CLEAR_SESSION) and not resp.prepared:
        cookies = request.app[keys.COOKIES]
        cookies.clear(resp, cookies.name)


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        resp = await handler(request)
    except ProviderDenied as exc:
        return denied_page(exc)
    except GatewayError as exc:
        link = None
        if exc.status == 400 and request.path == "/oauth2/callback":
            link = ("/oauth2/start", "Start signing in again")
        resp = error_response(request, exc.status, exc.code, exc.message, exc.headers, link)
        _clear_if_asked(request, resp)
        return resp
    except web.HTTPException as exc:
        _clear_if_asked(request, exc)
        raise
    except Exception:
        errlog.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(request, 500, "internal_error", "The gateway failed unexpectedly.")
    _clear_if_asked(request, resp)
    return resp


@web.middleware
async def access_log(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request id (passed through when well-formed, else generated) and one log line a request."""
    rid = request.headers.get("X-Request-Id", "")
    if not _REQUEST_ID_RE.match(rid):
        rid = secrets.token_hex(16)
    request[keys.REQUEST_ID] = rid
    start = time.perf_counter()
    status = 500
    try:
        resp = await handler(request)
        status = resp.status
        if not resp.prepared:
            resp.headers["X-Request-Id"] = rid
        return resp
    except web.HTTPException as exc:
        status = exc.status
        exc.headers["X-Request-Id"] = rid
        raise
    finally:
        log.info(
            "%s %s %s",
            request.method,
            request.path,
            status,
            extra={
                "request_id": rid,
                "method": request.method,
                "path": request.path,
                "status": status,
                "duration_ms": round((time.perf_counter() - start) * 1000, 2),
                "remote": request.remote,
            },
        )

"""Small HTML and JSON answers the gateway writes itself (errors, sign-out, signed-out).

Everything interpolated is escaped; no page ever contains a token, a code or a cookie value.
"""

from __future__ import annotations

import html
from typing import Any

from aiohttp import web

NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache", "Referrer-Policy": "no-referrer"}
_SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self' https: http:; frame-ancestors 'none'",
}

_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:36rem;margin:4rem auto;padding:0 1rem;"
    "color:#222}h1{font-size:1.4rem}p{line-height:1.5}a,button{font-size:1rem}"
    "button{padding:.5rem 1rem;cursor:pointer}.code{color:#666;font-size:.85rem}"
)


def wants_html(request: web.Request) -> bool:
    """A browser navigation, as opposed to an API call (CONTRACT: what crosses the gateway)."""
    mode = request.headers.get("Sec-Fetch-Mode")
    if mode is not None and mode != "navigate":
        return False
    if request.headers.get("X-Requested-With", "").lower() == "xmlhttprequest":
        return False
    return "text/html" in request.headers.get("Accept", "")


def page(
    title: str, body_html: str, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    doc = (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        '<meta name=viewport content="width=device-width,initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>"
        f"<body><h1>{html.escape(title)}</h1>{body_html}</body></html>"
    )
    hdrs = {**NO_STORE, **_SECURITY_HEADERS, **(headers or {})}
    return web.Response(text=doc, status=status, content_type="text/html", headers=hdrs)


def error_response(
    request: web.Request,
    status: int,
    code: str,
    message: str,
    headers: dict[str, str] | None = None,
    link: tuple[str, str] | None = None,
) -> web.Response:
    """The one shape of every error: HTML for navigations, JSON for everything else."""
    if wants_html(request):
        extra = ""
        if link:
            extra = (
                f'<p><a href="{html.escape(link[0], quote=True)}">{html.escape(link[1])}</a></p>'
            )
        body = (
            f"<p>{html.escape(message)}</p>{extra}<p class=code>{status} · {html.escape(code)}</p>"
        )
        return page(_TITLES.get(status, "Error"), body, status, headers)
    payload: dict[str, Any] = {"error": code, "message": message, "status": status}
    return web.json_response(payload, status=status, headers={**NO_STORE, **(headers or {})})


_TITLES = {
    400: "Bad request",
    401: "Sign-in required",
    403: "Access denied",
    404: "Not found",
    405: "Method not allowed",
    413: "Request too large",
    431: "Request headers too large",
    502: "Upstream unavailable",
    503: "Temporarily unavailable",
    504: "Upstream timeout",
}


def redirect(
    location: str, status: int = 302, headers: dict[str, str] | None = None
) -> web.Response:
    """A redirect as a plain response (so cookies can be set on it before it is returned)."""
    return web.Response(
        status=status, headers={"Location": location, **NO_STORE, **(headers or {})}
    )

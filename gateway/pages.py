"""The pages and small answers the gateway writes itself: errors (HTML for navigations, JSON
for everything else), the sign-out confirmation, the signed-out page.

Pages are Jinja2 templates (``gateway/templates``, or the operator's ``pages.templates_dir``
first) rendered with autoescaping always on: whatever is interpolated is escaped, and no page
is ever given a token, a code or a cookie value. A custom template that fails to render is
logged and the built-in one is used instead, so a typo never turns an error page into a 500.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

from aiohttp import web
from jinja2 import ChoiceLoader, Environment, FileSystemLoader, PackageLoader

from gateway import paths
from gateway.config import PagesSettings

log = logging.getLogger("gateway.pages")

NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache", "Referrer-Policy": "no-referrer"}
_CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src {img}; "
    "form-action 'self' https: http:; frame-ancestors 'none'"
)


@dataclass(frozen=True, slots=True)
class Action:
    """A button on a page: a link, or a POST form with hidden fields."""

    href: str
    label: str
    primary: bool = False
    method: str = "get"
    fields: tuple[tuple[str, str], ...] = ()


# status: (title, what to do next). Plain words; no "upstream", no protocol jargon.
_ERRORS: dict[int, tuple[str, str]] = {
    400: ("Something was wrong with this request", "Go back and try again, or start over."),
    401: ("Please sign in", "You need to sign in to see this page."),
    403: (
        "You don't have access to this page",
        "If you think you should, ask whoever runs this site for access, or sign in with "
        "another account.",
    ),
    404: ("Page not found", "Check the address, or start from the home page."),
    405: ("This action isn't possible here", "Go back and try again, or start over."),
    413: ("That was too large to send", "Try again with a smaller upload."),
    431: (
        "Your browser sent too much information",
        "Clearing this site's cookies in your browser usually fixes this.",
    ),
    500: ("Something went wrong on our side", "Please try again in a moment."),
    502: (
        "The application isn't answering",
        "This is usually temporary. Try again in a moment.",
    ),
    503: ("Temporarily unavailable", "If you were signed in, you still are."),
    504: ("The application took too long to answer", "Try again in a moment."),
}


class Pages:
    """Renders the gateway's pages with the operator's title, logo and templates."""

    def __init__(self, settings: PagesSettings | None = None) -> None:
        self.settings = settings or PagesSettings()
        builtin = PackageLoader("gateway", "templates")
        self._builtin = Environment(loader=builtin, autoescape=True)
        custom = self.settings.templates_dir
        loader = ChoiceLoader([FileSystemLoader(custom), builtin]) if custom else builtin
        self._env = Environment(loader=loader, autoescape=True) if custom else self._builtin
        self.site = {"title": self.settings.title, "logo_url": self.settings.logo_url}
        img = "'none'"
        if self.settings.logo_url:
            parts = urlsplit(self.settings.logo_url)
            img = f"{parts.scheme}://{parts.netloc}" if parts.netloc else "'self'"
        self.headers = {
            **NO_STORE,
            "X-Content-Type-Options": "nosniff",
            "X-Frame-Options": "DENY",
            "Content-Security-Policy": _CSP.format(img=img),
        }

    def render(
        self,
        template: str,
        title: str,
        *,
        status: int = 200,
        headers: dict[str, str] | None = None,
        **context: Any,
    ) -> web.Response:
        values = {"site": self.site, "title": title, "status": status, **context}
        try:
            text = self._env.get_template(template).render(values)
        except Exception:  # a custom template's bug must not turn this page into a 500
            if self._env is self._builtin:
                raise
            log.exception("custom template %s failed; using the built-in one", template)
            text = self._builtin.get_template(template).render(values)
        return web.Response(
            text=text,
            status=status,
            content_type="text/html",
            headers={**self.headers, **(headers or {})},
        )


@functools.cache
def _default_pages() -> Pages:
    return Pages()


def pages_of(request: web.Request) -> Pages:
    from gateway import keys

    return request.app.get(keys.PAGES) or _default_pages()


def request_id(request: web.Request) -> str | None:
    from gateway import keys

    return request.get(keys.REQUEST_ID)


def signed_in_as(request: web.Request) -> str | None:
    """How to name the signed-in user on a page: email, else username, else sub."""
    from gateway import keys

    identity = request.get(keys.IDENTITY)
    if identity is None:
        return None
    name = identity.email or identity.claim("preferred_username") or identity.sub
    return str(name)


def wants_html(request: web.Request) -> bool:
    """A browser navigation, as opposed to an API call (CONTRACT: what crosses the gateway)."""
    mode = request.headers.get("Sec-Fetch-Mode")
    if mode is not None and mode != "navigate":
        return False
    if request.headers.get("X-Requested-With", "").lower() == "xmlhttprequest":
        return False
    return "text/html" in request.headers.get("Accept", "")


def _here(request: web.Request) -> str:
    """Where to come back to after signing in: this path and query, or / for our own."""
    if request.method != "GET" or request.path.startswith(paths.OWN_PREFIX):
        return "/"
    query = request.rel_url.raw_query_string
    return request.rel_url.raw_path + ("?" + query if query else "")


def _start(return_to: str) -> str:
    return paths.start_url(return_to)


def error_response(
    request: web.Request,
    status: int,
    code: str,
    message: str,
    headers: dict[str, str] | None = None,
    link: tuple[str, str] | None = None,
) -> web.Response:
    """The one shape of every error: HTML for navigations, JSON for everything else."""
    rid = request_id(request)
    if not wants_html(request):
        payload: dict[str, Any] = {"error": code, "message": message, "status": status}
        if rid:
            payload["request_id"] = rid
        return web.json_response(payload, status=status, headers={**NO_STORE, **(headers or {})})
    title, hint = _ERRORS.get(status, ("Something went wrong", "Go back and try again."))
    actions: list[Action] = []
    user = signed_in_as(request)
    if link:
        actions.append(Action(link[0], link[1], primary=True))
    elif status == 401:
        actions.append(Action(_start(_here(request)), "Sign in", primary=True))
    elif status >= 500 and request.method == "GET":
        # An empty href reloads this very address without the page repeating it.
        actions.append(Action("", "Try again", primary=True))
    actions.append(Action("/", "Go to the home page", primary=not actions))
    switch = paths.SIGN_OUT + "?rd=" + quote(_start(_here(request)), safe="/")
    return pages_of(request).render(
        "error.html",
        title,
        status=status,
        headers=headers,
        message=message,
        hint=hint,
        actions=actions,
        user=user if status == 403 else None,
        switch_url=switch,
        sign_out_url=paths.SIGN_OUT,
        request_id=rid,
        code=code,
    )


def denied_response(request: web.Request, error: str, message: str) -> web.Response:
    """The provider refused to sign the user in (``error`` is its OAuth error code)."""
    return pages_of(request).render(
        "error.html",
        "Not signed in",
        status=400,
        message=message,
        hint="You can try again, perhaps with another account.",
        actions=[
            Action(paths.START, "Try signing in again", primary=True),
            Action("/", "Go to the home page"),
        ],
        request_id=request_id(request),
        code="provider_error",
        error=error,
    )


def redirect(
    location: str, status: int = 302, headers: dict[str, str] | None = None
) -> web.Response:
    """A redirect as a plain response (so cookies can be set on it before it is returned)."""
    return web.Response(
        status=status, headers={"Location": location, **NO_STORE, **(headers or {})}
    )

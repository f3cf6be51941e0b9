"""The provider's HTML pages: sign-in form, consent, errors and "signed out".

Small, plain pages a person sees in ``gateway demo``. Every echoed value goes through
``html.escape``; pages are never cached or framed.
"""

from __future__ import annotations

from collections.abc import Iterable
from html import escape

from aiohttp import web

from .config import DemoUser

PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
    "frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}

SCOPE_TEXT = {
    "openid": "Sign you in with your account",
    "email": "See your email address",
    "profile": "See your name and username",
    "groups": "See the groups you belong to",
    "offline_access": "Stay signed in while you are away",
}

STYLE = """
body{font-family:system-ui,sans-serif;background:#f4f5f7;color:#222;margin:0}
main{max-width:26rem;margin:4rem auto;background:#fff;padding:2rem;border-radius:8px;
box-shadow:0 1px 4px rgba(0,0,0,.15)}
h1{font-size:1.4rem;margin-top:0}label{display:block;margin:.8rem 0 .2rem}
input[type=text],input[type=password]{width:100%;padding:.5rem;box-sizing:border-box}
button{margin-top:1rem;padding:.5rem 1.2rem;margin-right:.5rem}
.error{color:#a00;background:#fee;padding:.5rem;border-radius:4px}
.hint{font-size:.85rem;color:#555;margin-top:1.5rem}
"""


def page(title: str, body: str, status: int = 200) -> web.Response:
    """A complete HTML page; ``title`` is escaped here, ``body`` must already be safe."""
    text = (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(title)} - Dev IdP</title><style>{STYLE}</style></head>"
        f"<body><main><h1>{escape(title)}</h1>\n{body}\n</main></body></html>\n"
    )
    return web.Response(text=text, status=status, content_type="text/html", headers=PAGE_HEADERS)


def login_page(
    *,
    client_id: str,
    interaction: str,
    users: Iterable[DemoUser],
    error: str | None = None,
    username: str = "",
) -> web.Response:
    message = f'<p class="error" role="alert">{escape(error)}</p>' if error else ""
    hints = "".join(
        f"<li><code>{escape(u.username)}</code> / <code>{escape(u.password)}</code></li>"
        for u in users
    )
    body = f"""<p>Sign in to continue to <strong>{escape(client_id)}</strong>.</p>
{message}
<form method="post" action="/login">
<input type="hidden" name="interaction" value="{escape(interaction)}">
<label for="username">Username</label>
<input type="text" id="username" name="username" value="{escape(username)}"
 autocomplete="username" required autofocus>
<label for="password">Password</label>
<input type="password" id="password" name="password" autocomplete="current-password" required>
<button type="submit">Sign in</button>
</form>
<div class="hint">Demo users (username / password):<ul>{hints}</ul></div>"""
    return page("Sign in", body)


def consent_page(
    *, client_id: str, interaction: str, scopes: Iterable[str], username: str
) -> web.Response:
    items = "".join(
        f"<li>{escape(SCOPE_TEXT.get(s, s))} <small>({escape(s)})</small></li>" for s in scopes
    )
    body = f"""<p>Signed in as <strong>{escape(username)}</strong>.</p>
<p><strong>{escape(client_id)}</strong> asks to:</p>
<ul>{items}</ul>
<form method="post" action="/consent">
<input type="hidden" name="interaction" value="{escape(interaction)}">
<button type="submit" name="decision" value="approve">Allow</button>
<button type="submit" name="decision" value="deny">Deny</button>
</form>"""
    return page("Allow access?", body)


def error_page(title: str, message: str, status: int = 400) -> web.Response:
    return page(title, f"<p>{escape(message)}</p>", status=status)


def index_page(issuer: str, users: Iterable[DemoUser]) -> web.Response:
    names = "".join(f"<li><code>{escape(u.username)}</code></li>" for u in users)
    discovery = escape(issuer + "/.well-known/openid-configuration")
    body = f"""<p>A development OpenID provider. Issuer: <code>{escape(issuer)}</code></p>
<p><a href="{discovery}">OpenID configuration</a></p>
<p>Users:</p><ul>{names}</ul>"""
    return page("Dev IdP", body)


def signed_out_page() -> web.Response:
    return page("You are signed out", "<p>You have been signed out of the Dev IdP.</p>")

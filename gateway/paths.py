"""The gateway's own endpoint paths, named once.

Every module that registers, links to or recognises one of these uses the constant here,
never a string literal.
"""

from __future__ import annotations

from urllib.parse import quote

OWN_PREFIX = "/oauth2/"
START = "/oauth2/start"
CALLBACK = "/oauth2/callback"
SIGN_OUT = "/oauth2/sign_out"
SIGNED_OUT = "/oauth2/signed_out"
USERINFO = "/oauth2/userinfo"
AUTH = "/oauth2/auth"
BACKCHANNEL_LOGOUT = "/oauth2/backchannel_logout"
HEALTHZ = "/healthz"
READYZ = "/readyz"
METRICS = "/metrics"
JWKS = "/.well-known/jwks.json"


def start_url(return_to: str) -> str:
    """The sign-in URL that lands on ``return_to`` afterwards."""
    return START + "?rd=" + quote(return_to, safe="/")


def start_url_for(path: str, query: str = "") -> str:
    """The sign-in URL for a request to the normalized (so decoded) ``path`` with its raw
    ``query``. The path is percent-encoded again, so that ``rd`` names a URL (``/a%20b``,
    ``/a%3Fb``) that /oauth2/start accepts and that leads back to this very path."""
    target = quote(path, safe="/:@!$&'()*+,;=~") + ("?" + query if query else "")
    return start_url(target)

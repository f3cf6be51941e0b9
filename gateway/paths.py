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

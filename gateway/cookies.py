"""Cookie attributes in one place: ``__Host-`` names, Secure, HttpOnly, Path=/, no Domain.

rfc6265bis §4.1.3.2: a ``__Host-`` cookie must be Secure, have Path=/ and no Domain.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web

from gateway.config import SessionSettings
from gateway.headers import OwnCookies
from gateway.kept import Kept

# ``CookiePolicy.session_value`` remembers at most this many Cookie headers, each at most
# ``_KEPT_HEADER`` characters long (a bound on what a flood of distinct headers can hold).
_KEPT_HEADERS = 1024
_KEPT_HEADER = 4096


@dataclass(frozen=True, slots=True)
class CookiePolicy:
    name: str
    secure: bool
    samesite: str
    # Cookie header -> the session cookie's value in it (see ``session_value``).
    _values: Kept[str, str | None] = field(
        default_factory=lambda: Kept(_KEPT_HEADERS), init=False, repr=False, compare=False
    )

    @classmethod
    def from_settings(cls, s: SessionSettings) -> CookiePolicy:
        return cls(s.cookie_name, s.cookie_secure, s.cookie_samesite.capitalize())

    @property
    def login_prefix(self) -> str:
        """Login-state cookies: ``<name>-login-<flow id>``, one per flow in progress."""
        return self.name + "-login-"

    @property
    def logout_name(self) -> str:
        """``<name>-logout`` holds the sign-out state until /oauth2/signed_out (logout.py)."""
        return self.name + "-logout"

    @property
    def own(self) -> OwnCookies:
        """Every name of the gateway's cookies, as the proxy matches them in both directions
        (any case, ``__Host-``/``__Secure-`` variants): never sent upstream, never set by it."""
        return OwnCookies((self.name, self.logout_name), (self.login_prefix,))

    def session_value(self, request: web.BaseRequest) -> str | None:
        """The session cookie's value, exactly as ``request.cookies`` reads it, remembered
        per Cookie header: a browser sends the same header with every request, and parsing
        it (aiohttp's RFC 6265 parser, every cookie made a ``Morsel``) costs more than the
        rest of finding the session."""
        header = request.headers.get("Cookie", "")
        value = self._values.get(header, _UNSEEN)
        if value is _UNSEEN:
            value = request.cookies.get(self.name)
            if len(header) <= _KEPT_HEADER:
                self._values.keep(header, value)
        return value  # type: ignore[return-value]

    def set(self, resp: web.StreamResponse, name: str, value: str, max_age: int | None) -> None:
        resp.set_cookie(
            name,
            value,
            max_age=max_age,
            path="/",
            secure=self.secure,
            httponly=True,
            samesite=self.samesite,
        )

    def clear(self, resp: web.StreamResponse, name: str) -> None:
        resp.set_cookie(
            name, "", max_age=0, expires="Thu, 01 Jan 1970 00:00:00 GMT", path="/",
            secure=self.secure, httponly=True, samesite=self.samesite,
        )  # fmt: skip


_UNSEEN = object()

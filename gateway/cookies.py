"""Cookie attributes in one place: ``__Host-`` names, Secure, HttpOnly, Path=/, no Domain.

rfc6265bis §4.1.3.2: a ``__Host-`` cookie must be Secure, have Path=/ and no Domain.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from gateway.config import SessionSettings
from gateway.headers import OwnCookies


@dataclass(frozen=True, slots=True)
class CookiePolicy:
    name: str
    secure: bool
    samesite: str

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

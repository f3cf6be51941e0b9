"""Typed ``web.AppKey``s: how the web-layer modules share the objects ``app.py`` builds."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from gateway.bearer import BearerVerifier
from gateway.config import Settings
from gateway.cookies import CookiePolicy
from gateway.crypto import KeyRing
from gateway.oidc import ProviderClient
from gateway.policy import RouteTable
from gateway.sessions import SessionManager
from gateway.store import SessionStore

if TYPE_CHECKING:
    from gateway.proxy import Forwarder

SETTINGS = web.AppKey("settings", Settings)
RING = web.AppKey("ring", KeyRing)
COOKIES = web.AppKey("cookies", CookiePolicy)
STORE = web.AppKey("store", SessionStore)
PROVIDER = web.AppKey("provider", ProviderClient)
SESSIONS = web.AppKey("sessions", SessionManager)
ROUTES = web.AppKey("routes", RouteTable)
FORWARDERS = web.AppKey("forwarders", dict[int, "Forwarder"])
BEARER = web.AppKey("bearer", BearerVerifier)

# Per-request values.
REQUEST_ID = web.RequestKey("request_id", str)
CLEAR_SESSION = web.RequestKey("clear_session_cookie", bool)

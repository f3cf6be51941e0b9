"""A development OpenID Connect provider, for ``gateway demo`` and the test suite.

Spec-following (authorization code + PKCE S256, refresh rotation, RFC 9207 ``iss``,
revocation, introspection, RP-initiated and back-channel logout), with fault switches
that tests flip at run time. It binds to loopback only and imports nothing from the
rest of the gateway.
"""

from .config import ClientRegistration, DemoUser, DevIdpConfig, Faults, demo_users
from .server import RunningIdp, create_devidp_app, start_devidp
from .state import SESSION_COOKIE, STATE_KEY, IdpState

__all__ = [
    "SESSION_COOKIE",
    "STATE_KEY",
    "ClientRegistration",
    "DemoUser",
    "DevIdpConfig",
    "Faults",
    "IdpState",
    "RunningIdp",
    "create_devidp_app",
    "demo_users",
    "start_devidp",
]

"""``Principal``: who a request is from, however that was established (a browser session or
a bearer token). One type for both, worked out once per request by ``gateway.auth``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from gateway.config import RouteSettings
from gateway.session import Identity, Session, Ticket


@dataclass(frozen=True, slots=True)
class Principal:
    identity: Identity
    scopes: tuple[str, ...]
    # The access token the gateway may pass on: the session's (refreshed) access token, or
    # the bearer client's own token.
    access_token: str
    via: Literal["session", "bearer"]
    # The session and its ticket, for a principal from a session.
    session: Session | None = None
    ticket: Ticket | None = None

    @property
    def session_id(self) -> str | None:
        return self.session.session_id if self.session is not None else None

    def token_for(self, route: RouteSettings) -> str | None:
        """The token to send as ``Authorization: Bearer`` for ``route``: a bearer client's
        own token always, a session's access token on ``pass_access_token`` routes only."""
        if self.via == "bearer" or route.pass_access_token:
            return self.access_token
        return None

"""Server-side records the provider keeps: interactions, IdP sessions, codes, grants, tokens.

A *grant* is the family of everything issued from one authorization code: its access
tokens and its chain of refresh tokens. Revoking the grant kills the whole family, which
is what code replay (RFC 6749 §4.1.2) and refresh-token reuse (RFC 9700 §4.14.2) require.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class OAuthError(Exception):
    """An OAuth error answer (RFC 6749 §5.2): a stable ``error`` code and an HTTP status."""

    def __init__(self, error: str, description: str = "", status: int = 400) -> None:
        super().__init__(f"{error}: {description}" if description else error)
        self.error = error
        self.description = description
        self.status = status


@dataclass
class Interaction:
    """A pending authorization request, held while the user signs in and consents."""

    id: str
    client_id: str
    redirect_uri: str
    scope: tuple[str, ...]
    state: str | None
    nonce: str | None
    code_challenge: str
    prompt: frozenset[str]
    expires: int
    sid: str | None = None  # set once a user has signed in for this interaction


@dataclass
class IdpSession:
    """The provider's own login session, found through the ``devidp_session`` cookie."""

    cookie: str
    sid: str
    sub: str
    auth_time: int
    consents: dict[str, frozenset[str]] = field(default_factory=dict)
    clients: set[str] = field(default_factory=set)  # clients that got tokens in this session


@dataclass
class AuthCode:
    """An authorization code: single-use, short-lived, bound to client and redirect_uri."""

    client_id: str
    redirect_uri: str
    sub: str
    scope: tuple[str, ...]
    nonce: str | None
    code_challenge: str
    sid: str
    auth_time: int
    expires: int
    grant_id: str
    used: bool = False


@dataclass
class Grant:
    """The family of tokens issued from one authorization code."""

    id: str
    client_id: str
    sub: str
    scope: tuple[str, ...]
    sid: str
    auth_time: int
    access_tokens: list[str] = field(default_factory=list)
    refresh_tokens: list[str] = field(default_factory=list)
    revoked: bool = False


@dataclass
class RefreshRecord:
    """One refresh token; ``rotated`` once it has been exchanged for a successor."""

    grant_id: str
    expires: int
    rotated: bool = False
    revoked: bool = False


@dataclass
class AccessRecord:
    """One access token as the provider remembers it (for userinfo and introspection)."""

    jti: str
    sub: str
    client_id: str
    scope: tuple[str, ...]
    iat: int
    exp: int
    grant_id: str | None = None
    revoked: bool = False

"""Configuration of the development OpenID provider: users, clients, lifetimes, fault switches.

Plain dataclasses only; nothing here does I/O. ``Faults`` is deliberately mutable so a
test can flip a switch on the running provider and see the very next answer change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

AUTH_METHODS = ("client_secret_basic", "client_secret_post", "none")
SIGNING_ALGS = ("RS256", "ES256")
ACCESS_TOKEN_FORMATS = ("jwt", "opaque")
KNOWN_SCOPES = ("openid", "email", "profile", "groups", "offline_access")


@dataclass(frozen=True)
class DemoUser:
    """A user who can sign in with a username and password."""

    sub: str
    username: str
    password: str
    email: str
    name: str
    groups: tuple[str, ...] = ()
    preferred_username: str | None = None
    email_verified: bool = True


@dataclass(frozen=True)
class ClientRegistration:
    """A registered relying party (OIDC Dynamic Client Registration metadata names)."""

    client_id: str
    client_secret: str | None
    redirect_uris: tuple[str, ...]
    token_endpoint_auth_method: str = "client_secret_basic"
    post_logout_redirect_uris: tuple[str, ...] = ()
    backchannel_logout_uri: str | None = None
    backchannel_logout_session_required: bool = True


@dataclass
class Faults:
    """Switches that make the provider misbehave; every one defaults to off.

    The ID-token switches apply to every ID token (code and refresh grants); the
    signature switches (``bad_signature``, ``alg_none``, ``hs256_with_public_key``,
    ``unknown_kid``) apply to ID tokens only, never to access or logout tokens.
    ``introspection_answer`` sets members of every active introspection answer (a None
    value removes the member), e.g. ``{"typ": "Refresh"}`` as Keycloak says of a refresh
    token, or ``{"aud": None, "client_id": None}`` for an answer that names no client.
    """

    id_token_iss: str | None = None
    id_token_aud: list[str] | None = None
    id_token_azp: str | None = None
    id_token_nonce: str | None = None
    omit_nonce: bool = False
    bad_signature: bool = False
    alg_none: bool = False
    hs256_with_public_key: bool = False
    unknown_kid: bool = False
    id_token_exp_offset: int | None = None
    id_token_iat_offset: int | None = None
    authz_iss: str | None = None
    omit_authz_iss: bool = False
    token_error: str | None = None
    token_error_grant: str | None = None
    token_status: int | None = None
    token_delay: float = 0.0
    no_refresh_token: bool = False
    introspection_answer: dict[str, Any] = field(default_factory=dict)


@dataclass
class DevIdpConfig:
    """Everything the provider needs; ``issuer`` None means "derive from the bound address"."""

    users: list[DemoUser]
    clients: list[ClientRegistration]
    issuer: str | None = None
    access_token_ttl: int = 300
    id_token_ttl: int = 300
    refresh_token_ttl: int = 86400
    rotate_refresh_tokens: bool = True
    access_token_format: str = "jwt"
    signing_alg: str = "RS256"
    require_consent: bool = True
    faults: Faults = field(default_factory=Faults)

    def problems(self) -> list[str]:
        """Every inconsistency in this configuration, one sentence each (empty when valid)."""
        out: list[str] = []
        if self.signing_alg not in SIGNING_ALGS:
            out.append(f"signing_alg must be one of {', '.join(SIGNING_ALGS)}")
        if self.access_token_format not in ACCESS_TOKEN_FORMATS:
            out.append(f"access_token_format must be one of {', '.join(ACCESS_TOKEN_FORMATS)}")
        seen_subs: set[str] = set()
        seen_names: set[str] = set()
        for user in self.users:
            if user.sub in seen_subs or user.username in seen_names:
                out.append(f"user {user.username!r}: duplicate sub or username")
            seen_subs.add(user.sub)
            seen_names.add(user.username)
        seen_clients: set[str] = set()
        for client in self.clients:
            if client.client_id in seen_clients:
                out.append(f"client {client.client_id!r}: duplicate client_id")
            seen_clients.add(client.client_id)
            method = client.token_endpoint_auth_method
            if method not in AUTH_METHODS:
                out.append(f"client {client.client_id!r}: unknown auth method {method!r}")
            elif (method == "none") != (client.client_secret is None):
                out.append(
                    f"client {client.client_id!r}: a secret is needed exactly when the auth "
                    "method is not 'none'"
                )
            if not client.redirect_uris:
                out.append(f"client {client.client_id!r}: no redirect_uris")
        for name, ttl in (
            ("access_token_ttl", self.access_token_ttl),
            ("id_token_ttl", self.id_token_ttl),
            ("refresh_token_ttl", self.refresh_token_ttl),
        ):
            if ttl <= 0:
                out.append(f"{name} must be positive")
        return out


def demo_users() -> list[DemoUser]:
    """The two users of ``gateway demo``: alice (admins, staff) and bob (staff)."""
    return [
        DemoUser(
            sub="alice",
            username="alice",
            password="alice",
            email="alice@example.com",
            name="Alice Liddell",
            groups=("admins", "staff"),
            preferred_username="alice",
        ),
        DemoUser(
            sub="bob",
            username="bob",
            password="bob",
            email="bob@example.org",
            name="Bob Builder",
            groups=("staff",),
            preferred_username="bob",
        ),
    ]

"""The configured providers: one ``ProviderClient`` (and bearer verifier) per provider id,
found by id (a session's provider, ``/oauth2/start?provider=``) or by issuer (a
back-channel logout token, a JWT bearer token). Built once per app by ``app.py``.

Nothing here ever picks "the first provider": a caller names the provider it needs, or
asks which providers a route allows (``allowed``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import jwt

from gateway.bearer import BearerVerifier, looks_like_jwt
from gateway.config import (
    DEFAULT_PROVIDER_ID,
    DEFAULT_PROVIDER_NAME,
    ProviderRef,
    ProviderSettings,
    RouteSettings,
)
from gateway.oidc import ProviderClient
from gateway.oidc.metadata import ProviderMetadata


@dataclass(frozen=True, slots=True)
class Provider:
    """One configured provider and the objects that talk to it."""

    id: str
    display_name: str
    client: ProviderClient
    bearer: BearerVerifier | None = None

    @property
    def issuer(self) -> str:
        """The issuer its tokens and authorization responses carry."""
        meta = self.client.loaded_metadata
        if meta is not None:
            return meta.issuer
        return self.client.settings.issuer or ""


class Providers:
    """Every configured provider, in config order."""

    def __init__(self, providers: Sequence[Provider]) -> None:
        self._list = tuple(providers)
        self._by_id = {p.id: p for p in self._list}

    @classmethod
    def single(cls, client: ProviderClient, bearer: BearerVerifier | None = None) -> Providers:
        """A single ``provider:`` (id ``default``)."""
        return cls([Provider(DEFAULT_PROVIDER_ID, DEFAULT_PROVIDER_NAME, client, bearer)])

    @classmethod
    def of(
        cls, refs: Sequence[ProviderRef], clients: Sequence[ProviderClient], *, bearer: bool = True
    ) -> Providers:
        items = []
        for ref, client in zip(refs, clients, strict=True):
            verifier = BearerVerifier(client, ref.settings) if bearer else None
            items.append(Provider(ref.id, ref.display_name, client, verifier))
        return cls(items)

    def __iter__(self) -> Iterator[Provider]:
        return iter(self._list)

    def __len__(self) -> int:
        return len(self._list)

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(p.id for p in self._list)

    def get(self, provider_id: str) -> Provider | None:
        return self._by_id.get(provider_id)

    def by_issuer(self, issuer: str) -> Provider | None:
        """The provider whose issuer is exactly ``issuer`` (issuers are unique, config.py)."""
        if not issuer:
            return None
        for p in self._list:
            if p.issuer == issuer:
                return p
        return None

    def allowed(self, route: RouteSettings | None) -> tuple[Provider, ...]:
        """The providers that may sign in for ``route``, in config order (None: every one)."""
        if route is None or route.providers is None:
            return self._list
        names = set(route.providers)
        return tuple(p for p in self._list if p.id in names)

    def allows(self, route: RouteSettings | None, provider_id: str) -> bool:
        """Whether a session of ``provider_id`` counts on ``route`` (on every request)."""
        if route is not None and route.providers is not None:
            if provider_id not in route.providers:
                return False
        return provider_id in self._by_id

    def bearer_for(self, route: RouteSettings, token: str) -> Provider | None:
        """The provider that checks a bearer token on ``route`` (None: refuse it, 401).

        A JWT goes to the allowed provider its ``iss`` names (read unverified to choose;
        that provider's validator then checks it in full), never to another. An opaque
        token cannot say who issued it, so it is introspected only when the route allows
        exactly one provider: it is never shown to a provider that may not have issued it.
        With a single provider, that provider checks every token (as it always has).
        """
        allowed = self.allowed(route)
        if len(self._list) == 1:
            return self._list[0] if allowed else None
        if looks_like_jwt(token):
            found = self.by_issuer(unverified_issuer(token))
            return found if found is not None and found in allowed else None
        return allowed[0] if len(allowed) == 1 else None


def unverified_issuer(token: str) -> str:
    """The ``iss`` of a JWT read without checking anything: only to pick the provider whose
    validator then checks the token in full. "" for anything unreadable."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return ""
    iss = claims.get("iss") if isinstance(claims, dict) else None
    return iss if isinstance(iss, str) else ""


def mixup_risk(settings: ProviderSettings, meta: ProviderMetadata) -> str | None:
    """What one of several providers leaves open when it sends no ``iss`` (RFC 9207).

    With one redirect URI for all, RFC 9700 §4.4 leaves the mix-up defence to the response's
    ``iss``. Without it, only the login state ties a response to this provider: another
    configured provider that is chosen for a login and bounces the browser on to this one
    receives this one's code (and the PKCE verifier) at its token endpoint. With a
    confidential client the code is useless to it (it cannot authenticate as the gateway
    here); with a public client it can redeem it. None when the provider sends ``iss``.
    """
    if meta.iss_parameter_supported:
        return None
    risk = (
        "does not send iss in its authorization responses (RFC 9207): with several "
        "providers, only the login state ties a response to this provider"
    )
    if settings.effective_auth_method == "none":
        risk += (
            "; with a public client, another configured provider that mixes up a login "
            "could redeem this provider's code: give it a confidential client"
        )
    return risk

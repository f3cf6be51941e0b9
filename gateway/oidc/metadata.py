"""Provider metadata: OpenID Connect Discovery 1.0, or endpoints named in the config."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from gateway.config import ProviderSettings

# Only asymmetric algorithms: an HS* token could be forged with the public key (SECURITY.md 5).
ASYMMETRIC_ALGS = (
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class ProviderMetadata:
    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str | None = None
    userinfo_endpoint: str | None = None
    revocation_endpoint: str | None = None
    end_session_endpoint: str | None = None
    introspection_endpoint: str | None = None
    # RFC 9126 §5: pushed authorization requests.
    pushed_authorization_request_endpoint: str | None = None
    require_pushed_authorization_requests: bool = False
    signing_algs: tuple[str, ...] = ("RS256",)
    iss_parameter_supported: bool = False
    backchannel_logout_supported: bool = False
    # None: the provider publishes no such list (so nothing can be said about it).
    scopes_supported: tuple[str, ...] | None = None
    code_challenge_methods_supported: tuple[str, ...] | None = None

    @classmethod
    def from_discovery(cls, doc: dict[str, Any], settings: ProviderSettings) -> ProviderMetadata:
        """Build from a discovery document; the config may override single endpoints."""
        issuer = doc.get("issuer")
        if not isinstance(issuer, str):
            raise ValueError("the discovery document names no issuer")
        # OpenID Connect Discovery §4.3: the issuer in the document must be the one we asked.
        if issuer != settings.issuer:
            raise ValueError("the discovery document names another issuer")
        algs = doc.get("id_token_signing_alg_values_supported") or ["RS256"]
        allowed = tuple(a for a in algs if a in ASYMMETRIC_ALGS) or ("RS256",)

        def pick(name: str) -> str | None:
            configured = getattr(settings, name)
            value = configured or doc.get(name)
            return value if isinstance(value, str) and value else None

        auth, token = pick("authorization_endpoint"), pick("token_endpoint")
        if not auth or not token:
            raise ValueError("the discovery document lacks authorization or token endpoint")
        return cls(
            issuer=issuer,
            authorization_endpoint=auth,
            token_endpoint=token,
            jwks_uri=pick("jwks_uri"),
            userinfo_endpoint=pick("userinfo_endpoint"),
            revocation_endpoint=pick("revocation_endpoint"),
            end_session_endpoint=pick("end_session_endpoint"),
            introspection_endpoint=pick("introspection_endpoint"),
            pushed_authorization_request_endpoint=pick("pushed_authorization_request_endpoint"),
            require_pushed_authorization_requests=doc.get("require_pushed_authorization_requests")
            is True,
            signing_algs=allowed,
            iss_parameter_supported=bool(doc.get("authorization_response_iss_parameter_supported")),
            backchannel_logout_supported=bool(doc.get("backchannel_logout_supported")),
            scopes_supported=_strings(doc.get("scopes_supported")),
            code_challenge_methods_supported=_strings(doc.get("code_challenge_methods_supported")),
        )

    def with_oauth_metadata(self, doc: Any) -> ProviderMetadata:
        """Fill the endpoints discovery left out from an RFC 8414 document of the same issuer
        (RFC 8414 §3.3: a document naming another issuer is not used)."""
        if not isinstance(doc, dict) or doc.get("issuer") != self.issuer:
            return self
        found: dict[str, Any] = {}
        for name in ("revocation_endpoint", "introspection_endpoint"):
            value = doc.get(name)
            if getattr(self, name) is None and isinstance(value, str) and value:
                found[name] = value
        if self.code_challenge_methods_supported is None:
            methods = _strings(doc.get("code_challenge_methods_supported"))
            if methods is not None:
                found["code_challenge_methods_supported"] = methods
        return replace(self, **found) if found else self

    @classmethod
    def from_settings(cls, settings: ProviderSettings) -> ProviderMetadata:
        """A plain OAuth2 provider without discovery: every endpoint comes from the config."""
        assert settings.authorization_endpoint and settings.token_endpoint
        return cls(
            issuer=settings.issuer or "",
            authorization_endpoint=settings.authorization_endpoint,
            token_endpoint=settings.token_endpoint,
            jwks_uri=settings.jwks_uri,
            userinfo_endpoint=settings.userinfo_endpoint,
            revocation_endpoint=settings.revocation_endpoint,
            end_session_endpoint=settings.end_session_endpoint,
            introspection_endpoint=settings.introspection_endpoint,
            pushed_authorization_request_endpoint=settings.pushed_authorization_request_endpoint,
        )


def _strings(value: Any) -> tuple[str, ...] | None:
    if not isinstance(value, list):
        return None
    return tuple(v for v in value if isinstance(v, str))

"""The provider client: discovery, JWKS, authorization URL, token calls, JWT validation."""

from gateway.oidc.client import ProviderClient, TokenResponse
from gateway.oidc.jwks import JwksCache
from gateway.oidc.metadata import ProviderMetadata
from gateway.oidc.validate import IdTokenValidator, LogoutClaims

__all__ = [
    "IdTokenValidator",
    "JwksCache",
    "LogoutClaims",
    "ProviderClient",
    "ProviderMetadata",
    "TokenResponse",
]

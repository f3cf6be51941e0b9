"""The exception hierarchy: every class carries its HTTP status and a stable ``code``.

One middleware turns these into answers; nothing else maps errors to HTTP.
Messages are shown to clients, so they never contain a token, a cookie value or a secret.
"""

from __future__ import annotations


class GatewayError(Exception):
    """Base of every error the gateway answers itself."""

    status: int = 500
    code: str = "internal_error"
    public_message: str = "The gateway could not handle this request."
    # A page's one way on (href, label) when shown as HTML, set by the raising handler.
    link: tuple[str, str] | None = None

    def __init__(self, message: str | None = None, *, headers: dict[str, str] | None = None):
        super().__init__(message or self.public_message)
        self.message = message or self.public_message
        self.headers = headers or {}


class BadRequest(GatewayError):
    status = 400
    code = "bad_request"
    public_message = "The request was malformed."


class LoginFlowError(BadRequest):
    """The authorization response could not be accepted (state, code, ID token, iss)."""

    code = "login_failed"
    public_message = "The sign-in could not be completed. Please start again."


class ProviderDenied(BadRequest):
    """The provider answered the callback with an OAuth error such as access_denied."""

    code = "provider_error"
    public_message = "The identity provider did not sign you in."

    def __init__(self, error: str, description: str | None = None):
        super().__init__(self.public_message)
        self.error = error
        self.description = description


class Unauthenticated(GatewayError):
    status = 401
    code = "unauthenticated"
    public_message = "Authentication is required."


class Forbidden(GatewayError):
    status = 403
    code = "forbidden"
    public_message = "You are not allowed to see this page."


class NotFound(GatewayError):
    status = 404
    code = "not_found"
    public_message = "Nothing is served here."


class MethodNotAllowed(GatewayError):
    status = 405
    code = "method_not_allowed"
    public_message = "That method is not allowed here."


class PayloadTooLarge(GatewayError):
    status = 413
    code = "payload_too_large"
    public_message = "The request is too large."


class UpstreamError(GatewayError):
    status = 502
    code = "bad_gateway"
    public_message = "The application behind this address did not answer."


class UpstreamTimeout(GatewayError):
    status = 504
    code = "gateway_timeout"
    public_message = "The application behind this address took too long to answer."


class StoreUnavailable(GatewayError):
    status = 503
    code = "session_store_unavailable"
    public_message = "Signing in is briefly unavailable here. Please try again in a moment."

    def __init__(self, message: str | None = None):
        super().__init__(message, headers={"Retry-After": "5"})


class ProviderUnavailable(GatewayError):
    status = 503
    code = "provider_unavailable"
    public_message = "The sign-in service is briefly unavailable. Please try again in a moment."

    def __init__(self, message: str | None = None):
        super().__init__(message, headers={"Retry-After": "10"})


class ProviderRefused(GatewayError):
    """The provider refused a request the gateway made to start a sign-in (a pushed
    authorization request answered with an OAuth error): a configuration problem."""

    status = 502
    code = "provider_refused"
    public_message = (
        "The identity provider refused to start the sign-in. This is a configuration "
        "problem; please tell the site's administrators."
    )


class OAuthError(Exception):
    """An OAuth 2.0 error response from the provider (RFC 6749 §5.2), branched on by ``error``."""

    def __init__(self, error: str, description: str | None = None, status: int | None = None):
        super().__init__(error)
        self.error = error
        self.description = description
        self.status = status


class ProviderTransportError(Exception):
    """The provider could not be reached, timed out, or answered 5xx."""


class TokenValidationError(Exception):
    """A JWT (ID token, logout token, bearer token) failed validation; ``reason`` is safe to log."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class StoreError(Exception):
    """The session store did not answer."""

"""Pushed authorization requests (RFC 9126): when to push, the answer, the browser's URL.

With ``par: auto`` (the default) the gateway pushes when the provider's metadata names a
``pushed_authorization_request_endpoint`` (RFC 9126 §5); ``required`` insists on it and
``off`` never pushes. A provider that sets ``require_pushed_authorization_requests`` is
pushed to under ``auto`` too. Pushing moves every authorization parameter (PKCE challenge,
state, nonce, scope, redirect_uri, extra parameters) into an authenticated back-channel
POST; the browser then carries only ``client_id`` and the ``request_uri`` (RFC 9126 §4).

Where pushing is needed but impossible (no endpoint), ``ParUnavailable`` is raised: a
sign-in cannot start (503), while everything else keeps working.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from gateway.errors import ProviderTransportError
from gateway.oidc.metadata import ProviderMetadata

__all__ = ["ParUnavailable", "browser_url", "endpoint", "probe_result", "request_uri"]

_MAX_REQUEST_URI = 2048


class ParUnavailable(ProviderTransportError):
    """Pushing is required (by ``par: required`` or the provider) but there is no endpoint."""


def endpoint(mode: str, meta: ProviderMetadata) -> str | None:
    """The PAR endpoint to push to, or None for a plain authorization request."""
    if mode == "off":
        return None
    if meta.pushed_authorization_request_endpoint:
        return meta.pushed_authorization_request_endpoint
    if mode == "required":
        raise ParUnavailable(
            "par: required, but the provider advertises no pushed_authorization_request_endpoint"
        )
    if meta.require_pushed_authorization_requests:
        raise ParUnavailable(
            "the provider requires pushed authorization requests but names no endpoint"
        )
    return None


def request_uri(data: Any) -> str:
    """RFC 9126 §2.2: the ``request_uri`` of a successful answer (``expires_in`` is the
    provider's business: the browser is sent on at once)."""
    uri = data.get("request_uri") if isinstance(data, dict) else None
    if not isinstance(uri, str) or not uri or len(uri) > _MAX_REQUEST_URI:
        raise ProviderTransportError("the PAR endpoint answered no request_uri")
    return uri


def browser_url(authorization_endpoint: str, client_id: str, uri: str) -> str:
    """RFC 9126 §4: the authorization endpoint with only ``client_id`` and ``request_uri``."""
    sep = "&" if urlsplit(authorization_endpoint).query else "?"
    query = urlencode({"client_id": client_id, "request_uri": uri}, quote_via=quote)
    return authorization_endpoint + sep + query


def probe_result(mode: str, meta: ProviderMetadata) -> tuple[str, bool, str] | None:
    """``check-config --probe``: a line when PAR matters (used, required or refused)."""
    name = "provider PAR"
    if mode == "off":
        if meta.require_pushed_authorization_requests:
            return (name, False, "par: off, but the provider requires pushed authorization "
                    "requests: sign-ins will fail")  # fmt: skip
        return None
    try:
        url = endpoint(mode, meta)
    except ParUnavailable as exc:
        return (name, False, f"{exc}: /oauth2/start will answer 503")
    if url is None:
        return None
    return (name, True, f"authorization requests are pushed to {url}")

"""HTTP helpers shared by the provider's back-end endpoints: JSON answers, OAuth error
answers (RFC 6749 §5.2) and client authentication (RFC 6749 §2.3, OIDC Core §9).
"""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote_plus

from aiohttp import web

from . import client_assertion
from .config import ClientRegistration
from .records import OAuthError
from .state import IdpState

NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def json_answer(body: Mapping[str, Any], status: int = 200) -> web.Response:
    """A JSON answer that no cache keeps (RFC 6749 §5.1)."""
    return web.json_response(dict(body), status=status, headers=NO_STORE)


def error_answer(err: OAuthError) -> web.Response:
    body = {"error": err.error}
    if err.description:
        body["error_description"] = err.description
    resp = json_answer(body, status=err.status)
    if err.status == 401:
        resp.headers["WWW-Authenticate"] = 'Basic realm="devidp"'
    return resp


def _basic_credentials(header: str) -> tuple[str, str]:
    """RFC 6749 §2.3.1: client id and secret, each form-urlencoded, in HTTP Basic."""
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        raise OAuthError("invalid_client", "unsupported authorization scheme", 401)
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise OAuthError("invalid_client", "malformed basic credentials", 401) from exc
    client_id, sep, secret = decoded.partition(":")
    if not sep:
        raise OAuthError("invalid_client", "malformed basic credentials", 401)
    return unquote_plus(client_id), unquote_plus(secret)


def authenticate_client(
    state: IdpState, headers: Mapping[str, str], form: Mapping[str, str]
) -> ClientRegistration:
    """The client making this request, authenticated by its registered method.

    Using a method other than the registered one, or two methods at once, is
    ``invalid_client`` (401), as is an unknown client or a wrong secret.
    """
    header = headers.get("Authorization")
    body_id = form.get("client_id")
    body_secret = form.get("client_secret")
    if "client_assertion" in form or "client_assertion_type" in form:
        if header is not None or body_secret is not None:
            raise OAuthError("invalid_client", "more than one authentication method", 401)
        return client_assertion.authenticate(state, form)
    if header is not None:
        if body_secret is not None:
            raise OAuthError("invalid_client", "more than one authentication method", 401)
        client_id, secret = _basic_credentials(header)
        if body_id is not None and body_id != client_id:
            raise OAuthError("invalid_client", "client_id mismatch", 401)
        method, presented = "client_secret_basic", secret
    elif body_secret is not None:
        client_id, method, presented = body_id or "", "client_secret_post", body_secret
    else:
        client_id, method, presented = body_id or "", "none", ""
    client = state.clients.get(client_id)
    if client is None or client.token_endpoint_auth_method != method:
        raise OAuthError("invalid_client", "client authentication failed", 401)
    if method != "none":
        expected = (client.client_secret or "").encode("utf-8")
        if not client.client_secret or not hmac.compare_digest(expected, presented.encode("utf-8")):
            raise OAuthError("invalid_client", "client authentication failed", 401)
    return client


async def read_form(request: web.Request) -> dict[str, str]:
    """The form body as single values; a repeated parameter is invalid (RFC 6749 §3.2)."""
    form = await request.post()
    out: dict[str, str] = {}
    for key in form:
        values = form.getall(key)
        if len(values) != 1 or not isinstance(values[0], str):
            raise OAuthError("invalid_request", f"parameter {key} must appear once")
        out[key] = values[0]
    return out

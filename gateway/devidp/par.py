"""Pushed authorization requests (RFC 9126) for the provider: ``POST /par`` and its use.

With ``DevIdpConfig.pushed_authorization`` "enabled" or "required", discovery names the
endpoint (and, for "required", ``require_pushed_authorization_requests``). A client
authenticates (any registered method) and pushes the authorization parameters; it gets a
``request_uri`` that is single-use and expires after ``PAR_TTL`` seconds (``expires_in``),
and sends the browser to ``/authorize`` with only ``client_id`` and that ``request_uri``.
With "required", a plain authorization request is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiohttp import web
from multidict import MultiDict, MultiDictProxy

from . import pages
from .oauth import authenticate_client, error_answer, json_answer, read_form
from .records import OAuthError
from .state import STATE_KEY, IdpState, new_id

PAR_TTL = 60
URN = "urn:ietf:params:oauth:request_uri:"
_CLIENT_AUTH = ("client_secret", "client_assertion", "client_assertion_type")


def advertise(state: IdpState, metadata: dict[str, Any]) -> None:
    """Discovery members for PAR (RFC 9126 §5) and private_key_jwt (OIDC Discovery §3)."""
    metadata["token_endpoint_auth_signing_alg_values_supported"] = ["RS256", "ES256"]
    mode = state.cfg.pushed_authorization
    if mode != "off":
        metadata["pushed_authorization_request_endpoint"] = f"{state.issuer}/par"
    if mode == "required":
        metadata["require_pushed_authorization_requests"] = True


async def push(request: web.Request) -> web.Response:
    """``POST /par``: validate and keep the request; answer 201 with its ``request_uri``."""
    state = request.app[STATE_KEY]
    if state.cfg.pushed_authorization == "off":
        return error_answer(OAuthError("invalid_request", "no PAR endpoint", 404))
    state.par_calls += 1
    try:
        form = await read_form(request)
        client = authenticate_client(state, request.headers, form)
        params = {k: v for k, v in form.items() if k not in _CLIENT_AUTH}
        params.setdefault("client_id", client.client_id)
        if params["client_id"] != client.client_id:
            raise OAuthError("invalid_request", "client_id does not match the client")
        if "request_uri" in params:  # RFC 9126 §2.1
            raise OAuthError("invalid_request", "request_uri cannot be pushed")
        if params.get("redirect_uri") not in client.redirect_uris:
            raise OAuthError("invalid_request", "redirect_uri is not registered")
    except OAuthError as err:
        return error_answer(err)
    now = state.now()
    for key in [k for k, (_, _, until) in state.pushed_requests.items() if until <= now]:
        del state.pushed_requests[key]
    uri = URN + new_id()
    state.pushed_requests[uri] = (client.client_id, params, now + PAR_TTL)
    return json_answer({"request_uri": uri, "expires_in": PAR_TTL}, status=201)


def resolve(state: IdpState, query: Mapping[str, str]) -> MultiDictProxy[str] | web.Response | None:
    """The parameters of the authorization request at ``/authorize``: the pushed ones for
    a ``request_uri`` (used up now), None to read the query itself, or an error page."""
    uri = query.get("request_uri")
    if state.cfg.pushed_authorization == "off":
        return None  # as before PAR: a request_uri is answered request_not_supported
    if uri is None:
        if state.cfg.pushed_authorization == "required":
            return pages.error_page(
                "Pushed authorization request required",
                "This provider accepts only pushed authorization requests (RFC 9126).",
            )
        return None
    pushed = state.pushed_requests.pop(uri, None) if uri.startswith(URN) else None
    if pushed is None or pushed[2] <= state.now():
        return pages.error_page("Invalid request_uri", "The request_uri is unknown or expired.")
    client_id, params, _ = pushed
    if query.get("client_id") != client_id:
        return pages.error_page("Invalid request_uri", "The client_id does not match.")
    return MultiDictProxy(MultiDict(params))

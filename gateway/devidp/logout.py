"""``GET|POST /end_session``: OpenID Connect RP-Initiated Logout 1.0.

Ends the IdP session (the cookie's, or else the one named by the hint's ``sid``), which
sends back-channel logout tokens, then redirects to a registered
``post_logout_redirect_uri`` with ``state``, or shows a "signed out" page.
"""

from __future__ import annotations

from typing import Any

import jwt
from aiohttp import web
from yarl import URL

from . import pages
from .oauth import read_form
from .records import OAuthError
from .state import SESSION_COOKIE, STATE_KEY, IdpState


def _hint_client(claims: dict[str, Any]) -> set[str]:
    aud = claims.get("aud")
    return {aud} if isinstance(aud, str) else {str(a) for a in aud or ()}


async def _params(request: web.Request) -> dict[str, str]:
    if request.method == "POST":
        return await read_form(request)
    query = request.query
    if any(len(query.getall(key)) > 1 for key in query):
        raise OAuthError("invalid_request", "a parameter was repeated")
    return dict(query)


def _check_hint(state: IdpState, hint: str | None) -> dict[str, Any] | None:
    """Claims of an ID token we issued (§2: an expired one is fine); raises if it is not ours."""
    if not hint:
        return None
    return state.keys.verify(hint, issuer=state.issuer, verify_exp=False)


async def end_session(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    try:
        params = await _params(request)
        hint = _check_hint(state, params.get("id_token_hint"))
    except OAuthError:
        return pages.error_page("Invalid logout request", "A parameter was repeated.")
    except jwt.PyJWTError:
        return pages.error_page(
            "Invalid logout request", "The id_token_hint was not issued by this provider."
        )
    clients = _hint_client(hint) if hint else set()
    client_id = params.get("client_id")
    if client_id and clients and client_id not in clients:
        return pages.error_page(
            "Invalid logout request", "client_id does not match the id_token_hint."
        )
    if client_id is None and len(clients) == 1:
        client_id = next(iter(clients))
    session = state.session(request.cookies.get(SESSION_COOKIE))
    if session is None and hint is not None and "sid" in hint:
        session = state.session_by_sid(str(hint["sid"]))
    if session is not None:
        await state.end_session(session.sid)
    client = state.clients.get(client_id or "")
    target = params.get("post_logout_redirect_uri")
    resp: web.Response
    if target and client is not None and target in client.post_logout_redirect_uris:
        query = {"state": params["state"]} if "state" in params else {}
        location = URL(target).extend_query(query)
        resp = web.Response(
            status=302, headers={"Location": str(location), "Cache-Control": "no-store"}
        )
    else:
        resp = pages.signed_out_page()
    resp.del_cookie(SESSION_COOKIE, path="/")
    return resp

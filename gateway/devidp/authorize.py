"""The front channel: ``GET /authorize``, the sign-in form (``POST /login``) and consent
(``POST /consent``), ending in a redirect to the client with ``code``/``state``/``iss``.

Errors before the client and its redirect_uri are known show a page and never redirect
(RFC 6749 §4.1.2.1); later errors go back to the client with ``error=`` (and ``iss``,
RFC 9207 §2). PKCE with S256 is mandatory (RFC 9700 §2.1.1).
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Mapping

from aiohttp import web
from yarl import URL

from . import pages, par
from .config import KNOWN_SCOPES
from .oauth import read_form
from .records import IdpSession, Interaction, OAuthError
from .state import SESSION_COOKIE, STATE_KEY, IdpState

# RFC 7636 §4.2: a S256 challenge is 43 base64url characters.
CHALLENGE = re.compile(r"[A-Za-z0-9_-]{43}")


def redirect_to_client(
    state: IdpState, redirect_uri: str, client_state: str | None, params: dict[str, str]
) -> web.Response:
    """302 to the client's redirect_uri with ``params``, ``state`` and ``iss`` added."""
    query = dict(params)
    if client_state is not None:
        query["state"] = client_state
    if not state.faults.omit_authz_iss:
        query["iss"] = state.faults.authz_iss or state.issuer
    location = URL(redirect_uri).extend_query(query)
    return web.Response(
        status=302, headers={"Location": str(location), "Cache-Control": "no-store"}
    )


def _fail(state: IdpState, interaction: Interaction, error: str, desc: str) -> web.Response:
    state.interactions.pop(interaction.id, None)
    params = {"error": error, "error_description": desc}
    return redirect_to_client(state, interaction.redirect_uri, interaction.state, params)


def _finish(state: IdpState, interaction: Interaction, session: IdpSession) -> web.Response:
    state.interactions.pop(interaction.id, None)
    code = state.issue_code(interaction, session)
    return redirect_to_client(state, interaction.redirect_uri, interaction.state, {"code": code})


def _login_form(
    state: IdpState, interaction: Interaction, error: str | None = None, username: str = ""
) -> web.Response:
    return pages.login_page(
        client_id=interaction.client_id,
        interaction=interaction.id,
        users=state.users.values(),
        error=error,
        username=username,
    )


def _after_login(state: IdpState, interaction: Interaction, session: IdpSession) -> web.Response:
    """Consent if needed (and not remembered in the IdP session), else the code."""
    interaction.sid = session.sid
    granted = session.consents.get(interaction.client_id, frozenset())
    needs_consent = state.cfg.require_consent and (
        "consent" in interaction.prompt or not set(interaction.scope) <= granted
    )
    if not needs_consent:
        return _finish(state, interaction, session)
    if "none" in interaction.prompt:
        return _fail(state, interaction, "consent_required", "consent is required")
    user = state.users[session.sub]
    return pages.consent_page(
        client_id=interaction.client_id,
        interaction=interaction.id,
        scopes=interaction.scope,
        username=user.username,
    )


async def authorize(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    query = request.query
    if any(len(query.getall(key)) > 1 for key in query):
        return pages.error_page("Invalid request", "A parameter was repeated.")
    pushed = par.resolve(state, query)  # RFC 9126 §4
    if isinstance(pushed, web.Response):
        return pushed
    query = pushed if pushed is not None else query
    client = state.clients.get(query.get("client_id", ""))
    if client is None:
        return pages.error_page("Unknown client", "This application is not registered.")
    redirect_uri = query.get("redirect_uri", "")
    if redirect_uri not in client.redirect_uris:
        return pages.error_page(
            "Invalid redirect_uri", "The redirect_uri is not registered for this application."
        )
    interaction = state.start_interaction(
        client_id=client.client_id,
        redirect_uri=redirect_uri,
        scope=tuple(s for s in KNOWN_SCOPES if s in query.get("scope", "").split()),
        state=query.get("state"),
        nonce=query.get("nonce"),
        code_challenge=query.get("code_challenge", ""),
        prompt=frozenset(query.get("prompt", "").split()),
    )
    problem = _request_problem(query, interaction)
    if problem is not None:
        return _fail(state, interaction, problem.error, problem.description)
    session = state.session(request.cookies.get(SESSION_COOKIE))
    if session is not None and "max_age" in query:
        try:
            if state.now() - session.auth_time > int(query["max_age"]):
                session = None
        except ValueError:
            return _fail(state, interaction, "invalid_request", "max_age must be a number")
    if session is None or "login" in interaction.prompt:
        if "none" in interaction.prompt:
            return _fail(state, interaction, "login_required", "the user is not signed in")
        return _login_form(state, interaction)
    return _after_login(state, interaction, session)


def _request_problem(query: Mapping[str, str], interaction: Interaction) -> OAuthError | None:
    """What is wrong with an authorization request whose client and redirect_uri are fine."""
    if query.get("response_type") != "code":
        return OAuthError("unsupported_response_type", "only response_type=code is supported")
    if query.get("response_mode", "query") != "query":
        return OAuthError("invalid_request", "only response_mode=query is supported")
    if query.get("code_challenge_method") != "S256":
        return OAuthError("invalid_request", "PKCE with code_challenge_method=S256 is required")
    if not CHALLENGE.fullmatch(interaction.code_challenge):
        return OAuthError("invalid_request", "code_challenge must be 43 base64url characters")
    if not interaction.scope:
        return OAuthError("invalid_scope", "no known scope was requested")
    if "none" in interaction.prompt and len(interaction.prompt) > 1:
        return OAuthError("invalid_request", "prompt=none cannot be combined")
    if "request" in query or "request_uri" in query:
        return OAuthError("request_not_supported", "request objects are not supported")
    return None


async def login(request: web.Request) -> web.Response:
    """``POST /login``: check the password; on success start the IdP session."""
    state = request.app[STATE_KEY]
    try:
        form = await read_form(request)
    except OAuthError:
        return pages.error_page("Invalid request", "A field was repeated.")
    interaction = state.interaction(form.get("interaction", ""))
    if interaction is None:
        return pages.error_page(
            "Sign-in expired", "This sign-in request has expired. Start again from the app."
        )
    username = form.get("username", "")
    user = state.user_by_username(username)
    password = form.get("password", "").encode("utf-8")
    if user is None or not hmac.compare_digest(user.password.encode("utf-8"), password):
        return _login_form(state, interaction, "Wrong username or password.", username)
    session = state.sign_in(user, state.session(request.cookies.get(SESSION_COOKIE)))
    resp = _after_login(state, interaction, session)
    resp.set_cookie(
        SESSION_COOKIE,
        session.cookie,
        httponly=True,
        samesite="Lax",
        path="/",
        secure=state.issuer.startswith("https:"),
    )
    return resp


async def consent(request: web.Request) -> web.Response:
    """``POST /consent``: approve (remembered in the IdP session) or deny."""
    state = request.app[STATE_KEY]
    try:
        form = await read_form(request)
    except OAuthError:
        return pages.error_page("Invalid request", "A field was repeated.")
    interaction = state.interaction(form.get("interaction", ""))
    if interaction is None:
        return pages.error_page(
            "Request expired", "This authorization request has expired. Start again from the app."
        )
    session = state.session(request.cookies.get(SESSION_COOKIE))
    if session is None or session.sid != interaction.sid:
        return pages.error_page("Not signed in", "Your sign-in session has changed. Start again.")
    decision = form.get("decision")
    if decision == "deny":
        return _fail(state, interaction, "access_denied", "the user denied access")
    if decision != "approve":
        return pages.error_page("Invalid request", "Choose Allow or Deny.")
    granted = session.consents.get(interaction.client_id, frozenset())
    session.consents[interaction.client_id] = granted | frozenset(interaction.scope)
    return _finish(state, interaction, session)

"""The provider's live state: users, clients, keys, sessions, codes and tokens, in memory.

Everything a test may inspect or poke lives here (``faults``, ``token_calls``,
``userinfo_calls``, ``jwks_calls``, ``introspect_calls``, ``revoked``, ``backchannel_sent``,
``rotate_keys``, ``sign``, ``set_user_groups``...). Handlers reach
it through ``app[STATE_KEY]``. The clock is injectable: tests move ``state.clock``
instead of sleeping.
"""

from __future__ import annotations

import secrets
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import aiohttp
import jwt
from aiohttp import web

from .backchannel import deliver_logout_tokens
from .config import ClientRegistration, DemoUser, DevIdpConfig, Faults
from .keys import KeyChoice, KeyRing
from .records import AccessRecord, AuthCode, Grant, IdpSession, Interaction, RefreshRecord
from .tokens import access_token_claims, logout_token_claims

SESSION_COOKIE = "devidp_session"
INTERACTION_TTL = 600
CODE_TTL = 60


def new_id(nbytes: int = 32) -> str:
    return secrets.token_urlsafe(nbytes)


class IdpState:
    """All mutable state of one provider instance."""

    def __init__(self, cfg: DevIdpConfig, clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.clock = clock
        self.keys = KeyRing(cfg.signing_alg)
        self.users: dict[str, DemoUser] = {user.sub: user for user in cfg.users}
        self.clients: dict[str, ClientRegistration] = {c.client_id: c for c in cfg.clients}
        self.token_calls: Counter[str] = Counter()
        self.userinfo_calls = 0  # tests prove an access token was (not) used
        self.jwks_calls = 0  # tests count relying parties' JWKS re-fetches
        self.introspect_calls = 0  # tests prove introspection answers are cached
        self.revoked: list[str] = []
        self.backchannel_sent: list[dict[str, Any]] = []
        self.interactions: dict[str, Interaction] = {}
        self.sessions: dict[str, IdpSession] = {}  # by cookie value
        self.codes: dict[str, AuthCode] = {}
        self.grants: dict[str, Grant] = {}
        self.refresh_tokens: dict[str, RefreshRecord] = {}
        self.access_tokens: dict[str, AccessRecord] = {}  # by token value
        self.revoked_jtis: set[str] = set()
        self.http: aiohttp.ClientSession | None = None  # set while the app runs
        # private_key_jwt and PAR (client_assertion.py, par.py)
        self.client_assertions: list[dict[str, Any]] = []  # header and claims, as accepted
        self.client_assertion_jtis: dict[str, int] = {}  # jti -> exp, each accepted once
        self.pushed_requests: dict[str, tuple[str, dict[str, str], int]] = {}
        self.par_calls = 0

    @property
    def faults(self) -> Faults:
        return self.cfg.faults

    @faults.setter
    def faults(self, value: Faults) -> None:
        self.cfg.faults = value

    @property
    def issuer(self) -> str:
        if self.cfg.issuer is None:
            raise RuntimeError("the issuer is not known before the provider is bound")
        return self.cfg.issuer

    def now(self) -> int:
        return int(self.clock())

    # -- keys and users ---------------------------------------------------------------

    def rotate_keys(self) -> None:
        """Publish a new signing key and sign with it; the previous key stays in the JWKS."""
        self.keys.rotate()

    def sign(
        self,
        claims: dict[str, Any],
        headers: dict[str, Any] | None = None,
        *,
        key: KeyChoice = "current",
    ) -> str:
        """Sign any JWT with the provider's key (tests forge logout and bearer tokens)."""
        return self.keys.sign(claims, headers, key=key)

    def set_user_groups(self, sub: str, groups: Sequence[str]) -> None:
        self.users[sub] = replace(self.users[sub], groups=tuple(groups))

    def user_by_username(self, username: str) -> DemoUser | None:
        return next((u for u in self.users.values() if u.username == username), None)

    # -- interactions and IdP sessions ------------------------------------------------

    def start_interaction(self, **request: Any) -> Interaction:
        now = self.now()
        for key in [k for k, v in self.interactions.items() if v.expires <= now]:
            del self.interactions[key]
        found = Interaction(id=new_id(), expires=now + INTERACTION_TTL, **request)
        self.interactions[found.id] = found
        return found

    def interaction(self, interaction_id: str) -> Interaction | None:
        found = self.interactions.get(interaction_id)
        if found is None or found.expires <= self.now():
            return None
        return found

    def session(self, cookie: str | None) -> IdpSession | None:
        return self.sessions.get(cookie) if cookie else None

    def session_by_sid(self, sid: str) -> IdpSession | None:
        return next((s for s in self.sessions.values() if s.sid == sid), None)

    def sign_in(self, user: DemoUser, current: IdpSession | None) -> IdpSession:
        """Start an IdP session, or renew ``auth_time`` when the same user signs in again."""
        if current is not None and current.sub == user.sub:
            current.auth_time = self.now()
            return current
        if current is not None:
            self.sessions.pop(current.cookie, None)
        created = IdpSession(cookie=new_id(), sid=new_id(16), sub=user.sub, auth_time=self.now())
        self.sessions[created.cookie] = created
        return created

    async def end_session(self, sid: str) -> IdpSession | None:
        """End an IdP session and send back-channel logout tokens to its clients.

        Grants bound to the session die with it, except ``offline_access`` ones.
        """
        ended = self.session_by_sid(sid)
        if ended is None:
            return None
        del self.sessions[ended.cookie]
        for grant in self.grants.values():
            if grant.sid == sid and "offline_access" not in grant.scope:
                self.revoke_grant(grant.id)
        deliveries: list[tuple[str, str]] = []
        for client_id in sorted(ended.clients):
            client = self.clients.get(client_id)
            if client is None or client.backchannel_logout_uri is None:
                continue
            claims = logout_token_claims(
                issuer=self.issuer,
                client_id=client_id,
                sub=ended.sub,
                sid=ended.sid,
                now=self.now(),
                jti=new_id(16),
            )
            self.backchannel_sent.append(claims)
            token = self.sign(claims, {"typ": "logout+jwt"})
            deliveries.append((client.backchannel_logout_uri, token))
        if deliveries:
            await deliver_logout_tokens(self.http, deliveries)
        return ended

    # -- codes, grants and tokens -----------------------------------------------------

    def issue_code(self, interaction: Interaction, session: IdpSession) -> str:
        now = self.now()
        for key in [k for k, v in self.codes.items() if v.expires <= now - CODE_TTL]:
            del self.codes[key]
        grant = Grant(
            id=new_id(16),
            client_id=interaction.client_id,
            sub=session.sub,
            scope=interaction.scope,
            sid=session.sid,
            auth_time=session.auth_time,
        )
        self.grants[grant.id] = grant
        code = new_id()
        self.codes[code] = AuthCode(
            client_id=interaction.client_id,
            redirect_uri=interaction.redirect_uri,
            sub=session.sub,
            scope=interaction.scope,
            nonce=interaction.nonce,
            code_challenge=interaction.code_challenge,
            sid=session.sid,
            auth_time=session.auth_time,
            expires=now + CODE_TTL,
            grant_id=grant.id,
        )
        return code

    def revoke_grant(self, grant_id: str) -> None:
        grant = self.grants.get(grant_id)
        if grant is None:
            return
        grant.revoked = True
        for token in grant.refresh_tokens:
            self.refresh_tokens[token].revoked = True
        for token in grant.access_tokens:
            self.access_tokens[token].revoked = True

    def issue_access_token(
        self,
        sub: str,
        client_id: str,
        scope: str | Sequence[str],
        ttl: int,
        *,
        grant_id: str | None = None,
    ) -> str:
        """A JWT (``typ: at+jwt``) or opaque access token, remembered for introspection."""
        scopes = tuple(scope.split()) if isinstance(scope, str) else tuple(scope)
        now, jti = self.now(), new_id(16)
        record = AccessRecord(jti, sub, client_id, scopes, now, now + ttl, grant_id)
        if self.cfg.access_token_format == "opaque":
            token = new_id()
        else:
            claims = access_token_claims(
                issuer=self.issuer,
                user=self.users.get(sub),
                sub=sub,
                client_id=client_id,
                scope=scopes,
                now=now,
                ttl=ttl,
                jti=jti,
            )
            token = self.sign(claims, {"typ": "at+jwt"})
        self.access_tokens[token] = record
        if grant_id is not None:
            self.grants[grant_id].access_tokens.append(token)
        return token

    def issue_refresh_token(self, grant: Grant) -> str:
        token = new_id()
        self.refresh_tokens[token] = RefreshRecord(
            grant.id, self.now() + self.cfg.refresh_token_ttl
        )
        grant.refresh_tokens.append(token)
        return token

    def active_access_token(self, token: str) -> AccessRecord | None:
        """The record of a live access token; JWTs we signed but never stored count too."""
        record = self.access_tokens.get(token)
        if record is None and token.count(".") == 2:
            record = self._record_from_jwt(token)
        if record is None or record.revoked or record.jti in self.revoked_jtis:
            return None
        if record.exp <= self.now():
            return None
        grant = self.grants.get(record.grant_id) if record.grant_id else None
        return None if grant is not None and grant.revoked else record

    def _record_from_jwt(self, token: str) -> AccessRecord | None:
        try:
            claims = self.keys.verify(token, issuer=self.issuer, typ="at+jwt", verify_exp=False)
            scope = tuple(str(claims.get("scope", "")).split())
            return AccessRecord(
                str(claims["jti"]),
                str(claims["sub"]),
                str(claims["client_id"]),
                scope,
                int(claims["iat"]),
                int(claims["exp"]),
            )
        except (jwt.PyJWTError, KeyError, TypeError, ValueError):
            return None

    def revoke_token(self, token: str, client_id: str) -> None:
        """RFC 7009 §2.1: a refresh token takes its grant with it; an access token dies alone.

        A token issued to another client is left alone (the answer is 200 all the same).
        """
        refresh = self.refresh_tokens.get(token)
        if refresh is not None:
            if self.grants[refresh.grant_id].client_id == client_id:
                self.revoke_grant(refresh.grant_id)
                self.revoked.append(token)
            return
        record = self.access_tokens.get(token) or self.active_access_token(token)
        if record is not None and record.client_id == client_id:
            record.revoked = True
            self.revoked_jtis.add(record.jti)
            self.revoked.append(token)


STATE_KEY: web.AppKey[IdpState] = web.AppKey("devidp_state", IdpState)

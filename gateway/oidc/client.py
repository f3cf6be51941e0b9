"""The provider client: metadata loading, authorization URL, code exchange, refresh, userinfo,
revocation (RFC 7009), introspection (RFC 7662) and the end-session URL.

Transport failures and 5xx raise ``ProviderTransportError``; OAuth error responses raise
``OAuthError`` carrying the ``error`` code, which callers branch on (never on message text).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

import aiohttp

from gateway.config import ProviderSettings
from gateway.errors import OAuthError, ProviderTransportError
from gateway.logs import WarnLimiter, transport_cause
from gateway.oidc import par
from gateway.oidc.client_auth import ClientAssertions, audience
from gateway.oidc.jwks import JwksCache
from gateway.oidc.metadata import ProviderMetadata
from gateway.oidc.validate import IdTokenValidator
from gateway.tracing import Tracing

log = logging.getLogger("gateway.oidc")
_MAX_DOC = 1024 * 1024
_RETRY_DISCOVERY = 5.0


@dataclass(frozen=True, slots=True)
class TokenResponse:
    access_token: str
    token_type: str
    expires_in: float | None
    refresh_token: str | None
    refresh_expires_in: float | None
    id_token: str | None
    scope: tuple[str, ...] | None

    @classmethod
    def parse(cls, data: Any) -> TokenResponse:
        if not isinstance(data, dict):
            raise ProviderTransportError("the token endpoint answered no JSON object")
        at = data.get("access_token")
        if not isinstance(at, str) or not at:
            raise ProviderTransportError("the token response has no access_token")
        if str(data.get("token_type", "Bearer")).lower() not in ("bearer", "dpop"):
            raise ProviderTransportError("unsupported token_type")
        scope = data.get("scope")
        return cls(
            access_token=at,
            token_type="Bearer",
            expires_in=_number(data.get("expires_in")),
            refresh_token=data.get("refresh_token")
            if isinstance(data.get("refresh_token"), str)
            else None,
            refresh_expires_in=_number(data.get("refresh_expires_in")),
            id_token=data.get("id_token") if isinstance(data.get("id_token"), str) else None,
            scope=tuple(scope.split()) if isinstance(scope, str) else None,
        )


def _number(v: Any) -> float | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int | float) and v >= 0:
        return float(v)
    if isinstance(v, str) and v.isdigit():
        return float(v)
    return None


def make_provider_http(settings: ProviderSettings) -> aiohttp.ClientSession:
    ssl_ctx: ssl.SSLContext | bool = True
    if settings.ca_file:
        ssl_ctx = ssl.create_default_context(cafile=settings.ca_file)
    return aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=settings.timeout, connect=min(5.0, settings.timeout)),
        connector=aiohttp.TCPConnector(ssl=ssl_ctx, limit=64),
        cookie_jar=aiohttp.DummyCookieJar(),
        headers={"User-Agent": "gateway"},
    )


class ProviderClient:
    def __init__(
        self,
        settings: ProviderSettings,
        redirect_uri: str,
        http: aiohttp.ClientSession,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.redirect_uri = redirect_uri
        self._http = http
        self._clock = clock
        self._meta: ProviderMetadata | None = None
        self._meta_lock = asyncio.Lock()
        self._last_attempt = 0.0
        self._warn = WarnLimiter(log)
        self.tracing = Tracing()  # the app's, set by app.py
        self.jwks = JwksCache(self._get_json, lambda: self._meta.jwks_uri if self._meta else None)
        self.validator = IdTokenValidator(
            self.jwks,
            settings.client_id,
            issuer=lambda: self._meta.issuer if self._meta else "",
            algorithms=lambda: self._meta.signing_algs if self._meta else (),
            clock=clock,
        )
        # private_key_jwt (RFC 7523): None for the secret-based and public methods.
        self.assertions = ClientAssertions.from_settings(settings, clock=clock)

    # -- metadata --------------------------------------------------------------------------

    @property
    def loaded(self) -> bool:
        return self._meta is not None

    @property
    def loaded_metadata(self) -> ProviderMetadata | None:
        """The metadata if loaded (no I/O)."""
        return self._meta

    async def load(self) -> ProviderMetadata:
        """Discovery (or the configured endpoints) and the JWKS; raises on failure."""
        async with self._meta_lock:
            if self._meta is not None:
                return self._meta
            self._last_attempt = time.monotonic()
            s = self.settings
            if s.issuer and not (s.authorization_endpoint and s.token_endpoint and s.jwks_uri):
                doc = await self._get_json(
                    s.issuer.rstrip("/") + "/.well-known/openid-configuration"
                )
                try:
                    meta = ProviderMetadata.from_discovery(doc, s)
                except ValueError as exc:
                    raise ProviderTransportError(str(exc)) from None
                if not (meta.revocation_endpoint and meta.introspection_endpoint):
                    meta = await self._with_rfc8414(meta)
            else:
                meta = ProviderMetadata.from_settings(s)
            self._meta = meta
        if meta.jwks_uri:
            try:
                await self.jwks.refresh()
            except ProviderTransportError:
                log.warning("provider JWKS not loaded yet; will retry on first use")
        return meta

    async def _with_rfc8414(self, meta: ProviderMetadata) -> ProviderMetadata:
        """CONTRACT "Provider metadata": discovery lacks the revocation or introspection
        endpoint, so read the issuer's RFC 8414 document too (its §3.1 URL, then the
        issuer-relative one many providers serve); a missing document changes nothing."""
        parts = urlsplit(meta.issuer)
        path = parts.path.rstrip("/")
        urls = [f"{parts.scheme}://{parts.netloc}/.well-known/oauth-authorization-server{path}"]
        if path:
            urls.append(
                f"{parts.scheme}://{parts.netloc}{path}/.well-known/oauth-authorization-server"
            )
        for url in urls:
            try:
                doc = await self._get_json(url)
            except ProviderTransportError as exc:
                log.info("no RFC 8414 metadata: %s", exc)
                continue
            merged = meta.with_oauth_metadata(doc)
            if merged is not meta:
                log.info(
                    "endpoints from RFC 8414 metadata",
                    extra={
                        "revocation_endpoint": merged.revocation_endpoint,
                        "introspection_endpoint": merged.introspection_endpoint,
                    },
                )
            return merged
        return meta

    def scopes(self, meta: ProviderMetadata) -> tuple[str, ...]:
        """The configured scopes, or the default for this provider (CONTRACT "Provider
        metadata"): openid email profile, plus offline_access unless the provider publishes
        a scopes_supported list without it."""
        if self.settings.scopes is not None:
            return self.settings.scopes
        base = ("openid", "email", "profile")
        listed = meta.scopes_supported
        return (*base, "offline_access") if listed is None or "offline_access" in listed else base

    async def metadata(self) -> ProviderMetadata:
        """Loaded metadata, loading it now if an earlier attempt failed (rate-limited)."""
        if self._meta is not None:
            return self._meta
        if time.monotonic() - self._last_attempt < _RETRY_DISCOVERY and self._last_attempt:
            raise ProviderTransportError("provider metadata not loaded")
        return await self.load()

    async def _get_json(self, url: str) -> Any:
        with self.tracing.span(f"provider GET {urlsplit(url).path}", "client", _span_attrs(url)):
            return await self._get_json_untraced(url)

    async def _get_json_untraced(self, url: str) -> Any:
        try:
            async with self._http.get(url, allow_redirects=False) as resp:
                if resp.status != 200:
                    raise self._failed("GET", url, f"answered {resp.status}", resp.status)
                body = await resp.content.read(_MAX_DOC + 1)
                if len(body) > _MAX_DOC:
                    raise self._failed("GET", url, "answered too much")
                import json

                data = json.loads(body)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise self._failed("GET", url, f"failed: {transport_cause(exc)}") from None
        self._recovered(url)
        return data

    def _failed(
        self, method: str, url: str, why: str, status: int | None = None
    ) -> ProviderTransportError:
        """The error to raise for a provider that gave no usable answer, with one rate-limited
        WARNING per cause (gateway.logs.WarnLimiter). A 404 for an optional document (RFC 8414
        metadata) is not a provider failure and is not warned about."""
        text = f"{method} {_safe(url)} {why}"
        if status != 404:
            self._warn.warn(f"provider {_origin(url)} {why}", "provider failure: %s", text)
        return ProviderTransportError(text)

    def _recovered(self, url: str) -> None:
        self._warn.ok(f"provider {_origin(url)} ", "provider %s answers again", _origin(url))

    # -- front channel ---------------------------------------------------------------------

    def authorization_url(
        self, meta: ProviderMetadata, state: str, nonce: str, challenge: str
    ) -> str:
        params = dict(self.settings.extra_auth_params)
        params.update(
            response_type="code",
            client_id=self.settings.client_id,
            redirect_uri=self.redirect_uri,
            scope=" ".join(self.scopes(meta)),
            state=state,
            nonce=nonce,
            code_challenge=challenge,
            code_challenge_method="S256",
        )
        if self.settings.prompt and "prompt" not in params:
            # Only when the operator asks (some providers, oidc-provider by default, ignore
            # offline_access without prompt=consent, OIDC Core §11; most do not need it).
            params["prompt"] = self.settings.prompt
        sep = "&" if urlsplit(meta.authorization_endpoint).query else "?"
        return meta.authorization_endpoint + sep + urlencode(params, quote_via=quote)

    async def authorization_redirect(
        self, meta: ProviderMetadata, state: str, nonce: str, challenge: str
    ) -> str:
        """Where to send the browser: the authorization URL, or, when the request is pushed
        (RFC 9126, ``oidc.par``), the endpoint with only ``client_id`` and ``request_uri``.

        Raises ``par.ParUnavailable`` when pushing is required but impossible, OAuthError
        when the PAR endpoint refuses, ProviderTransportError when it does not answer.
        """
        endpoint = par.endpoint(self.settings.par, meta)
        if endpoint is None:
            return self.authorization_url(meta, state, nonce, challenge)
        # The very parameters of a plain request (one place builds them), as a form.
        query = self.authorization_url(
            replace(meta, authorization_endpoint=""), state, nonce, challenge
        )
        form = dict(parse_qsl(query.removeprefix("?"), keep_blank_values=True))
        _, data = await self._post(endpoint, form)
        return par.browser_url(
            meta.authorization_endpoint, self.settings.client_id, par.request_uri(data)
        )

    def end_session_url(
        self, meta: ProviderMetadata, id_token_hint: str | None, post_logout: str, state: str
    ) -> str | None:
        """RP-Initiated Logout 1.0 §2, identified by ``client_id``.

        The URL travels through the browser, and no token may reach it (SECURITY.md 11,
        OAuth 2.0 for Browser-Based Apps §6.1), so callers pass ``id_token_hint`` only when
        the operator opted in (``logout.id_token_hint``); §2 lets ``client_id`` name the
        client that registered ``post_logout_redirect_uri``.
        """
        if not meta.end_session_endpoint:
            return None
        params = {
            "client_id": self.settings.client_id,
            "post_logout_redirect_uri": post_logout,
            "state": state,
        }
        if id_token_hint:
            params["id_token_hint"] = id_token_hint
        sep = "&" if urlsplit(meta.end_session_endpoint).query else "?"
        return meta.end_session_endpoint + sep + urlencode(params, quote_via=quote)

    # -- back channel ----------------------------------------------------------------------

    def _auth(self, form: dict[str, str], url: str = "") -> dict[str, str]:
        s = self.settings
        method = s.effective_auth_method
        headers = {"Accept": "application/json"}
        secret = s.client_secret.get_secret_value() if s.client_secret else ""
        if method == "client_secret_basic":
            # RFC 6749 §2.3.1: id and secret are form-urlencoded before base64.
            pair = f"{quote(s.client_id, safe='')}:{quote(secret, safe='')}"
            headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
        elif method == "client_secret_post":
            form["client_id"] = s.client_id
            form["client_secret"] = secret
        elif self.assertions is not None:
            form.update(self.assertions.form(self._assertion_audience(url)))
        else:
            form["client_id"] = s.client_id
        return headers

    def _assertion_audience(self, url: str) -> str:
        """The ``aud`` of a client assertion sent to ``url`` (``client_assertion_audience``)."""
        meta, s = self._meta, self.settings
        return audience(
            s.client_assertion_audience,
            issuer=(meta.issuer if meta else "") or s.issuer or "",
            token_endpoint=(meta.token_endpoint if meta else "") or s.token_endpoint or "",
            endpoint=url,
        )

    async def _post(self, url: str, form: dict[str, str]) -> tuple[int, Any]:
        what = form.get("grant_type") or urlsplit(url).path
        with self.tracing.span(f"provider POST {what}", "client", _span_attrs(url)):
            return await self._post_untraced(url, form)

    async def _post_untraced(self, url: str, form: dict[str, str]) -> tuple[int, Any]:
        headers = self._auth(form, url)
        try:
            async with self._http.post(
                url, data=form, headers=headers, allow_redirects=False
            ) as resp:
                body = await resp.content.read(_MAX_DOC + 1)
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise self._failed("POST", url, f"failed: {transport_cause(exc)}") from None
        if status >= 500 or len(body) > _MAX_DOC:
            raise self._failed("POST", url, f"answered {status}")
        self._recovered(url)
        data: Any = None
        if body:
            try:
                import json

                data = json.loads(body)
            except ValueError:
                data = None
        if status >= 400:
            err = data.get("error") if isinstance(data, dict) else None
            if not isinstance(err, str):
                raise ProviderTransportError(f"POST {_safe(url)} answered {status}")
            desc = data.get("error_description")
            raise OAuthError(err, desc if isinstance(desc, str) else None, status)
        return status, data

    async def check_client_auth(self, meta: ProviderMetadata) -> tuple[int, str | None]:
        """``check-config --probe``: redeem a code that does not exist, authenticated as the
        client. The answer's HTTP status and OAuth ``error``: ``invalid_grant`` means the
        provider accepted the client and refused only the code; ``invalid_client`` (or a 401)
        means the client id or secret is wrong. Raises ProviderTransportError without answer."""
        import secrets

        form = {
            "grant_type": "authorization_code",
            "code": "gateway-probe-" + secrets.token_urlsafe(16),
            "redirect_uri": self.redirect_uri,
            "code_verifier": secrets.token_urlsafe(48),
        }
        try:
            status, _ = await self._post(meta.token_endpoint, form)
        except OAuthError as exc:
            return exc.status or 400, exc.error
        return status, None

    async def exchange_code(self, code: str, verifier: str) -> TokenResponse:
        meta = await self.metadata()
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": self.redirect_uri,
            "code_verifier": verifier,
        }
        _, data = await self._post(meta.token_endpoint, form)
        return TokenResponse.parse(data)

    async def refresh(self, refresh_token: str) -> TokenResponse:
        meta = await self.metadata()
        form = {"grant_type": "refresh_token", "refresh_token": refresh_token}
        _, data = await self._post(meta.token_endpoint, form)
        return TokenResponse.parse(data)

    async def userinfo(self, access_token: str) -> dict[str, Any] | None:
        meta = await self.metadata()
        if not meta.userinfo_endpoint:
            return None
        headers = {"Authorization": f"Bearer {access_token}", "Accept": "application/json"}
        try:
            async with self._http.get(
                meta.userinfo_endpoint, headers=headers, allow_redirects=False
            ) as resp:
                if resp.status != 200 or "json" not in resp.headers.get("Content-Type", ""):
                    return None
                body = await resp.content.read(_MAX_DOC + 1)
        except (aiohttp.ClientError, TimeoutError):
            return None
        try:
            import json

            data = json.loads(body)
        except ValueError:
            return None
        return data if isinstance(data, dict) else None

    async def revoke(self, token: str, hint: str) -> bool:
        """RFC 7009; True when the provider accepted it (or has no revocation endpoint: False)."""
        meta = await self.metadata()
        if not meta.revocation_endpoint:
            return False
        try:
            await self._post(meta.revocation_endpoint, {"token": token, "token_type_hint": hint})
        except (OAuthError, ProviderTransportError) as exc:
            log.warning("token revocation failed: %s", getattr(exc, "error", type(exc).__name__))
            return False
        return True

    async def introspect(self, token: str) -> dict[str, Any]:
        """RFC 7662; raises ProviderTransportError when there is no endpoint or no answer."""
        meta = await self.metadata()
        if not meta.introspection_endpoint:
            raise ProviderTransportError("the provider has no introspection endpoint")
        try:
            _, data = await self._post(
                meta.introspection_endpoint, {"token": token, "token_type_hint": "access_token"}
            )
        except OAuthError as exc:
            raise ProviderTransportError(f"introspection refused: {exc.error}") from None
        if not isinstance(data, dict):
            raise ProviderTransportError("introspection answered no JSON object")
        return data


def _safe(url: str) -> str:
    """A URL for logs: scheme, host and path only (never a query that might carry a token)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rsplit('@', 1)[-1]}{parts.path}"


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rsplit('@', 1)[-1]}"


def _span_attrs(url: str) -> dict[str, Any]:
    parts = urlsplit(url)
    return {"server.address": parts.hostname, "server.port": parts.port, "url.path": parts.path}

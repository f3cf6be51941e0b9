"""``gateway check-config --probe``: contact the provider and the session store, one check each.

A result's second member is True (ok), False (FAIL: exit status 1) or None (WARN: printed,
exit status unaffected). The provider check authenticates for real: it redeems a code that
does not exist with the client's credentials, so a wrong secret fails the probe while the
expected refusal of the code (``invalid_grant``) passes it.
"""

from __future__ import annotations

from gateway.config import ProviderSettings, Settings
from gateway.errors import ProviderTransportError, StoreError
from gateway.oidc import ProviderClient, par
from gateway.oidc.client import make_provider_http
from gateway.oidc.metadata import ProviderMetadata
from gateway.providers import mixup_risk
from gateway.store import open_store

Result = tuple[str, bool | None, str]


async def probe(settings: Settings) -> list[Result]:
    results: list[Result] = []
    several = settings.providers is not None
    for ref in settings.provider_refs:
        found = await _probe_provider(ref.settings, settings.redirect_uri, several=several)
        if several:  # "provider corp discovery": which provider each line is about
            found = [(f"provider {ref.id}{n[len('provider') :]}", ok, d) for n, ok, d in found]
        results.extend(found)
    if settings.session.store == "redis":
        try:
            store = open_store(settings.session)
        except ValueError as exc:  # e.g. a redis+sentinel:// URL without a service name
            results.append(("redis", False, f"bad redis_url ({exc})"))
            return results
        try:
            await store.ping()
            results.append(("redis", True, "PING answered"))
        except StoreError as exc:
            results.append(("redis", False, f"no answer ({exc})"))
        finally:
            await store.close()
    else:
        results.append(("session store", True, "memory (one process only)"))
    return results


async def _probe_provider(
    provider_settings: ProviderSettings, redirect_uri: str, *, several: bool = False
) -> list[Result]:
    results: list[Result] = []
    http = make_provider_http(provider_settings)
    try:
        provider = ProviderClient(provider_settings, redirect_uri, http)
        try:
            meta = await provider.load()
            results.append(("provider discovery", True, f"issuer {meta.issuer}"))
        except ProviderTransportError as exc:
            results.append(("provider discovery", False, str(exc)))
            meta = None
        if meta is not None:
            if (par_line := par.probe_result(provider_settings.par, meta)) is not None:
                results.append(par_line)
            try:
                await provider.jwks.refresh()
                results.append(("provider JWKS", True, f"{meta.jwks_uri}"))
            except ProviderTransportError as exc:
                results.append(("provider JWKS", False, str(exc)))
            results.append(await _client_auth(provider, meta))
            results.extend(_warnings(provider, meta))
            if several and (risk := mixup_risk(provider.settings, meta)) is not None:
                results.append(("provider mix-up defence", None, risk))
    finally:
        await http.close()
    return results


async def _client_auth(provider: ProviderClient, meta: ProviderMetadata) -> Result:
    name = "provider client authentication"
    try:
        status, error = await provider.check_client_auth(meta)
    except ProviderTransportError as exc:
        return (name, False, f"the token endpoint gave no usable answer ({exc})")
    public = provider.settings.effective_auth_method == "none"
    if error == "invalid_grant":
        what = "client id accepted (public client)" if public else "client id and secret accepted"
        return (name, True, f"{what}; a made-up code refused with invalid_grant")
    if error == "invalid_client" or status == 401:
        return (
            name,
            False,
            f"the provider refused the client ({error or status}): check client_id, "
            "client_secret and client_auth_method",
        )
    if error == "unauthorized_client":
        return (name, False, "the client may not use the authorization code grant")
    if error is None:
        return (name, False, f"a made-up code was accepted (HTTP {status})")
    return (name, None, f"could not tell whether the client is accepted (answered {error})")


def _warnings(provider: ProviderClient, meta: ProviderMetadata) -> list[Result]:
    out: list[Result] = []
    listed = meta.scopes_supported
    if listed is not None:
        for scope in provider.scopes(meta):
            if scope not in listed:
                out.append(("provider scopes", None, f"{scope} is not in scopes_supported"))
    if not meta.revocation_endpoint:
        out.append(
            ("provider revocation", None, "no revocation_endpoint: sign-out cannot revoke tokens")
        )
    if not meta.end_session_endpoint:
        out.append(
            (
                "provider end-session",
                None,
                "no end_session_endpoint: sign-out cannot end the provider's session",
            )
        )
    methods = meta.code_challenge_methods_supported
    if methods is None or "S256" not in methods:
        out.append(
            (
                "provider PKCE",
                None,
                "S256 not in code_challenge_methods_supported (PKCE is sent anyway)",
            )
        )
    return out

"""``gateway check-config --probe``: contact the provider and the session store, one check each."""

from __future__ import annotations

import aiohttp

from gateway.config import Settings
from gateway.errors import ProviderTransportError, StoreError
from gateway.oidc import ProviderClient, par
from gateway.oidc.client import make_provider_http
from gateway.store import open_store

Result = tuple[str, bool, str]


async def probe(settings: Settings) -> list[Result]:
    results: list[Result] = []
    http = make_provider_http(settings.provider)
    try:
        provider = ProviderClient(settings.provider, settings.redirect_uri, http)
        try:
            meta = await provider.load()
            results.append(("provider discovery", True, f"issuer {meta.issuer}"))
        except ProviderTransportError as exc:
            results.append(("provider discovery", False, str(exc)))
            meta = None
        if meta is not None:
            if (par_line := par.probe_result(settings.provider.par, meta)) is not None:
                results.append(par_line)
            try:
                await provider.jwks.refresh()
                results.append(("provider JWKS", True, f"{meta.jwks_uri}"))
            except ProviderTransportError as exc:
                results.append(("provider JWKS", False, str(exc)))
            results.append(await _token_endpoint(http, meta.token_endpoint))
    finally:
        await http.close()
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


async def _token_endpoint(http: aiohttp.ClientSession, url: str) -> Result:
    """Reachable means an HTTP answer below 500 to an empty grant (it is expected to refuse)."""
    try:
        async with http.post(
            url, data={"grant_type": "client_credentials"}, allow_redirects=False
        ) as r:
            ok = r.status < 500
            return ("provider token endpoint", ok, f"answered HTTP {r.status}")
    except (aiohttp.ClientError, TimeoutError) as exc:
        return ("provider token endpoint", False, type(exc).__name__)

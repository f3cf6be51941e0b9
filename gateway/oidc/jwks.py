"""JWKS cache: keys by ``kid``; an unknown ``kid`` re-fetches once, rate-limited, single-flight."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import jwt

from gateway.errors import ProviderTransportError, TokenValidationError

log = logging.getLogger("gateway.oidc")

Fetch = Callable[[str], Awaitable[dict[str, Any]]]


class JwksCache:
    def __init__(
        self,
        fetch: Fetch,
        uri_source: Callable[[], str | None],
        min_refetch_interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fetch = fetch
        self._uri = uri_source
        self._interval = min_refetch_interval
        self._clock = clock
        self._keys: dict[str | None, list[jwt.PyJWK]] = {}
        self._fetched_at: float | None = None
        self._miss_fetch_at: float | None = None  # when a kid miss last caused a fetch
        self._inflight: asyncio.Future[None] | None = None

    @property
    def loaded(self) -> bool:
        return self._fetched_at is not None

    async def refresh(self) -> None:
        """Fetch the key set now (single-flight: concurrent callers share one request)."""
        if self._inflight is not None:
            await asyncio.shield(self._inflight)
            return
        loop = asyncio.get_running_loop()
        self._inflight = loop.create_future()
        try:
            uri = self._uri()
            if not uri:
                raise ProviderTransportError("the provider publishes no jwks_uri")
            doc = await self._fetch(uri)
            self._keys = _parse(doc)
            self._fetched_at = self._clock()
            self._inflight.set_result(None)
        except BaseException as exc:
            self._inflight.set_exception(exc)
            self._inflight.exception()  # mark retrieved: waiters re-raise it themselves
            raise
        finally:
            self._inflight = None

    async def key_for(self, kid: str | None, alg: str) -> jwt.PyJWK:
        """The key for a token header; on a miss, re-fetch once unless a miss just did.

        Only miss-triggered fetches count against the rate limit: a key the provider rotates
        in right after a scheduled fetch (start-up, say) is still looked up at once (OIDC
        Core §10.1.1), while forged kids cause at most one fetch per interval. A miss while a
        fetch is in flight waits for that fetch instead of failing early.
        """
        key = self._find(kid, alg)
        if key is not None:
            return key
        now = self._clock()
        due = (
            not self.loaded
            or self._miss_fetch_at is None
            or now - self._miss_fetch_at >= self._interval
        )
        if due or self._inflight is not None:
            if due:
                self._miss_fetch_at = now
            await self.refresh()
            key = self._find(kid, alg)
            if key is not None:
                return key
        raise TokenValidationError("no key in the provider's JWKS matches the token's kid")

    def _find(self, kid: str | None, alg: str) -> jwt.PyJWK | None:
        candidates = self._keys.get(kid, []) if kid is not None else self._keys.get(None, [])
        if kid is None and not candidates:
            candidates = [k for keys in self._keys.values() for k in keys]
        fitting = [k for k in candidates if _fits(k, alg)]
        if kid is None and len(fitting) != 1:
            return None
        return fitting[0] if fitting else None


def _fits(key: jwt.PyJWK, alg: str) -> bool:
    key_alg = key._jwk_data.get("alg")
    if key_alg and key_alg != alg:
        return False
    kty = key.key_type
    return (
        (alg.startswith(("RS", "PS")) and kty == "RSA")
        or (alg.startswith("ES") and kty == "EC")
        or (alg == "EdDSA" and kty == "OKP")
    )


def _parse(doc: Any) -> dict[str | None, list[jwt.PyJWK]]:
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise ProviderTransportError("the JWKS document has no keys")
    keys: dict[str | None, list[jwt.PyJWK]] = {}
    for data in doc["keys"]:
        if not isinstance(data, dict) or data.get("use", "sig") != "sig":
            continue
        if data.get("kty") == "oct":
            continue  # symmetric keys are never accepted from a JWKS
        try:
            key = jwt.PyJWK(data)
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError):
            log.warning(
                "skipping a JWKS key the gateway cannot use: %s", json.dumps(data.get("kid"))
            )
            continue
        keys.setdefault(data.get("kid"), []).append(key)
    return keys

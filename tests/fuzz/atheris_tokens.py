#!/usr/bin/env python3
"""atheris: bearer and logout tokens - the ``Authorization`` header, JWT headers and claims
behind a good signature (the dev provider's own key), and RFC 7662 introspection answers.

Properties: every refusal is ``TokenValidationError`` (or the RFC 6750 error the header
parser raises), never another exception; an access token that is accepted has our issuer,
our audience, a future ``exp`` and a subject, and is not an ID or logout token; a logout
token that is accepted carries the logout event, a ``jti`` and a ``sub`` or ``sid``; an
introspection answer is accepted only when active, ours and not expired.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import atheris
import jwt
from multidict import CIMultiDict, CIMultiDictProxy

with atheris.instrument_imports(include=["gateway"], enable_loader_override=False):
    from gateway.bearer import (
        BearerVerifier,
        InvalidRequest,
        InvalidToken,
        _require_access_token,
        bearer_token,
        identity_of,
        scopes_of,
    )
    from gateway.devidp.keys import KeyRing
    from gateway.errors import TokenValidationError
    from gateway.oidc.jwks import JwksCache
    from gateway.oidc.validate import LOGOUT_EVENT, IdTokenValidator

ISSUER = "https://idp.example"
CLIENT = "gateway-client"
KEYS = KeyRing("RS256")
LOOP = asyncio.new_event_loop()


async def _fetch(uri: str) -> dict[str, Any]:
    return KEYS.jwks()


VALIDATOR = IdTokenValidator(
    JwksCache(_fetch, lambda: "https://idp.example/jwks"), CLIENT,
    issuer=lambda: ISSUER, algorithms=lambda: ("RS256", "ES256"),
)  # fmt: skip
# Only the pure answer check of the verifier is fuzzed here (no provider behind it).
VERIFIER = object.__new__(BearerVerifier)
VERIFIER.audiences = [CLIENT]

NAMES = ["iss", "sub", "aud", "exp", "nbf", "iat", "scope", "scp", "typ", "nonce", "cnf",
         "events", "client_id", "azp", "groups", "email", "jti", "sid", "active",
         "token_type", "username", "at_hash"]  # fmt: skip


def _value(fdp: atheris.FuzzedDataProvider, depth: int = 0) -> Any:
    kind = fdp.ConsumeIntInRange(0, 9 if depth < 2 else 5)
    now = int(time.time())
    if kind == 0:
        return None
    if kind == 1:
        return fdp.ConsumeBool()
    if kind == 2:
        return fdp.ConsumeIntInRange(-(2**40), 2**40) + (now if fdp.ConsumeBool() else 0)
    if kind == 3:
        return fdp.ConsumeFloat()
    if kind == 4:
        return fdp.ConsumeUnicodeNoSurrogates(16)
    if kind == 5:
        return fdp.PickValueInList([ISSUER, CLIENT, "alice", "Bearer", "Refresh", "at+jwt",
                                    "logout+jwt", "openid email", LOGOUT_EVENT, ""])  # fmt: skip
    if kind in (6, 7):
        return [_value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 3))]
    return {fdp.PickValueInList([LOGOUT_EVENT, "x", ""]): _value(fdp, depth + 1)
            for _ in range(fdp.ConsumeIntInRange(0, 2))}  # fmt: skip


def _claims(fdp: atheris.FuzzedDataProvider) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {"iss": ISSUER, "sub": "alice", "aud": CLIENT, "iat": now,
                              "exp": now + 300, "jti": "j1", "scope": "openid"}  # fmt: skip
    for _ in range(fdp.ConsumeIntInRange(0, 5)):
        name = fdp.PickValueInList(NAMES)
        if fdp.ConsumeBool():
            claims.pop(name, None)
        else:
            claims[name] = _value(fdp)
    return claims


def _check_access(token: str) -> None:
    try:
        claims = LOOP.run_until_complete(VALIDATOR.validate_access_token(token, [CLIENT]))
        _require_access_token(jwt.get_unverified_header(token), claims)
        ident = identity_of(claims)
        scopes_of(claims)
    except TokenValidationError:
        return
    aud = claims["aud"]
    assert claims["iss"] == ISSUER and (aud == CLIENT or CLIENT in aud), claims
    assert claims["exp"] > time.time() - 60 and ident.sub == claims["sub"] and ident.sub, claims
    assert not {"nonce", "events", "cnf"} & set(claims), claims


def _check_logout(token: str) -> None:
    try:
        out = LOOP.run_until_complete(VALIDATOR.validate_logout_token(token))
    except TokenValidationError:
        return
    assert out.jti and len(out.jti) <= 256 and (out.sub or out.sid), out


def _check_introspection(data: dict[str, Any]) -> None:
    now = time.time()
    try:
        principal = VERIFIER._from_introspection(data, ISSUER, now)
    except TokenValidationError:
        return
    assert data.get("active") is True and principal.identity.sub, data
    exp = data.get("exp")
    assert exp is None or exp > now, data
    aud = data.get("aud")
    if aud is not None:
        assert aud == CLIENT or (isinstance(aud, list) and CLIENT in aud), data
    else:
        assert data.get("client_id") in (None, CLIENT), data


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    mode = fdp.ConsumeIntInRange(0, 3)
    if mode == 0:  # the Authorization header as a client sends it
        headers: CIMultiDict[str] = CIMultiDict()
        for _ in range(fdp.ConsumeIntInRange(0, 2)):
            headers.add("Authorization", fdp.ConsumeUnicodeNoSurrogates(60))
        try:
            token = bearer_token(CIMultiDictProxy(headers))
        except (InvalidRequest, InvalidToken):
            return
        if token is not None:
            _check_access(token)
        return
    if mode == 3:
        claims = _claims(fdp)
        claims["active"] = _value(fdp) if fdp.ConsumeBool() else True
        _check_introspection(claims)
        return
    header = {"typ": fdp.PickValueInList(["at+jwt", "JWT", "logout+jwt", "x", None])}
    if fdp.ConsumeBool():
        header["kid"] = _value(fdp)
    claims = _claims(fdp)
    if mode == 2 and fdp.ConsumeBool():
        claims["events"] = {LOGOUT_EVENT: {}}
    try:
        token = KEYS.sign(claims, {k: v for k, v in header.items() if v is not None})
    except (TypeError, ValueError, jwt.PyJWTError):  # the signing side refuses it
        return
    if fdp.ConsumeBool():  # damage the signed token
        i = fdp.ConsumeIntInRange(0, len(token) - 1)
        token = token[:i] + fdp.ConsumeUnicodeNoSurrogates(3) + token[i + 1 :]
    if mode == 1:
        _check_access(token)
    else:
        _check_logout(token)
    json.dumps(claims, default=str)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()

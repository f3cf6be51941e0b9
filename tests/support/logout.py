"""Signing out: the front-channel confirmation form, and forged back-channel logout tokens."""

from __future__ import annotations

import time
import uuid
from typing import Any

import aiohttp

from gateway.devidp.tokens import BACKCHANNEL_EVENT
from tests.conftest import CLIENT_ID, Stack
from tests.idp_client import FormParser


async def confirmation_form(
    http: aiohttp.ClientSession, stack: Stack, query: str = ""
) -> dict[str, str]:
    async with http.get(stack.url + "/oauth2/sign_out" + query) as resp:
        assert resp.status == 200
        assert resp.headers["Cache-Control"] == "no-store"
        parser = FormParser()
        parser.feed(await resp.text())
    (form,) = parser.forms
    assert form.method == "post" and form.action == "/oauth2/sign_out"
    return {name: value for _, name, value in form.fields}


def claims(stack: Stack, **changes: Any) -> dict[str, Any]:
    now = int(time.time())
    out: dict[str, Any] = {
        "iss": stack.idp.issuer,
        "aud": CLIENT_ID,
        "iat": now,
        "exp": now + 120,
        "jti": uuid.uuid4().hex,
        "sub": "alice",
        "events": {BACKCHANNEL_EVENT: {}},
    }
    for key, value in changes.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def logout_token(stack: Stack, **changes: Any) -> str:
    return stack.idp.state.sign(claims(stack, **changes), headers={"typ": "logout+jwt"})

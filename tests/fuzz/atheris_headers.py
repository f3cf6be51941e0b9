#!/usr/bin/env python3
"""atheris: header filtering in both directions (``gateway.headers``).

Properties of ``upstream_headers``: no header the gateway strips (identity headers in any
spelling, hop-by-hop ones, every ``X-Forwarded-*``, names listed in ``Connection``) survives
unless the gateway set it; the gateway's values are the ones sent; the gateway's own cookies
never reach the upstream. Of ``client_headers``: no hop-by-hop header and no ``Set-Cookie``
for one of the gateway's cookies (by its exact name, the rule browsers apply) reaches the
client. The browser spellings of issue 7 item 1 (``=name=value``, attribute case,
``__Host-`` variants) are checked by tests/fuzz/test_headers.py.
"""

from __future__ import annotations

import sys

import atheris
from multidict import CIMultiDict, CIMultiDictProxy

with atheris.instrument_imports(include=["gateway"], enable_loader_override=False):
    from gateway.headers import (
        HOP_BY_HOP,
        OwnCookies,
        client_headers,
        normalize,
        set_cookie_name,
        upstream_headers,
    )

STRIP = frozenset({"x-forwarded-user", "x-forwarded-email", "x-forwarded-groups",
                   "x-gateway-assertion", "authorization"})  # fmt: skip
INJECT = {"X-Forwarded-User": "alice", "Authorization": "Bearer real"}
OWN_COOKIES = OwnCookies(names=("gw", "gw-logout"), prefixes=("gw-login-",))
NAMES = ["X-Forwarded-User", "x_forwarded_user", "X-FORWARDED-EMAIL", "Authorization",
         "Connection", "Cookie", "cookie", "Host", "Content-Length", "Transfer-Encoding",
         "X-Gateway-Assertion", "X-Forwarded-For", "Forwarded", "Upgrade", "Keep-Alive",
         "Set-Cookie", "set-cookie", "X-Other", "TE", "Proxy-Authorization"]  # fmt: skip
VALUES = ["gw=stolen", "gw-login-0=x; a=b", "a=b; gw=x", " gw =x", "gw-logout=1",
          "X-Other, X-Forwarded-For", "close", "keep-alive, X-Other", "upgrade", "alice"]  # fmt: skip


def _headers(fdp: atheris.FuzzedDataProvider) -> CIMultiDictProxy[str]:
    out: CIMultiDict[str] = CIMultiDict()
    for _ in range(fdp.ConsumeIntInRange(0, 12)):
        name = (
            fdp.PickValueInList(NAMES) if fdp.ConsumeBool() else fdp.ConsumeUnicodeNoSurrogates(12)
        )
        value = (
            fdp.PickValueInList(VALUES) if fdp.ConsumeBool() else fdp.ConsumeUnicodeNoSurrogates(30)
        )
        out.add(name, value)
    return CIMultiDictProxy(out)


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    sent = _headers(fdp)
    websocket = fdp.ConsumeBool()
    out = upstream_headers(
        sent, strip=STRIP, inject=INJECT, own_cookies=OWN_COOKIES, forwarded_for="10.0.0.1",
        forwarded_proto="https", forwarded_host="gw.example", host="up.example",
        keep_content_length=fdp.ConsumeBool(), websocket=websocket,
    )  # fmt: skip
    injected = {normalize(n) for n in INJECT}
    for name, value in out.items():
        key = normalize(name)
        if key in injected:
            assert value == INJECT[next(n for n in INJECT if normalize(n) == key)], (name, value)
        else:
            assert key not in STRIP, name
        assert key not in HOP_BY_HOP, name
        if key.startswith("x-forwarded-") and key not in injected:
            expected = {"x-forwarded-for": "10.0.0.1", "x-forwarded-proto": "https",
                        "x-forwarded-host": "gw.example"}  # fmt: skip
            assert expected.get(key) == value, (name, value)
        if key == "cookie":
            for pair in value.split(";"):
                assert not OWN_COOKIES.matches(pair.partition("=")[0]), value
    assert out["Host"] == "up.example"
    for name in INJECT:
        assert out.getall(name) == [INJECT[name]], name

    answer = client_headers(_headers(fdp), OWN_COOKIES)
    for name, value in answer.items():
        key = normalize(name)
        assert key not in HOP_BY_HOP, name
        if key == "set-cookie":
            assert not OWN_COOKIES.matches(set_cookie_name(value)), value


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()

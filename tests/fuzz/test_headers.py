"""Set-Cookie headers an upstream sends for the gateway's own cookies, in every spelling a
browser accepts (issue 7 item 1), against ``gateway.headers.client_headers``."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.headers import OwnCookies, client_headers
from tests.fuzz.profiles import FUZZ, TRIED

pytestmark = pytest.mark.fuzz

OWN = frozenset({"gw", "gw-logout", "gw-login-0"})


@st.composite
def planted_cookies(draw: st.DrawFn) -> str:
    """A Set-Cookie a browser would store as one of the gateway's cookies."""
    name = draw(st.sampled_from(sorted(OWN)))
    spelled = draw(st.sampled_from([f"{name}=v", f" {name} = v", f"={name}=v", f"{name}=v;"]))
    attrs = draw(st.lists(st.sampled_from(["Path=/", "PATH=/", "HttpOnly", "secure",
                                           "SameSite=None", "Max-Age=99", "Domain=gw.example"]),
                          max_size=3))  # fmt: skip
    return "; ".join([spelled.rstrip(";"), *attrs])


@FUZZ
@given(cookie=planted_cookies(), name=st.sampled_from(["Set-Cookie", "set-cookie", "SET-COOKIE"]))
def test_an_upstream_never_plants_the_gateways_cookies(cookie: str, name: str) -> None:
    TRIED["headers: planted Set-Cookie"] += 1
    # Whatever the request carried: the gateway's own cookie names decide.
    own = OwnCookies(names=("gw", "gw-logout"), prefixes=("gw-login-",))
    out = client_headers(CIMultiDictProxy(CIMultiDict([(name, cookie)])), own)
    assert out.getall("Set-Cookie", []) == [], cookie

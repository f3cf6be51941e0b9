#!/usr/bin/env python3
"""atheris: redirect targets (``gateway.redirects``) and the sign-in URL built for a request.

Properties: ``safe_redirect`` never raises; a target it accepts is, read the way a browser
reads a Location, on our origin or an allowlisted one; ``same_origin_path`` of an accepted
own-origin target is a path on our origin; and the ``rd`` that ``start_url`` builds for any
normalized request path and query is accepted and leads back to that path.
"""

from __future__ import annotations

import os
import sys
from urllib.parse import parse_qs, urlsplit

import atheris

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

with atheris.instrument_imports(include=["gateway"], enable_loader_override=False):
    from gateway.paths import start_url_for
    from gateway.policy import PathRejected, normalize_path
    from gateway.redirects import MAX_REDIRECT_LEN, safe_redirect, same_origin_path

from tests.fuzz.urls import browser_target, origin_of

OWN = "https://gw.example:8443"
ALLOWED = ("https://allowed.example",)


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    target = fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 300))
    ok = safe_redirect(target, OWN, ALLOWED)
    if ok is not None:
        landing = browser_target(OWN, ok)
        assert origin_of(landing) in {OWN, *ALLOWED}, (target, landing)
        sent = same_origin_path(ok, OWN)
        assert origin_of(browser_target(OWN, sent)) in {OWN, *ALLOWED}, (target, sent)
    # The gate's login redirect for a request to this path and query.
    raw_path, _, query = fdp.ConsumeUnicodeNoSurrogates(200).partition("?")
    try:
        path = normalize_path("/" + raw_path.lstrip("/"))
    except PathRejected:
        return
    if any(ord(c) < 0x21 or ord(c) == 0x7F or c in "\\" for c in query):
        return  # a raw query byte that never reaches the gateway from an HTTP parser
    url = start_url_for(path, query)
    rd = parse_qs(urlsplit(url).query, keep_blank_values=True).get("rd", [""])[0]
    if len(rd) > MAX_REDIRECT_LEN:
        return  # a deep link this long is refused at sign-in (a 400; see docs/fuzzing.md)
    back = safe_redirect(rd, OWN, ALLOWED)
    assert back is not None, (path, query, rd)
    assert normalize_path(urlsplit(browser_target(OWN, back)).path) == path, (path, rd)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()

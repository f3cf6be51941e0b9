#!/usr/bin/env python3
"""atheris: request-path normalisation (``gateway.policy.normalize_path``) and route matching.

Properties: only ``PathRejected`` is ever raised; a normalized path starts with one ``/``,
has no empty, ``.`` or ``..`` segment and no control character; normalizing it again (as
the upstream receives it, percent-encoded) gives the same path; the route table picks the
same route for it. Run: ``python tests/fuzz/atheris_paths.py [libFuzzer flags] [corpus]``.
"""

from __future__ import annotations

import sys
from urllib.parse import quote

import atheris

with atheris.instrument_imports(include=["gateway"], enable_loader_override=False):
    from gateway.config import RouteSettings
    from gateway.policy import PathRejected, RouteTable, normalize_path

ROUTES = RouteTable(
    [
        RouteSettings(prefix=p, upstream="http://127.0.0.1:9")
        for p in ("/", "/public", "/admin", "/api", "/api/admin", "/oauth2")
    ]
)


def test_one_input(data: bytes) -> None:
    raw = data.decode("utf-8", "surrogateescape")
    try:
        path = normalize_path(raw)
    except PathRejected:
        return
    assert path.startswith("/"), path
    segments = path.split("/")[1:]
    if path.endswith("/") and path != "/":
        segments = segments[:-1]
    assert path == "/" or all(s not in ("", ".", "..") for s in segments), path
    assert not any(ord(c) < 0x20 or ord(c) == 0x7F for c in path), path
    again = normalize_path(quote(path, safe="/"))
    assert again == path, (raw, path, again)
    assert _route(path) is _route(again)


_REJECTED = object()


def _route(path: str) -> object:
    """The route for ``path``, or ``_REJECTED`` for a spelling folded onto another route."""
    try:
        return ROUTES.match(path)
    except PathRejected:
        return _REJECTED


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()

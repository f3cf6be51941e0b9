"""Pure decisions: the normalized path, which route serves it, and whether an identity may pass.

No I/O. One normalized path decides the route and is what the upstream receives
(SECURITY.md 17): the raw request path is percent-decoded once, dot segments are resolved
(RFC 3986 §5.2.4) and repeated slashes folded; encodings whose meaning differs between
servers (``%2F``, ``%5C``, ``\\``, ``;`` parameters, NUL and control bytes) are refused.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

from gateway.config import RouteSettings
from gateway.session import Identity

_AMBIGUOUS = re.compile(r"%(2[fF]|5[cC]|00|25)")
_HEX = re.compile(r"%(?![0-9A-Fa-f]{2})")
MAX_PATH = 8192


class PathRejected(ValueError):
    """The request path cannot be served unambiguously."""


def normalize_path(raw_path: str) -> str:
    """The decoded, dot-resolved, slash-folded path; raise PathRejected when ambiguous."""
    path = raw_path.split("?", 1)[0].split("#", 1)[0]
    if not path.startswith("/") or len(path) > MAX_PATH:
        raise PathRejected("the path must start with / and be of reasonable length")
    if _AMBIGUOUS.search(path) or _HEX.search(path) or "\\" in path or ";" in path:
        raise PathRejected(
            "encoded slashes, backslashes, '%', ';' and NUL are not accepted in paths"
        )
    try:
        decoded = unquote_to_bytes(path).decode("utf-8", "strict")
    except UnicodeError:  # also bytes that are not UTF-8 in a surrogate-escaped str
        raise PathRejected("the path is not valid UTF-8") from None
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in decoded) or "\\" in decoded or ";" in decoded:
        raise PathRejected("control characters, backslashes and ';' are not accepted in paths")
    out: list[str] = []
    segments = decoded.split("/")
    for seg in segments[1:]:
        if seg in ("", "."):
            continue
        if seg == "..":
            if out:
                out.pop()
            continue
        out.append(seg)
    trailing = decoded.endswith("/") or segments[-1] in (".", "..")
    result = "/" + "/".join(out)
    if trailing and out:
        result += "/"
    return result


@dataclass(frozen=True, slots=True)
class Route:
    index: int
    settings: RouteSettings
    prefix: str

    def matches(self, path: str) -> bool:
        p = self.prefix
        if p == "/" or path == p.rstrip("/") or path.startswith(p if p.endswith("/") else p + "/"):
            return True
        return False

    @property
    def public(self) -> bool:
        return self.settings.auth == "none"


class RouteTable:
    """Longest matching prefix wins; a prefix matches whole segments only (/api ≠ /apix)."""

    def __init__(self, routes: Sequence[RouteSettings]) -> None:
        self.routes = tuple(
            sorted(
                (Route(i, r, r.prefix) for i, r in enumerate(routes)),
                key=lambda r: len(r.prefix),
                reverse=True,
            )
        )

    def match(self, path: str) -> Route | None:
        for route in self.routes:
            if route.matches(path):
                return route
        return None


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    reason: str = ""


def email_in_domains(email: str, domains: Sequence[str]) -> bool:
    """Exactly one '@' and a domain that equals one listed (case-insensitive)."""
    if email.count("@") != 1:
        return False
    local, domain = email.split("@")
    if not local or not domain:
        return False
    return domain.lower() in {d.lower().lstrip("@") for d in domains}


def check_requirements(route: RouteSettings, identity: Identity, scopes: Sequence[str]) -> Decision:
    """Every non-empty ``require`` list must be met (AND across lists, OR within one)."""
    req = route.require
    if req.scopes and not set(req.scopes) <= set(scopes):
        return Decision(False, "missing scope")
    if req.groups and not set(req.groups) & set(identity.groups):
        return Decision(False, "not in a required group")
    email = identity.email
    # Absent means the provider does not say; some providers (Amazon Cognito) send "false".
    flag = identity.claims.get("email_verified", True)
    verified = flag is not False and not (isinstance(flag, str) and flag.lower() == "false")
    if req.emails or req.email_domains:
        if not email or not verified or email.count("@") != 1:
            return Decision(False, "no verified email")
        ok_email = bool(req.emails) and email.lower() in {e.lower() for e in req.emails}
        ok_domain = bool(req.email_domains) and email_in_domains(email, req.email_domains)
        if not (ok_email or ok_domain):
            return Decision(False, "email not allowed")
    return Decision(True)

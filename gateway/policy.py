"""Pure decisions: the normalized path, which route serves it, and whether an identity may pass.

No I/O. One normalized path decides the route and is what the upstream receives: the raw
request path is percent-decoded once, dot segments are resolved (RFC 3986 §5.2.4) and
repeated slashes folded; encodings whose meaning differs between servers (``%2F``, ``%5C``,
``\\``, ``;`` parameters, NUL, C0/C1 controls, Unicode format characters) are refused.

Routes are chosen on that path and, as well, on the spelling a folding upstream would serve
(``route_key``): NFKC, NTFS stream suffixes and trailing dots and spaces of each segment
dropped (Windows, IIS), and, with ``server.case_insensitive_routes``, lowercase. When the two
spellings would be served by different routes the path is refused, so no spelling falls to a
weaker route.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

from gateway.config import RouteSettings
from gateway.session import Identity

_AMBIGUOUS = re.compile(r"%(2[fF]|5[cC]|00|25)")
_HEX = re.compile(r"%(?![0-9A-Fa-f]{2})")
# After decoding: C0 and C1 controls, DEL, backslashes and ';' (format characters: _is_format).
_REFUSED = re.compile("[\x00-\x1f\x7f-\x9f\\\\;]")
# ASCII characters a folding upstream drops at the end of a segment (see _fold_segment).
_ASCII_TRAILING = frozenset(". \t\n\v\f\r\x1c\x1d\x1e\x1f")
_ASCII_FOLDABLE = re.compile("[. \t\n\v\f\r\x1c-\x1f](?:/|$)")
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
    if _REFUSED.search(decoded) or (not decoded.isascii() and any(map(_is_format, decoded))):
        raise PathRejected(
            "control, zero-width and format characters, backslashes and ';' are not accepted"
            " in paths"
        )
    out: list[str] = []
    segments = decoded.split("/")
    for seg in segments[1:]:
        if seg in ("", "."):
            continue
        if seg == "..":
            if out:
                out.pop()
            continue
        if (seg[-1] in _ASCII_TRAILING or not seg.isascii()) and not _fold_segment(
            seg, streams=False
        ):
            # Only dots and spaces ("...", ". ", "%20"): Windows reads it as "." or "..".
            raise PathRejected("a path segment of only dots and spaces is not accepted")
        out.append(seg)
    trailing = decoded.endswith("/") or segments[-1] in (".", "..")
    result = "/" + "/".join(out)
    if trailing and out:
        result += "/"
    return result


def _is_format(c: str) -> bool:
    """Unicode format characters (category Cf: U+200B, U+FEFF, U+00AD, bidi marks...), which
    some upstreams drop or ignore when they match a path."""
    return c > "\x9f" and unicodedata.category(c) == "Cf"


def _fold_segment(seg: str, *, streams: bool = True) -> str:
    """A segment as Windows/IIS and NFKC-folding servers read it: compatibility-normalized,
    an NTFS stream suffix dropped (``admin::$DATA`` is ``admin``) when ``streams``, then
    trailing dots and (Unicode) spaces dropped (``admin.`` and ``admin%20`` are ``admin``)."""
    if seg.isascii():
        if seg[-1:] not in _ASCII_TRAILING and ":" not in seg:
            return seg  # the common case, unchanged
    else:
        seg = unicodedata.normalize("NFKC", seg)
    if streams:
        seg = seg.partition(":")[0]
    end = len(seg)
    while end and (seg[end - 1] == "." or seg[end - 1].isspace()):
        end -= 1
    return seg[:end]


def route_key(path: str, *, lowercase: bool = False, fold: bool = True) -> str:
    """The spelling routes are compared in: each segment folded (``_fold_segment``) when
    ``fold``, and lowercased when routes are case-insensitive."""
    if fold and (not path.isascii() or ":" in path or _ASCII_FOLDABLE.search(path)):
        path = "/".join(_fold_segment(seg) if seg else seg for seg in path.split("/"))
    return path.lower() if lowercase else path


def _prefix_matches(prefix: str, path: str) -> bool:
    return (
        prefix == "/"
        or path == prefix.rstrip("/")
        or path.startswith(prefix if prefix.endswith("/") else prefix + "/")
    )


@dataclass(frozen=True, slots=True)
class Route:
    index: int
    settings: RouteSettings
    prefix: str
    # ``prefix`` in the two spellings RouteTable compares (see ``route_key``).
    literal_key: str = ""
    folded_key: str = ""

    def matches(self, path: str) -> bool:
        return _prefix_matches(self.prefix, path)

    @property
    def public(self) -> bool:
        return self.settings.auth == "none"


class RouteTable:
    """Longest matching prefix wins; a prefix matches whole segments only (/api ≠ /apix).

    ``match`` compares the path as it is (lowercased with ``case_insensitive``) and as a
    folding upstream would read it; when the two would pick different routes the path is
    refused (PathRejected), so ``/admin.`` or ``/admin%20`` never falls to ``/``.
    """

    def __init__(self, routes: Sequence[RouteSettings], *, case_insensitive: bool = False) -> None:
        self.case_insensitive = case_insensitive
        self.routes = tuple(
            sorted(
                (
                    Route(
                        i,
                        r,
                        r.prefix,
                        route_key(r.prefix, lowercase=case_insensitive, fold=False),
                        route_key(r.prefix, lowercase=case_insensitive),
                    )
                    for i, r in enumerate(routes)
                ),
                key=lambda r: len(r.prefix),
                reverse=True,
            )
        )
        self._by_folded = tuple(sorted(self.routes, key=lambda r: len(r.folded_key), reverse=True))
        self._prefixes_fold_to_themselves = all(r.literal_key == r.folded_key for r in self.routes)

    def key(self, path: str) -> str:
        """The folded spelling of ``path`` that own-endpoint checks compare too."""
        return route_key(path, lowercase=self.case_insensitive)

    def match(self, path: str) -> Route | None:
        literal = route_key(path, lowercase=self.case_insensitive, fold=False)
        folded = self.key(path)
        chosen = next((r for r in self.routes if _prefix_matches(r.literal_key, literal)), None)
        if folded == literal and self._prefixes_fold_to_themselves:
            return chosen
        other = next((r for r in self._by_folded if _prefix_matches(r.folded_key, folded)), None)
        if other is not chosen:
            raise PathRejected(
                "this path is another spelling of a path served by a different route"
            )
        return chosen


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


def email_verified(identity: Identity, allow_missing: bool) -> bool:
    """The provider says the email is verified: ``email_verified`` true (or "true", as Amazon
    Cognito sends it). Without the claim, only when the route allows it (oauth2-proxy's
    default refuses); false, or anything else, never.
    """
    if "email_verified" not in identity.claims:
        return allow_missing
    flag = identity.claims["email_verified"]
    return flag is True or (isinstance(flag, str) and flag.lower() == "true")


def check_requirements(route: RouteSettings, identity: Identity, scopes: Sequence[str]) -> Decision:
    """Every non-empty ``require`` list must be met (AND across lists, OR within one)."""
    req = route.require
    if req.scopes and not set(req.scopes) <= set(scopes):
        return Decision(False, "missing scope")
    if req.groups and not set(req.groups) & set(identity.groups):
        return Decision(False, "not in a required group")
    email = identity.email
    if req.emails or req.email_domains:
        verified = email_verified(identity, req.allow_unverified_email)
        if not email or not verified or email.count("@") != 1:
            return Decision(False, "no verified email")
        ok_email = bool(req.emails) and email.lower() in {e.lower() for e in req.emails}
        ok_domain = bool(req.email_domains) and email_in_domains(email, req.email_domains)
        if not (ok_email or ok_domain):
            return Decision(False, "email not allowed")
    return Decision(True)

"""Where a browser may be sent: same-origin paths, or origins on an explicit allowlist.

Guards ``rd`` on /oauth2/start, the stored return path, and sign-out targets against open
redirects (RFC 9700 §4.11.1, SECURITY.md 9). Anything doubtful is refused, not repaired.
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import unquote, urlsplit

MAX_REDIRECT_LEN = 2048


def _origin(scheme: str, netloc: str) -> str:
    return f"{scheme.lower()}://{netloc.lower()}"


def safe_redirect(target: str | None, own_origin: str, allowed: Iterable[str] = ()) -> str | None:
    """The target if it is safe to redirect to, else None.

    Accepted: a path starting with a single ``/`` (no ``//``, no ``/\\`` in any encoding), or an
    absolute http(s) URL without credentials whose origin is ours or allowlisted.
    """
    if not target or len(target) > MAX_REDIRECT_LEN:
        return None
    # A raw space is refused (browsers strip leading ones: " //evil" is "//evil"); an
    # encoded one (``?q=a%20b`` in a deep link) is fine, since it only ever decodes to a
    # space inside a path or query. Tabs, CR/LF and other controls are refused in every
    # layer: the WHATWG URL parser drops them, turning "/\t/evil" into "//evil".
    if " " in target:
        return None
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in target) or "\\" in target:
        return None
    # Percent-encoding is looked through up to the query only: after '?' or '#' nothing
    # decoded can change where a browser goes, and a deep link's query may carry any
    # encoded byte (a newline typed into a search box, a Windows path).
    cut = min((i for i in (target.find("?"), target.find("#")) if i >= 0), default=len(target))
    decoded = target[:cut]
    for _ in range(3):  # look through up to three layers of percent-encoding
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in decoded) or "\\" in decoded:
            return None
        nxt = unquote(decoded)
        if nxt == decoded:
            break
        decoded = nxt
    if target.startswith("/"):
        if decoded.startswith("//") or target.startswith("//"):
            return None
        parts = urlsplit(target)
        if parts.scheme or parts.netloc:
            return None
        return target
    parts = urlsplit(target)
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        return None
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        return None
    try:
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        return None
    origin = _origin(parts.scheme, parts.netloc)
    if origin == own_origin.lower() or origin in {a.lower() for a in allowed}:
        return target
    return None


def same_origin_path(target: str, own_origin: str) -> str:
    """An accepted target as what to send: our own absolute URLs become paths, unless the
    path alone would read as another origin (``https://us//evil.example`` stays absolute:
    as ``//evil.example`` a browser would leave for evil.example)."""
    if target.lower().startswith(own_origin.lower() + "/"):
        path = target[len(own_origin) :]
        return path if safe_redirect(path, own_origin) == path else target
    if target.lower() == own_origin.lower():
        return "/"
    return target

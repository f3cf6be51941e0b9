"""Where a browser goes for a Location: the reference the fuzz properties judge redirects by.

No dependencies beyond the standard library, so the atheris harnesses can use it.
"""

from __future__ import annotations

import re
from urllib.parse import urljoin, urlsplit

_C0_AND_SPACE = "".join(chr(c) for c in range(0x21))


def browser_target(base: str, location: str) -> str:
    """WHATWG URL parsing in short: leading/trailing C0 controls and spaces trimmed, tab and
    newline removed anywhere, ``\\`` read as ``/`` in http(s) URLs, then resolved on ``base``."""
    loc = location.strip(_C0_AND_SPACE)
    loc = re.sub(r"[\t\n\r]", "", loc).replace("\\", "/")
    return urljoin(base + "/", loc)


def origin_of(url: str) -> str:
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        return "invalid:"
    return f"{parts.scheme.lower()}://{(parts.hostname or '').lower()}" + (
        f":{port}" if port else ""
    )

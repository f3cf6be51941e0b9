"""``gateway healthcheck``: GET ``/healthz`` of the gateway on this machine, exit 0 or 1.

For a container image's ``HEALTHCHECK`` (there is no curl in the image). The address comes
from the config's ``server.host``/``server.port`` (a wildcard bind is asked on loopback), or
from ``--url``. Standard library only, so it starts fast and never needs the event loop.
"""

from __future__ import annotations

import http.client
import ipaddress
from urllib.parse import urlsplit

from gateway.config import Settings


def healthz_url(settings: Settings) -> str:
    """``http://<host>:<port>/healthz`` for the configured bind address."""
    host = settings.server.host
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if address is not None and address.is_unspecified:
        host = "::1" if address.version == 6 else "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.server.port}/healthz"


def check(url: str, timeout: float = 5.0) -> tuple[bool, str]:
    """(healthy, one line saying why): healthy only for a 200 answer."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return False, f"not an http(s) URL: {url}"
    conn_type = (
        http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    )
    conn = conn_type(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request("GET", parts.path or "/", headers={"User-Agent": "gateway-healthcheck"})
        status = conn.getresponse().status
    except (OSError, http.client.HTTPException) as exc:
        return False, f"{url}: {exc.__class__.__name__}: {exc}"
    finally:
        conn.close()
    if status != 200:
        return False, f"{url}: HTTP {status}"
    return True, f"{url}: HTTP 200"

"""Raw HTTP over a socket: requests sent byte for byte, answers read until the server closes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from multidict import CIMultiDict
from yarl import URL


@dataclass
class RawResponse:
    status: int | None  # None: the server closed without a status line
    headers: CIMultiDict[str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def _dechunk(body: bytes) -> bytes:
    out = b""
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += rest[:size]
        body = rest[size + 2 :]
    return out


async def raw_request(url: str, data: bytes, timeout: float = 15.0) -> RawResponse:
    """Send ``data`` as-is to the server of ``url``; read the answer until the server closes."""
    u = URL(url)
    reader, writer = await asyncio.open_connection(u.host, u.port)
    try:
        writer.write(data)
        await writer.drain()
        raw = b""
        async with asyncio.timeout(timeout):
            while chunk := await reader.read(65536):
                raw += chunk
    except ConnectionResetError:
        raw = b""
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except ConnectionError:
            pass
    if not raw.startswith(b"HTTP/"):
        return RawResponse(None, CIMultiDict(), raw)
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.add(name.strip(), value.strip())
    if "chunked" in headers.get("Transfer-Encoding", "").lower():
        body = _dechunk(body)
    return RawResponse(status, headers, body)


def raw_get(
    target: str, host: str, headers: Sequence[tuple[str, str]] = (), method: str = "GET"
) -> bytes:
    """A request as bytes, exactly as written (Connection: close, so the answer ends)."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
